"""Fused attention: torch.library custom ops, autograd, and the public `attention` /
`varlen_attention` functions.

Layers (as in flash-attention's interface): `tritformer::attention_fwd` / `attention_bwd` custom
ops around the kernel launchers, `register_fake` allocating output shapes only, and
`register_autograd` wiring the backward, so `torch.compile(fullgraph=True)` traces through.
On the "torch" backend (CPU without Triton's interpreter) the public functions run
`tritformer.fallback` (torch's SDPA) under autograd instead of the custom ops.

Internally a window is (left, right): key j is visible to query i iff
i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right, None = unbounded on that side. causal is
right = 0; `window=(l, r)` maps -1 to None; SDPA's top-left causal is right = Nq - Nk.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import fallback, reference
from .._autocast import autocast
from .._checks import (check_attention_inputs, check_attention_options, check_flag,
                       check_varlen_inference_only, check_varlen_inputs)
from ..backend import backend_for, is_torch


def _kernels():
    from tritformer.kernels import attention as K  # imported at first use: see backend.py
    return K


def _options(scale, left, right, attn_mask, key_padding_mask, alibi_slopes, cu_seqlens_q,
             cu_seqlens_k, seed, softcap, dropout_p, max_seqlen_q, max_seqlen_k,
             seqlens_checked=False):
    return _kernels().Options(
        scale=scale, left=left, right=right, attn_mask=attn_mask,
        key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes, softcap=softcap,
        dropout_p=dropout_p, seed=0 if seed is None else int(seed.item()),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_checked=seqlens_checked)


def _default_scale(q, scale):
    """scale None = 1/sqrt(D), computed inside the ops: under torch.compile(dynamic=True) D is a
    SymInt and a SymFloat passed as a float argument would specialise the graph on D."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                   alibi_slopes: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                   scale: Optional[float], left: Optional[int], right: Optional[int], softcap: float,
                   dropout_p: float, max_seqlen_q: int, max_seqlen_k: int,
                   seqlens_checked: bool = False, deterministic: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out, lse, and lse_lo: lse's rounding residual for the backward (fp32 inputs; else empty).
    deterministic: the backward's path (read by the autograd formula, not the forward).

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (varlen: B = 1, N = total tokens, cu_seqlens set);
    attn_mask expanded to [B, Hq, Nq, Nk] (a stride-0 view where broadcast). seqlens_checked:
    (varlen) max_seqlen_* are known to bound every sequence (checked on the host); when not
    (under torch.compile) the kernels loop over tiles past them."""
    opts = _options(_default_scale(q, scale), left, right, attn_mask, key_padding_mask,
                    alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softcap, dropout_p,
                    max_seqlen_q, max_seqlen_k, seqlens_checked)
    return _kernels().attention_forward(q, k, v, opts)


@_attention_fwd.register_fake
def _(q, k, v, attn_mask, key_padding_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
      scale, left, right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, seqlens_checked=False,
      deterministic=True):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    lse_lo = (torch.empty_like(lse) if _kernels().lse_residual_for(q.dtype)
              else lse.new_empty(0))
    return torch.empty_like(q), lse, lse_lo


@torch.library.custom_op("tritformer::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                   attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                   alibi_slopes: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                   scale: Optional[float], left: Optional[int], right: Optional[int], softcap: float,
                   dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, mask_grad: bool,
                   seqlens_checked: bool = False, lse_lo: Optional[torch.Tensor] = None,
                   deterministic: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, and d(attn_mask) [B, Hq, Nq, Nk] float32 when mask_grad (else empty).
    deterministic: separate dK/dV and dQ kernels (bitwise reproducible); else one fused kernel
    with dQ accumulated by fp32 atomics (kernels.attention.plan_backward)."""
    opts = _options(_default_scale(q, scale), left, right, attn_mask, key_padding_mask,
                    alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softcap, dropout_p,
                    max_seqlen_q, max_seqlen_k, seqlens_checked)
    return _kernels().attention_backward(do, q, k, v, out, lse, opts, dlse, mask_grad, lse_lo,
                                         deterministic)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, attn_mask, key_padding_mask, alibi_slopes, cu_seqlens_q,
      cu_seqlens_k, seed, scale, left, right, softcap, dropout_p, max_seqlen_q, max_seqlen_k,
      mask_grad, seqlens_checked=False, lse_lo=None, deterministic=True):
    dmask = (q.new_empty((*q.shape[:3], k.shape[2]), dtype=torch.float32) if mask_grad
             else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, kpm, alibi, cu_q, cu_k, seed = inputs[:9]
    out, lse, lse_lo = output
    ctx.save_for_backward(q, k, v, out, lse, lse_lo, attn_mask, kpm, alibi, cu_q, cu_k, seed)
    # scale .. max_seqlen_k, seqlens_checked, deterministic (defaults filled in when omitted)
    ctx.scalars = tuple(inputs[9:]) + (False, True)[len(inputs) - 16:]
    ctx.mask_grad = (attn_mask is not None and attn_mask.dtype != torch.bool
                     and ctx.needs_input_grad[3])


def _backward(ctx, dout, dlse, _dlse_lo):
    q, k, v, out, lse, lse_lo, attn_mask, kpm, alibi, cu_q, cu_k, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    *scalars, seqlens_checked, deterministic = ctx.scalars
    dq, dk, dv, dmask = torch.ops.tritformer.attention_bwd(
        dout, q, k, v, out, lse, dlse, attn_mask, kpm, alibi, cu_q, cu_k, seed, *scalars,
        ctx.mask_grad, seqlens_checked, lse_lo, deterministic)
    dmask = dmask.to(attn_mask.dtype) if ctx.mask_grad else None
    return (dq, dk, dv, dmask) + (None,) * 14


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("tritformer::varlen_paged_fwd", mutates_args=())
def _varlen_paged_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      block_table: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
                      alibi_slopes: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      scale: Optional[float], left: Optional[int], right: Optional[int],
                      softcap: float, dropout_p: float, max_seqlen_q: int, max_seqlen_k: int,
                      seqlens_checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """varlen forward over a paged KV cache and/or seqused_k (inference: no autograd formula).

    q [1, Hq, total_q, D]; k/v [num_blocks, Hkv, page, D] views of the paged caches when
    block_table is given (else [1, Hkv, total_k, D]). Returns out and lse [1, Hq, total_q]."""
    opts = _options(_default_scale(q, scale), left, right, None, None, alibi_slopes,
                    cu_seqlens_q, cu_seqlens_k, seed, softcap, dropout_p, max_seqlen_q,
                    max_seqlen_k, seqlens_checked)
    opts.block_table, opts.seqused_k = block_table, seqused_k
    out, lse, _ = _kernels().attention_forward(q, k, v, opts)
    return out, lse


@_varlen_paged_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, alibi_slopes, seed, scale,
      left, right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, seqlens_checked):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Shared driver
# ---------------------------------------------------------------------------------------------
def _dropout_seed(dropout_p: float) -> Optional[torch.Tensor]:
    """A Philox seed drawn from torch's default CPU generator (torch.manual_seed reproduces it),
    as a tensor so that torch.compile traces the draw instead of breaking the graph."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64)


def _reference_dropout_mask(seed, dropout_p, shape, device):
    """Reference backend: the bool keep mask for `seed` (None without dropout), from a torch
    generator (deterministic per seed; a different stream from the kernels' Philox)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device).manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _scalars(q, scale, softcap, dropout_p):
    """(scale, softcap, dropout_p, seed) as the custom ops take them: scale None = 1/sqrt(D)
    (computed in the ops, see _default_scale), softcap 0 = off, a fresh dropout seed when
    dropout_p > 0."""
    scale = None if scale is None else float(scale)
    return scale, float(softcap) if softcap else 0.0, float(dropout_p), _dropout_seed(dropout_p)


# The backward path when a caller does not choose (`deterministic` of `attention` /
# `varlen_attention`): True, the separate dK/dV and dQ kernels (bitwise reproducible), or
# False, the fused kernel with dQ's fp32 atomics (5 GEMMs per tile pair instead of 7) where
# configs.py has a spill-free fused tile (16-bit, D <= 64, sm_80 / sm_90; elsewhere False
# runs the deterministic kernels). Chosen from `inspect --perf`'s estimates (README,
# "Backward paths"): the faster path by the model, or the deterministic one when the
# estimated gap is under 10%. Where the fused kernel runs it is estimated 14-23% faster per
# tile pair (Triton 3.9 and 3.7.1), so False, as FlashAttention's default.
DETERMINISTIC_DEFAULT = False


def backward_deterministic(deterministic: bool) -> bool:
    """The backward path of a call: `deterministic` (checked to be a bool), forced True while
    torch.use_deterministic_algorithms(True) is on (as PyTorch's own kernels)."""
    check_flag("deterministic", deterministic)
    return deterministic or torch.are_deterministic_algorithms_enabled()


def _attention(q, k, v, scale, left, right, return_lse=False, attn_mask=None,
               key_padding_mask=None, dropout_p=0.0, alibi_slopes=None, softcap=None,
               deterministic=True):
    """Dense attention on checked inputs; window as (left, right) offsets (module docstring)."""
    scale, softcap, dropout_p, seed = _scalars(q, scale, softcap, dropout_p)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if is_torch(backend_for(q)):  # CPU fallback: torch's SDPA (tritformer.fallback)
        keep = _reference_dropout_mask(seed, dropout_p, (B, Hq, Nq, Nk), q.device)
        out, lse = fallback.attention(q, k, v, scale, left, right, return_lse, attn_mask,
                                      key_padding_mask, dropout_p, alibi_slopes, softcap, keep)
        return (out, lse) if return_lse else out
    mask = None if attn_mask is None else attn_mask.expand(B, Hq, Nq, Nk)
    slopes = None if alibi_slopes is None else alibi_slopes.float().expand(B, Hq).contiguous()
    out, lse, _ = torch.ops.tritformer.attention_fwd(
        q, k, v, mask, key_padding_mask, slopes, None, None, seed, scale, left, right, softcap,
        dropout_p, 0, 0, False, deterministic)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
@autocast("q", "k", "v", "attn_mask")  # as SDPA: torch's lower-precision list
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False,
              attn_mask: Optional[torch.Tensor] = None,
              key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              window: Optional[tuple[int, int]] = None,
              alibi_slopes: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
              layout: str = "bhnd", deterministic: bool = DETERMINISTIC_DEFAULT):
    """Fused softmax attention, FlashAttention-2 style: softmax(score + bias, masked) v.

    Shapes below are for ``layout="bhnd"`` (the default). With ``layout="bnhd"`` q, k, v are
    [B, N, H, D] (FlashAttention's layout), read through transposed views (no copy), and out is
    returned as [B, Nq, Hq, D]; lse stays [B, Hq, Nq], masks keep their shapes. Shapes that fit
    only the other layout raise ValueError naming the layout to pass.

    Args:
        q: [B, Hq, Nq, D] queries. float16, bfloat16 or float32; any strides (a [B, N, H, D]
            tensor's ``.transpose(1, 2)`` view is read in place, no copy).
        k: [B, Hkv, Nk, D] keys, same dtype and device. Hq must be a multiple of Hkv:
            Hkv == Hq is multi-head, 1 < Hkv < Hq grouped-query (query head h reads kv head
            h // (Hq // Hkv)), Hkv == 1 multi-query attention.
        v: [B, Hkv, Nk, D] values.
        causal: mask key j for query i when j > i + (Nk - Nq): aligned to the bottom-right
            corner (FlashAttention's convention; torch SDPA's ``is_causal`` is top-left, see
            `tritformer.scaled_dot_product_attention`), so a block of new queries attends to a
            longer KV cache. With Nq=2, Nk=5 (1 = attend)::

                1 1 1 1 0
                1 1 1 1 1

            and with Nq=5, Nk=2 the first three queries see no key at all::

                0 0
                0 0
                0 0
                1 0
                1 1

            A query row with no visible key outputs 0 (lse = -inf) and gets zero gradient.
        scale: multiplier of q kᵀ before the softmax; default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the (masked, biased) scores.
        attn_mask: bool (True = attend, SDPA's meaning) or additive float, broadcastable to
            [B, Hq, Nq, Nk]; read tile by tile through broadcast strides, never expanded in
            memory. A float mask that requires grad gets its gradient.
        key_padding_mask: [B, Nk] bool, True = padding (nn.MultiheadAttention's meaning).
            Key tiles outside each sequence's first..last valid key are not visited.
        dropout_p: dropout on the attention probabilities, in [0, 1). The mask comes from an
            in-kernel Philox generator seeded from torch's default generator (so
            ``torch.manual_seed`` reproduces it); the backward regenerates the same mask.
        window: (left, right) sliding window as FlashAttention's ``window_size``: query i sees
            keys i + Nk - Nq - left .. i + Nk - Nq + right, -1 = unbounded. causal=True sets
            right = 0. Key tiles outside the window are skipped.
        alibi_slopes: [Hq] or [B, Hq]; adds -slope * |i + Nk - Nq - j| to the scores.
        softcap: scores become softcap * tanh(scores / softcap) before bias and mask (Gemma-2);
            None or 0 = off.
        layout: "bhnd" ([B, H, N, D]) or "bnhd" ([B, N, H, D]) for q, k, v and out.
        deterministic: the backward's path. True: separate dK/dV and dQ kernels, bitwise
            reproducible run to run. False: one fused kernel that accumulates dQ with fp32
            atomics (FlashAttention-2's 5 GEMMs per tile pair instead of 7), whose dQ may
            differ in the last bits between runs (dK, dV and a mask's gradient do not).
            The default is `DETERMINISTIC_DEFAULT` (README, "Backward": the figures behind
            it). ``torch.use_deterministic_algorithms(True)`` forces True.

    Returns:
        out [B, Hq, Nq, D] in q's dtype (and q's memory layout); with ``return_lse`` also
        lse [B, Hq, Nq] float32, natural log (unaffected by dropout). Gradients flow to q, k,
        v, a float attn_mask, and through lse.

    D may be 1..256 (any value; tiles are padded to a power of two on chip), Nq and Nk any
    length including 0 and 1. Where this runs: see ``tritformer.backend_for``.
    """
    from .._layout import from_bhnd, to_bhnd
    q, k, v = to_bhnd(q, k, v, layout)  # checks layout; "bnhd": transpose(1, 2) views
    if layout == "bnhd":
        return from_bhnd(attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                                   attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   dropout_p=dropout_p, window=window, alibi_slopes=alibi_slopes,
                                   softcap=softcap, deterministic=deterministic),
                         layout, return_lse)
    check_attention_inputs(q, k, v, scale)
    check_attention_options(q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            dropout_p=dropout_p, window=window, alibi_slopes=alibi_slopes,
                            softcap=softcap, causal=causal, return_lse=return_lse)
    deterministic = backward_deterministic(deterministic)
    left, right = reference.window_bounds(bool(causal), window)
    return _attention(q, k, v, scale, left, right, return_lse, attn_mask, key_padding_mask,
                      dropout_p, alibi_slopes, softcap, deterministic)


@autocast("q", "k", "v")  # as SDPA
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0,
                     window: Optional[tuple[int, int]] = None,
                     alibi_slopes: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None,
                     block_table: Optional[torch.Tensor] = None,
                     seqused_k: Optional[torch.Tensor] = None, return_lse: bool = False,
                     deterministic: bool = DETERMINISTIC_DEFAULT):
    """Attention over packed variable-length sequences (FlashAttention's varlen convention).

    q [total_q, Hq, D], k/v [total_k, Hkv, D]; sequence s holds query rows
    cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys cu_seqlens_k[s]:cu_seqlens_k[s+1] (int32,
    starting at 0, non-decreasing, ending at the totals). Each sequence attends only within
    itself; no padding is computed. max_seqlen_q / max_seqlen_k bound the lengths (they size
    the launch grid). causal / window / alibi_slopes ([Hq] or [num_seqs, Hq]) / softcap /
    dropout_p as in `attention`, aligned bottom-right within each sequence.

    Paged KV cache (prefill over a cache, FlashAttention's ``block_table``): with block_table
    int32 [num_seqs, max_blocks], k/v are the caches [num_blocks, page_block_size, Hkv, D]
    (any page size >= 1) and key j of sequence s is k[block_table[s, j // page], j % page];
    cu_seqlens_k still gives each sequence's length (FlashAttention 2's meaning; it need not
    end at any total). The kernel reads the pages in place, no gather. seqused_k int32
    [num_seqs] (FlashAttention 3's meaning, with or without block_table): sequence s uses only
    its first seqused_k[s] keys (at most its cu_seqlens_k length); causal / window / ALiBi
    align to that length. Table entries past the blocks a sequence uses are never read.
    Both are inference-only: there is no backward, and a call where q, k or v requires grad
    while grad mode is on raises RuntimeError (use torch.no_grad() or inference_mode()).

    deterministic: the backward's path, as in `attention`.

    Returns out [total_q, Hq, D] (and lse [Hq, total_q] float32 with ``return_lse``).
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                        block_table, seqused_k)
    n_seq = cu_seqlens_q.shape[0] - 1
    check_attention_options(q, k, dropout_p=dropout_p, window=window, alibi_slopes=alibi_slopes,
                            softcap=softcap, batch=n_seq, heads=q.shape[1], causal=causal,
                            return_lse=return_lse)
    check_varlen_inference_only(q, k, v, block_table, seqused_k)
    deterministic = backward_deterministic(deterministic)
    left, right = reference.window_bounds(bool(causal), window)
    scale, softcap, dropout_p, seed = _scalars(q, scale, softcap, dropout_p)
    if is_torch(backend_for(q)):  # CPU fallback: torch's SDPA per sequence (tritformer.fallback)
        keep = _reference_dropout_mask(seed, dropout_p, (q.shape[1], q.shape[0], max_seqlen_k),
                                       q.device)
        out, lse = fallback.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left,
                                             right, return_lse, dropout_p, alibi_slopes, softcap,
                                             keep, block_table=block_table, seqused_k=seqused_k)
        return (out, lse) if return_lse else out
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().expand(n_seq, q.shape[1]).contiguous()
    # [T, H, D] viewed as [1, H, T, D]: the kernels read the packed tokens through strides
    view = lambda t: t.transpose(0, 1).unsqueeze(0)
    # max_seqlen_* checked by check_varlen_inputs unless compiling
    checked = not torch.compiler.is_compiling()
    if block_table is not None or seqused_k is not None:
        # paged caches [num_blocks, page, Hkv, D] viewed [num_blocks, Hkv, page, D]: the
        # kernel's stride_kz steps one block
        kv = (lambda t: t.permute(0, 2, 1, 3)) if block_table is not None else view
        out, lse = torch.ops.tritformer.varlen_paged_fwd(
            view(q), kv(k), kv(v), cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, slopes,
            seed, scale, left, right, softcap, dropout_p, int(max_seqlen_q), int(max_seqlen_k),
            checked)
    else:
        out, lse, _ = torch.ops.tritformer.attention_fwd(
            view(q), view(k), view(v), None, None, slopes, cu_seqlens_q, cu_seqlens_k, seed,
            scale, left, right, softcap, dropout_p, int(max_seqlen_q), int(max_seqlen_k), checked,
            deterministic)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out
