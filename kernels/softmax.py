"""Fused scaled, masked softmax (Megatron-LM's fused softmax semantics): Triton kernels + launchers.

y = softmax(scale * x + mask) over the last dim of a [D0, D1, D2, C] view (any strides, so a
broadcast mask is read through stride-0 dims, never materialised). One program per row (when
the rows outnumber CUDA's grid, at most MAX_PROGRAMS programs loop over them, grid-stride):
- single tile (C <= the row block): the row is read once into registers and written once;
- multi tile (longer rows, no length limit): a first pass keeps a per-lane running max and sum
  (online softmax) over the row's tiles, a second pass writes exp(s - m) / l: two reads and one
  write, never a fallback to PyTorch.
Backward: dz = y * (dy - rowsum(dy * y)) (gradient of the softmax input), times `grad_scale`,
in the same single/multi tile structure.

Masking: bool mask True = keep, or an additive float mask; causal masks key j for row i of the
second-to-last dim when j > i + (C - D2) (bottom-right, as tritformer.attention). A row with
nothing left gives zeros (and zero gradient), not NaN.
Layout: inputs are read through their strides as [D0, D1, D2, C] views (a rank > 4 input whose
leading dims cannot be merged by a view is copied contiguous once); outputs are written in
place, through a view of exactly the tensor the caller returns, never through a reshape copy.
This module knows nothing of autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._constants import LOG2E
from ._launch import Launch, device_arch, is_interpreted, run


@triton.jit
def _row_bases(row, D1, D2, s0, s1, s2):
    i2 = row % D2
    t = row // D2
    i1 = t % D1
    i0 = t // D1
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2, i2


@triton.jit
def _logits(x_row, m_row, cols, C, i2, D2, stride_xc, stride_mc, scale,
             HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr):
    """scale * x + mask for one tile (natural units); -inf where masked or past the row end.

    Kept in natural units until the max is subtracted: exp2((s - m) * log2(e)) rounds only the
    small difference, where scaling s by log2(e) first would round |s| (measured: fp32 rows of
    randn * 3 at 5.1x PyTorch's error with the log2-first form, numpy 2.4 exp2)."""
    inb = cols < C
    x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=inb, other=0.0).to(tl.float32)
    s = x * scale
    keep = inb
    if HAS_MASK:
        if MASK_BOOL:
            mk = tl.load(m_row + cols.to(tl.int64) * stride_mc, mask=inb, other=0)
            keep = keep & (mk != 0)
        else:
            mk = tl.load(m_row + cols.to(tl.int64) * stride_mc, mask=inb, other=0.0)
            s += mk.to(tl.float32)
    if CAUSAL:
        keep = keep & (cols <= i2 + (C - D2))
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _sum_unit(p, BLOCK: tl.constexpr):
    """sum(p) of a [BLOCK] tile of values in [0, 1] (NaN propagates), within ~1 rounding in any
    summation order: fp32 softmax rows, whose 1/l is the row max's output.

    Each p splits exactly into hi = (sigma + p) - sigma, a multiple of ulp(sigma) = 2^(c-23)
    (sigma = 2^c >= BLOCK / 2, and >= 2 so sigma + p stays in sigma's binade), and lo = p - hi
    (|lo| <= 2^(c-24)). Any sum of at most BLOCK his is a multiple of 2^(c-23) below 2^(c+1),
    so below 2^24 units: exact, whatever the reduction tree (numpy's 8-lane blocks in the
    interpreter, the warp shuffles on a GPU). Only the small los' sum and the final add round.
    Found by the deep fuzz search: 102 values of randn * 3 at scale 1.5 summed to l = 1.1229062
    in the interpreter's 8-lane order (float64 sum of the same p: 1.12290642, 2 ulp), the row
    max's y = 1/l 7.6x PyTorch's error; with the split it is 1.1229064, 0.93x."""
    if BLOCK >= 4:
        sigma = BLOCK * 0.5
    else:
        sigma = 2.0
    hi = (sigma + p) - sigma
    return tl.sum(hi, axis=0) + tl.sum(p - hi, axis=0)


@triton.jit
def _softmax_fwd_row(row, X, Mask, Y, D1, D2, C,
                     stride_x0, stride_x1, stride_x2, stride_xc,
                     stride_m0, stride_m1, stride_m2, stride_mc,
                     stride_y0, stride_y1, stride_y2, stride_yc,
                     scale,
                     HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr):
    x_off, i2 = _row_bases(row, D1, D2, stride_x0, stride_x1, stride_x2)
    y_off, _ = _row_bases(row, D1, D2, stride_y0, stride_y1, stride_y2)
    x_row = X + x_off
    y_row = Y + y_off
    m_row = Mask
    if HAS_MASK:
        m_off, _ = _row_bases(row, D1, D2, stride_m0, stride_m1, stride_m2)
        m_row = Mask + m_off
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        s = _logits(x_row, m_row, cols, C, i2, D2, stride_xc, stride_mc, scale,
                     HAS_MASK, MASK_BOOL, CAUSAL)
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: every p is 0
        p = tl.math.exp2((s - m) * LOG2E)
        if X.dtype.element_ty == tl.float32:
            l = _sum_unit(p, BLOCK)
        else:
            l = tl.sum(p, axis=0)
        y = p * (1.0 / tl.where(l == 0.0, 1.0, l))
        tl.store(y_row + cols.to(tl.int64) * stride_yc, y.to(Y.dtype.element_ty), mask=cols < C)
    else:
        # pass 1: per-lane online max and sum, one reduction at the end
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            s = _logits(x_row, m_row, start + cols, C, i2, D2, stride_xc, stride_mc, scale,
                         HAS_MASK, MASK_BOOL, CAUSAL)
            m_new = tl.maximum(m_i, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = (l_i * tl.math.exp2((m_i - m_safe) * LOG2E)
                   + tl.math.exp2((s - m_safe) * LOG2E))
            m_i = m_new
        m = tl.max(m_i, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(l_i * tl.math.exp2((m_i - m) * LOG2E), axis=0)
        inv_l = 1.0 / tl.where(l == 0.0, 1.0, l)
        # pass 2: normalise and write
        for start in range(0, C, BLOCK):
            s = _logits(x_row, m_row, start + cols, C, i2, D2, stride_xc, stride_mc, scale,
                         HAS_MASK, MASK_BOOL, CAUSAL)
            y = tl.math.exp2((s - m) * LOG2E) * inv_l
            tl.store(y_row + (start + cols).to(tl.int64) * stride_yc, y.to(Y.dtype.element_ty),
                     mask=start + cols < C)


@triton.jit
def _softmax_fwd(X, Mask, Y, n_rows, D1, D2, C,
                 stride_x0, stride_x1, stride_x2, stride_xc,
                 stride_m0, stride_m1, stride_m2, stride_mc,
                 stride_y0, stride_y1, stride_y2, stride_yc,
                 scale,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
                 ROW_LOOP: tl.constexpr):
    if ROW_LOOP:  # more rows than programs (CUDA's grid limit): grid-stride, int64 row index
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _softmax_fwd_row(row, X, Mask, Y, D1, D2, C,
                             stride_x0, stride_x1, stride_x2, stride_xc,
                             stride_m0, stride_m1, stride_m2, stride_mc,
                             stride_y0, stride_y1, stride_y2, stride_yc,
                             scale,
                             HAS_MASK, MASK_BOOL, CAUSAL, BLOCK, SINGLE_TILE)
    else:  # one row per program, as many programs as rows
        _softmax_fwd_row(tl.program_id(0), X, Mask, Y, D1, D2, C,
                         stride_x0, stride_x1, stride_x2, stride_xc,
                         stride_m0, stride_m1, stride_m2, stride_mc,
                         stride_y0, stride_y1, stride_y2, stride_yc,
                         scale,
                         HAS_MASK, MASK_BOOL, CAUSAL, BLOCK, SINGLE_TILE)


@triton.jit
def _softmax_bwd_row(row, Y, DY, DZ, D1, D2, C,
                     stride_y0, stride_y1, stride_y2, stride_yc,
                     stride_d0, stride_d1, stride_d2, stride_dc,
                     stride_z0, stride_z1, stride_z2, stride_zc,
                     grad_scale,
                     BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr):
    # dz = y * (dy - rowsum(dy * y)) * grad_scale; masked entries have y = 0, so dz = 0 there.
    # A row whose y is all 0 (nothing kept: sum(y) == 0, as y >= 0 and a kept row sums to 1)
    # gets dz = 0 whatever dy holds, NaN or inf included, as the reference (a NaN y row sums
    # to NaN and propagates)
    # fp32 inputs (WIDE): rowsum(dy * y) and y * (dy - rowsum) * grad_scale in fp64, rounded
    # once to fp32 at the end. dy - rowsum cancels where dy ~ rowsum, so the fp32 sum's rounding (another order than
    # PyTorch's) became the element's whole error: 9 columns, dx 5.7e-8 vs PyTorch 6.5e-9
    # (8.7x; the deep fuzz run, tests/test_fuzz.py::test_fp32_softmax_backward_cancellation).
    # One fp64 FMA per element: the kernel stays bound by its two reads and one write.
    WIDE: tl.constexpr = Y.dtype.element_ty == tl.float32
    y_off, _ = _row_bases(row, D1, D2, stride_y0, stride_y1, stride_y2)
    d_off, _ = _row_bases(row, D1, D2, stride_d0, stride_d1, stride_d2)
    z_off, _ = _row_bases(row, D1, D2, stride_z0, stride_z1, stride_z2)
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        inb = cols < C
        y = tl.load(Y + y_off + cols.to(tl.int64) * stride_yc, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(DY + d_off + cols.to(tl.int64) * stride_dc, mask=inb, other=0.0).to(tl.float32)
        if WIDE:
            delta64 = tl.sum(y.to(tl.float64) * dy.to(tl.float64), axis=0)
            dz = (y.to(tl.float64) * (dy.to(tl.float64) - delta64) * grad_scale).to(tl.float32)
        else:
            delta = tl.sum(y * dy, axis=0)
            dz = y * (dy - delta) * grad_scale
        dz = tl.where(tl.sum(y, axis=0) == 0.0, 0.0, dz)  # row with nothing kept: 0 even for NaN dy
        tl.store(DZ + z_off + cols.to(tl.int64) * stride_zc, dz.to(DZ.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK], tl.float64 if WIDE else tl.float32)
        y_sum = 0.0  # summed per tile: a [BLOCK] accumulator cost 16-22 registers, this 4-10
        for start in range(0, C, BLOCK):
            c = start + cols
            inb = c < C
            y = tl.load(Y + y_off + c.to(tl.int64) * stride_yc, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + d_off + c.to(tl.int64) * stride_dc, mask=inb, other=0.0).to(tl.float32)
            if WIDE:
                acc += y.to(tl.float64) * dy.to(tl.float64)
            else:
                acc += y * dy
            y_sum += tl.sum(y, axis=0)
        delta = tl.sum(acc, axis=0)
        empty = y_sum == 0.0  # row with nothing kept: 0 even for NaN dy
        for start in range(0, C, BLOCK):
            c = start + cols
            inb = c < C
            y = tl.load(Y + y_off + c.to(tl.int64) * stride_yc, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + d_off + c.to(tl.int64) * stride_dc, mask=inb, other=0.0).to(tl.float32)
            if WIDE:
                dz = (y.to(tl.float64) * (dy.to(tl.float64) - delta) * grad_scale).to(tl.float32)
            else:
                dz = y * (dy - delta) * grad_scale
            dz = tl.where(empty, 0.0, dz)
            tl.store(DZ + z_off + c.to(tl.int64) * stride_zc, dz.to(DZ.dtype.element_ty), mask=inb)


@triton.jit
def _softmax_bwd(Y, DY, DZ, n_rows, D1, D2, C,
                 stride_y0, stride_y1, stride_y2, stride_yc,
                 stride_d0, stride_d1, stride_d2, stride_dc,
                 stride_z0, stride_z1, stride_z2, stride_zc,
                 grad_scale,
                 BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
                 ROW_LOOP: tl.constexpr):
    if ROW_LOOP:  # more rows than programs (CUDA's grid limit): grid-stride, int64 row index
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _softmax_bwd_row(row, Y, DY, DZ, D1, D2, C,
                             stride_y0, stride_y1, stride_y2, stride_yc,
                             stride_d0, stride_d1, stride_d2, stride_dc,
                             stride_z0, stride_z1, stride_z2, stride_zc,
                             grad_scale, BLOCK, SINGLE_TILE)
    else:  # one row per program, as many programs as rows
        _softmax_bwd_row(tl.program_id(0), Y, DY, DZ, D1, D2, C,
                         stride_y0, stride_y1, stride_y2, stride_yc,
                         stride_d0, stride_d1, stride_d2, stride_dc,
                         stride_z0, stride_z1, stride_z2, stride_zc,
                         grad_scale, BLOCK, SINGLE_TILE)


# ---------------------------------------------------------------------------------------------
# Configs: one row per program; a row up to MAX_SINGLE_TILE elements is held in registers
# (16K fp32 over 16 warps = 32 values per thread), longer rows stream MULTI_TILE-element tiles.
# ---------------------------------------------------------------------------------------------
MAX_SINGLE_TILE = 16384
MULTI_TILE = 4096
# CUDA's grid: axis 0 takes at most 2^31 - 1 programs. More rows than that are looped over
# inside the programs (grid-stride, int64 row index: a separate specialisation, ROW_LOOP, so
# that the one-row-per-program kernel keeps its registers). Read at each launch: tests shrink it.
MAX_PROGRAMS = 2 ** 31 - 1


def _rows_grid(n_rows: int) -> tuple[dict, tuple]:
    """The ROW_LOOP constexpr and the 1-D grid for n_rows rows (within CUDA's grid limits)."""
    programs = min(n_rows, MAX_PROGRAMS)
    return {"ROW_LOOP": n_rows > programs}, (programs,)


def _tile(n_cols: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(max(n_cols, 1))
    if block <= MAX_SINGLE_TILE:
        return block, True
    return MULTI_TILE, False


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _view4(t: torch.Tensor) -> torch.Tensor | None:
    """A [D0, D1, D2, C] view of t (rank >= 1; leading dims beyond three merged), or None when
    they cannot be merged without a copy."""
    if t.dim() > 4:
        try:
            return t.view(-1, *t.shape[-3:])
        except RuntimeError:
            return None
    return t[(None,) * (4 - t.dim())]


def _read4(t: torch.Tensor) -> torch.Tensor:
    """A [D0, D1, D2, C] tensor the kernels READ through its strides: a view of t, or a
    contiguous copy of it (once, before launch) when its leading dims cannot be viewed as one
    axis (rank > 4 only, e.g. a transposed batch or a mask broadcast over an inner batch dim)."""
    v = _view4(t)
    return v if v is not None else _view4(t.contiguous())


def _write4(t: torch.Tensor) -> torch.Tensor:
    """A [D0, D1, D2, C] view of an output the kernels WRITE: always a view, never a copy
    (writing into a reshape copy would return uninitialised memory). Outputs are allocated so
    that one exists (ops/softmax.py: _out_like)."""
    v = _view4(t)
    if v is None:
        raise ValueError(f"softmax output of shape {tuple(t.shape)} and strides {t.stride()}: "
                         "its leading dims must merge into one axis by a view")
    return v


def _strides4(t: torch.Tensor, p: str) -> dict:
    s = t.stride()
    return {f"stride_{p}0": s[0], f"stride_{p}1": s[1], f"stride_{p}2": s[2], f"stride_{p}c": s[3]}


def plan_forward(x4, mask4, y4, scale: float, causal: bool) -> list[Launch]:
    D0, D1, D2, C = x4.shape
    block, single = _tile(C)
    has_mask = mask4 is not None
    row_loop, grid = _rows_grid(D0 * D1 * D2)
    args = {"X": x4, "Mask": mask4 if has_mask else x4, "Y": y4, "n_rows": D0 * D1 * D2,
            "D1": D1, "D2": D2, "C": C,
            **_strides4(x4, "x"), **_strides4(mask4 if has_mask else x4, "m"), **_strides4(y4, "y"),
            "scale": scale}
    constexprs = {"HAS_MASK": has_mask, "MASK_BOOL": has_mask and mask4.dtype == torch.bool,
                  "CAUSAL": causal, "BLOCK": block, "SINGLE_TILE": single, **row_loop}
    # NOTE: the multi-tile forward (online max/sum over 4K tiles) at 8 warps spilled 8 B at
    # 64 regs on sm_90 fp16 (Triton 3.9's own ptxas run, inspect since 821e9fd); 16 warps:
    # 40 regs, 0 B on sm_80 and sm_90
    warps = _num_warps(block) if single else 16
    cfg = triton.Config({}, num_warps=warps, num_stages=1)
    return [Launch("softmax_fwd", _softmax_fwd, args, constexprs,
                   lambda meta: grid, [cfg], ["C"], ("C",))]


def plan_backward(y4, dy4, dz4, grad_scale: float) -> list[Launch]:
    D0, D1, D2, C = y4.shape
    block, single = _tile(C)
    row_loop, grid = _rows_grid(D0 * D1 * D2)
    args = {"Y": y4, "DY": dy4, "DZ": dz4, "n_rows": D0 * D1 * D2, "D1": D1, "D2": D2, "C": C,
            **_strides4(y4, "y"), **_strides4(dy4, "d"), **_strides4(dz4, "z"),
            "grad_scale": grad_scale}
    cfg = triton.Config({}, num_warps=_num_warps(block), num_stages=1)
    return [Launch("softmax_bwd", _softmax_bwd, args,
                   {"BLOCK": block, "SINGLE_TILE": single, **row_loop},
                   lambda meta: grid, [cfg], ["C"], ("C",))]


def softmax_forward(x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor, scale: float,
                    causal: bool) -> torch.Tensor:
    """y = softmax(scale * x + mask) over x's last dim, written in place and returned; mask
    already expanded to x's shape (a view); y of x's shape, leading dims mergeable by a view."""
    if x.numel() == 0:
        return y
    m4 = None if mask is None else _read4(mask)
    for launch in plan_forward(_read4(x), m4, _write4(y), scale, causal):
        run(launch)
    return y


def softmax_backward(dy: torch.Tensor, y: torch.Tensor, dz: torch.Tensor,
                     grad_scale: float) -> torch.Tensor:
    """dz = grad_scale * y * (dy - rowsum(dy * y)), written in place and returned."""
    if y.numel() == 0:
        return dz
    for launch in plan_backward(_read4(y), _read4(dy), _write4(dz), grad_scale):
        run(launch)
    return dz


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_softmax_fwd) else device_arch(t)
