"""Launch plans (`plan_forward`, `plan_backward`: the Launches `inspect` compiles and `run`
executes) and the launchers the ops call. Knows nothing of autograd: tensors in, tensors out.
"""
from __future__ import annotations

import os

import torch
import triton

from .._constants import LOG2E
from .._launch import Launch, arch_family, device_arch, flat_grid, int32_tiles, is_interpreted, run
from ._common import _dropout_mask_kernel
from .backward import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .configs import PREPROCESS_BLOCK_M, TMA_BWD, TMA_FWD, _block_d, configs_for
from .forward import _attn_fwd
from .options import (Options, _attn_dot_precision, _features, _paging, _strides, _tma_cell,
                      _variant)


def _pick(fn, values: dict) -> dict:
    """The entries of `values` that are parameters of kernel `fn`, in signature order."""
    return {name: values[name] for name in fn.arg_names if name in values}


# Lengths in the tuning key: rounded up to a power of two (kernels._launch.tune_bucket), so that
# varying lengths (each varlen batch: the packed totals N_Q / N_KV and the longest sequence,
# MAX_SEQLEN, which sizes the grid) re-run the autotuner once per bucket, not per length.
_BUCKETED = ("N_Q", "N_KV", "MAX_SEQLEN")


def _tune_key(constexprs: dict) -> list:
    return [*_BUCKETED, "HEAD_DIM",
            *[c for c in constexprs if c.isupper() and c != "HEAD_DIM"]]


def _grid_len(max_seqlen: int) -> int:
    """Varlen: the per-sequence length a grid is sized for. At least 1, so that every sequence
    gets a program: one longer than max_seqlen (possible under torch.compile, where the contents
    of cu_seqlens are not checked) is covered by the kernels' loop over its tiles."""
    return max(int(max_seqlen), 1)


def tma_layout_ok(t: torch.Tensor) -> bool:
    """Whether a [B, H, N, D] k / v tensor can be read by TMA descriptors of its [N, D] rows per
    (batch, head): last stride 1 and every other stride, and the base address, 16-byte aligned
    (so each (batch, head) and varlen sequence base stays aligned)."""
    per16 = 16 // t.element_size()
    return (t.stride(-1) == 1 and all(s % per16 == 0 for s in t.stride()[:-1])
            and (t.device.type == "meta" or t.data_ptr() % 16 == 0))


def _tma_forced() -> bool:
    """TRITFORMER_TMA=1: descriptors in the interpreter too (tests of the descriptor path)."""
    return os.environ.get("TRITFORMER_TMA", "") == "1"


def _tma_eligible(q, rows: tuple) -> bool:
    """What every descriptor load needs, forward and backward (the measured cells aside):
    TRITFORMER_TMA not 0, 16-bit inputs, a head dim of 64 or 128 exactly (the descriptor's box
    is [rows, HEAD_DIM]) and `rows` (the tensors read by descriptor) in layouts tma_layout_ok
    accepts."""
    return (os.environ.get("TRITFORMER_TMA", "") != "0"
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] in (64, 128)
            and all(tma_layout_ok(t) for t in rows))


def use_tma(q, k, v, opts: Options, arch: int | None, variant: str) -> bool:
    """The forward loads K / V through tensor descriptors (forward.py, TMA): where
    configs.TMA_FWD has the (arch family, head dim, options._tma_cell) cell (sm_90: TMA; sm_80 D=128:
    Triton lowers the descriptors to cp.async with fewer registers than the pointer tensors), for
    16-bit inputs whose head dim is 64 or 128 exactly (the descriptor's box is [BLOCK_N,
    HEAD_DIM]), not paged, with k / v layouts tma_layout_ok accepts; pointer loads otherwise. In
    the interpreter TRITFORMER_TMA=1 turns it on where the rest holds (tests: the descriptor
    path's numerics); TRITFORMER_TMA=0 turns it off everywhere."""
    D = q.shape[3]
    if not _tma_eligible(q, (k, v)) or opts.block_table is not None:
        return False
    cell = _tma_cell(opts, variant)
    if arch is None:  # any variant with a descriptor cell on some GPU
        return _tma_forced() and any(key[2] == cell for key in TMA_FWD)
    return (arch_family(arch), D, cell) in TMA_FWD


def use_tma_bwd(kernel: str, q, k, rows: tuple, opts: Options, arch: int | None,
                variant: str, split: int = 1) -> list | None:
    """The configs of backward kernel `kernel` ("bwd_dkdv", "bwd_fused", "bwd_dq") with its
    streamed tiles through tensor descriptors (backward.py, TMA: Q / dO in dK/dV and the fused
    kernel, K / V in dQ), or None for pointer loads. Descriptors where configs.TMA_BWD has the
    (arch family, head dim, _tma_cell, kernel, "mha" or "gqa") cell (GQA compiles a loop over the
    group's query heads that MHA does not, and it costs registers), for 16-bit inputs whose
    head dim is 64 or 128 exactly, with `rows` (the tensors read by descriptor) in layouts
    tma_layout_ok accepts. TRITFORMER_TMA as for the forward (`use_tma`): 1 turns them on in
    the interpreter (its configs then), 0 off everywhere. split: the dK/dV grid's GQA split
    (`_heads`)."""
    D = q.shape[3]
    if not _tma_eligible(q, rows):
        return None
    cell = _tma_cell(opts, variant)
    if arch is None:  # plain, varlen (the descriptor path's own tests) and any measured cell
        if _tma_forced() and (cell in ("plain", "varlen") or any(key[2] == cell for key in TMA_BWD)):
            return configs_for(kernel, None, D, q.element_size(), variant)
        return None
    return TMA_BWD.get((arch_family(arch), D, cell, kernel, _heads(q, k, split)))


def _heads(q, k, split: int = 1) -> str:
    """"mha" (one query head per dK/dV program: MHA, or GQA split over its whole group) or
    "gqa": the backward's MHA / GQA config cells (TMA_BWD, BWD_MHA), as GQA compiles a loop over
    the group's query heads that MHA does not (the kernel's GROUP_PART)."""
    return "mha" if q.shape[1] == k.shape[1] * split else "gqa"


def _tma_scratch(size: int, alignment: int, stream):
    """Triton's global-scratch allocator for device-side tensor descriptors (128 B each per
    program), from torch's caching allocator on the current device."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _before_launch(launch: Launch, device_type: str) -> None:
    """A TMA launch on CUDA: Triton's scratch allocator for its descriptors. Triton keeps the
    allocator per thread (a ContextVar): set for every launch, so that autograd's threads (a
    forward recomputed in backward) have it too."""
    if launch.constexprs.get("TMA") and device_type == "cuda":
        triton.set_allocator(_tma_scratch)


def plan_forward(q, k, v, out, lse, opts: Options, arch: int | None,
                 lse_lo: torch.Tensor | None = None) -> list[Launch]:
    """lse_lo (fp32 inputs): also write lse's rounding residual there (forward.py)."""
    H, D = q.shape[1], q.shape[3]
    block_d = _block_d(D)
    feats, flags, n_z, variant = _features(q, k, opts, lse)
    paging, paging_flags = _paging(k, opts, lse)
    n_q = _grid_len(opts.max_seqlen_q) if opts.varlen else q.shape[2]
    args = _pick(_attn_fwd, {"Q": q, "K": k, "V": v, "Out": out, "Lse": lse,
                             "LseLo": lse if lse_lo is None else lse_lo, **feats,
                             "MAX_SEQLEN": n_q, **paging,
                             **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"),
                             **_strides(out, "o")})
    # 16-bit inputs: scores in log2 units, log2(e) folded into the scale (one FFMA per score
    # before its EX2 instead of FMUL, FADD, FMUL). fp32 keeps natural units: scaling by log2(e)
    # first rounds |s| in the exponent (forward.py / _common._scores). A scale <= 0 keeps them
    # too: the log2 fast path takes the row max of the raw products.
    log2_units = q.dtype != torch.float32 and opts.scale > 0
    if log2_units:
        args["sm_scale"] = args["sm_scale"] * LOG2E.value
        args["cap_out"] = args["cap_out"] * LOG2E.value
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, **flags, "LSE_LO": lse_lo is not None,
                  **paging_flags, "DOT_PRECISION": _attn_dot_precision(q.dtype, block_d, variant),
                  "LOG2_UNITS": log2_units}
    constexprs["TMA"] = use_tma(q, k, v, opts, arch, variant)
    # a paged cache without masked switches: varlen's tiles where they stay spill-free
    # (configs.PAGED_FWD); the dot precision keeps the variant's (the packed run's arithmetic)
    table = "paged" if paging_flags["PAGED"] and variant == "varlen" else variant
    configs = configs_for("fwd", arch, block_d, q.element_size(), table)
    if constexprs["TMA"] and arch is not None:
        configs = TMA_FWD[(arch_family(arch), block_d, _tma_cell(opts, variant))]
    return [Launch("attn_fwd", _attn_fwd, args, constexprs,
                   lambda meta: flat_grid(triton.cdiv(n_q, meta["BLOCK_M"]), n_z, H),
                   configs, _tune_key(constexprs), _BUCKETED)]


def plan_backward(do, q, k, v, out, lse, dlse, delta, dq, dk, dv, opts: Options,
                  arch: int | None, dmask: torch.Tensor | None = None,
                  lse_lo: torch.Tensor | None = None, split: int = 1,
                  deterministic: bool = True) -> list[Launch]:
    """lse_lo: the forward's lse residual (fp32), subtracted when P is recomputed. split > 1
    (GQA, `gqa_split`): dk / dv are fp32 workspaces [B, Hkv * split, Nk, D] of partial sums
    that the caller reduces over the split (`attention_backward`).

    deterministic: [preprocess, dK/dV, dQ] (7 GEMMs per tile pair, bitwise reproducible).
    Otherwise [preprocess, fused]: the dK/dV kernel with FUSED_DQ (5 GEMMs per tile pair), dq
    then a zeroed fp32 accumulator [B, Hq, Nq, D] that it atomically adds dS K into (unscaled:
    the caller multiplies by the scale and casts), and dmask written by the same kernel."""
    if opts.block_table is not None or opts.seqused_k is not None:
        raise ValueError("block_table / seqused_k are forward-only: no backward kernel reads them")
    B, H, N_Q, D = q.shape
    block_d = _block_d(D)
    feats, flags, n_z, variant = _features(q, k, opts, lse)
    n_q = _grid_len(opts.max_seqlen_q) if opts.varlen else N_Q
    n_k = _grid_len(opts.max_seqlen_k) if opts.varlen else k.shape[2]
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, **flags, "LSE_LO": lse_lo is not None,
                  "DOT_PRECISION": _attn_dot_precision(q.dtype, block_d, variant)}
    # 16-bit: P recomputed in log2 units as the forward computes it (one FFMA per score before
    # its EX2); the preprocess writes lse * log2(e) (+inf for empty rows) to lse_b, which the
    # dK/dV and dQ kernels read in place of lse. fp32 keeps natural units and lse's residual.
    # Only where it was compiled clean (AOT, Triton 3.9 and 3.7.1): the plain, varlen and light
    # tables at D <= 128 on sm_80 / sm_90 (and the interpreter's launches of them); elsewhere
    # natural units, the kernels as they were. Plain and varlen choose alike, so that a packed
    # batch does each sequence's own arithmetic, bitwise (tests/test_varlen.py).
    log2_units = (q.dtype != torch.float32 and variant in ("plain", "varlen", "light")
                  and block_d <= 128 and (arch is None or arch_family(arch) in (80, 90)))
    constexprs["LOG2_UNITS"] = log2_units
    lse_b = torch.empty_like(lse) if log2_units else lse
    pre_m = PREPROCESS_BLOCK_M
    preprocess = Launch(
        "attn_bwd_preprocess", _attn_bwd_preprocess,
        {"Out": out, "DO": do, "DLse": dlse if dlse is not None else delta,  # read iff HAS_DLSE
         "Delta": delta, "Lse": lse, "LseB": lse_b, **_strides(out, "o"), **_strides(do, "do"),
         "H": H, "N_Q": N_Q},
        {"HEAD_DIM": D, "BLOCK_D": block_d, "BLOCK_M": pre_m, "HAS_DLSE": dlse is not None,
         "LOG2_UNITS": log2_units},
        lambda meta: flat_grid(triton.cdiv(N_Q, pre_m), B, H),
        [triton.Config({}, num_warps=4, num_stages=1)], [])
    values = {"Q": q, "K": k, "V": v, "DO": do, "Lse": lse_b,
              "LseLo": lse if lse_lo is None else lse_lo, "Delta": delta, "DK": dk, "DV": dv,
              "DQ": dq, "DMask": lse if dmask is None else dmask, **feats,
              **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"), **_strides(do, "do"),
              **_strides(dk, "dk"), **_strides(dv, "dv"), **_strides(dq, "dq")}
    fused = not deterministic
    table = "bwd_fused" if fused else "bwd_dkdv"
    # streamed tiles through tensor descriptors where configs.TMA_BWD measured them (use_tma_bwd)
    tma_dkdv = use_tma_bwd(table, q, k, (q, do), opts, arch, variant, split)
    dkdv_constexprs = {**constexprs, "FUSED_DQ": fused, "MASK_GRAD": fused and dmask is not None,
                       "TMA": tma_dkdv is not None}
    dkdv = Launch(
        "attn_bwd_fused" if fused else "attn_bwd_dkdv", _attn_bwd_dkdv,
        _pick(_attn_bwd_dkdv, {**values, "MAX_SEQLEN": n_k, "GROUP_SPLIT": split,
                               "GROUP_PART": values["GROUP"] // split}),
        dkdv_constexprs,
        lambda meta: flat_grid(triton.cdiv(n_k, meta["BLOCK_N"]), n_z, k.shape[1] * split),
        tma_dkdv or configs_for(table, arch, block_d, q.element_size(), variant,
                                _heads(q, k, split)),
        _tune_key(dkdv_constexprs) + ["GROUP_SPLIT", "GROUP_PART"], _BUCKETED)
    if fused:
        return [preprocess, dkdv]
    tma_dq = use_tma_bwd("bwd_dq", q, k, (k, v), opts, arch, variant)
    dq_constexprs = {**constexprs, "MASK_GRAD": dmask is not None, "TMA": tma_dq is not None}
    dq_launch = Launch(
        "attn_bwd_dq", _attn_bwd_dq, _pick(_attn_bwd_dq, {**values, "MAX_SEQLEN": n_q}),
        dq_constexprs,
        lambda meta: flat_grid(triton.cdiv(n_q, meta["BLOCK_M"]), n_z, H),
        tma_dq or configs_for("bwd_dq", arch, block_d, q.element_size(), variant),
        _tune_key(dq_constexprs), _BUCKETED)
    return [preprocess, dkdv, dq_launch]


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_attn_fwd) else device_arch(t)


# GQA backward parallelism. The dK/dV grid runs over (key tile, kv head, sequence): each program
# loops over its group's query heads, so a GQA model launches `group` times fewer programs than
# the same model with MHA (Llama-3-70B: 8x). At small batch and long context that leaves most
# SMs idle. Splitting each group over `split` programs restores the parallelism; the partial
# dK/dV go to an fp32 workspace [B, Hkv * split, Nk, D] (2 * 4 * B * Hkv * split * Nk * D bytes
# for dK and dV) summed over the split in a fixed order (deterministic, no atomics). The
# choice: the smallest split (a divisor of the group) that gives at least GQA_SPLIT_WAVES
# programs per SM, within GQA_SPLIT_BUDGET bytes of workspace (plus q's own size); no split
# where the unsplit grid already fills the GPU (then the split only adds traffic and memory).
# FlashAttention-2 always expands (dk/dv per query head in the input dtype, summed by torch).
# The fused kernel (deterministic=False) takes the whole group where that workspace fits the
# budget, as FlashAttention-2 does: one query head per program, so GROUP_PART = 1 and the head
# loop compiles away; the kernel is then MHA's, with MHA's tiles (configs.BWD_MHA, TMA_BWD's
# "mha" cells; `_heads`). sm_80 fp16 D=64, causal GQA 4:1: 16x128/4/1 (MHA's) est. 0.745 instead
# of the looping kernel's 16x64/4/1 0.677, which is all the looping kernel fits (16x128/4/1
# spills 80 B; 16x128/8/1 fits at replication 1.2); sm_80 D=128 gets MHA's fused tile, where
# the looping kernel has none. The cost: the workspace (2 * 4 * B * Hq * Nk * D bytes: 268 MB
# for Hq = 32, Nk = 8192, D = 128, B = 1) and one reduction pass over it, which adds about
# 16 * Hq * D bytes of traffic per key against the backward's 10 * Nq * Hq * D FLOPs per key.
GQA_SPLIT_WAVES = 2
GQA_SPLIT_BUDGET = 256 * 2 ** 20


def gqa_split(programs: int, group: int, sm_count: int | None, part_bytes: int,
              budget: int) -> int:
    """How many programs share one kv head's dK/dV tile (a divisor of `group`; 1 = no split).

    programs: the unsplit dK/dV grid size; sm_count: the GPU's SMs (None off CUDA: no split);
    part_bytes: the workspace one split part costs (dK + dV in fp32); budget: bytes allowed."""
    if group <= 1 or not sm_count or programs >= GQA_SPLIT_WAVES * sm_count:
        return 1
    best = 1
    for s in range(2, group + 1):
        if group % s:
            continue
        if s * part_bytes > budget:
            break
        best = s
        if programs * s >= GQA_SPLIT_WAVES * sm_count:
            break
    return best


def _gqa_split_for(q, k, opts: Options, arch: int | None, n_z: int, n_k: int,
                   fused: bool = False) -> int:
    """The dK/dV grid's split of each GQA group (1 = none): TRITFORMER_GQA_SPLIT if set; off
    CUDA 1; the fused kernel (`fused`): the whole group where its workspace fits the budget
    (see the note above GQA_SPLIT_WAVES); otherwise gqa_split's choice by parallelism."""
    group = q.shape[1] // k.shape[1]
    forced = os.environ.get("TRITFORMER_GQA_SPLIT")
    if forced:  # benchmarks and tests: a fixed split (must divide the group)
        split = int(forced)
        if split < 1 or group % split:
            raise ValueError(f"TRITFORMER_GQA_SPLIT={forced} must divide the GQA group size {group}")
        return split
    if is_interpreted(_attn_fwd) or q.device.type != "cuda":
        return 1
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    configs = configs_for("bwd_dkdv", arch, _block_d(q.shape[3]), q.element_size(),
                          _variant(opts))
    block_n = max(c.kwargs.get("BLOCK_N", 64) for c in configs) if configs else 64
    programs = triton.cdiv(n_k, block_n) * n_z * k.shape[1]
    # the workspace is shaped like k with Hkv * split heads (varlen: B = 1, N = total tokens)
    part_bytes = 2 * 4 * k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3]
    budget = GQA_SPLIT_BUDGET + q.nbytes
    if fused and group > 1 and group * part_bytes <= budget:
        return group  # one query head per program: MHA's kernel and tiles
    return gqa_split(programs, group, sm_count, part_bytes, budget)


def lse_residual_for(dtype: torch.dtype) -> bool:
    """Whether the forward keeps lse's fp32 rounding residual for the backward: fp32 inputs
    only (16-bit gradients are far coarser than 0.5 ulp of lse; their kernels stay as they were)."""
    return dtype == torch.float32


def attention_forward(q, k, v, opts: Options):
    """out [B, Hq, Nq, D] (q's dtype and layout), lse [B, Hq, Nq] float32 (natural log), and
    lse_lo: for fp32 inputs lse's rounding residual [B, Hq, Nq] (exact lse = lse + lse_lo, for
    `attention_backward`), else an empty tensor (also with block_table / seqused_k, which have
    no backward). Paged (opts.block_table): k, v are the caches viewed [num_blocks, Hkv, page,
    D], q [1, Hq, total_q, D]."""
    q, k, v = (int32_tiles(t) for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    # block_table / seqused_k are forward-only (inference): no backward reads the residual
    forward_only = opts.block_table is not None or opts.seqused_k is not None
    lse_lo = (torch.empty_like(lse) if lse_residual_for(q.dtype) and not forward_only
              else lse.new_empty(0))
    if out.numel():
        for launch in plan_forward(q, k, v, out, lse, opts, _arch_for(q),
                                   lse_lo if lse_lo.numel() else None):
            _before_launch(launch, q.device.type)
            run(launch)
    else:
        lse.fill_(float("-inf"))
        lse_lo.zero_()
    return out, lse, lse_lo


def attention_backward(do, q, k, v, out, lse, opts: Options, dlse=None, mask_grad=False,
                       lse_lo=None, deterministic: bool = True):
    """dq, dk, dv (same shapes, dtypes and layouts as q, k, v) and, with mask_grad, the
    gradient of the additive mask as dense [B, Hq, Nq, Nk] float32 (else an empty tensor).

    deterministic: the dK/dV and dQ kernels (no atomics, bitwise reproducible). Otherwise the
    fused kernel (`plan_backward`): dQ accumulated with fp32 atomics, so its last bits may
    differ from run to run (the order of the additions); dK, dV and dmask stay reproducible."""
    do, q, k, v, out = (int32_tiles(t) for t in (do, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dmask = (torch.zeros((*q.shape[:3], k.shape[2]), device=q.device, dtype=torch.float32)
             if mask_grad else q.new_empty(0, dtype=torch.float32))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if dlse is not None:
        # the kernel indexes dLse as a dense [B, H, N] float32 buffer; autograd may hand over any
        # layout (an expanded zero has stride 0) or dtype. B*H*N floats: the copy is negligible.
        dlse = dlse.to(torch.float32).contiguous()
    lse = lse.contiguous()
    if lse_lo is not None and lse_lo.numel() == 0:
        lse_lo = None  # 16-bit inputs, or a caller without the residual (ring attention's merge)
    if lse_lo is not None:
        lse_lo = lse_lo.contiguous()
    arch = _arch_for(q)
    n_z = opts.cu_seqlens_q.shape[0] - 1 if opts.varlen else q.shape[0]
    n_k = _grid_len(opts.max_seqlen_k) if opts.varlen else k.shape[2]
    # the fused kernel where its table has a tile for this arch, head dim, dtype and split (none
    # spill-free: the deterministic kernels, which deterministic=False permits)
    if not deterministic:
        split = _gqa_split_for(q, k, opts, arch, n_z, n_k, fused=True)
        deterministic = not configs_for("bwd_fused", arch, _block_d(q.shape[3]),
                                        q.element_size(), _variant(opts), _heads(q, k, split))
    if deterministic:
        split = _gqa_split_for(q, k, opts, arch, n_z, n_k)
    if split > 1:  # partial sums per split part, reduced below (see gqa_split)
        B, H_KV, N_KV, D = k.shape
        ws_k = torch.empty(B, H_KV * split, N_KV, D, device=k.device, dtype=torch.float32)
        ws_v = torch.empty_like(ws_k)
    else:
        ws_k, ws_v = dk, dv
    # the fused path's dQ accumulator: fp32, zeroed, [B, Hq, Nq, D] contiguous
    dq_acc = dq if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    for launch in plan_backward(do, q, k, v, out, lse, dlse, delta, dq_acc, ws_k, ws_v, opts,
                                arch, dmask if mask_grad else None, lse_lo, split,
                                deterministic=deterministic):
        _before_launch(launch, q.device.type)
        run(launch)
    if not deterministic:
        # scale once here; a row with no finite score (lse = -inf) has a constant output: zero
        # gradient, even where a key of -inf met its zero dS in the dot (0 * -inf = NaN), as
        # the dQ kernel does
        dq_acc.mul_(opts.scale).masked_fill_(torch.isneginf(lse)[..., None], 0.0)
        dq.copy_(dq_acc)
    if split > 1:
        dk.copy_(ws_k.view(B, H_KV, split, N_KV, D).sum(2))
        dv.copy_(ws_v.view(B, H_KV, split, N_KV, D).sum(2))
    return dq, dk, dv, dmask


def dropout_keep_mask(seed: int, dropout_p: float, n_rows: int, n_cols: int, device) -> torch.Tensor:
    """bool [n_rows, n_cols]: the keep bits the attention kernels draw for lse row r and key c
    (dense: rows are [B, Hq, Nq] flattened and n_cols = Nk; varlen: [Hq, total_q] and
    n_cols = max_seqlen_k). For tests and the reference comparison."""
    out = torch.empty(n_rows, n_cols, dtype=torch.bool, device=device)
    if out.numel():
        run(Launch("dropout_mask", _dropout_mask_kernel,
                   {"Out": out, "n_rows": n_rows, "n_cols": n_cols, "dropout_p": float(dropout_p),
                    "seed": int(seed)}, {"BLOCK_R": 32, "BLOCK_C": 64},
                   lambda meta: flat_grid(triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 64)),
                   [triton.Config({}, num_warps=4, num_stages=1)], []))
    return out
