"""Fused softmax attention (FlashAttention-2 algorithm): Triton kernels and host launchers.

Layout: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with any strides; Hq = GROUP * Hkv (MHA, GQA, MQA).
Packed variable-length batches (VARLEN) use the same kernels on [1, H, total, D] views: the
program's "batch" index is then the sequence, whose token range comes from cu_seqlens.

Grids are one axis (CUDA takes 2^31 - 1 programs on x, 65,535 on y and z): each kernel is a thin
wrapper that decodes (tile, head, batch) from the program id and calls its `_tile` function; for
packed sequences the wrapper loops over the tiles of a sequence longer than the grid assumed.

Scores, in this order (all optional except the first, each a constexpr switch):
    s = scale * q kᵀ                                 (natural units; exp2((s - max) * log2 e))
    s = softcap * tanh(s / softcap)                  SOFTCAP (Gemma-2)
    s += -slope_h * |i + Nk - Nq - j|                HAS_ALIBI
    s += attn_mask[b, h, i, j]                       MASK_KIND 2 (additive float)
    masked: attn_mask False (MASK_KIND 1), key_padding_mask True (HAS_KPM),
            j > i + Nk - Nq + right (WIN_RIGHT; causal is right = 0),
            j < i + Nk - Nq - left (WIN_LEFT)
    P = softmax(s); dropout (DROPOUT) zeroes P with probability p (Philox4x32-7, one draw
    per 8 keys: key j is 16-bit half j % 2 of word (j // 8) % 4 of the draw at counter
    (4 (j // 32) + (j % 8) // 2, lse row), _common._dropout_keep) and the output is
    rescaled by 1 / (1 - p).
Key tiles that the window leaves fully masked, and (with a key padding mask) tiles outside
each sequence's first..last valid key, are never visited; tiles fully inside the window run
without evaluating the window masks.

Forward only (varlen inference): PAGED reads K/V from paged caches [num_blocks, Hkv, page, D]
through a block table (key j of sequence s: slot j % page of block table[s, j // page]),
SEQUSED limits sequence s to its first seqused_k[s] keys (options._paging).

Where things live (one room per concern):
    _common.py   the score pipeline, key ranges, sequence bounds, dropout bits, program-id decode
    forward.py   the forward kernel;  backward.py  the three backward kernels
    configs.py   tile tables (interpreter and GPU, per variant), with their AOT provenance
    options.py   `Options` (what a call asks for) -> the kernels' runtime args and switches
    launch.py    launch plans (what `inspect` compiles) and the launchers the ops call
A new switch: a constexpr in options._features, then the signatures and call sites of the
kernel files (kernel -> tile body -> inner sweep; constexprs by keyword), and if it changes what
a score is, `_scores` in _common.py.

This package knows nothing of autograd: launchers take tensors and return tensors.
"""
from ._common import _dropout_keep, _dropout_mask_kernel, _key_range, _load_lse, _scores, _seq_info
from .backward import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .configs import (GPU_CONFIGS, INTERPRETER_CONFIGS, PREPROCESS_BLOCK_M, VARIANT_CONFIGS,
                      _block_d, _cfg, configs_for, interpreter_configs)
from .forward import _attn_fwd
from .launch import (attention_backward, attention_forward, dropout_keep_mask,
                     lse_residual_for, plan_backward, plan_forward)
from .options import Options, _dot_precision, _features
from .._launch import is_interpreted
