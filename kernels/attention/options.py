"""What a call asks for (`Options`) and how it maps onto the kernels' switches (`_features`):
runtime arguments, constexprs, the grid's batch count, the config variant, the dot precision.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Options:
    """Everything beyond q, k, v (see the module docstring); tensors already on q's device.

    left/right: window offsets from the bottom-right diagonal, None = unbounded (causal:
    right = 0). attn_mask: [B, Hq, Nq, Nk] view (stride 0 where broadcast), bool or float.
    key_padding_mask: [B, Nk] bool, True = padding. alibi_slopes: [B, Hq] float32 (varlen:
    [num_seqs, Hq]). cu_seqlens_*: int32 [num_seqs + 1] for packed sequences; q/k/v are then
    [1, H, total, D] views and max_seqlen_* size the grid."""
    scale: float
    left: Optional[int] = None
    right: Optional[int] = None
    attn_mask: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqlens_checked: bool = False  # varlen: max_seqlen_* known to bound every sequence
    # varlen, forward only: block_table int32 [num_seqs, max_blocks] (k/v then paged caches
    # viewed [num_blocks, Hkv, page, D]) and seqused_k int32 [num_seqs] (keys used per sequence)
    block_table: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def _attn_dot_precision(dtype: torch.dtype, block_d: int, variant: str | None = None) -> str:
    """The attention kernels' DOT_PRECISION (forward and backward alike): _dot_precision's,
    except fp32 at BLOCK_D <= 16: "exact", which runs the dots listed below as
    _math.dot_f32_exact (three tf32 pieces per operand, six MMAs, products exact to ~2^-30
    and one rounding per k-step of 8). A score there is a short sum that often cancels, and the FMA chain's
    sequential rounding over D lost to PyTorch's vector-lane sum: one query, one key, D=16, lse
    4.1e-8 vs PyTorch 3.9e-9 (10.6x; the deep fuzz run, tests/test_fuzz.py), and D=8 out 4.9x
    (test_fp32_small_head_dim_sequential_pv). "exact" runs the forward's QK^T and P @ V and
    the backward's recomputed scores (they must be the forward's: P comes from its lse) and dP
    (dP - delta cancels to 0 for a single key); the backward's dV, dK and dQ dots stay FMA
    (_math.dot_prec_fma). Interpreter (its GPU dot model), one query and one key, 150 seeds:
    lse over the bound D=16 1/150 (FMA dots 7/150), D=8 0/150 (4/150). AOT at D=16 (sm_80 /
    sm_90, causal and not, MHA and GQA 4:1, Triton 3.9 and 3.7.1): plain and masked spill-free;
    the varlen dK/dV's 8-warp tiles, which ptxas holds to 80-128 registers, spill 40-48 B
    (sm_80 32x16/8/1 and 16x32/8/1, sm_90 32x16/8/1 GQA causal; FMA dots: 0 B). Kept: a
    performance cost in fp32 varlen at D <= 16 only, and varlen must run plain's arithmetic
    (tests/test_varlen.py compares them bitwise).

    fp32 at BLOCK_D 32..64: "exact_scores", the scores (the forward's QK^T, the backward's
    recompute) and dP as _math.dot_f32_exact, P @ V and the dV / dK / dQ dots in 3xTF32.
    3xTF32 products err by up to ~2^-21 of |q||k| (Triton's split keeps 11 of the 13 bits of
    x - tf32(x) and drops small x small) where PyTorch's fp32 product is exact; a score that
    nearly cancels carries that into lse and every P of its row: the deep fuzz run's lse 2.9x
    PyTorch's error at |q|, |k| ~ 4, D = 33 (now 0.31x), and the SDPA drop-in's 4.3-5.5x at
    E = 33 and 64 (tests/test_fuzz.py). P in [0, 1] times V and the gradients are sums of
    many terms where 3xTF32's relative error stays below the criterion's. The fp32 D <= 64
    tiles of every table were re-swept for it (configs.py; six MMAs per score tile need more
    registers and shared memory).

    fp32 at BLOCK_D 128: "exact_scores" too, for every variant (before: 3xTF32 scores in plain
    and varlen, the FMA chain in the masked tables; 3 queries with |q| ~ 4 over 2 keys failed
    the criterion in 1-6 of 40 seeds at D = 80 and 128, up to 4.95x PyTorch's error,
    tests/test_fuzz.py::test_fp32_exact_scores_block_d_128). The kernels load the score and dP
    operands in 16-wide slices of D there (_math.dot_f32_exact_sliced): at full width every
    backward tile spilled. BLOCK_D 256 keeps the FMA chain (_dot_precision)."""
    if dtype == torch.float32 and block_d <= 16:
        return "exact"
    if dtype == torch.float32 and block_d <= 128:
        return "exact_scores"
    return _dot_precision(dtype, block_d, variant)


def _dot_precision(dtype: torch.dtype, block_d: int, variant: str | None = None) -> str:
    """tl.dot's input_precision for the attention kernels (forward and backward share it, so the
    backward recomputes exactly the forward's scores).

    16-bit inputs: exact products in the MMA, the argument is unused. fp32 inputs must keep
    fp32-level accuracy (the criterion compares against PyTorch's fp32 math), so never plain
    TF32: 3xTF32 (hi/lo operand splits on tensor cores) where the config tables hold tiles that
    compile spill-free with it, exact fp32 FMA ("ieee", no tensor cores) elsewhere:
    - BLOCK_D <= 16: "ieee". A score is a sum of a few products, so 3xTF32's ~2^-22 relative
      error per product (PyTorch's fp32 product is exact) dominates: with one key and D=1, dK
      must cancel to 0 and 3xTF32 left 2.3e-8 (5/200 seeds over the criterion's floor, the deep
      fuzz run; 0/200 with FMA dots). FMA dots cost little at D <= 16. (The attention kernels
      go further there: "exact", _attn_dot_precision.)
    - BLOCK_D 32..64: "tf32x3" for every variant. (The attention kernels run their scores
      and dP exact there and at BLOCK_D 128: "exact_scores", _attn_dot_precision.)
    - BLOCK_D 128, variant "plain" or "varlen": "tf32x3", in the fp32 tiles of configs.py (AOT
      sweep: spill-free on sm_80/sm_90, Triton 3.9 and 3.7.1). Other callers (variant None:
      decode; "masked", whose every-switch backward spilled 8-96 B in all 14 tiles tried; and
      "light", kept on masked's arithmetic so that its numerics did not move): "ieee". (The
      attention kernels run "exact_scores" there since: _attn_dot_precision.)
    - BLOCK_D 256: "ieee" (every tf32x3 backward tile spilled: 180 B to 1 KB at the smallest).
    """
    if dtype != torch.float32:
        return "tf32"
    if block_d <= 16:
        return "ieee"
    if block_d <= 64:
        return "tf32x3"
    return "tf32x3" if block_d <= 128 and variant in ("plain", "varlen") else "ieee"


def _strides(t: torch.Tensor, prefix: str) -> dict:
    """Stride arguments of a [B, H, N, D] tensor named as in the kernels' signatures."""
    axes = "zhmd" if prefix in ("q", "o", "do", "dq") else "zhnd"
    return {f"stride_{prefix}{a}": t.stride(i) for i, a in enumerate(axes)}


def _kv_range(kpm: torch.Tensor) -> torch.Tensor:
    """[B, 2] int32: first valid key and last valid key + 1 of each sequence (0, 0 if none)."""
    valid = ~kpm
    n = kpm.shape[1]
    first = valid.to(torch.int32).argmax(1)
    last = n - valid.flip(1).to(torch.int32).argmax(1)
    any_valid = valid.any(1)
    zero = torch.zeros_like(first)
    return torch.stack([torch.where(any_valid, first, zero),
                        torch.where(any_valid, last, zero)], 1).to(torch.int32).contiguous()


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _features(q, k, opts: Options, dummy: torch.Tensor):
    """(runtime args, constexprs, batch count of the grid, config variant) shared by the kernels."""
    B, H, N_Q, _ = q.shape
    N_KV = k.shape[2]
    mask, kpm, slopes = opts.attn_mask, opts.key_padding_mask, opts.alibi_slopes
    # The small tensors are indexed as dense arrays in the kernels (Kpm + z * stride_kpz + j,
    # Alibi + seq * H + h, CuQ + seq): normalised here, once per launch plan. Each is at most
    # B * Nk elements; a strided cu_seqlens read as dense ran past q (tests/test_strided_args.py).
    # Only the attention mask (up to B * H * Nq * Nk) is read through its own strides.
    kpm, slopes = _dense(kpm), _dense(slopes)
    cu_q, cu_k = _dense(opts.cu_seqlens_q), _dense(opts.cu_seqlens_k)
    args = {
        "Mask": dummy if mask is None else mask,
        "Kpm": dummy if kpm is None else kpm,
        "KvRange": dummy if kpm is None else _kv_range(kpm),
        "Alibi": dummy if slopes is None else slopes,
        "CuQ": dummy if not opts.varlen else cu_q,
        "CuK": dummy if not opts.varlen else cu_k,
        **({f"stride_m{a}": 0 for a in "zhmn"} if mask is None
           else {f"stride_m{a}": mask.stride(i) for i, a in enumerate("zhmn")}),
        "stride_kpz": 0 if kpm is None else kpm.stride(0),
        "H": H, "GROUP": H // k.shape[1], "N_Q": N_Q, "N_KV": N_KV, "sm_scale": opts.scale,
        "cap_in": opts.scale / opts.softcap if opts.softcap else 0.0,
        "cap_out": opts.softcap if opts.softcap else 0.0,
        "win_left": opts.left or 0, "win_right": opts.right or 0,
        "dropout_p": float(opts.dropout_p), "seed": int(opts.seed),
        "DROP_COLS": opts.max_seqlen_k if opts.varlen else N_KV,
    }
    fast16 = int(q.dtype != torch.float32 and q.shape[-1] <= 128)
    constexprs = {
        "WIN_LEFT": opts.left is not None, "WIN_RIGHT": opts.right is not None,
        "MASK_KIND": 0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        # key padding, ALiBi, softcap: 2 = the cheaper 16-bit forms of _common._scores (16-bit
        # inputs at D <= 128, where they were compiled clean: AOT, Triton 3.9 and 3.7.1), 1 =
        # the forms from before (fp32, where the criterion needs them, and D = 256, where the
        # 16-bit forms spilled 36-332 B in dK/dV and dQ on Triton 3.9)
        "HAS_KPM": (1 + fast16) if kpm is not None else 0,
        "HAS_ALIBI": (1 + fast16) if slopes is not None else 0,
        # softcap's tanh: 1 = accurate to fp32, 2 = the 16-bit form (one EX2 and one RSQ per
        # score, about 2^-21 absolute: _math.tanh_scaled16)
        "SOFTCAP": (1 + fast16) if opts.softcap else 0,
        "DROPOUT": opts.dropout_p > 0, "VARLEN": opts.varlen,
        # varlen whose max_seqlen was not checked against cu_seqlens (torch.compile): the
        # programs loop over the tiles past it. Only then: the loop around the tile body cost
        # registers (sm_90 fp16 D=128 varlen forward 224 -> 255 regs + 32-96 B spilled)
        "SEQ_LOOP": opts.varlen and not opts.seqlens_checked,
    }
    n_z = opts.cu_seqlens_q.shape[0] - 1 if opts.varlen else B
    return args, constexprs, n_z, _variant(opts)


def _paging(k, opts: Options, dummy: torch.Tensor):
    """(runtime args, constexprs) of the forward kernel's paged-KV and seqused_k switches.

    PAGED: k/v are paged caches viewed [num_blocks, Hkv, PAGE, D] (stride_kz: one block);
    key j of sequence s is slot j % PAGE of block BlockTable[s, j // PAGE]. The kernel clamps
    the table index into [0, MAX_BLOCKS) and the block id into [0, NUM_BLOCKS) (the host checks
    the table's contents, except while torch.compile traces), so it never reads outside k/v.
    SEQUSED: sequence s uses its first SeqUsedK[s] keys (clamped into [0, its cu_seqlens_k
    length]). Off (dummies; PAGE 1): the kernel is the one compiled before these switches."""
    bt = opts.block_table
    used = _dense(opts.seqused_k)
    args = {
        "BlockTable": dummy if bt is None else bt,
        "SeqUsedK": dummy if used is None else used,
        "stride_btz": 0 if bt is None else bt.stride(0),
        "stride_btb": 0 if bt is None else bt.stride(1),
        "MAX_BLOCKS": 1 if bt is None else bt.shape[1],
        "NUM_BLOCKS": 1 if bt is None else k.shape[0],
    }
    # PAGE a constexpr: j // PAGE and j % PAGE per key become shifts / multiplies (a runtime
    # divisor: 1258 issue clocks per iteration instead of 1156, `inspect --perf` sm_90 fp16
    # D=128 128x64/8); one kernel per page size, which a serving engine fixes once
    return args, {"PAGED": bt is not None, "SEQUSED": used is not None,
                  "PAGE": 1 if bt is None else k.shape[2]}


def _tma_cell(opts: Options, variant: str) -> str:
    """The variant under which a launch looks up its tensor-descriptor cells (configs.TMA_FWD,
    TMA_BWD; launch.use_tma, use_tma_bwd): the light switches one at a time where they were
    measured alone, else the variant itself. "light:kpm": key padding the only light switch;
    "light:window": a left window edge the only one (a right edge or causal is plain's too).
    Their kernels are the light variant's (its constexprs, dot precision and units), on the
    plain kernel's descriptor tiles, which the light table's every-switch tiles cannot take
    (sm_90 fp16 D=128 forward 128x128/8/3 with all four light switches: 656 B spilled)."""
    if variant != "light":
        return variant
    on = {name for name, is_on in (
        ("kpm", opts.key_padding_mask is not None), ("window", opts.left is not None),
        ("alibi", opts.alibi_slopes is not None), ("softcap", bool(opts.softcap))) if is_on}
    return f"light:{on.pop()}" if len(on) == 1 and on <= {"kpm", "window"} else variant


def _variant(opts: Options) -> str:
    """The config table a launch uses (configs.py), by what the switches cost in registers:
    - "masked": an attn_mask (a tile of mask loads with 64-bit addresses), or dropout with any
      other switch, or varlen with any switch: the small-tile table;
    - "dropout": dropout as the only switch (causal or a right window edge allowed) on dense
      inputs: big tiles measured with the Philox draw (wgmma on sm_90 16-bit). Dropout with a
      light switch stays "masked": those kernels were not measured on the big tiles;
    - "light": key padding, ALiBi, softcap or a left window edge, any subset, on dense
      (non-varlen) inputs: the plain tiles that stay spill-free with all four on (wgmma on
      sm_90 16-bit), so one switch no longer costs the whole masked table;
    - "varlen" (packed sequences; with any switch: "masked", not measured otherwise) or "plain".
    """
    if opts.attn_mask is not None:
        return "masked"
    light = (opts.key_padding_mask is not None or opts.alibi_slopes is not None
             or bool(opts.softcap) or opts.left is not None)
    if opts.dropout_p > 0:
        return "masked" if light or opts.varlen else "dropout"
    if light:
        return "masked" if opts.varlen else "light"
    return "varlen" if opts.varlen else "plain"
