"""Attention backward (FlashAttention-2): delta, then either dK/dV and dQ in two kernels with no
atomics (deterministic, 7 GEMMs per query tile x key tile pair), or one fused kernel that also
accumulates dQ with fp32 atomics (FUSED_DQ, 5 GEMMs per pair; launch.plan_backward).

- `_attn_bwd_preprocess`: delta = rowsum(dO * O) - dLse per query row.
- `_attn_bwd_dkdv`: one program per (key tile, kv head, sequence) owns its dK/dV tile and loops
  over the query heads of its group and their query tiles (deterministic, no atomics); with
  FUSED_DQ it also adds each pair's dS K into an fp32 dQ accumulator (atomics) and writes the
  mask gradient.
- `_attn_bwd_dq`: one program per (query tile, head, sequence) loops over the key tiles.
Both recompute P from the saved lse with the forward's exact score pipeline (`_scores`). Each
tile body sweeps its loop through one keyword call site of its `_inner` sweep: dQ in three
ranges (the window's two edges and the whole tiles between), dK/dV in two loops (the bounded
query tiles: both window edges and a ragged last tile; then the unbounded ones, whose rows are
all inside n_q, without any mask); the wrappers pass their runtime arguments
to the tile bodies in signature order (tests/test_kernel_signatures.py) and constexprs by
keyword.

LOG2_UNITS (16-bit inputs): P is recomputed in log2 units, as the forward computes it: the
preprocess writes lse * log2(e) (+inf for a row without a visible key) and each score costs one
FFMA before its EX2 (fp32 keeps natural units and lse's residual). TMA (configs.TMA_BWD): the
streamed tiles through tensor descriptors of each (sequence, head)'s rows, Q / dO in dK/dV and
the fused kernel, K / V in dQ (rows past the sequence read as zero); pointer loads otherwise.
"""
import triton
import triton.language as tl

from .._constants import LOG2E
from .._math import EXACT_SLICE, dot_f32_exact_sliced
from .._math import dot_prec0 as _dot
from .._math import dot_prec0_fma as _gdot
from .._math import dot_prec_fma as _gdot_acc
from ._common import _dropout_keep, _key_range, _load_lse, _program_tile, _scores, _seq_info


@triton.jit
def _attn_bwd_preprocess(Out, DO, DLse, Delta, Lse, LseB,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_doz, stride_doh, stride_dom, stride_dod,
                         H, N_Q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_DLSE: tl.constexpr, LOG2_UNITS: tl.constexpr):
    # delta = rowsum(dO * O) - dLse   (dLse: gradient flowing into the returned lse, if any)
    # LOG2_UNITS (16-bit): also LseB = lse * log2(e), +inf where lse = -inf (a row with no
    # visible key: P = 0), the form the dK/dV and dQ loops subtract before exp2
    # program -> (row tile, head, batch)
    start_m, off_h, off_z, _ = _program_tile(N_Q, BLOCK_M, H)
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
    if LOG2_UNITS:
        lse = tl.load(Lse + row, mask=offs_m < N_Q, other=0.0)
        tl.store(LseB + row, tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E,
                 mask=offs_m < N_Q)



@triton.jit
def _attn_bwd_dkdv_step(dk, dv, k, v, kT, q_ptr, do_ptr, q_offs, do_offs, Lse, LseLo, Delta,
                        row0, start_m, offs_m, j, mask_d, n_q, n_kv, diag, m_base, stride_mm,
                        stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out, win_left,
                        win_right, DROP_COLS, dropout_p, seed, dq_ptr, dq_offs, dm_base,
                        stride_dmm,
                        BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                        WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                        HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                        LSE_LO: tl.constexpr, FUSED_DQ: tl.constexpr, DQ_TRANS: tl.constexpr,
                        MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        TMA: tl.constexpr, LOG2_UNITS: tl.constexpr, k_rows, v_rows,
                        stride_qm, stride_dom, stride_qd, stride_dod, stride_kd, stride_vd,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # One query tile (rows start_m + offs_m) against the resident key tile. q_ptr / do_ptr /
    # dq_ptr: the tile's first row (pointers), or the tensor descriptors (TMA, addressed by
    # start_m). BOUNDARY: rows may pass n_q (and the key bound / window apply, _scores);
    # without it every row is inside n_q, so no row mask is evaluated.
    # Query rows past n_q load as zero with lse = +inf, so they add nothing: no row bound on P.
    # Keys past n_kv (ragged last key tile) produce rows of dK/dV that are never stored.
    # TMA: rows past n_q read as zero (TMA's out-of-bounds fill), as the masked pointer loads do.
    # SLICED (fp32 exact scores at BLOCK_D 128): the scores and dP^T from K / V (k_rows /
    # v_rows: the key tile's row pointers) and q / dO reloaded in slices of D
    # (_math.dot_f32_exact_sliced)
    SLICED: tl.constexpr = DOT_PRECISION == "exact_scores" and BLOCK_D > 64 and not TMA
    offs_qm = start_m + offs_m
    if BOUNDARY:
        mask_m = offs_qm < n_q
    else:  # a constant mask: the loads and the row select below fold away
        mask_m = tl.full([BLOCK_M], 1, tl.int1)
    i = offs_qm[None, :]
    if TMA:
        q = q_ptr.load([start_m, 0])
    else:
        q = tl.load(q_ptr + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if LOG2_UNITS:  # Lse: the preprocess's lse * log2(e), +inf for empty rows
        lse = tl.load(Lse + row0 + offs_qm, mask=mask_m, other=float("inf"))
    else:
        lse = _load_lse(Lse, row0 + offs_qm, mask_m)
    # -- recompute P^T [BLOCK_N, BLOCK_M] from the saved lse ----
    if SLICED:
        qkT = dot_f32_exact_sliced(k_rows, stride_kd, j < n_kv, q_ptr + offs_m[None, :] * stride_qm,
                                   stride_qd, mask_m[None, :], HEAD_DIM, BLOCK_D, EXACT_SLICE,
                                   A_VOLATILE=True)
    else:
        qkT = _dot(k, tl.trans(q), DOT_PRECISION)
    sT, tT = _scores(qkT, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
                     slope, sm_scale, cap_in, cap_out, win_left, win_right,
                     BOUNDARY=BOUNDARY, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
                     MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                     SOFTCAP=SOFTCAP, LOG2_UNITS=LOG2_UNITS, base=start_m)
    # masked to -inf before exp2: a masked score above the row's lse must not make inf.
    # Rows past n_q (zero-filled q) are zeroed explicitly: with a key of -inf their score is
    # 0 * -inf = NaN, which would reach dK/dV through the dots (tests/test_empty_rows.py).
    if LSE_LO:  # fp32: lse's rounding residual (forward.py), subtracted after the exact s - lse
        lse_lo = tl.load(LseLo + row0 + offs_qm, mask=mask_m, other=0.0)
        pT = tl.math.exp2(((sT - lse[None, :]) - lse_lo[None, :]) * LOG2E)
    elif LOG2_UNITS:  # 16-bit: scores and lse in log2 units, one FFMA per score (forward.py)
        pT = tl.math.exp2(sT - lse[None, :])
    else:
        pT = tl.math.exp2((sT - lse[None, :]) * LOG2E)
    pT = tl.where(mask_m[None, :], pT, 0.0)
    if TMA:
        do = do_ptr.load([start_m, 0])
    else:
        do = tl.load(do_ptr + do_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    # dV before dP^T is formed: fewer live tiles (dP^T first spilled fp32 D=128 on sm_80)
    if DROPOUT:  # dV += (P∘Z)^T dO / (1-p); dP = (dO V^T)∘Z / (1-p)
        keepT = _dropout_keep(seed, row0 + i, j, DROP_COLS, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        dv = _gdot_acc(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do, dv, DOT_PRECISION)
    else:  # dV += P^T dO
        dv = _gdot_acc(pT.to(do.dtype), do, dv, DOT_PRECISION)
    if SLICED:  # dP uncompensated: compensated, plain sm_80 GQA 4:1 16x16/8/1 spilled 192 B
        dpT = dot_f32_exact_sliced(v_rows, stride_vd, j < n_kv, do_ptr + offs_m[None, :] * stride_dom,
                                   stride_dod, mask_m[None, :], HEAD_DIM, BLOCK_D, EXACT_SLICE,
                                   A_VOLATILE=True, COMPENSATED=False)
    else:
        dpT = _dot(v, tl.trans(do), DOT_PRECISION)
    if DROPOUT:
        dpT = tl.where(keepT, dpT * inv_keep, 0.0)
    # -- dS^T = P^T * (dP^T - delta), dK += dS^T Q ----
    delta = tl.load(Delta + row0 + offs_qm, mask=mask_m, other=0.0)
    dsT = pT * (dpT - delta[None, :])
    if MASK_GRAD:  # d(additive mask) = dS (before softcap), as the dQ kernel writes it
        tl.store(dm_base + i.to(tl.int64) * stride_dmm + j, dsT,
                 mask=(i < n_q) & (j < n_kv))
    if SOFTCAP:  # through softcap * tanh(s / softcap)
        dsT = dsT * (1.0 - tT * tT)
    dk = _gdot_acc(dsT.to(q.dtype), q, dk, DOT_PRECISION)
    if FUSED_DQ:  # dQ += dS K (unscaled), fp32 atomics into the zeroed accumulator
        if DQ_TRANS:  # dQ^T = K^T dS^T [BLOCK_D, BLOCK_M]: the MMA's M is the head dim
            dq = _gdot(kT, dsT.to(k.dtype), DOT_PRECISION)
            tl.atomic_add(dq_ptr + dq_offs, dq, mask=mask_d[:, None] & mask_m[None, :],
                          sem="relaxed")
        else:  # dQ = dS K [BLOCK_M, BLOCK_D]: the MMA's M is the query tile
            dq = _gdot(tl.trans(dsT.to(k.dtype)), k, DOT_PRECISION)
            tl.atomic_add(dq_ptr + dq_offs, dq, mask=mask_m[:, None] & mask_d[None, :],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, kT, q_base, do_base, q_offs, do_offs, Lse, LseLo, Delta,
                         stride_qm, stride_dom, row0, lo, hi, lo2, hi2, offs_m, j, mask_d, n_q,
                         n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale,
                         cap_in, cap_out, win_left, win_right, DROP_COLS, dropout_p, seed,
                         dq_base, dq_offs, stride_dqm, dm_base, stride_dmm,
                         BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                         WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                         LSE_LO: tl.constexpr, FUSED_DQ: tl.constexpr, DQ_TRANS: tl.constexpr,
                         MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         TMA: tl.constexpr, LOG2_UNITS: tl.constexpr, k_rows, v_rows,
                         stride_qd, stride_dod, stride_kd, stride_vd, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # The query tiles of [lo, hi) and, with BOUNDARY, then those of [lo2, hi2) (the two bounded
    # ranges in one loop, so the kernel has two loop copies, not three: a third one cost
    # registers across GQA's head loop, 152 B spilled at D=128 on sm_90).
    # TMA: q_base / do_base are tensor descriptors of this (sequence, head)'s [n_q, D] rows,
    # addressed by query row
    if BOUNDARY:
        n_a = tl.cdiv(hi - lo, BLOCK_M)
        for it in range(0, n_a + tl.cdiv(hi2 - lo2, BLOCK_M)):
            start_m = tl.where(it < n_a, lo + it * BLOCK_M, lo2 + (it - n_a) * BLOCK_M)
            q_ptr = q_base
            do_ptr = do_base
            if not TMA:
                q_ptr = q_base + tl.cast(start_m, tl.int64) * stride_qm
                do_ptr = do_base + tl.cast(start_m, tl.int64) * stride_dom
            dk, dv = _attn_bwd_dkdv_step(
                dk, dv, k, v, kT, q_ptr, do_ptr, q_offs, do_offs, Lse, LseLo, Delta, row0,
                start_m, offs_m, j, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn,
                kpm_base, slope, sm_scale, cap_in, cap_out, win_left, win_right, DROP_COLS,
                dropout_p, seed, dq_base + tl.cast(start_m, tl.int64) * stride_dqm, dq_offs,
                dm_base, stride_dmm, BLOCK_M=BLOCK_M, BOUNDARY=BOUNDARY, WIN_LEFT=WIN_LEFT,
                WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, LSE_LO=LSE_LO, FUSED_DQ=FUSED_DQ,
                DQ_TRANS=DQ_TRANS, MASK_GRAD=MASK_GRAD, DOT_PRECISION=DOT_PRECISION, TMA=TMA,
                LOG2_UNITS=LOG2_UNITS, k_rows=k_rows, v_rows=v_rows, stride_qm=stride_qm,
                stride_dom=stride_dom, stride_qd=stride_qd, stride_dod=stride_dod,
                stride_kd=stride_kd, stride_vd=stride_vd, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    else:
        if not TMA:
            q_base += tl.cast(lo, tl.int64) * stride_qm
            do_base += tl.cast(lo, tl.int64) * stride_dom
        if FUSED_DQ:
            dq_base += tl.cast(lo, tl.int64) * stride_dqm
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _attn_bwd_dkdv_step(
                dk, dv, k, v, kT, q_base, do_base, q_offs, do_offs, Lse, LseLo, Delta, row0,
                start_m, offs_m, j, mask_d, n_q, n_kv, diag, m_base, stride_mm, stride_mn,
                kpm_base, slope, sm_scale, cap_in, cap_out, win_left, win_right, DROP_COLS,
                dropout_p, seed, dq_base, dq_offs, dm_base, stride_dmm, BLOCK_M=BLOCK_M,
                BOUNDARY=BOUNDARY, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT,
                LSE_LO=LSE_LO, FUSED_DQ=FUSED_DQ, DQ_TRANS=DQ_TRANS, MASK_GRAD=MASK_GRAD,
                DOT_PRECISION=DOT_PRECISION, TMA=TMA, LOG2_UNITS=LOG2_UNITS, k_rows=k_rows,
                v_rows=v_rows, stride_qm=stride_qm, stride_dom=stride_dom, stride_qd=stride_qd,
                stride_dod=stride_dod, stride_kd=stride_kd, stride_vd=stride_vd,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
            if FUSED_DQ:
                dq_base += BLOCK_M * stride_dqm
            if not TMA:
                q_base += BLOCK_M * stride_qm
                do_base += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_tile(tile, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DK, DV, DQ, Mask, Kpm, Alibi, CuQ, CuK,
                        DMask,
                        stride_qz, stride_qh, stride_qm, stride_qd,
                        stride_kz, stride_kh, stride_kn, stride_kd,
                        stride_vz, stride_vh, stride_vn, stride_vd,
                        stride_doz, stride_doh, stride_dom, stride_dod,
                        stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                        stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                        stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                        stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                        H, GROUP, GROUP_SPLIT, GROUP_PART, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left,
                        win_right, dropout_p, seed, DROP_COLS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                        HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                        DROPOUT: tl.constexpr, VARLEN: tl.constexpr, LSE_LO: tl.constexpr,
                        FUSED_DQ: tl.constexpr, MASK_GRAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
                        LOG2_UNITS: tl.constexpr):
    # One program owns one K/V tile of one kv head and loops over the query heads of its group
    # and over their query tiles: dK/dV are complete in registers, no atomics (deterministic).
    # GROUP_SPLIT > 1 (GQA at low parallelism, launch.gqa_split): GROUP_SPLIT programs share a kv
    # head, each over GROUP / GROUP_SPLIT of its query heads, and store their partial dK/dV at
    # head index `head` of an fp32 workspace [B, Hkv * GROUP_SPLIT, Nk, D] that the host sums
    # over the split in a fixed order (still deterministic). GROUP_SPLIT = 1 is today's kernel.
    # GROUP_PART = GROUP // GROUP_SPLIT, the query heads each program loops over, is passed so
    # that the JIT specialises 1 away: with one head per program (MHA, or GQA split over its
    # whole group) the head loop disappears and the kernel compiles as MHA's does.
    # FUSED_DQ (the non-deterministic path, FlashAttention-2's 5 GEMMs per tile pair): each
    # query tile's dQ contribution dS K is also formed here and atomically added (fp32,
    # unscaled) into DQ, a zeroed [B, Hq, Nq, D] fp32 accumulator; the dQ kernel is not run,
    # and with MASK_GRAD the mask gradient dS is written here instead of by the dQ kernel.
    start_n = tile
    off_hkv = head // GROUP_SPLIT  # kv head
    g0 = (head % GROUP_SPLIT) * GROUP_PART
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

    k_rows = K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + rows_n * stride_kn
    v_rows = V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + rows_n * stride_vn
    k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(v_rows + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
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
    # the unbounded range ends at the last query tile wholly within n_q: a ragged last tile
    # goes to the bounded loop, which masks the rows
    full_hi = tl.minimum(full_hi, (n_q // BLOCK_M) * BLOCK_M)
    if FUSED_DQ:
        # a ragged key tile goes through the bounded loop whole, which masks the keys past
        # n_kv: unmasked, their score (0, plus ALiBi's bias) may pass the row's lse and P
        # overflow, and dQ += dS K would add inf * 0 = NaN (the dK/dV rows of those keys are
        # never stored, so the deterministic dK/dV kernel leaves them unmasked)
        full_hi = tl.where(n0 + BLOCK_N > n_kv, full_lo, full_hi)
    m_lo = tl.minimum(m_lo, m_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), m_hi)

    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # [BLOCK_M, BLOCK_D]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    # dQ's MMA takes the larger of the query tile and the head dim as its M (rows): on sm_90 a
    # 64-row first operand on 8 warps is computed by both warpgroups (replication)
    DQ_TRANS: tl.constexpr = BLOCK_D > BLOCK_M
    if DQ_TRANS:  # dQ^T tile [BLOCK_D, BLOCK_M]
        dq_offs = offs_d[:, None] * stride_dqd + offs_m[None, :] * stride_dqm
    else:
        dq_offs = offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    kT = k  # unused unless FUSED_DQ and DQ_TRANS
    if FUSED_DQ and DQ_TRANS:
        # K^T [BLOCK_D, BLOCK_N] loaded as its own operand (not tl.trans(k): a second,
        # transposed register copy of k held through the loop)
        kT = tl.load(K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh
                     + rows_n.reshape(1, BLOCK_N) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & (offs_n[None, :] < n_kv), other=0.0)
    # LOG2_UNITS (16-bit): scores in log2 units, as the forward's (the scale and the softcap's
    # factor times log2 e here, ALiBi's slope below, an additive mask in _scores); dK keeps sm_scale
    s_scale = sm_scale
    s_cap_out = cap_out
    if LOG2_UNITS:
        s_scale = sm_scale * LOG2E
        s_cap_out = cap_out * LOG2E
    for gi in range(0, GROUP_PART):
        g = g0 + gi
        off_h = off_hkv * GROUP + g
        q_base = (Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh
                  + q_start.to(tl.int64) * stride_qm)
        do_base = (DO + z64 * stride_doz + off_h.to(tl.int64) * stride_doh
                   + q_start.to(tl.int64) * stride_dom)
        if TMA:  # Q / dO tiles by descriptor (launch.use_tma_bwd; see _attn_fwd_tile)
            q_base = tl.make_tensor_descriptor(q_base, shape=[n_q, HEAD_DIM],
                                               strides=[stride_qm, 1],
                                               block_shape=[BLOCK_M, BLOCK_D])
            do_base = tl.make_tensor_descriptor(do_base, shape=[n_q, HEAD_DIM],
                                                strides=[stride_dom, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start
        m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
        dq_base = (DQ + z64 * stride_dqz + off_h.to(tl.int64) * stride_dqh
                   + q_start.to(tl.int64) * stride_dqm)
        dm_base = DMask + (z * H + off_h).to(tl.int64) * N_Q * N_KV  # dense [B, Hq, Nq, Nk] fp32
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + seq * H + off_h)
            if LOG2_UNITS:
                slope = slope * LOG2E
        # two loops, unrolled at compile time: the bounded one over [m_lo, full_lo) (crosses
        # the right edge: causal diagonal, WIN_RIGHT) and [full_hi, m_hi) (crosses the left
        # edge, WIN_LEFT, or the ragged last query tile), then [full_lo, full_hi), where every
        # row sees the whole key tile and is inside n_q (no bound, window or row mask)
        for part in tl.static_range(2):
            if part == 0:
                a_lo = m_lo
                a_hi = full_lo
                b_lo = full_hi
                b_hi = m_hi
            else:
                a_lo = full_lo
                a_hi = full_hi
                b_lo = full_hi
                b_hi = full_hi
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, kT, q_base=q_base, do_base=do_base, q_offs=q_offs, do_offs=do_offs,
                Lse=Lse, LseLo=LseLo, Delta=Delta, stride_qm=stride_qm, stride_dom=stride_dom,
                row0=row0, lo=a_lo, hi=a_hi, lo2=b_lo, hi2=b_hi, offs_m=offs_m, j=j,
                mask_d=mask_d, n_q=n_q, n_kv=n_kv, diag=diag, m_base=m_base,
                stride_mm=stride_mm, stride_mn=stride_mn, kpm_base=kpm_base, slope=slope,
                sm_scale=s_scale, cap_in=cap_in, cap_out=s_cap_out, win_left=win_left,
                win_right=win_right, DROP_COLS=DROP_COLS, dropout_p=dropout_p, seed=seed,
                dq_base=dq_base, dq_offs=dq_offs, stride_dqm=stride_dqm, dm_base=dm_base,
                stride_dmm=N_KV, BLOCK_M=BLOCK_M, BOUNDARY=part == 0, WIN_LEFT=WIN_LEFT,
                WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, LSE_LO=LSE_LO, FUSED_DQ=FUSED_DQ,
                DQ_TRANS=DQ_TRANS, MASK_GRAD=MASK_GRAD, DOT_PRECISION=DOT_PRECISION, TMA=TMA,
                LOG2_UNITS=LOG2_UNITS, k_rows=k_rows, v_rows=v_rows, stride_qd=stride_qd,
                stride_dod=stride_dod, stride_kd=stride_kd, stride_vd=stride_vd,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)

    dk *= sm_scale
    tl.store(DK + z64 * stride_dkz + head.to(tl.int64) * stride_dkh + rows_n * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + z64 * stride_dvz + head.to(tl.int64) * stride_dvh + rows_n * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, LseLo, Delta, DK, DV, DQ, Mask, Kpm, Alibi, CuQ, CuK, DMask,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_doz, stride_doh, stride_dom, stride_dod,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                   stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                   stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                   H, GROUP, GROUP_SPLIT, GROUP_PART, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left,
                   win_right, dropout_p, seed, DROP_COLS, MAX_SEQLEN,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                   DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQ_LOOP: tl.constexpr,
                   LSE_LO: tl.constexpr, FUSED_DQ: tl.constexpr, MASK_GRAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
                   LOG2_UNITS: tl.constexpr):
    # program -> (key tile, kv head x split part, sequence)
    tile, head, seq, n_tiles = _program_tile(MAX_SEQLEN, BLOCK_N, H // GROUP * GROUP_SPLIT)
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row
        n_real = tl.load(CuK + seq + 1) - tl.load(CuK + seq)
        for t in range(tile, (n_real + BLOCK_N - 1) // BLOCK_N, n_tiles):
            _attn_bwd_dkdv_tile(t, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DK, DV, DQ, Mask, Kpm,
                                Alibi, CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd,
                                stride_kz, stride_kh, stride_kn, stride_kd, stride_vz, stride_vh,
                                stride_vn, stride_vd, stride_doz, stride_doh, stride_dom,
                                stride_dod, stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                                stride_dvz, stride_dvh, stride_dvn, stride_dvd, stride_dqz,
                                stride_dqh, stride_dqm, stride_dqd, stride_mz, stride_mh,
                                stride_mm, stride_mn, stride_kpz, H, GROUP, GROUP_SPLIT, GROUP_PART, N_Q,
                                N_KV, sm_scale, cap_in, cap_out, win_left, win_right, dropout_p,
                                seed, DROP_COLS,
                                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                                BLOCK_N=BLOCK_N, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
                                MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                                SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, VARLEN=VARLEN,
                                LSE_LO=LSE_LO, FUSED_DQ=FUSED_DQ, MASK_GRAD=MASK_GRAD,
                                DOT_PRECISION=DOT_PRECISION, TMA=TMA,
                                LOG2_UNITS=LOG2_UNITS)
    else:
        _attn_bwd_dkdv_tile(tile, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DK, DV, DQ, Mask, Kpm,
                            Alibi, CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd,
                            stride_kz, stride_kh, stride_kn, stride_kd, stride_vz, stride_vh,
                            stride_vn, stride_vd, stride_doz, stride_doh, stride_dom, stride_dod,
                            stride_dkz, stride_dkh, stride_dkn, stride_dkd, stride_dvz,
                            stride_dvh, stride_dvn, stride_dvd, stride_dqz, stride_dqh,
                            stride_dqm, stride_dqd, stride_mz, stride_mh, stride_mm, stride_mn,
                            stride_kpz, H,
                            GROUP, GROUP_SPLIT, GROUP_PART, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                            dropout_p, seed, DROP_COLS, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WIN_LEFT=WIN_LEFT,
                            WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM,
                            HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, VARLEN=VARLEN,
                            LSE_LO=LSE_LO, FUSED_DQ=FUSED_DQ, MASK_GRAD=MASK_GRAD,
                            DOT_PRECISION=DOT_PRECISION, TMA=TMA, LOG2_UNITS=LOG2_UNITS)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, lse_lo, delta, k_base, v_base, k_offs, v_offs,
                       stride_kn, stride_vn, lo, hi, i, offs_n, mask_d, n_q, n_kv, diag,
                       m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out,
                       win_left, win_right, row0, DROP_COLS, dropout_p, seed, dm_base, stride_dmm,
                       BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                       WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                       MASK_GRAD: tl.constexpr, LSE_LO: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
                       LOG2_UNITS: tl.constexpr, q_rows, do_rows, ok_m, stride_qd, stride_dod,
                       stride_kd, stride_vd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # TMA: k_base / v_base are tensor descriptors of the [n_kv, D] key rows (zero past n_kv).
    # SLICED (fp32 exact scores at BLOCK_D 128): the scores and dP from q / dO / K / V reloaded
    # in slices of D (_math.dot_f32_exact_sliced; q_rows / do_rows: the tile's row pointers),
    # uncompensated (COMPENSATED=False, the one chain over D): the compensated scores spilled
    # this kernel (AOT, Triton 3.9, sm_90 fp32 D=128: 32x16/8/1 16-260 B, 16x16/8/1 GQA causal
    # 8 B), so its P carries the chain's rounding against the forward's lse (relative ~1e-7 to
    # 1e-6 at |s| ~ 30), as the whole backward did before 2026-12-08; the dK/dV kernel's
    # scores are compensated (its P matches lse). fp32 has no fused-dQ cell: this kernel runs.
    SLICED: tl.constexpr = DOT_PRECISION == "exact_scores" and BLOCK_D > 64 and not TMA
    if not TMA:
        k_base += tl.cast(lo, tl.int64) * stride_kn
        v_base += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        j = (start_n + offs_n)[None, :]
        if TMA:
            kT = k_base.load([start_n, 0]).T
            vT = v_base.load([start_n, 0]).T
        elif BOUNDARY:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
        else:
            kT = tl.load(k_base + k_offs, mask=mask_d[:, None], other=0.0)
            vT = tl.load(v_base + v_offs, mask=mask_d[:, None], other=0.0)
        # -- recompute P [BLOCK_M, BLOCK_N]; masked to -inf before exp2 ----
        if SLICED:
            ok_n = j < n_kv
            qk = dot_f32_exact_sliced(q_rows, stride_qd, ok_m, k_base + offs_n[None, :] * stride_kn,
                                      stride_kd, ok_n, HEAD_DIM, BLOCK_D, EXACT_SLICE,
                                      COMPENSATED=False)
        else:
            qk = _dot(q, kT, DOT_PRECISION)
        s, t = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base, slope,
                       sm_scale, cap_in, cap_out, win_left, win_right, BOUNDARY=BOUNDARY,
                       WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                       HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                       LOG2_UNITS=LOG2_UNITS, base=start_n)
        if LSE_LO:  # fp32: see _attn_bwd_dkdv_inner
            p = tl.math.exp2(((s - lse[:, None]) - lse_lo[:, None]) * LOG2E)
        elif LOG2_UNITS:  # 16-bit: log2 units (_attn_bwd_dkdv_inner)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        # -- dS = P * (dP - delta), dQ += dS K ----
        if SLICED:
            dp = dot_f32_exact_sliced(do_rows, stride_dod, ok_m, v_base + offs_n[None, :] * stride_vn,
                                      stride_vd, ok_n, HEAD_DIM, BLOCK_D, EXACT_SLICE,
                                      COMPENSATED=False)
        else:
            dp = _dot(do, vT, DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, row0 + i, j, DROP_COLS, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # d(additive mask) = dS, written [B, Hq, Nq, Nk] (reduced by the caller)
            tl.store(dm_base + i.to(tl.int64) * stride_dmm + j, ds, mask=(i < n_q) & (j < n_kv))
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _gdot_acc(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION)
        if not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq_tile(tile, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DQ, Mask, Kpm, KvRange, Alibi, CuQ, CuK, DMask,
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
                      LSE_LO: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
                      LOG2_UNITS: tl.constexpr):
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

    q_rows = Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh + rows_m * stride_qm
    do_rows = DO + z64 * stride_doz + off_h.to(tl.int64) * stride_doh + rows_m * stride_dom
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(do_rows + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start
    if LOG2_UNITS:  # the preprocess's lse * log2(e), +inf for empty rows (and past n_q)
        lse = tl.load(Lse + row0 + offs_m, mask=mask_m, other=float("inf"))
    else:
        lse = _load_lse(Lse, row0 + offs_m, mask_m)
    lse_lo = lse  # unused without LSE_LO
    if LSE_LO:
        lse_lo = tl.load(LseLo + row0 + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + row0 + offs_m, mask=mask_m, other=0.0)
    k_base = K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # V^T tile [BLOCK_D, BLOCK_N]
    if TMA:  # K / V tiles by descriptor (launch.use_tma_bwd; see _attn_fwd_tile)
        k_base = tl.make_tensor_descriptor(k_base, shape=[n_kv, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, shape=[n_kv, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
    kpm_base = Kpm + z64 * stride_kpz
    dm_base = DMask + (z * H + off_h).to(tl.int64) * N_Q * N_KV  # dense [B, Hq, Nq, Nk] fp32
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + seq * H + off_h)
        if LOG2_UNITS:
            slope = slope * LOG2E
    s_scale = sm_scale  # LOG2_UNITS: as _attn_bwd_dkdv_tile; dQ keeps sm_scale
    s_cap_out = cap_out
    if LOG2_UNITS:
        s_scale = sm_scale * LOG2E
        s_cap_out = cap_out * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(start_m * BLOCK_M, n_q, n_kv, diag, win_left, win_right,
                                          KvRange, seq, BLOCK_M, BLOCK_N,
                                          WIN_LEFT, WIN_RIGHT, HAS_KPM)
    # the forward's three key ranges (see _attn_fwd_tile), unrolled at compile time
    for part in tl.static_range(3):
        if part != 0 or WIN_LEFT:
            if part == 0:
                part_lo = lo
                part_hi = full_lo
            elif part == 1:
                part_lo = full_lo
                part_hi = full_hi
            else:
                part_lo = full_hi
                part_hi = hi
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse, lse_lo, delta, k_base=k_base, v_base=v_base, k_offs=k_offs,
                q_rows=q_rows, do_rows=do_rows, ok_m=mask_m[:, None], stride_qd=stride_qd,
                stride_dod=stride_dod, stride_kd=stride_kd, stride_vd=stride_vd,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                v_offs=v_offs, stride_kn=stride_kn, stride_vn=stride_vn, lo=part_lo, hi=part_hi,
                i=i, offs_n=offs_n, mask_d=mask_d, n_q=n_q, n_kv=n_kv, diag=diag, m_base=m_base,
                stride_mm=stride_mm, stride_mn=stride_mn, kpm_base=kpm_base, slope=slope,
                sm_scale=s_scale, cap_in=cap_in, cap_out=s_cap_out, win_left=win_left,
                win_right=win_right, row0=row0, DROP_COLS=DROP_COLS, dropout_p=dropout_p,
                seed=seed, dm_base=dm_base, stride_dmm=N_KV, BLOCK_N=BLOCK_N,
                BOUNDARY=part != 1, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT,
                MASK_GRAD=MASK_GRAD, LSE_LO=LSE_LO, DOT_PRECISION=DOT_PRECISION, TMA=TMA,
                LOG2_UNITS=LOG2_UNITS)
    # a row with no finite score has a constant output (0): zero gradient, even where a key of
    # -inf met its zero dS in the dot (0 * -inf = NaN)
    dq = tl.where((lse == float("inf"))[:, None], 0.0, dq * sm_scale)
    tl.store(DQ + z64 * stride_dqz + off_h.to(tl.int64) * stride_dqh + rows_m * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, LseLo, Delta, DQ, Mask, Kpm, KvRange, Alibi, CuQ, CuK, DMask,
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
                 MASK_GRAD: tl.constexpr, LSE_LO: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, LOG2_UNITS: tl.constexpr):
    # program -> (query tile, head, sequence)
    tile, head, seq, n_tiles = _program_tile(MAX_SEQLEN, BLOCK_M, H)
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row
        n_real = tl.load(CuQ + seq + 1) - tl.load(CuQ + seq)
        for t in range(tile, (n_real + BLOCK_M - 1) // BLOCK_M, n_tiles):
            _attn_bwd_dq_tile(t, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DQ, Mask, Kpm, KvRange, Alibi,
                              CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd,
                              stride_kz, stride_kh, stride_kn, stride_kd, stride_vz, stride_vh,
                              stride_vn, stride_vd, stride_doz, stride_doh, stride_dom, stride_dod,
                              stride_dqz, stride_dqh, stride_dqm, stride_dqd, stride_mz, stride_mh,
                              stride_mm, stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale,
                              cap_in, cap_out, win_left, win_right, dropout_p, seed, DROP_COLS,
                              HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                              WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                              HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                              DROPOUT=DROPOUT, VARLEN=VARLEN, MASK_GRAD=MASK_GRAD,
                              LSE_LO=LSE_LO, DOT_PRECISION=DOT_PRECISION, TMA=TMA,
                              LOG2_UNITS=LOG2_UNITS)
    else:
        _attn_bwd_dq_tile(tile, seq, head, Q, K, V, DO, Lse, LseLo, Delta, DQ, Mask, Kpm, KvRange, Alibi,
                          CuQ, CuK, DMask, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz,
                          stride_kh, stride_kn, stride_kd, stride_vz, stride_vh, stride_vn,
                          stride_vd, stride_doz, stride_doh, stride_dom, stride_dod, stride_dqz,
                          stride_dqh, stride_dqm, stride_dqd, stride_mz, stride_mh, stride_mm,
                          stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out,
                          win_left, win_right, dropout_p, seed, DROP_COLS, HEAD_DIM=HEAD_DIM,
                          BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WIN_LEFT=WIN_LEFT,
                          WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM,
                          HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, VARLEN=VARLEN,
                          MASK_GRAD=MASK_GRAD, LSE_LO=LSE_LO, DOT_PRECISION=DOT_PRECISION,
                          TMA=TMA, LOG2_UNITS=LOG2_UNITS)
