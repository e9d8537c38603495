"""Fused softmax attention (FlashAttention-2 algorithm): Triton kernels and host launchers.

Layout: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with any strides; Hq = GROUP * Hkv (MHA, GQA, MQA).
Causal masking is bottom-right aligned: key j is masked for query i when j > i + (Nk - Nq).

This module knows nothing of autograd: launchers take tensors and return tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, arch_family, device_arch, is_interpreted, run

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn,
                    stride_vn, lo, hi, offs_m, offs_n, mask_d, N_KV, diag, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # MASKED=False: every key block in [lo, hi) is full and entirely visible to every query row of
    # the tile, so neither bounds nor causal masks are evaluated (the off-band fast path).
    k_base += tl.cast(lo, tl.int64) * stride_kn
    v_base += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        # -- load K^T tile [BLOCK_D, BLOCK_N], compute qk ----
        if MASKED:
            k = tl.load(k_base + k_offs, mask=mask_d[:, None] & (offs_kn[None, :] < N_KV), other=0.0)
        else:
            k = tl.load(k_base + k_offs, mask=mask_d[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            keep = offs_kn[None, :] < N_KV
            if CAUSAL:
                keep = keep & (offs_kn[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
        # -- online softmax update ----
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # a row with no visible key so far keeps m = -inf; subtract 0 instead (exp2(-inf) = 0)
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- accumulate p @ v ----
        if MASKED:
            v = tl.load(v_base + v_offs, mask=(offs_kn[:, None] < N_KV) & mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_base + v_offs, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _visible_key_range(start_m, N_KV, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """Key range [0, hi) seen by query tile start_m; [0, full_hi) is unmasked and BLOCK_N-aligned."""
    if CAUSAL:
        # last row of the tile sees keys j <= (start_m + 1) * BLOCK_M - 1 + diag
        hi = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + diag, 0), N_KV)
        # first row sees keys j <= start_m * BLOCK_M + diag: whole blocks below that are unmasked
        full_hi = (tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(full_hi, (N_KV // BLOCK_N) * BLOCK_N)
    else:
        hi = N_KV
        full_hi = (N_KV // BLOCK_N) * BLOCK_N
    return full_hi, hi


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse,
              stride_qz, stride_qh, stride_qm, stride_qd,
              stride_kz, stride_kh, stride_kn, stride_kd,
              stride_vz, stride_vh, stride_vn, stride_vd,
              stride_oz, stride_oh, stride_om, stride_od,
              H, GROUP, N_Q, N_KV, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    off_hz = off_z * H + off_h
    off_hkv = off_h // GROUP
    diag = N_KV - N_Q  # bottom-right causal alignment

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # folds to all-true when HEAD_DIM == BLOCK_D
    mask_m = offs_m < N_Q

    # int64 base offsets: B*H*N*D may pass 2^31; in-tile offsets stay int32
    q_ptrs = (Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
              + (start_m * BLOCK_M).to(tl.int64) * stride_qm
              + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = qk_scale * 1.44269504  # 1/ln(2): softmax in base 2
    # the query tile stays on chip for the whole loop
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    full_hi, hi = _visible_key_range(start_m, N_KV, diag, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: off-band, full blocks, no mask
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs,
                                    stride_kn, stride_vn, 0, full_hi, offs_m, offs_n, mask_d, N_KV, diag, qk_scale,
                                    BLOCK_N, False, CAUSAL, DOT_PRECISION)
    # stage 2: diagonal blocks and the ragged tail, masked; blocks past hi are never visited
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs,
                                    stride_kn, stride_vn, full_hi, hi, offs_m, offs_n, mask_d, N_KV, diag, qk_scale,
                                    BLOCK_N, True, CAUSAL, DOT_PRECISION)

    # -- epilogue: one normalisation; rows with no visible key give 0 and lse = -inf ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # back to natural log: * ln(2)
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Lse + off_hz.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)
    o_ptrs = (Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


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
    start_m = tl.program_id(0)
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    off_hz = off_z * H + off_h
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
def _load_lse_log2(Lse, row, mask):
    # rows past N_Q and rows with no visible key (lse = -inf) get +inf, so P = exp2(s - lse) = 0
    lse = tl.load(Lse + row, mask=mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.44269504  # 1/ln(2)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta,
                         stride_qm, stride_dom,
                         row_base, lo, hi, offs_m, offs_n, mask_d, N_Q, diag, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    # Query rows past N_Q load as zero with lse = +inf, so they add nothing: only the causal
    # mask needs evaluating (MASKED), never a bounds mask on P.
    q_base += tl.cast(lo, tl.int64) * stride_qm
    do_base += tl.cast(lo, tl.int64) * stride_dom
    for start_m in range(lo, hi, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < N_Q
        q = tl.load(q_base + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse2 = _load_lse_log2(Lse, row_base + offs_qm, mask_m)
        # -- recompute P^T [BLOCK_N, BLOCK_M] from the saved lse ----
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        sT = qkT * qk_scale - lse2[None, :]
        if MASKED:  # mask before exp2: a masked score above the row's lse must not make inf
            sT = tl.where(offs_n[:, None] <= offs_qm[None, :] + diag, sT, float("-inf"))
        pT = tl.math.exp2(sT)
        do = tl.load(do_base + do_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        # -- dV += P^T dO ----
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (dP^T - delta), dK += dS^T Q ----
        delta = tl.load(Delta + row_base + offs_qm, mask=mask_m, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        q_base += BLOCK_M * stride_qm
        do_base += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_doz, stride_doh, stride_dom, stride_dod,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                   H, GROUP, N_Q, N_KV, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program owns one K/V tile of one kv head and loops over the query heads of its group
    # and over their query tiles: dK/dV are complete in registers, no atomics (deterministic).
    start_n = tl.program_id(0)
    off_z = tl.program_id(1)
    off_hkv = tl.program_id(2)  # kv head
    diag = N_KV - N_Q

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_nd = (offs_n[:, None] < N_KV) & mask_d[None, :]

    k = tl.load(K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
                + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2)

    # query rows that see any key of this tile, and rows that see all of it
    m_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n * BLOCK_N - diag, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum((start_n + 1) * BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, m_end)
        full_lo = tl.minimum(full_lo, m_end)
    else:
        lo = 0
        full_lo = 0

    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # [BLOCK_M, BLOCK_D]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        row_base = (off_z * H + off_h).to(tl.int64) * N_Q
        # stage 1: tiles crossing the causal diagonal, masked
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta,
                                      stride_qm, stride_dom, row_base, lo, full_lo,
                                      offs_m, offs_n, mask_d, N_Q, diag, qk_scale,
                                      BLOCK_M, True, DOT_PRECISION)
        # stage 2: tiles below the diagonal (or all tiles when not causal), unmasked
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_offs, do_offs, Lse, Delta,
                                      stride_qm, stride_dom, row_base, full_lo, m_end,
                                      offs_m, offs_n, mask_d, N_Q, diag, qk_scale,
                                      BLOCK_M, False, DOT_PRECISION)

    dk *= sm_scale
    tl.store(DK + off_z.to(tl.int64) * stride_dkz + off_hkv.to(tl.int64) * stride_dkh
             + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + off_z.to(tl.int64) * stride_dvz + off_hkv.to(tl.int64) * stride_dvh
             + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_offs, v_offs,
                       stride_kn, stride_vn, lo, hi, offs_m, offs_n, mask_d, N_KV, diag, qk_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    k_base += tl.cast(lo, tl.int64) * stride_kn
    v_base += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        if MASKED:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None] & (offs_kn[None, :] < N_KV), other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None] & (offs_kn[None, :] < N_KV), other=0.0)
        else:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None], other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None], other=0.0)
        # -- recompute P [BLOCK_M, BLOCK_N] ----
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s = qk * qk_scale - lse2[:, None]
        if MASKED:
            # keys past N_KV load as zero, so P must be masked explicitly there; masked before
            # exp2 so that a masked score above the row's lse never makes an inf
            keep = offs_kn[None, :] < N_KV
            if CAUSAL:
                keep = keep & (offs_kn[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s)
        # -- dS = P * (dP - delta), dQ += dS K ----
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ,
                 stride_qz, stride_qh, stride_qm, stride_qd,
                 stride_kz, stride_kh, stride_kn, stride_kd,
                 stride_vz, stride_vh, stride_vn, stride_vd,
                 stride_doz, stride_doh, stride_dom, stride_dod,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUP, N_Q, N_KV, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    off_hz = off_z * H + off_h
    off_hkv = off_h // GROUP
    diag = N_KV - N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N_Q
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)
    row = off_hz.to(tl.int64) * N_Q + offs_m
    lse2 = _load_lse_log2(Lse, row, mask_m)
    delta = tl.load(Delta + row, mask=mask_m, other=0.0)
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # V^T tile [BLOCK_D, BLOCK_N]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2)

    full_hi, hi = _visible_key_range(start_m, N_KV, diag, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: off-band key tiles, no mask; stage 2: diagonal tiles and the ragged tail
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_offs, v_offs,
                            stride_kn, stride_vn, 0, full_hi, offs_m, offs_n, mask_d,
                            N_KV, diag, qk_scale, BLOCK_N, False, CAUSAL, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_offs, v_offs,
                            stride_kn, stride_vn, full_hi, hi, offs_m, offs_n, mask_d,
                            N_KV, diag, qk_scale, BLOCK_N, True, CAUSAL, DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


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
        80: [(64, 2, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)]),
             (128, 2, [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]),
             # 64x32/4 warps spilled 136 B on Triton 3.7.1 (causal); 8 warps: 222 regs, 0 spill
             (256, 2, [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)]),
             (64, 4, [_cfg(64, 32, 4, 2)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
    },
    "bwd_dkdv": {  # BLOCK_M: streamed query tile, BLOCK_N: resident key tile
        90: [(64, 2, [_cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2)]),
             (128, 2, [_cfg(32, 128, 8, 2), _cfg(64, 64, 8, 2)]),
             (256, 2, [_cfg(16, 32, 4, 1)]),
             (64, 4, [_cfg(16, 32, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(16, 32, 8, 1), _cfg(16, 16, 8, 1)])],
        80: [(64, 2, [_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2)]),
             (128, 2, [_cfg(64, 64, 8, 2), _cfg(16, 128, 8, 2)]),
             (256, 2, [_cfg(16, 32, 4, 1)]),
             (64, 4, [_cfg(16, 32, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 16, 8, 1)])],
    },
    "bwd_dq": {  # BLOCK_M: resident query tile, BLOCK_N: streamed key tile
        90: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)]),
             (128, 2, [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)]),
             # 64x16/4 warps spilled 16-40 B on Triton 3.7.1; 64x32/8: 206 regs, 0 spill
             (256, 2, [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)]),
             (64, 4, [_cfg(64, 16, 4, 2)]),
             (128, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
        80: [(64, 2, [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
             # 128x32/8 warps spilled 12 B (255 regs) on Triton 3.7.1 at D=128 causal
             (128, 2, [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)]),
             (256, 2, [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)]),
             (64, 4, [_cfg(32, 16, 4, 1)]),
             (128, 4, [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1)]),
             (256, 4, [_cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1)])],
    },
}
PREPROCESS_BLOCK_M = 64


def configs_for(kernel: str, arch: int | None, block_d: int, elem_bytes: int) -> list:
    """Candidate configs of `kernel` for a compute capability (None: the interpreter)."""
    if arch is None:
        return [INTERPRETER_CONFIGS[kernel]]
    for max_d, nbytes, cfgs in GPU_CONFIGS[kernel][arch_family(arch)]:
        if block_d <= max_d and elem_bytes == nbytes:
            return cfgs
    raise ValueError(f"no {kernel} config for head dim {block_d}, {elem_bytes}-byte elements")


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
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
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if block_d <= 64 else "ieee"


def _strides(t: torch.Tensor, prefix: str) -> dict:
    """Stride arguments of a [B, H, N, D] tensor named as in the kernels' signatures."""
    axes = "zhmd" if prefix in ("q", "o", "do", "dq") else "zhnd"
    return {f"stride_{prefix}{a}": t.stride(i) for i, a in enumerate(axes)}


def plan_forward(q, k, v, out, lse, causal: bool, scale: float, arch: int | None) -> list[Launch]:
    B, H, N_Q, D = q.shape
    H_KV, N_KV = k.shape[1], k.shape[2]
    block_d = _block_d(D)
    args = {"Q": q, "K": k, "V": v, "Out": out, "Lse": lse,
            **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"), **_strides(out, "o"),
            "H": H, "GROUP": H // H_KV, "N_Q": N_Q, "N_KV": N_KV, "qk_scale": scale}
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, "CAUSAL": causal,
                  "DOT_PRECISION": _dot_precision(q.dtype, block_d)}
    return [Launch("attn_fwd", _attn_fwd, args, constexprs,
                   lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), B, H),
                   configs_for("fwd", arch, block_d, q.element_size()),
                   ["N_Q", "N_KV", "HEAD_DIM", "CAUSAL"])]


def plan_backward(do, q, k, v, out, lse, dlse, delta, dq, dk, dv, causal: bool, scale: float,
                  arch: int | None) -> list[Launch]:
    B, H, N_Q, D = q.shape
    H_KV, N_KV = k.shape[1], k.shape[2]
    block_d = _block_d(D)
    common = {"H": H, "GROUP": H // H_KV, "N_Q": N_Q, "N_KV": N_KV, "sm_scale": scale}
    constexprs = {"HEAD_DIM": D, "BLOCK_D": block_d, "CAUSAL": causal,
                  "DOT_PRECISION": _dot_precision(q.dtype, block_d)}
    tune_key = ["N_Q", "N_KV", "HEAD_DIM", "CAUSAL"]
    pre_m = PREPROCESS_BLOCK_M
    preprocess = Launch(
        "attn_bwd_preprocess", _attn_bwd_preprocess,
        {"Out": out, "DO": do, "DLse": dlse if dlse is not None else delta,  # read iff HAS_DLSE
         "Delta": delta, **_strides(out, "o"), **_strides(do, "do"), "H": H, "N_Q": N_Q},
        {"HEAD_DIM": D, "BLOCK_D": block_d, "BLOCK_M": pre_m, "HAS_DLSE": dlse is not None},
        lambda meta: (triton.cdiv(N_Q, pre_m), B, H),
        [triton.Config({}, num_warps=4, num_stages=1)], [])
    dkdv = Launch(
        "attn_bwd_dkdv", _attn_bwd_dkdv,
        {"Q": q, "K": k, "V": v, "DO": do, "Lse": lse, "Delta": delta, "DK": dk, "DV": dv,
         **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"), **_strides(do, "do"),
         **_strides(dk, "dk"), **_strides(dv, "dv"), **common},
        constexprs, lambda meta: (triton.cdiv(N_KV, meta["BLOCK_N"]), B, H_KV),
        configs_for("bwd_dkdv", arch, block_d, q.element_size()), tune_key)
    dq_launch = Launch(
        "attn_bwd_dq", _attn_bwd_dq,
        {"Q": q, "K": k, "V": v, "DO": do, "Lse": lse, "Delta": delta, "DQ": dq,
         **_strides(q, "q"), **_strides(k, "k"), **_strides(v, "v"), **_strides(do, "do"),
         **_strides(dq, "dq"), **common}, constexprs,
                       lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), B, H),
                       configs_for("bwd_dq", arch, block_d, q.element_size()), tune_key)
    return [preprocess, dkdv, dq_launch]


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_attn_fwd) else device_arch(t)


def attention_forward(q, k, v, causal: bool, scale: float):
    """out [B, Hq, Nq, D] (q's dtype and layout), lse [B, Hq, Nq] float32 (natural log)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel():
        for launch in plan_forward(q, k, v, out, lse, causal, scale, _arch_for(q)):
            run(launch)
    else:
        lse.fill_(float("-inf"))
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal: bool, scale: float, dlse=None):
    """dq, dk, dv (same shapes, dtypes and layouts as q, k, v). Deterministic: no atomics."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if dlse is not None:
        # the kernel indexes dLse as a dense [B, H, N] float32 buffer; autograd may hand over any
        # layout (an expanded zero has stride 0) or dtype. B*H*N floats: the copy is negligible.
        dlse = dlse.to(torch.float32).contiguous()
    lse = lse.contiguous()
    for launch in plan_backward(do, q, k, v, out, lse, dlse, delta, dq, dk, dv, causal, scale,
                                _arch_for(q)):
        run(launch)
    return dq, dk, dv
