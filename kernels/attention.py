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
    P = softmax(s); dropout (DROPOUT) zeroes P with probability p (Philox, counter =
    lse row * DROP_COLS + j) and the output is rescaled by 1 / (1 - p).
Key tiles that the window leaves fully masked, and (with a key padding mask) tiles outside
each sequence's first..last valid key, are never visited; tiles fully inside the window run
without evaluating the window masks.

This module knows nothing of autograd: launchers take tensors and return tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from ._constants import LN2, LOG2E
from ._launch import (Launch, arch_family, device_arch, flat_grid, int32_tiles,
                      is_interpreted, run)
from ._math import tanh as _tanh


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, row, col, DROP_COLS, dropout_p):
    """Philox keep mask of lse row `row` (broadcast with `col`): counter row * DROP_COLS + col."""
    offs = row.to(tl.int64) * DROP_COLS + col
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _seq_info(CuQ, CuK, off_z, N_Q, N_KV, VARLEN: tl.constexpr):
    """(batch index for strides, first query row, first key row, n_q, n_kv) of batch/sequence
    index off_z."""
    if VARLEN:
        q_start = tl.load(CuQ + off_z)
        k_start = tl.load(CuK + off_z)
        n_q = tl.load(CuQ + off_z + 1) - q_start
        n_kv = tl.load(CuK + off_z + 1) - k_start
        z = off_z * 0  # one packed "batch": sequences are token ranges
    else:
        q_start = off_z * 0
        k_start = off_z * 0
        n_q = N_Q
        n_kv = N_KV
        z = off_z
    return z, q_start, k_start, n_q, n_kv


@triton.jit
def _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
            sm_scale, cap_in, cap_out, win_left, win_right,
            BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
            MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr,
            SOFTCAP: tl.constexpr):
    """Scores of a tile (natural units), -inf where masked, and tanh(.) for the softcap gradient.

    Natural units until the row max / lse is subtracted, then exp2((s - m) * log2(e)): scaling
    s by log2(e) first rounds |s| in the exponent (fp32 at |s| ~ 16: dV 5.9x PyTorch's error
    through the recomputed P, found by the fuzz tests); the difference is small and exact.

    i, j: query and key positions within the sequence, shaped to broadcast to qk's tile
    ([M, 1] and [1, N] in the forward and dQ kernels, [1, M] and [N, 1] in dK/dV). BOUNDARY:
    evaluate the window and the key bound; off the window's edges both are known to hold."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)    # cap_in = scale / softcap
        s = t * cap_out           # cap_out = softcap
    else:
        t = qk
        s = qk * sm_scale
    if HAS_ALIBI:
        s += slope * (-tl.abs(i + diag - j)).to(tl.float32)
    if MASK_KIND != 0:
        inb = (i < n_q) & (j < n_kv)
        m_ptrs = m_base + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn
        if MASK_KIND == 1:
            keep_m = tl.load(m_ptrs, mask=inb, other=0)
            s = tl.where(keep_m != 0, s, float("-inf"))
        else:
            s += tl.load(m_ptrs, mask=inb, other=0.0).to(tl.float32)
    if HAS_KPM:
        pad = tl.load(kpm_base + j, mask=j < n_kv, other=1)
        s = tl.where(pad != 0, float("-inf"), s)
    if BOUNDARY:
        keep = j < n_kv  # broadcast against the tile by tl.where
        if WIN_RIGHT:
            keep = keep & (j <= i + diag + win_right)
        if WIN_LEFT:
            keep = keep & (j >= i + diag - win_left)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(m0, n_q, n_kv, diag, win_left, win_right, KvRange, z,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN_LEFT: tl.constexpr,
               WIN_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr):
    """Key tiles of the query tile starting at row m0: [lo, hi) holds every visible key, and
    [full_lo, full_hi) (BLOCK_N-aligned, inside it) the tiles every row sees whole."""
    m1 = m0 + BLOCK_M - 1  # last row of the tile
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    if WIN_RIGHT:  # row i sees j <= i + diag + right
        hi = tl.minimum(tl.maximum(m1 + diag + win_right + 1, 0), n_kv)
        full_hi = tl.minimum((tl.maximum(m0 + diag + win_right + 1, 0) // BLOCK_N) * BLOCK_N, n_full)
    else:
        hi = n_kv
        full_hi = n_full
    if WIN_LEFT:  # row i sees j >= i + diag - left
        lo = (tl.maximum(m0 + diag - win_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m1 + diag - win_left, 0), BLOCK_N) * BLOCK_N
    else:
        lo = n_kv * 0
        full_lo = n_kv * 0
    if HAS_KPM:  # keys outside [first valid, last valid] of this sequence are never visited
        lo = tl.maximum(lo, (tl.load(KvRange + 2 * z) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, tl.load(KvRange + 2 * z + 1))
    hi = tl.where(m0 < n_q, hi, 0)  # varlen: a tile past this sequence's queries does nothing
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
                    lo, hi, i, offs_n, mask_d, n_q, n_kv, diag,
                    m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out,
                    win_left, win_right, drop_row, DROP_COLS, dropout_p, seed,
                    BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                    WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # BOUNDARY=False: every key tile in [lo, hi) is full and inside every row's window, so
    # neither the key bound nor the window is evaluated (the fast path).
    k_base += tl.cast(lo, tl.int64) * stride_kn
    v_base += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        j = offs_kn[None, :]
        # -- load K^T tile [BLOCK_D, BLOCK_N], compute scores ----
        if BOUNDARY:
            k = tl.load(k_base + k_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
        else:
            k = tl.load(k_base + k_offs, mask=mask_d[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        s, _ = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
                       sm_scale, cap_in, cap_out, win_left, win_right, BOUNDARY, WIN_LEFT,
                       WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP)
        # -- online softmax update ----
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        # a row with no finite score so far (masked, or -inf from the data itself: on every
        # path, the fast one included) keeps m = -inf; subtract 0 instead (exp2(-inf) = 0),
        # not -inf (-inf - -inf = NaN). One select per row per tile.
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2((s - m_sub[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_sub) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, drop_row + i, j, DROP_COLS, dropout_p), p, 0.0)
        # -- accumulate p @ v ----
        if BOUNDARY:
            v = tl.load(v_base + v_offs, mask=(offs_kn[:, None] < n_kv) & mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_base + v_offs, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tile(tile, seq, head, Q, K, V, Out, Lse, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_oz, stride_oh, stride_om, stride_od,
                   stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                   H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                   dropout_p, seed, DROP_COLS,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                   DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tile
    off_h = head
    off_hkv = off_h // GROUP
    z, q_start, k_start, n_q, n_kv = _seq_info(CuQ, CuK, seq, N_Q, N_KV, VARLEN)
    diag = n_kv - n_q  # bottom-right alignment of causal / window / ALiBi

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # folds to all-true when HEAD_DIM == BLOCK_D
    mask_m = offs_m < n_q
    i = offs_m[:, None]

    # int64 base offsets: B*H*N*D may pass 2^31; in-tile offsets stay int32
    z64 = z.to(tl.int64)
    q_ptrs = (Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh
              + (q_start + start_m * BLOCK_M).to(tl.int64) * stride_qm
              + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    k_base = K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, BLOCK_D]
    m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
    kpm_base = Kpm + z64 * stride_kpz
    row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start  # lse row of query 0 of this sequence
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + seq * H + off_h)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the query tile stays on chip for the whole loop
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    lo, full_lo, full_hi, hi = _key_range(start_m * BLOCK_M, n_q, n_kv, diag, win_left, win_right,
                                          KvRange, seq, BLOCK_M, BLOCK_N,
                                          WIN_LEFT, WIN_RIGHT, HAS_KPM)
    if WIN_LEFT:  # tiles crossing the window's left edge
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, lo, full_lo,
            i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
            sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p, seed,
            BLOCK_N, True, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT,
            DOT_PRECISION)
    # tiles inside every row's window: no window or bound mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, full_lo, full_hi,
        i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
        sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p, seed,
        BLOCK_N, False, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT,
        DOT_PRECISION)
    # tiles crossing the right edge (causal diagonal) and the ragged key tail
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, full_hi, hi,
        i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
        sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p, seed,
        BLOCK_N, True, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT,
        DOT_PRECISION)

    # -- epilogue: one normalisation; rows with no visible key give 0 and lse = -inf ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    acc = acc * inv_l[:, None]
    lse = m_i + tl.math.log2(l_safe) * LN2  # m + ln(l)
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Lse + row0 + offs_m, lse, mask=mask_m)
    o_ptrs = (Out + z64 * stride_oz + off_h.to(tl.int64) * stride_oh
              + (q_start + offs_m)[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
              stride_qz, stride_qh, stride_qm, stride_qd,
              stride_kz, stride_kh, stride_kn, stride_kd,
              stride_vz, stride_vh, stride_vn, stride_vd,
              stride_oz, stride_oh, stride_om, stride_od,
              stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
              H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
              dropout_p, seed, DROP_COLS, MAX_SEQLEN,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
              DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQ_LOOP: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    # program -> (query tile, head, sequence) on grid axis 0 (CUDA takes 2^31 - 1 programs
    # there, 65,535 on axes 1 and 2), tiles fastest: the tiles of one head run together.
    # MAX_SEQLEN is the length the grid was sized for (varlen: max_seqlen_*).
    n_tiles = (MAX_SEQLEN + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    tile = pid % n_tiles
    head = (pid // n_tiles) % H
    seq = pid // n_tiles // H
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row
        n_real = tl.load(CuQ + seq + 1) - tl.load(CuQ + seq)
        for t in range(tile, (n_real + BLOCK_M - 1) // BLOCK_M, n_tiles):
            _attn_fwd_tile(t, seq, head, Q, K, V, Out, Lse, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
                stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn,
                stride_kd, stride_vz, stride_vh, stride_vn, stride_vd, stride_oz, stride_oh,
                stride_om, stride_od, stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz, H,
                GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right, dropout_p, seed,
                DROP_COLS, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WIN_LEFT, WIN_RIGHT, MASK_KIND,
                HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, VARLEN, DOT_PRECISION)
    else:
        _attn_fwd_tile(tile, seq, head, Q, K, V, Out, Lse, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
            stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn,
            stride_kd, stride_vz, stride_vh, stride_vn, stride_vd, stride_oz, stride_oh,
            stride_om, stride_od, stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz, H,
            GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right, dropout_p, seed,
            DROP_COLS, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WIN_LEFT, WIN_RIGHT, MASK_KIND,
            HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, VARLEN, DOT_PRECISION)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(Out, DO, DLse, Delta,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_doz, stride_doh, stride_dom, stride_dod,
                         H, N_Q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_DLSE: tl.constexpr):
    # delta = rowsum(dO * O) - dLse   (dLse: gradient flowing into the returned lse, if any)
    # program -> (row tile, head, batch) on grid axis 0 (see _attn_fwd)
    n_tiles = (N_Q + BLOCK_M - 1) // BLOCK_M
    start_m = tl.program_id(0) % n_tiles
    off_hz = tl.program_id(0) // n_tiles
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    row = off_hz.to(tl.int64) * N_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < N_Q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < N_Q)


@triton.jit
def _load_lse(Lse, row, mask):
    # rows past N_Q and rows with no visible key (lse = -inf) get +inf, so P = exp(s - lse) = 0
    lse = tl.load(Lse + row, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta,
                         stride_qm, stride_dom, row0, lo, hi, offs_m, j, mask_d, n_q, n_kv, diag,
                         m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in,
                         cap_out, win_left, win_right, DROP_COLS, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                         WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    # Query rows past n_q load as zero with lse = +inf, so they add nothing: no row bound on P.
    # Keys past n_kv (ragged last key tile) produce rows of dK/dV that are never stored.
    q_base += tl.cast(lo, tl.int64) * stride_qm
    do_base += tl.cast(lo, tl.int64) * stride_dom
    for start_m in range(lo, hi, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < n_q
        i = offs_qm[None, :]
        q = tl.load(q_base + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse = _load_lse(Lse, row0 + offs_qm, mask_m)
        # -- recompute P^T [BLOCK_N, BLOCK_M] from the saved lse ----
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        sT, tT = _scores(qkT, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
                         slope, sm_scale, cap_in, cap_out, win_left, win_right, BOUNDARY,
                         WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP)
        # masked to -inf before exp2: a masked score above the row's lse must not make inf.
        # Rows past n_q (zero-filled q) are zeroed explicitly: with a key of -inf their score is
        # 0 * -inf = NaN, which would reach dK/dV through the dots (tests/test_empty_rows.py).
        pT = tl.math.exp2((sT - lse[None, :]) * LOG2E)
        pT = tl.where(mask_m[None, :], pT, 0.0)
        do = tl.load(do_base + do_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        # dV before dP^T is formed: fewer live tiles (dP^T first spilled fp32 D=128 on sm_80)
        if DROPOUT:  # dV += (P∘Z)^T dO / (1-p); dP = (dO V^T)∘Z / (1-p)
            keepT = _dropout_keep(seed, row0 + i, j, DROP_COLS, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:  # dV += P^T dO
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (dP^T - delta), dK += dS^T Q ----
        delta = tl.load(Delta + row0 + offs_qm, mask=mask_m, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # through softcap * tanh(s / softcap)
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        q_base += BLOCK_M * stride_qm
        do_base += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_tile(tile, seq, head, Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, Alibi, CuQ, CuK,
                        stride_qz, stride_qh, stride_qm, stride_qd,
                        stride_kz, stride_kh, stride_kn, stride_kd,
                        stride_vz, stride_vh, stride_vn, stride_vd,
                        stride_doz, stride_doh, stride_dom, stride_dod,
                        stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                        stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                        stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                        H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                        dropout_p, seed, DROP_COLS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                        HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                        DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program owns one K/V tile of one kv head and loops over the query heads of its group
    # and over their query tiles: dK/dV are complete in registers, no atomics (deterministic).
    start_n = tile
    off_hkv = head  # kv head
    z, q_start, k_start, n_q, n_kv = _seq_info(CuQ, CuK, seq, N_Q, N_KV, VARLEN)
    diag = n_kv - n_q

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_nd = (offs_n[:, None] < n_kv) & mask_d[None, :]
    j = offs_n[:, None]
    z64 = z.to(tl.int64)
    rows_n = (k_start + offs_n)[:, None].to(tl.int64)

    k = tl.load(K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + rows_n * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + rows_n * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query tiles that see any key of this tile [m_lo, m_hi), and that see all of it
    n0 = start_n * BLOCK_N
    n1 = n0 + BLOCK_N - 1
    m_end = tl.cdiv(n_q, BLOCK_M) * BLOCK_M
    if WIN_RIGHT:  # row i sees key j iff i >= j - diag - right
        m_lo = (tl.maximum(n0 - diag - win_right, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n1 - diag - win_right, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = n_q * 0
        full_lo = n_q * 0
    if WIN_LEFT:  # row i sees key j iff i <= j - diag + left
        m_hi = tl.minimum(tl.maximum(n1 - diag + win_left + 1, 0), n_q)
        full_hi = (tl.maximum(n0 - diag + win_left + 1, 0) // BLOCK_M) * BLOCK_M
    else:
        m_hi = m_end
        full_hi = m_end
    kpm_base = Kpm + z64 * stride_kpz
    if HAS_KPM:  # a key tile that is all padding has zero gradient: skip its query loop
        pad = tl.load(kpm_base + offs_n, mask=offs_n < n_kv, other=1)
        m_hi = tl.where(tl.sum((pad == 0).to(tl.int32), 0) > 0, m_hi, 0)
    m_hi = tl.where(n0 < n_kv, m_hi, 0)  # varlen: a tile past this sequence's keys
    m_lo = tl.minimum(m_lo, m_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), m_hi)

    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # [BLOCK_M, BLOCK_D]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        q_base = (Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh
                  + q_start.to(tl.int64) * stride_qm)
        do_base = (DO + z64 * stride_doz + off_h.to(tl.int64) * stride_doh
                   + q_start.to(tl.int64) * stride_dom)
        row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start
        m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + seq * H + off_h)
        if WIN_RIGHT:  # query tiles crossing the right edge (causal diagonal)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta, stride_qm,
                stride_dom, row0, m_lo, full_lo, offs_m, j, mask_d, n_q, n_kv, diag, m_base,
                stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out, win_left,
                win_right, DROP_COLS, dropout_p, seed, BLOCK_M, True, WIN_LEFT, WIN_RIGHT,
                MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta, stride_qm,
            stride_dom, row0, full_lo, full_hi, offs_m, j, mask_d, n_q, n_kv, diag, m_base,
            stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out, win_left,
            win_right, DROP_COLS, dropout_p, seed, BLOCK_M, False, WIN_LEFT, WIN_RIGHT,
            MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, DOT_PRECISION)
        if WIN_LEFT:  # query tiles crossing the left edge
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta, stride_qm,
                stride_dom, row0, full_hi, m_hi, offs_m, j, mask_d, n_q, n_kv, diag, m_base,
                stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out, win_left,
                win_right, DROP_COLS, dropout_p, seed, BLOCK_M, True, WIN_LEFT, WIN_RIGHT,
                MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, DOT_PRECISION)

    dk *= sm_scale
    tl.store(DK + z64 * stride_dkz + off_hkv.to(tl.int64) * stride_dkh + rows_n * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + z64 * stride_dvz + off_hkv.to(tl.int64) * stride_dvh + rows_n * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, Alibi, CuQ, CuK,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_doz, stride_doh, stride_dom, stride_dod,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                   stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                   H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                   dropout_p, seed, DROP_COLS, MAX_SEQLEN,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                   DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQ_LOOP: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # program -> (key tile, head, sequence) on grid axis 0 (CUDA takes 2^31 - 1 programs
    # there, 65,535 on axes 1 and 2), tiles fastest: the tiles of one head run together.
    # MAX_SEQLEN is the length the grid was sized for (varlen: max_seqlen_*).
    n_tiles = (MAX_SEQLEN + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    tile = pid % n_tiles
    head = (pid // n_tiles) % (H // GROUP)
    seq = pid // n_tiles // (H // GROUP)
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row
        n_real = tl.load(CuK + seq + 1) - tl.load(CuK + seq)
        for t in range(tile, (n_real + BLOCK_N - 1) // BLOCK_N, n_tiles):
            _attn_bwd_dkdv_tile(t, seq, head, Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, Alibi,
                CuQ, CuK, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh,
                stride_kn, stride_kd, stride_vz, stride_vh, stride_vn, stride_vd, stride_doz,
                stride_doh, stride_dom, stride_dod, stride_dkz, stride_dkh, stride_dkn,
                stride_dkd, stride_dvz, stride_dvh, stride_dvn, stride_dvd, stride_mz, stride_mh,
                stride_mm, stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out,
                win_left, win_right, dropout_p, seed, DROP_COLS, HEAD_DIM, BLOCK_D, BLOCK_M,
                BLOCK_N, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT,
                VARLEN, DOT_PRECISION)
    else:
        _attn_bwd_dkdv_tile(tile, seq, head, Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, Alibi,
            CuQ, CuK, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn,
            stride_kd, stride_vz, stride_vh, stride_vn, stride_vd, stride_doz, stride_doh,
            stride_dom, stride_dod, stride_dkz, stride_dkh, stride_dkn, stride_dkd, stride_dvz,
            stride_dvh, stride_dvn, stride_dvd, stride_mz, stride_mh, stride_mm, stride_mn,
            stride_kpz, H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
            dropout_p, seed, DROP_COLS, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WIN_LEFT, WIN_RIGHT,
            MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, VARLEN, DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, k_offs, v_offs,
                       stride_kn, stride_vn, lo, hi, i, offs_n, mask_d, n_q, n_kv, diag,
                       m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out,
                       win_left, win_right, row0, DROP_COLS, dropout_p, seed, dm_base, stride_dmm,
                       BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                       WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                       MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_base += tl.cast(lo, tl.int64) * stride_kn
    v_base += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        j = (start_n + offs_n)[None, :]
        if BOUNDARY:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
        else:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None], other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None], other=0.0)
        # -- recompute P [BLOCK_M, BLOCK_N]; masked to -inf before exp2 ----
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, t = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
                       sm_scale, cap_in, cap_out, win_left, win_right, BOUNDARY, WIN_LEFT,
                       WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP)
        p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        # -- dS = P * (dP - delta), dQ += dS K ----
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, row0 + i, j, DROP_COLS, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # d(additive mask) = dS, written [B, Hq, Nq, Nk] (reduced by the caller)
            tl.store(dm_base + i.to(tl.int64) * stride_dmm + j, ds, mask=(i < n_q) & (j < n_kv))
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq_tile(tile, seq, head, Q, K, V, DO, Lse, Delta, DQ, Mask, Kpm, KvRange, Alibi, CuQ, CuK, DMask,
                      stride_qz, stride_qh, stride_qm, stride_qd,
                      stride_kz, stride_kh, stride_kn, stride_kd,
                      stride_vz, stride_vh, stride_vn, stride_vd,
                      stride_doz, stride_doh, stride_dom, stride_dod,
                      stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                      stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                      H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                      dropout_p, seed, DROP_COLS,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                      HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                      DROPOUT: tl.constexpr, VARLEN: tl.constexpr, MASK_GRAD: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    start_m = tile
    off_h = head
    off_hkv = off_h // GROUP
    z, q_start, k_start, n_q, n_kv = _seq_info(CuQ, CuK, seq, N_Q, N_KV, VARLEN)
    diag = n_kv - n_q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < n_q
    mask_md = mask_m[:, None] & mask_d[None, :]
    i = offs_m[:, None]
    z64 = z.to(tl.int64)
    rows_m = (q_start + offs_m)[:, None].to(tl.int64)

    q = tl.load(Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh + rows_m * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + z64 * stride_doz + off_h.to(tl.int64) * stride_doh + rows_m * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start
    lse = _load_lse(Lse, row0 + offs_m, mask_m)
    delta = tl.load(Delta + row0 + offs_m, mask=mask_m, other=0.0)
    k_base = K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # V^T tile [BLOCK_D, BLOCK_N]
    m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
    kpm_base = Kpm + z64 * stride_kpz
    dm_base = DMask + (z * H + off_h).to(tl.int64) * N_Q * N_KV  # dense [B, Hq, Nq, Nk] fp32
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + seq * H + off_h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(start_m * BLOCK_M, n_q, n_kv, diag, win_left, win_right,
                                          KvRange, seq, BLOCK_M, BLOCK_N,
                                          WIN_LEFT, WIN_RIGHT, HAS_KPM)
    if WIN_LEFT:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, lo,
            full_lo, i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
            slope, sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p,
            seed, dm_base, N_KV, BLOCK_N, True, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM,
            HAS_ALIBI, SOFTCAP, DROPOUT, MASK_GRAD, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, full_lo,
        full_hi, i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
        slope, sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p,
        seed, dm_base, N_KV, BLOCK_N, False, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM,
        HAS_ALIBI, SOFTCAP, DROPOUT, MASK_GRAD, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, full_hi,
        hi, i, offs_n, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
        slope, sm_scale, cap_in, cap_out, win_left, win_right, row0, DROP_COLS, dropout_p,
        seed, dm_base, N_KV, BLOCK_N, True, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM,
        HAS_ALIBI, SOFTCAP, DROPOUT, MASK_GRAD, DOT_PRECISION)
    # a row with no finite score has a constant output (0): zero gradient, even where a key of
    # -inf met its zero dS in the dot (0 * -inf = NaN)
    dq = tl.where((lse == float("inf"))[:, None], 0.0, dq * sm_scale)
    tl.store(DQ + z64 * stride_dqz + off_h.to(tl.int64) * stride_dqh + rows_m * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Mask, Kpm, KvRange, Alibi, CuQ, CuK, DMask,
                 stride_qz, stride_qh, stride_qm, stride_qd,
                 stride_kz, stride_kh, stride_kn, stride_kd,
                 stride_vz, stride_vh, stride_vn, stride_vd,
                 stride_doz, stride_doh, stride_dom, stride_dod,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                 stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                 H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                 dropout_p, seed, DROP_COLS, MAX_SEQLEN,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                 HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                 DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQ_LOOP: tl.constexpr,
                 MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # program -> (query tile, head, sequence) on grid axis 0 (CUDA takes 2^31 - 1 programs
    # there, 65,535 on axes 1 and 2), tiles fastest: the tiles of one head run together.
    # MAX_SEQLEN is the length the grid was sized for (varlen: max_seqlen_*).
    n_tiles = (MAX_SEQLEN + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    tile = pid % n_tiles
    head = (pid // n_tiles) % H
    seq = pid // n_tiles // H
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row
        n_real = tl.load(CuQ + seq + 1) - tl.load(CuQ + seq)
        for t in range(tile, (n_real + BLOCK_M - 1) // BLOCK_M, n_tiles):
            _attn_bwd_dq_tile(t, seq, head, Q, K, V, DO, Lse, Delta, DQ, Mask, Kpm, KvRange,
                Alibi, CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz,
                stride_kh, stride_kn, stride_kd, stride_vz, stride_vh, stride_vn, stride_vd,
                stride_doz, stride_doh, stride_dom, stride_dod, stride_dqz, stride_dqh,
                stride_dqm, stride_dqd, stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz, H,
                GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right, dropout_p, seed,
                DROP_COLS, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WIN_LEFT, WIN_RIGHT, MASK_KIND,
                HAS_KPM, HAS_ALIBI, SOFTCAP, DROPOUT, VARLEN, MASK_GRAD, DOT_PRECISION)
    else:
        _attn_bwd_dq_tile(tile, seq, head, Q, K, V, DO, Lse, Delta, DQ, Mask, Kpm, KvRange, Alibi,
            CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh,
            stride_kn, stride_kd, stride_vz, stride_vh, stride_vn, stride_vd, stride_doz,
            stride_doh, stride_dom, stride_dod, stride_dqz, stride_dqh, stride_dqm, stride_dqd,
            stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale,
            cap_in, cap_out, win_left, win_right, dropout_p, seed, DROP_COLS, HEAD_DIM, BLOCK_D,
            BLOCK_M, BLOCK_N, WIN_LEFT, WIN_RIGHT, MASK_KIND, HAS_KPM, HAS_ALIBI, SOFTCAP,
            DROPOUT, VARLEN, MASK_GRAD, DOT_PRECISION)


@triton.jit
def _dropout_mask_kernel(Out, n_rows, n_cols, dropout_p, seed,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[r, c] = the attention kernels' dropout keep bit of lse row r, key c (DROP_COLS = n_cols)."""
    n_col_tiles = (n_cols + BLOCK_C - 1) // BLOCK_C  # program -> (row tile, column tile), axis 0
    rows = (tl.program_id(0) // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = (tl.program_id(0) % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    keep = _dropout_keep(seed, rows, cols, n_cols, dropout_p)
    tl.store(Out + rows.to(tl.int64) * n_cols + cols, keep, mask=(rows < n_rows) & (cols < n_cols))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages)


# Interpreter tiles: BLOCK_M != BLOCK_N on purpose, so the tests exercise the general diagonal
# logic; small enough that the test sequence lengths (17..257) span several tiles.
INTERPRETER_CONFIGS = {
    "fwd": _cfg(64, 32, 4, 1),
    "bwd_dkdv": _cfg(32, 64, 4, 1),  # BLOCK_M: streamed query tile, BLOCK_N: resident key tile
    "bwd_dq": _cfg(64, 32, 4, 1),    # BLOCK_M: resident query tile, BLOCK_N: streamed key tile
}

# GPU candidates: {kernel: {arch family: [(max BLOCK_D, element bytes, [configs])]}}; with two
# candidates the autotuner picks on the device. NOTE: every entry was chosen from an AOT sweep
# (`python -m tritformer inspect`, Triton 3.9, causal): all are spill-free and within shared
# memory; e.g. fwd D=128 fp16 sm_90 128x64/8 warps/3 stages: 232 regs, 128 KB smem, wgmma;
# 128x64/4 warps spilled 1240 B, so 4-warp 128-row tiles are not shipped at D >= 128.
# fp32 at D > 64 computes its dots in exact fp32 FMA (see _dot_precision): 8-warp tiles,
# e.g. bwd_dkdv D=256 sm_80 32x16/8 warps: 128 regs, 0 spill; 4 warps spilled 2.4 KB.
GPU_CONFIGS = {
    "fwd": {
        90: [(64, 2, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)]),
             (128, 2, [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]),
             (256, 2, [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2)]),
             (64, 4, [_cfg(64, 32, 4, 2)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        # 128x128/8/3 spilled 16 B (causal, 255 regs) in Triton's own ptxas run, 3.7.1 and 3.9;
        # 64x64/4/3: 255 regs, 0 B on both
        80: [(64, 2, [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]),
             # 128x64/8 warps/3 stages spilled 48 B once the kernel took masks/varlen (causal);
             # 128x32/8/3: 189 regs, 0 spill
             (128, 2, [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)]),
             # 64x32/4 warps spilled 136 B on Triton 3.7.1 (causal); 8 warps: 222 regs, 0 spill
             (256, 2, [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)]),
             (64, 4, [_cfg(64, 32, 4, 2)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
    },
    "bwd_dkdv": {  # BLOCK_M: streamed query tile, BLOCK_N: resident key tile
        # Read from the cubins Triton builds (inspect since 821e9fd: Triton's own ptxas flags),
        # GQA 4:1 causal: 64x128/8 spilled 80 B at D=64 (64x64/8: 241 regs, 0 B) and 32x64/8
        # 24 B at D=128 (16x64/8: 222 regs, 0 B; 16x128/8: 251 regs, 0 B)
        90: [(64, 2, [_cfg(32, 128, 8, 2), _cfg(64, 64, 8, 2)]),
             (128, 2, [_cfg(16, 128, 8, 2), _cfg(16, 64, 8, 2)]),
             (256, 2, [_cfg(16, 32, 4, 1)]),
             (64, 4, [_cfg(16, 32, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1)]),
             (256, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)])],
        # GQA 4:1 (the group loop): 32x64/4 (D=64) and 64x64/8 (D=128) spilled
        80: [(64, 2, [_cfg(32, 128, 8, 2), _cfg(16, 128, 8, 2)]),
             (128, 2, [_cfg(16, 128, 8, 2), _cfg(32, 64, 8, 2)]),
             (256, 2, [_cfg(16, 32, 4, 1)]),
             (64, 4, [_cfg(16, 32, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 16, 8, 1)])],
    },
    "bwd_dq": {  # BLOCK_M: resident query tile, BLOCK_N: streamed key tile
        90: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)]),
             (128, 2, [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)]),
             # 64x16/4 warps spilled 16-40 B on Triton 3.7.1; 64x32/8: 206 regs, 0 spill
             (256, 2, [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)]),
             (64, 4, [_cfg(64, 16, 4, 2)]),
             (128, 4, [_cfg(16, 16, 8, 1), _cfg(16, 16, 4, 1)]),
             (256, 4, [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1)])],
        80: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
             # 128x32/8 warps spilled 12 B (255 regs) on Triton 3.7.1 at D=128 causal
             (128, 2, [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)]),
             (256, 2, [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)]),
             (64, 4, [_cfg(32, 16, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
    },
}
# Packed sequences and the masked switches have their own tables (configs_for's `variant`),
# chosen by an AOT sweep (Triton 3.9, causal, the `inspect --op varlen / masked` plans): for
# each bucket, the first two spill-free configs within shared memory, trying the plain GQA
# table's accepted configs first for varlen, then 32x32/8, 32x16/8, 16x32/8, 16x16/8 warps.
# varlen: the plain table's tiles mostly survive; dK/dV at D=128 needs smaller ones (e.g. sm_90
# fp16 32x128/8 spilled 332 B). masked (every switch on: float mask + its gradient, key padding,
# ALiBi, softcap, dropout, window): register-bound: even 64x32/4 spilled at D=64 fp16 (sm_80,
# 255 regs + 48 B), so 32-row tiles with 8 warps (e.g. sm_80 fp16 D=128 fwd 32x32/8: 244 regs,
# 0 B). A kernel with only some switches on uses the same conservative table.
VARIANT_CONFIGS = {
    "varlen": {
        "fwd": {
            90: [(64, 2, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)]),
                 (128, 2, [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]),
                 (256, 2, [_cfg(64, 32, 4, 2), _cfg(64, 32, 8, 2)]),
                 (64, 4, [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 3)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
            80: [(64, 2, [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)]),
                 (128, 2, [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)]),
                 (256, 2, [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)]),
                 (64, 4, [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 3)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        },
        "bwd_dkdv": {
            # Triton 3.7.1: sm_90 D=128 32x16/8 spilled 24 B (80 regs), sm_80 D=128 16x128/8
            # spilled 136 B (causal); 32x32/8 and 16x64/8 are spill-free on 3.7.1 and 3.9
            # 32x32/8/1 GQA 4:1 causal D=64: 128 regs, 32 B spilled (3.7.1 and 3.9); 16x64/8/1: 138
            90: [(64, 2, [_cfg(32, 128, 8, 2), _cfg(16, 64, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(16, 64, 8, 1)]),
                 (256, 2, [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)]),
                 (64, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)]),
                 (256, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)])],
            80: [(64, 2, [_cfg(16, 128, 8, 2), _cfg(32, 32, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(16, 64, 8, 1)]),
                 (256, 2, [_cfg(16, 32, 4, 1), _cfg(32, 32, 8, 1)]),
                 (64, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
                 (128, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)]),
                 (256, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)])],
        },
        "bwd_dq": {
            90: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)]),
                 (128, 2, [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)]),
                 (256, 2, [_cfg(128, 32, 8, 2), _cfg(32, 32, 8, 1)]),
                 (64, 4, [_cfg(64, 16, 4, 2), _cfg(128, 32, 8, 2)]),
                 (128, 4, [_cfg(16, 16, 8, 1)]),
                 (256, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)])],
            80: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
                 (128, 2, [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)]),
                 (256, 2, [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)]),
                 (64, 4, [_cfg(32, 16, 4, 1), _cfg(64, 16, 4, 2)]),
                 (128, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)]),
                 (256, 4, [_cfg(16, 32, 8, 1), _cfg(32, 32, 8, 1)])],
        },
    },
    "masked": {
        "fwd": {
            90: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (64, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)])],
            80: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (64, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        },
        "bwd_dkdv": {
            90: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (64, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 16, 8, 1)])],
            80: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
                 (64, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        },
        "bwd_dq": {
            90: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (64, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
            80: [(64, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (128, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 2, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (64, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
                 (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
                 (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        },
    },
}
PREPROCESS_BLOCK_M = 64


def configs_for(kernel: str, arch: int | None, block_d: int, elem_bytes: int,
                variant: str = "plain") -> list:
    """Candidate configs of `kernel` for a compute capability (None: the interpreter).

    variant: "plain" (dense, causal or not), "varlen" (packed sequences) or "masked" (any of
    attn_mask, key padding, ALiBi, softcap, dropout, a left window edge): each has its own
    spill-free table (VARIANT_CONFIGS), the masked one with smaller tiles."""
    if arch is None:
        return [INTERPRETER_CONFIGS[kernel]]
    table = GPU_CONFIGS if variant == "plain" else VARIANT_CONFIGS[variant]
    for max_d, nbytes, cfgs in table[kernel][arch_family(arch)]:
        if block_d <= max_d and elem_bytes == nbytes:
            return cfgs
    raise ValueError(f"no {kernel} config for head dim {block_d}, {elem_bytes}-byte elements")


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
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

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _dot_precision(dtype: torch.dtype, block_d: int) -> str:
    # 16-bit inputs: exact products in the MMA, the argument is unused.
    # fp32 inputs must keep fp32-level accuracy (the criterion compares against PyTorch's fp32
    # math), so never plain TF32. Up to BLOCK_D=64, 3xTF32 does it on tensor cores. Beyond, its
    # hi/lo operand splits exhaust the registers (AOT sweep, Triton 3.9, causal: D=128 dK/dV and
    # dQ at 251-255 regs in every tile tried, D=256 spilling 128 B..3 KB in all 36 candidates),
    # so fp32 with D > 64 uses exact fp32 FMA ("ieee"): spill-free, no tensor cores. Forward and
    # backward share the choice, so the backward recomputes exactly the forward's scores.
    # At D <= 16 (BLOCK_D 16) fp32 uses "ieee" too: a score is a sum of a few products, so
    # 3xTF32's ~2^-22 relative error per product (PyTorch's fp32 product is exact) dominates:
    # with one key and D=1, dK must cancel to 0 and 3xTF32 left 2.3e-8 (5/200 seeds over the
    # criterion's floor, the deep fuzz run; 0/200 with FMA dots). FMA dots cost little at D <= 16.
    if dtype != torch.float32:
        return "tf32"
    if block_d <= 16:
        return "ieee"
    return "tf32x3" if block_d <= 64 else "ieee"


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
    constexprs = {
        "WIN_LEFT": opts.left is not None, "WIN_RIGHT": opts.right is not None,
        "MASK_KIND": 0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        "HAS_KPM": kpm is not None, "HAS_ALIBI": slopes is not None,
        "SOFTCAP": bool(opts.softcap), "DROPOUT": opts.dropout_p > 0, "VARLEN": opts.varlen,
        # varlen whose max_seqlen was not checked against cu_seqlens (torch.compile): the
        # programs loop over the tiles past it. Only then: the loop around the tile body cost
        # registers (sm_90 fp16 D=128 varlen forward 224 -> 255 regs + 32-96 B spilled)
        "SEQ_LOOP": opts.varlen and not opts.seqlens_checked,
    }
    n_z = opts.cu_seqlens_q.shape[0] - 1 if opts.varlen else B
    heavy = (constexprs["MASK_KIND"] or kpm is not None or slopes is not None or opts.softcap
             or opts.dropout_p > 0 or opts.left is not None)
    variant = "masked" if heavy else ("varlen" if opts.varlen else "plain")
    return args, constexprs, n_z, variant


def _pick(fn, values: dict) -> dict:
    """The entries of `values` that are parameters of kernel `fn`, in signature order."""
    return {name: values[name] for name in fn.arg_names if name in values}


def _tune_key(constexprs: dict) -> list:
    return ["N_Q", "N_KV", "HEAD_DIM", *[c for c in constexprs if c.isupper() and c != "HEAD_DIM"]]


def _grid_len(max_seqlen: int) -> int:
    """Varlen: the per-sequence length a grid is sized for. At least 1, so that every sequence
    gets a program: one longer than max_seqlen (possible under torch.compile, where the contents
    of cu_seqlens are not checked) is covered by the kernels' loop over its tiles."""
    return max(int(max_seqlen), 1)


def plan_forward(q, k, v, out, lse, opts: Options, arch: int | None) -> list[Launch]:
    H, D = q.shape[1], q.shape[3]
    block_d = _block_d(D)
    feats, flags, n_z, variant = _features(q, k, opts, lse)
    n_q = _grid_len(opts.max_seqlen_q) if opts.varlen else q.shape[2]
    args = _pick(_attn_fwd, {"Q": q, "K": k, "V": v, "Out": out, "Lse": lse, **feats,
                             "MAX_SEQLEN": n_q,
                             **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"),
                             **_strides(out, "o")})
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, **flags,
                  "DOT_PRECISION": _dot_precision(q.dtype, block_d)}
    return [Launch("attn_fwd", _attn_fwd, args, constexprs,
                   lambda meta: flat_grid(triton.cdiv(n_q, meta["BLOCK_M"]), n_z, H),
                   configs_for("fwd", arch, block_d, q.element_size(), variant),
                   _tune_key(constexprs))]


def plan_backward(do, q, k, v, out, lse, dlse, delta, dq, dk, dv, opts: Options,
                  arch: int | None, dmask: torch.Tensor | None = None) -> list[Launch]:
    B, H, N_Q, D = q.shape
    block_d = _block_d(D)
    feats, flags, n_z, variant = _features(q, k, opts, lse)
    n_q = _grid_len(opts.max_seqlen_q) if opts.varlen else N_Q
    n_k = _grid_len(opts.max_seqlen_k) if opts.varlen else k.shape[2]
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, **flags,
                  "DOT_PRECISION": _dot_precision(q.dtype, block_d)}
    tune_key = _tune_key(constexprs)
    pre_m = PREPROCESS_BLOCK_M
    preprocess = Launch(
        "attn_bwd_preprocess", _attn_bwd_preprocess,
        {"Out": out, "DO": do, "DLse": dlse if dlse is not None else delta,  # read iff HAS_DLSE
         "Delta": delta, **_strides(out, "o"), **_strides(do, "do"), "H": H, "N_Q": N_Q},
        {"HEAD_DIM": D, "BLOCK_D": block_d, "BLOCK_M": pre_m, "HAS_DLSE": dlse is not None},
        lambda meta: flat_grid(triton.cdiv(N_Q, pre_m), B, H),
        [triton.Config({}, num_warps=4, num_stages=1)], [])
    values = {"Q": q, "K": k, "V": v, "DO": do, "Lse": lse, "Delta": delta, "DK": dk, "DV": dv,
              "DQ": dq, "DMask": lse if dmask is None else dmask, **feats,
              **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"), **_strides(do, "do"),
              **_strides(dk, "dk"), **_strides(dv, "dv"), **_strides(dq, "dq")}
    dkdv = Launch(
        "attn_bwd_dkdv", _attn_bwd_dkdv, _pick(_attn_bwd_dkdv, {**values, "MAX_SEQLEN": n_k}),
        constexprs,
        lambda meta: flat_grid(triton.cdiv(n_k, meta["BLOCK_N"]), n_z, k.shape[1]),
        configs_for("bwd_dkdv", arch, block_d, q.element_size(), variant), tune_key)
    dq_launch = Launch(
        "attn_bwd_dq", _attn_bwd_dq, _pick(_attn_bwd_dq, {**values, "MAX_SEQLEN": n_q}),
        {**constexprs, "MASK_GRAD": dmask is not None},
        lambda meta: flat_grid(triton.cdiv(n_q, meta["BLOCK_M"]), n_z, H),
        configs_for("bwd_dq", arch, block_d, q.element_size(), variant), tune_key + ["MASK_GRAD"])
    return [preprocess, dkdv, dq_launch]


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_attn_fwd) else device_arch(t)


def attention_forward(q, k, v, opts: Options):
    """out [B, Hq, Nq, D] (q's dtype and layout), lse [B, Hq, Nq] float32 (natural log)."""
    q, k, v = (int32_tiles(t) for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel():
        for launch in plan_forward(q, k, v, out, lse, opts, _arch_for(q)):
            run(launch)
    else:
        lse.fill_(float("-inf"))
    return out, lse


def attention_backward(do, q, k, v, out, lse, opts: Options, dlse=None, mask_grad=False):
    """dq, dk, dv (same shapes, dtypes and layouts as q, k, v) and, with mask_grad, the
    gradient of the additive mask as dense [B, Hq, Nq, Nk] float32 (else an empty tensor).
    Deterministic: no atomics."""
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
    for launch in plan_backward(do, q, k, v, out, lse, dlse, delta, dq, dk, dv, opts,
                                _arch_for(q), dmask if mask_grad else None):
        run(launch)
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
