"""Flash-decoding (split-KV) attention for KV-cache generation: Triton kernels and host launchers.

Layout: q [B, Hq, Nq, D]; k_cache/v_cache [B, Hkv, Nmax, D], any strides; Hq = GROUP * Hkv
(MHA, GQA, MQA: query head h reads kv head h // GROUP). Batch b holds cache_seqlens[b] valid keys
(no seqlens: all Nmax); cache positions past them are never read. The Nq queries are the last Nq
positions of the sequence and attend causally: query i sees key j iff j <= len_b - Nq + i (with
Nq = 1: every valid key). A query row that sees no key outputs 0 with lse = -inf.

Two kernels, as FlashAttention's split-KV decode:
  1. _decode_split, num_splits x row blocks x B * Hkv programs on one grid axis (CUDA limits
     axes y and z to 65,535; B * Hkv passes that in large-batch serving). A program takes one KV
     head and one contiguous chunk of its batch's valid keys (ceil(len_b / num_splits) rounded up to BLOCK_N,
     so programs past the end of a short sequence find an empty range), and packs the GROUP * Nq
     query rows of that KV head's group into the rows of one tile (row r = query head r // Nq of
     the group, query r % Nq), so every K/V tile is loaded once per group, not once per query
     head. Online softmax over the chunk's tiles; it writes the normalised partial output (fp32)
     and its lse (log2 units) to a workspace [B, Hq, Nq, num_splits, D] / [B, Hq, Nq,
     num_splits]. With a single split it writes out and lse directly and the second kernel is
     not launched.
  2. _decode_combine, one program per (b, h, i) row: merges the splits by their lse,
     m = max_s lse_s, w_s = 2^(lse_s - m), out = sum_s w_s o_s / sum_s w_s,
     lse = (m + log2(sum_s w_s)) * ln 2. A split that saw no key has lse = -inf: weight 0, its
     partial output is not even read.
Every batch runs in the same launch whatever its length: the split chunk is computed per batch.

This module knows nothing of autograd (decoding is inference only): launchers take tensors and
return tensors.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import Launch, arch_family, device_arch, flat_grid, int32_tiles, is_interpreted, run
from ._constants import LN2, LOG2E
from ._math import dot_f32_exact, dot_f32_exact_sliced, tanh as _tanh
from .attention import _block_d, _dot_precision


# ---------------------------------------------------------------------------------------------
# Kernel 1: one KV head's query group against one chunk of the cache
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_inner(acc, l_i, m_i, q, k_head, v_head, k_offs, v_offs, offs_d, stride_kz,
                  stride_kn, stride_kd, stride_vz, stride_vn, stride_vd, bt_row, stride_btn, PAGE,
                  MAX_BLOCKS, N_CACHE, lo, hi, i, offs_n, mask_d, k_lo, n_kv, diag, slope,
                  qk_scale, sm_scale, cap_in, cap_out, win_left, win_right,
                  BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, PAGED: tl.constexpr,
                  HAS_LEFTPAD: tl.constexpr, CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr,
                  WIN_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, q_rows, mask_q, stride_qd,
                  HEAD_DIM: tl.constexpr, QK_CHUNK: tl.constexpr):
    # BOUNDARY=False: every key of every tile in [lo, hi) is valid and visible to every row,
    # so neither the length bound, the left padding nor the window is evaluated (the fast
    # path). k_head / v_head: the cache at this KV head (and batch row, unless PAGED).
    # QK_CHUNK (exact_qk_chunk): fp32 scores with exact products in MMA k-steps of 8
    # (_math.dot_f32_exact) where the tile affords the split's extra MMAs: 16-row tiles, at
    # full width up to BLOCK_D 64, past it in QK_CHUNK-wide slices of D (at full width BLOCK_D
    # 128 spilled 204 B, AOT, Triton 3.9, sm_80; 32- and 64-row tiles spilled at BLOCK_D 64,
    # sm_80 'all' serving variant 72 B, 'paged' 64 rows 16 B). QK_CHUNK 0: DOT_PRECISION,
    # whose 3xTF32 products err by ~2^-21 |q||k| and FMA chains grow with D
    # (tests/test_fuzz.py, the fp32 decode cases)
    BLOCK_D: tl.constexpr = q.shape[1]
    k_base = k_head + tl.cast(lo, tl.int64) * stride_kn  # not PAGED: position lo of the row
    v_base = v_head + tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n  # [BLOCK_N] key positions
        # -- key rows: position j of the sequence, or slot j % PAGE of block table[j // PAGE] --
        if PAGED:
            # clamped: the host checks the table, except while torch.compile traces
            page = tl.minimum(j // PAGE, MAX_BLOCKS - 1)
            blk = tl.load(bt_row + page * stride_btn, mask=j < n_kv, other=0)
            blk = tl.minimum(tl.maximum(blk, 0), N_CACHE - 1).to(tl.int64)
            k_row = blk * stride_kz + (j % PAGE) * stride_kn
            v_row = blk * stride_vz + (j % PAGE) * stride_vn
            k_ptrs = k_head + k_row[None, :] + offs_d[:, None] * stride_kd
            v_ptrs = v_head + v_row[:, None] + offs_d[None, :] * stride_vd
        else:
            k_ptrs = k_base + k_offs
            v_ptrs = v_base + v_offs
        # -- load K^T tile [BLOCK_D, BLOCK_N]; keys outside [k_lo, n_kv) are never read ----
        if BOUNDARY:
            # the row's keys [k_lo, n_kv), as a [1, BLOCK_N] row and a [BLOCK_N, 1] column
            # (each built from j in its own layout: no layout conversion)
            ok_n = j[None, :] < n_kv
            ok_v = j[:, None] < n_kv
            if HAS_LEFTPAD:
                ok_n = ok_n & (j[None, :] >= k_lo)
                ok_v = ok_v & (j[:, None] >= k_lo)
        if QK_CHUNK == 0 or QK_CHUNK == BLOCK_D:
            if BOUNDARY:
                k = tl.load(k_ptrs, mask=mask_d[:, None] & ok_n, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
            if QK_CHUNK == 0:
                qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            else:
                qk = dot_f32_exact(q, k)
        else:
            # exact score products over D in QK_CHUNK-wide slices (_math.dot_f32_exact_sliced,
            # as the attention kernels' at BLOCK_D 128), one slice's pieces live at a time. q's
            # slices are loop-invariant: Triton hoists their loads and keeps the pieces in
            # shared memory (AOT TTGIR); the second pass's loads are the first's (CSE)
            if PAGED:
                k_rows = k_head + k_row[None, :]
            else:
                k_rows = k_base + offs_n[None, :] * stride_kn
            if not BOUNDARY:
                ok_n = tl.full([1, BLOCK_N], 1, tl.int1)  # every key of the tile (folds away)
            qk = dot_f32_exact_sliced(q_rows, stride_qd, mask_q, k_rows, stride_kd, ok_n,
                                      HEAD_DIM, BLOCK_D, QK_CHUNK)
        if SOFTCAP or HAS_ALIBI:
            # natural units as attention's _scores (same formulas), then to log2 units
            if SOFTCAP:
                s = _tanh(qk * cap_in) * cap_out  # cap_in = scale / softcap, cap_out = softcap
            else:
                s = qk * sm_scale
            if HAS_ALIBI:
                s += slope * (-tl.abs(i + diag - j[None, :])).to(tl.float32)
            s = s * LOG2E
        else:
            # log2 units: qk_scale = scale * log2(e), one multiply (see _decode_split)
            s = qk * qk_scale  # [BLOCK_M, BLOCK_N]
        if BOUNDARY:
            keep = ok_n  # keys before the left padding's end are not the row's
            if CAUSAL:       # query i sees j <= len - Nq + i
                keep = keep & (j[None, :] <= i + diag)
            if WIN_RIGHT:    # a right window edge > 0
                keep = keep & (j[None, :] <= i + diag + win_right)
            if WIN_LEFT:
                keep = keep & (j[None, :] >= i + diag - win_left)
            s = tl.where(keep, s, float("-inf"))
        # -- online softmax update ----
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        # a row with no finite score so far (no visible key, or keys of -inf in the cache: on
        # the fast path too) keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, not NaN)
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- accumulate p @ v; V rows outside [k_lo, n_kv) load as 0 (garbage, even NaN,
        # never meets a zero probability) ----
        if BOUNDARY:
            v = tl.load(v_ptrs, mask=ok_v & mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _decode_split(Q, K, V, SeqLens, LeftPad, BatchIdx, BlockTable, Alibi, Out, Lse, OPart,
                  LsePart,
                  stride_qz, stride_qh, stride_qm, stride_qd,
                  stride_kz, stride_kh, stride_kn, stride_kd,
                  stride_vz, stride_vh, stride_vn, stride_vd,
                  stride_oz, stride_oh, stride_om, stride_od,
                  stride_btz, stride_btn, stride_az, stride_ah,
                  HQ, HKV, GROUP, N_Q, N_MAX, NUM_SPLITS, N_CACHE, PAGE, MAX_BLOCKS,
                  qk_scale, sm_scale, cap_in, cap_out, win_left, win_right,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_SEQLENS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                  HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr,
                  CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_CHUNK: tl.constexpr):
    # Scores are in log2 units, s = q k^T * (scale * log2 e), so p = exp2(s - m) (FlashAttention-2's
    # folding): one rounding per score fewer than natural units' exp2((s - m) * log2 e), where
    # rounding the product moves p by up to |s - m| ulp. attention.py keeps natural units for
    # its backward, which recomputes P from a stored lse; nothing is recomputed here. With
    # softcap or ALiBi the score is built in natural units (attention's formulas) and then
    # converted. The workspace lse stays in log2 units for the combine; the returned lse is a
    # natural log.
    # program -> (split, row block, kv head, batch) on grid axis 0 (CUDA's axes 1 and 2 stop at
    # 65,535: B * Hkv passes that in large-batch serving), splits fastest
    n_row_blocks = tl.cdiv(GROUP * N_Q, BLOCK_M)
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    row_block = (pid // NUM_SPLITS) % n_row_blocks
    bh = pid // NUM_SPLITS // n_row_blocks
    b = bh // HKV
    off_hkv = bh % HKV

    # -- this batch row's keys: [k_lo, n_kv) (left padding, length), all clamped: the host
    # checks them, except while torch.compile traces ----
    if HAS_SEQLENS:
        n_kv = tl.minimum(tl.maximum(tl.load(SeqLens + b), 0), N_MAX)
    else:
        n_kv = N_MAX + b * 0
    if HAS_LEFTPAD:
        k_lo = tl.minimum(tl.maximum(tl.load(LeftPad + b), 0), n_kv)
    else:
        k_lo = b * 0
    diag = n_kv - N_Q  # query i sits at position diag + i (bottom-right alignment)
    if HAS_LEFTPAD or WIN_LEFT or WIN_RIGHT:
        # keys some row of the tile sees: [vis_lo, vis_hi); every row sees [all_lo, all_hi)
        vis_lo = k_lo
        vis_hi = n_kv
        all_lo = k_lo
        all_hi = n_kv
        if WIN_LEFT:   # row i sees j >= diag + i - left: row 0 the most, row Nq - 1 the least
            vis_lo = tl.maximum(vis_lo, diag - win_left)
            all_lo = tl.maximum(all_lo, diag + N_Q - 1 - win_left)
        if CAUSAL:     # row i sees j <= diag + i
            vis_hi = tl.minimum(vis_hi, tl.maximum(diag + N_Q, 0))
            all_hi = tl.minimum(all_hi, tl.maximum(diag + 1, 0))
        if WIN_RIGHT:  # row i sees j <= diag + i + right
            vis_hi = tl.minimum(vis_hi, tl.maximum(diag + N_Q + win_right, 0))
            all_hi = tl.minimum(all_hi, tl.maximum(diag + 1 + win_right, 0))
        vis_lo = (tl.minimum(vis_lo, vis_hi) // BLOCK_N) * BLOCK_N
        # split `split` of the visible range: a whole number of tiles per split
        chunk = tl.cdiv(tl.cdiv(vis_hi - vis_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = vis_lo + split * chunk
        hi = tl.minimum(lo + chunk, vis_hi)  # lo >= hi: past the row's keys, nothing to visit
        # whole tiles every row sees entirely: [full_lo, full_hi), inside [lo, hi)
        full_lo = tl.minimum(tl.maximum(tl.cdiv(all_lo, BLOCK_N) * BLOCK_N, lo),
                             tl.maximum(hi, lo))
        full_hi = tl.minimum(tl.maximum((tl.maximum(all_hi, 0) // BLOCK_N) * BLOCK_N, full_lo),
                             tl.maximum(hi, full_lo))
    else:
        # keys [0, n_kv), causal or not: the plain decode step, with the range arithmetic of
        # the kernel before the serving options (the general form above moved ptxas's
        # register allocation: sm_80 fp32 D=64 32 rows from 220 regs to 168 + 8 B spilled)
        chunk = tl.cdiv(tl.cdiv(n_kv, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole tiles
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_kv)  # lo >= hi: past this sequence's end
        if CAUSAL:  # keys < diag + 1 are visible to every row
            all_tiles = (tl.maximum(diag + 1, 0) // BLOCK_N) * BLOCK_N
        else:
            all_tiles = (n_kv // BLOCK_N) * BLOCK_N
        full_lo = lo
        full_hi = tl.minimum(tl.maximum(all_tiles, lo), hi)

    # -- rows: the GROUP query heads of this KV head times the Nq queries ----
    offs_r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row in the group tile
    g = offs_r // N_Q              # query head within the group
    i = (offs_r % N_Q)[:, None]    # query index, [BLOCK_M, 1]
    mask_r = offs_r < GROUP * N_Q
    off_h = (off_hkv * GROUP + g).to(tl.int64)  # [BLOCK_M] query heads
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # folds to all-true when HEAD_DIM == BLOCK_D

    # int64 base offsets: B*H*N*D may pass 2^31; in-tile offsets stay int32
    b64 = b.to(tl.int64)
    q_rows = Q + b64 * stride_qz + off_h[:, None] * stride_qh + i * stride_qm
    q_ptrs = q_rows + offs_d[None, :] * stride_qd
    if HAS_BATCH_IDX:  # batch row b reads cache row BatchIdx[b]
        cb = tl.minimum(tl.maximum(tl.load(BatchIdx + b), 0), N_CACHE - 1).to(tl.int64)
    else:
        cb = b64
    if PAGED:  # the block index is per key (_decode_inner); the row's block table
        k_head = K + off_hkv.to(tl.int64) * stride_kh
        v_head = V + off_hkv.to(tl.int64) * stride_vh
    else:
        k_head = K + cb * stride_kz + off_hkv.to(tl.int64) * stride_kh
        v_head = V + cb * stride_vz + off_hkv.to(tl.int64) * stride_vh
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, BLOCK_D]
    bt_row = BlockTable + b64 * stride_btz
    slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:  # per row: the rows of the tile are different query heads
        slope = tl.load(Alibi + b64 * stride_az + off_h[:, None] * stride_ah, mask=mask_r[:, None],
                        other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the query tile (the whole group) stays on chip for the whole loop
    q = tl.load(q_ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0)

    # three key ranges: [lo, full_lo) crosses the left padding or the window's left edge,
    # [full_lo, full_hi) is seen whole by every row (no mask), [full_hi, hi) crosses the causal
    # diagonal / window's right edge and holds the ragged tail of the sequence
    if HAS_LEFTPAD or WIN_LEFT:
        acc, l_i, m_i = _decode_inner(
            acc, l_i, m_i, q, k_head, v_head, k_offs, v_offs, offs_d, stride_kz, stride_kn,
            stride_kd, stride_vz, stride_vn, stride_vd, bt_row, stride_btn, PAGE, MAX_BLOCKS,
            N_CACHE, lo, full_lo, i, offs_n, mask_d, k_lo, n_kv, diag, slope, qk_scale,
            sm_scale, cap_in, cap_out, win_left, win_right, BLOCK_N=BLOCK_N, BOUNDARY=True,
            PAGED=PAGED, HAS_LEFTPAD=HAS_LEFTPAD, CAUSAL=CAUSAL, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
            HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        q_rows=q_rows, mask_q=mask_r[:, None], stride_qd=stride_qd, HEAD_DIM=HEAD_DIM,
        QK_CHUNK=QK_CHUNK)
    acc, l_i, m_i = _decode_inner(
        acc, l_i, m_i, q, k_head, v_head, k_offs, v_offs, offs_d, stride_kz, stride_kn,
        stride_kd, stride_vz, stride_vn, stride_vd, bt_row, stride_btn, PAGE, MAX_BLOCKS,
        N_CACHE, full_lo, full_hi, i, offs_n, mask_d, k_lo, n_kv, diag, slope, qk_scale,
        sm_scale, cap_in, cap_out, win_left, win_right, BLOCK_N=BLOCK_N, BOUNDARY=False,
        PAGED=PAGED, HAS_LEFTPAD=HAS_LEFTPAD, CAUSAL=CAUSAL, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
        HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        q_rows=q_rows, mask_q=mask_r[:, None], stride_qd=stride_qd, HEAD_DIM=HEAD_DIM,
        QK_CHUNK=QK_CHUNK)
    acc, l_i, m_i = _decode_inner(
        acc, l_i, m_i, q, k_head, v_head, k_offs, v_offs, offs_d, stride_kz, stride_kn,
        stride_kd, stride_vz, stride_vn, stride_vd, bt_row, stride_btn, PAGE, MAX_BLOCKS,
        N_CACHE, full_hi, hi, i, offs_n, mask_d, k_lo, n_kv, diag, slope, qk_scale,
        sm_scale, cap_in, cap_out, win_left, win_right, BLOCK_N=BLOCK_N, BOUNDARY=True,
        PAGED=PAGED, HAS_LEFTPAD=HAS_LEFTPAD, CAUSAL=CAUSAL, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
        HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        q_rows=q_rows, mask_q=mask_r[:, None], stride_qd=stride_qd, HEAD_DIM=HEAD_DIM,
        QK_CHUNK=QK_CHUNK)

    # -- epilogue: normalise; rows with no visible key give 0 and lse = -inf ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc * (1.0 / l_safe)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # log2 units
    # flat [B, Hq, Nq] row index: (b * Hq + h) * Nq + i = (b * Hq + hkv * GROUP) * Nq + r
    row = (b64 * HQ + off_hkv * GROUP) * N_Q + offs_r
    mask_rd = mask_r[:, None] & mask_d[None, :]
    if SINGLE_SPLIT:  # the final result, in q's dtype, through out's strides
        o_ptrs = (Out + b64 * stride_oz + off_h[:, None] * stride_oh + i * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_rd)
        tl.store(Lse + row, lse2 * LN2, mask=mask_r)
    else:  # workspace [B, Hq, Nq, NUM_SPLITS, HEAD_DIM] / [B, Hq, Nq, NUM_SPLITS], contiguous
        part = row * NUM_SPLITS + split
        tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_rd)
        tl.store(LsePart + part, lse2, mask=mask_r)


# ---------------------------------------------------------------------------------------------
# Kernel 2: merge the splits of one (b, h, i) row
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_combine(OPart, LsePart, Out, Lse,
                    stride_oz, stride_oh, stride_om, stride_od,
                    HQ, N_Q, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # flat [B, Hq, Nq] row
    b = row // (HQ * N_Q)
    off_h = (row // N_Q) % HQ
    i = row % N_Q
    offs_s = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    part0 = row * NUM_SPLITS

    # online softmax over the splits, SPLIT_TILE at a time (any NUM_SPLITS, bounded registers)
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, SPLIT_TILE):
        mask_s = s0 + offs_s < NUM_SPLITS
        lse_s = tl.load(LsePart + part0 + s0 + offs_s, mask=mask_s, other=float("-inf"))  # log2
        m_new = tl.maximum(m_i, tl.max(lse_s, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: every weight is 0
        alpha = tl.math.exp2(m_i - m_sub)
        w = tl.math.exp2(lse_s - m_sub)  # [SPLIT_TILE]; 0 for a split with no key
        # -- partial outputs [SPLIT_TILE, BLOCK_D]; splits with weight 0 are not read ----
        o = tl.load(OPart + (part0 + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(w > 0.0)[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new

    # -- epilogue: rows no split saw a key for give 0 and lse = -inf ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # natural log
    o_ptrs = Out + b * stride_oz + off_h * stride_oh + i * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_d)
    tl.store(Lse + row + tl.arange(0, 1), lse)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def _cfg(block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _combine_cfg(split_tile, num_warps, num_stages):
    return triton.Config({"SPLIT_TILE": split_tile}, num_warps=num_warps, num_stages=num_stages)


# Rows of the split kernel's query tile: GROUP * Nq padded to a power of two, at least 16
# (tl.dot's minimum M), at most the largest BLOCK_M the config table has for the head dim and
# dtype (more rows run in several row blocks, each streaming the chunk's K/V again).
MIN_BLOCK_M = 16
# fp32 16-row tiles at BLOCK_D 128: the exact score dot's slice width (exact_qk_chunk)
EXACT_QK_CHUNK = 32

# Interpreter tiles: BLOCK_N = 16 so the tests' short caches (up to 50 keys) span several
# tiles and splits; SPLIT_TILE = 2 so that their (at most 4) non-empty splits already take two
# steps of the combine's loop (the rescale between steps) and an odd count a ragged last step.
INTERPRETER_CONFIGS = {
    "split": _cfg(16, 4, 1),
    "combine": _combine_cfg(2, 4, 1),
}
INTERPRETER_MAX_BLOCK_M = 64

# GPU configs: {arch family: [(max BLOCK_D, element bytes, max BLOCK_M, [configs])]}: the
# smallest head-dim bucket holding BLOCK_D, then its first entry holding the query tile; the
# largest max BLOCK_M of a bucket caps the tile. Written for an H100 (sm_90) and sm_80.
# Decoding is bandwidth-bound: the query tile is small and K/V tiles stream through shared
# memory, so each entry takes the widest KV tile / deepest pipeline that passes.
# NOTE: picked by an AOT sweep (`inspect --op decode` plans: GQA 8:1 with Nq = 1, 4, 8 for 16,
# 32, 64 rows; split and single-split stores) on Triton 3.7.1 AND 3.9: the first candidate in
# the order BLOCK_N 128 -> 16, deeper -> shallower pipeline, 4 -> 8 warps that is spill-free
# with <= 240 registers on both (register allocation moves by tens between the versions:
# sm_90 fp16 D=128 32 rows 128/4 warps/2 stages was 255 regs, 0 B on 3.9 but spilled 12 B on
# 3.7.1) and lets two programs share an SM (shared memory <= half the SM's, registers x threads
# <= 32K), which the num_splits heuristic (PROGRAMS_PER_SM) counts on. Where nothing gives two
# per SM (marked 1/SM), the first spill-free one. E.g. 256-wide fp16 heads at 32 rows: every
# 4-warp tile spilled or sat at 245-255 regs. fp32 beyond D=64 computes its dots in exact fp32
# FMA (attention's _dot_precision), which holds at most 32 rows at D=128 and 16 at D=256;
# 16-row fp32 tiles at D=128 compute the scores exactly instead (exact_qk_chunk), which the
# 16-key tile holds under 245 registers with 4 warps (two per SM) on both versions.
# Comments: registers / shared memory per entry, worst over the plans it serves and both versions.
SPLIT_CONFIGS = {
    # 128/4/3 read from Triton's own ptxas run (inspect since 821e9fd): 16-row single-split
    # capped at 128 regs, 8 B spilled (3.9); 128/8/3 is 162 regs x 256 threads (1/SM)
    90: [(64, 2, 16, [_cfg(64, 4, 2)]),    # 80 regs, 20 KB (64/4/3: 'all' serving variant
         #                                   spilled 24 B on 3.9)
         (64, 2, 32, [_cfg(64, 4, 3)]),    # 126 regs, 40 KB
         (64, 2, 64, [_cfg(64, 4, 3)]),    # 167 regs, 56 KB
         (128, 2, 16, [_cfg(128, 4, 2)]),  # 186 regs, 72 KB
         (128, 2, 64, [_cfg(32, 4, 3)]),   # 187 regs, 64 KB
         (256, 2, 16, [_cfg(64, 4, 2)]),   # 187 regs, 74 KB
         (256, 2, 32, [_cfg(64, 8, 3)]),   # 178 regs, 148 KB: 1/SM
         (64, 4, 16, [_cfg(64, 4, 3)]),    # 3xTF32 dots: 221 regs, 80 KB
         (64, 4, 64, [_cfg(16, 4, 2)]),    # 228 regs, 48 KB
         (128, 4, 16, [_cfg(16, 4, 2)]),   # exact scores in 32-wide slices: 242 regs, 42 KB
         #                                   (32/4/2 on 3.9: paged 52 B, 'all' 8 B spilled)
         (128, 4, 32, [_cfg(16, 8, 2)]),   # FMA dots: 80 regs, 34 KB
         (256, 4, 16, [_cfg(32, 8, 2)])],  # 115 regs, 82 KB
    # 128/4/3: 32-row single-split spilled 16 B on Triton 3.7.1 (its own ptxas run)
    80: [(64, 2, 32, [_cfg(64, 4, 3)]),    # 128 regs, 40 KB
         (64, 2, 64, [_cfg(32, 4, 3)]),    # 143 regs, 24 KB
         (128, 2, 16, [_cfg(128, 4, 2)]),  # 186 regs, 72 KB
         (128, 2, 32, [_cfg(64, 4, 3)]),   # 191 regs, 76 KB
         (128, 2, 64, [_cfg(64, 8, 3)]),   # 176 regs, 88 KB: 1/SM
         (256, 2, 16, [_cfg(32, 8, 2)]),   # 128 regs, 41 KB
         (256, 2, 32, [_cfg(64, 8, 3)]),   # 184 regs, 148 KB: 1/SM
         (64, 4, 16, [_cfg(64, 4, 3)]),    # 3xTF32 dots: 230 regs, 80 KB
         (64, 4, 32, [_cfg(32, 4, 2)]),    # 220 regs, 40 KB
         (64, 4, 64, [_cfg(16, 8, 2)]),    # 167 regs, 40 KB: 1/SM
         (128, 4, 16, [_cfg(16, 4, 1)]),   # exact scores in 32-wide slices: 194 regs, 33 KB
         #                                   (3.9: 64/4/2 spilled 320-736 B; 64/8/2 and
         #                                   32/8/2 paged/all 253-255 regs x 256 threads;
         #                                   16/4/2 8-32 B once the slices were compensated,
         #                                   _math.dot_f32_exact_sliced, 2026-12-08)
         (128, 4, 32, [_cfg(16, 8, 2)]),   # FMA dots: 80 regs, 34 KB
         (256, 4, 16, [_cfg(32, 8, 2)])],  # 107 regs, 82 KB: 1/SM (just over half of 163 KB)
}
# The serving variants (paged cache, left padding, window, ALiBi, softcap: anything beyond the
# plain causal step) compile to different register allocations. Where a plain entry's config
# spilled in one of them (`inspect --op decode`: the "+paged" and "+all" rows, both Triton
# versions), the variants take this entry instead; measured spill-free for plain, paged and all
# options, single and split, on 3.7.1 and 3.9.
SERVING_CONFIGS = {
    # 128/4/2 with every option: 255 regs + 24 B (3.9); 64/4/2 148-162 regs, 38 KB
    90: [(128, 2, 16, [_cfg(64, 4, 2)])],
}
# sm_86/sm_89 and sm_120 (99 KB per block): sm_80's entries (same shared memory on these targets,
# measured: tests/data/config_smem.json) except the D=256 32-row one, 151,552 B on all three
SPLIT_CONFIGS[86] = SPLIT_CONFIGS[120] = [
    e if e[:3] != (256, 2, 32) else (256, 2, 32, [_cfg(32, 8, 2)]) for e in SPLIT_CONFIGS[80]]
# the combine kernel: one row per program, SPLIT_TILE x BLOCK_D fp32 partials per step
COMBINE_CONFIG = _combine_cfg(16, 4, 2)


def _split_entries(arch: int, block_d: int, elem_bytes: int) -> list:
    """[(max BLOCK_M, configs)] of the smallest head-dim bucket holding block_d."""
    table = [e for e in SPLIT_CONFIGS[arch_family(arch)] if e[1] == elem_bytes and block_d <= e[0]]
    if not table:
        raise ValueError(f"no decode config for head dim {block_d}, {elem_bytes}-byte elements")
    bucket = min(e[0] for e in table)
    return [(max_m, cfgs) for max_d, _, max_m, cfgs in table if max_d == bucket]


def max_block_m(arch: int | None, block_d: int, elem_bytes: int) -> int:
    """Largest query tile (rows) shipped for this head dim and dtype."""
    if arch is None:
        return INTERPRETER_MAX_BLOCK_M
    return max(m for m, _ in _split_entries(arch, block_d, elem_bytes))


def configs_for(kernel: str, arch: int | None, block_d: int, elem_bytes: int,
                block_m: int = MIN_BLOCK_M, serving: bool = False) -> list:
    """Candidate configs of `kernel` ("split" or "combine") for a compute capability (None:
    the interpreter) and, for the split kernel, its query tile of block_m rows; serving: a
    variant with options beyond the plain causal step (SERVING_CONFIGS first)."""
    if arch is None:
        return [INTERPRETER_CONFIGS[kernel]]
    if kernel == "combine":
        return [COMBINE_CONFIG]
    if serving:
        bucket = min((e[0] for e in SPLIT_CONFIGS[arch_family(arch)]
                      if e[1] == elem_bytes and block_d <= e[0]), default=None)
        for max_d, nbytes, max_m, cfgs in SERVING_CONFIGS.get(arch_family(arch), []):
            if (max_d, nbytes) == (bucket, elem_bytes) and block_m <= max_m:
                return cfgs
    for max_m, cfgs in _split_entries(arch, block_d, elem_bytes):
        if block_m <= max_m:
            return cfgs
    raise ValueError(f"no decode config for {block_m} query rows at head dim {block_d}")


# ---------------------------------------------------------------------------------------------
# Number of splits
# ---------------------------------------------------------------------------------------------
H100_SMS = 132       # streaming multiprocessors of an H100 SXM: the count used off a GPU
PROGRAMS_PER_SM = 2  # split programs resident per SM: SPLIT_CONFIGS is chosen so that two fit
MAX_SPLITS = 128     # FlashAttention's cap


def num_splits_heuristic(n_programs: int, n_tiles: int, n_sms: int = H100_SMS) -> int:
    """Splits of the KV sequence so that n_programs * splits fills the GPU (FlashAttention's
    decode heuristic, simplified).

    n_programs: programs without splitting (B * Hkv * row blocks); n_tiles: KV tiles of the
    cache. Aim at PROGRAMS_PER_SM * n_sms programs; no split when the batch nearly fills them
    alone (>= 80%); at most one split per tile and MAX_SPLITS. Among split counts giving the
    same tiles per split the fewest is taken, so that no split is empty (64 tiles in 12 splits:
    6 tiles each fill only 11 of them, so 11)."""
    target = PROGRAMS_PER_SM * n_sms
    if n_programs <= 0 or n_tiles <= 1 or n_programs >= 0.8 * target:
        return 1
    splits = min(triton.cdiv(target, n_programs), n_tiles, MAX_SPLITS)
    return triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return H100_SMS
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _block_m(rows: int, arch: int | None, block_d: int, elem_bytes: int) -> int:
    cap = max_block_m(arch, block_d, elem_bytes)
    return min(cap, max(MIN_BLOCK_M, triton.next_power_of_2(rows)))


def default_num_splits(q: torch.Tensor, k_cache: torch.Tensor, arch: int | None,
                       n_max: int | None = None) -> int:
    """num_splits_heuristic for these shapes: the cache's tiles counted with the first candidate
    config's BLOCK_N, lengths taken as Nmax (no device sync; splits past a shorter sequence's
    end exit at once). n_max: the cache's capacity per row (default k_cache.shape[2]; paged:
    blocks per row x page size)."""
    B, Hq, Nq, D = q.shape
    Hkv = k_cache.shape[1]
    n_max = k_cache.shape[2] if n_max is None else n_max
    rows = (Hq // Hkv) * Nq
    block_d, nbytes = _block_d(D), q.element_size()
    block_m = _block_m(rows, arch, block_d, nbytes)
    block_n = configs_for("split", arch, block_d, nbytes, block_m)[0].kwargs["BLOCK_N"]
    n_programs = B * Hkv * triton.cdiv(rows, block_m)
    return num_splits_heuristic(n_programs, triton.cdiv(n_max, block_n), _n_sms(q))


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor, prefix: str, axes: str) -> dict:
    return {f"stride_{prefix}{a}": t.stride(i) for i, a in enumerate(axes)}


def plan_decode(q, k_cache, v_cache, cache_seqlens, out, lse, o_part, lse_part, scale: float,
                num_splits: int, arch: int | None, *, window: tuple = (None, 0), alibi_slopes=None,
                softcap: float | None = None, block_table=None, cache_leftpad=None,
                cache_batch_idx=None) -> list[Launch]:
    """The split kernel, and the combine kernel when num_splits > 1 (o_part [B, Hq, Nq, S, D]
    and lse_part [B, Hq, Nq, S] float32 contiguous; unused with one split). Options as
    decode_forward's."""
    B, Hq, Nq, D = q.shape
    paged = block_table is not None
    Hkv = k_cache.shape[1]
    n_max = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    group = Hq // Hkv
    block_d, nbytes = _block_d(D), q.element_size()
    block_m = _block_m(group * Nq, arch, block_d, nbytes)
    single = num_splits == 1
    left, right = window
    if Nq == 1 and (right is None or right > 0):
        # one query sits at the last key: every right bound >= 0 is the causal one. Always
        # causal then: the unbounded form compiled to 255 registers + 20 B spilled (sm_90,
        # fp16, D=128, 16-row tile, 128/4/2) against 178 for the causal one
        right = 0
    causal = right == 0
    serving = (paged or left is not None or (right is not None and not causal)
               or alibi_slopes is not None or bool(softcap) or cache_leftpad is not None
               or cache_batch_idx is not None or right is None)
    dummy = lse
    # small index tensors are read as X + b: dense (a strided [B] view is copied, B int32s)
    dense = lambda t: dummy if t is None else t.contiguous()  # noqa: E731
    bt = dummy if block_table is None else block_table
    slopes = dummy if alibi_slopes is None else alibi_slopes
    slope_strides = (0, 0)
    if alibi_slopes is not None:  # [Hq] or [B, Hq]
        slope_strides = ((0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1
                         else tuple(alibi_slopes.stride()))
    split = Launch(
        "decode_split", _decode_split,
        {"Q": q, "K": k_cache, "V": v_cache, "SeqLens": dense(cache_seqlens),
         "LeftPad": dense(cache_leftpad), "BatchIdx": dense(cache_batch_idx), "BlockTable": bt,
         "Alibi": slopes, "Out": out, "Lse": lse, "OPart": dummy if single else o_part,
         "LsePart": dummy if single else lse_part,
         **_strides(q, "q", "zhmd"), **_strides(k_cache, "k", "zhnd"),
         **_strides(v_cache, "v", "zhnd"), **_strides(out, "o", "zhmd"),
         "stride_btz": bt.stride(0) if paged else 0, "stride_btn": bt.stride(1) if paged else 0,
         "stride_az": slope_strides[0], "stride_ah": slope_strides[1],
         "HQ": Hq, "HKV": Hkv, "GROUP": group, "N_Q": Nq, "N_MAX": n_max,
         "NUM_SPLITS": num_splits, "N_CACHE": k_cache.shape[0],
         "PAGE": k_cache.shape[2] if paged else 1,
         "MAX_BLOCKS": block_table.shape[1] if paged else 1,
         "qk_scale": scale * LOG2E.value, "sm_scale": scale,
         "cap_in": scale / softcap if softcap else 1.0, "cap_out": softcap or 1.0,
         "win_left": left or 0, "win_right": 0 if causal else (right or 0)},
        {"HEAD_DIM": D, "BLOCK_D": block_d, "BLOCK_M": block_m,
         "HAS_SEQLENS": cache_seqlens is not None, "SINGLE_SPLIT": single,
         "HAS_LEFTPAD": cache_leftpad is not None, "HAS_BATCH_IDX": cache_batch_idx is not None,
         "PAGED": paged, "CAUSAL": causal, "WIN_LEFT": left is not None,
         "WIN_RIGHT": right is not None and not causal,
         "HAS_ALIBI": alibi_slopes is not None, "SOFTCAP": bool(softcap),
         # fp32 D <= 16: exact FMA dots (attention's _dot_precision; tests/test_decode.py FP32 D=1)
         "DOT_PRECISION": _dot_precision(q.dtype, block_d),
         "QK_CHUNK": exact_qk_chunk(q.dtype, block_d, block_m)},
        lambda meta: flat_grid(num_splits, triton.cdiv(group * Nq, block_m), B * Hkv),
        configs_for("split", arch, block_d, nbytes, block_m, serving=serving),
        ["HQ", "HKV", "N_Q", "N_MAX", "NUM_SPLITS", "HEAD_DIM", "HAS_SEQLENS", "SINGLE_SPLIT",
         "HAS_LEFTPAD", "HAS_BATCH_IDX", "PAGED", "CAUSAL", "WIN_LEFT", "WIN_RIGHT", "HAS_ALIBI", "SOFTCAP"],
        ("N_MAX", "NUM_SPLITS"))  # the cache length (and the split count it sets), bucketed
    if single:
        return [split]
    combine = Launch(
        "decode_combine", _decode_combine,
        {"OPart": o_part, "LsePart": lse_part, "Out": out, "Lse": lse,
         **_strides(out, "o", "zhmd"), "HQ": Hq, "N_Q": Nq, "NUM_SPLITS": num_splits},
        {"HEAD_DIM": D, "BLOCK_D": block_d},
        lambda meta: flat_grid(B * Hq * Nq),
        configs_for("combine", arch, block_d, nbytes),
        ["NUM_SPLITS", "HEAD_DIM"], ("NUM_SPLITS",))
    return [split, combine]


def exact_qk_chunk(dtype: torch.dtype, block_d: int, block_m: int) -> int:
    """The split kernel's QK_CHUNK: 0 = scores by tl.dot at DOT_PRECISION; else exact fp32
    score products (_math.dot_f32_exact) over D in slices of this width (= BLOCK_D: one dot).

    fp32 16-row tiles only, up to BLOCK_D 128: at BLOCK_D 256 the sliced form spilled in every
    tile tried (AOT, Triton 3.9: sm_80 32/8/2 200 B, 16/8/2 1,576 B, 16/4/2 2,072 B; sm_90
    32/8/2 564 B), so fp32 D > 128 keeps FMA scores (DOT_PRECISION "ieee")."""
    if dtype != torch.float32 or block_m > 16 or block_d > 128:
        return 0
    return block_d if block_d <= 64 else EXACT_QK_CHUNK


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_decode_split) else device_arch(t)


def decode_forward(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None,
                   *, window: tuple = (None, 0), alibi_slopes=None, softcap: float | None = None,
                   block_table=None, cache_leftpad=None, cache_batch_idx=None):
    """out [B, Hq, Nq, D] (q's dtype and layout), lse [B, Hq, Nq] float32 (natural log).

    cache_seqlens: int32 [B] or None (all Nmax keys valid). num_splits: None = the heuristic.
    window: (left, right) key offsets from the bottom-right diagonal, None = unbounded (the
    default (None, 0) is causal). alibi_slopes [Hq] or [B, Hq]; softcap None or > 0.
    block_table int32 [B, max_blocks]: k_cache / v_cache are paged [num_blocks, Hkv, page, D]
    (position p of row b in block block_table[b, p // page], slot p % page). cache_leftpad
    int32 [B]: row b's keys start there. cache_batch_idx int32 [B]: row b reads cache row
    cache_batch_idx[b]. Arguments are checked by the caller; indices are clamped in the kernel."""
    q, k_cache, v_cache = (int32_tiles(t) for t in (q, k_cache, v_cache))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    paged = block_table is not None
    n_max = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    if out.numel() == 0 or n_max == 0 or k_cache.shape[0] == 0:  # nothing to compute, no key
        return out.zero_(), lse.fill_(float("-inf"))
    arch = _arch_for(q)
    if num_splits is None:
        num_splits = default_num_splits(q, k_cache, arch, n_max)
    o_part = lse_part = None
    if num_splits > 1:
        o_part = torch.empty((*q.shape[:3], num_splits, q.shape[3]), device=q.device,
                             dtype=torch.float32)
        lse_part = torch.empty((*q.shape[:3], num_splits), device=q.device, dtype=torch.float32)
    for launch in plan_decode(q, k_cache, v_cache, cache_seqlens, out, lse, o_part, lse_part,
                              scale, num_splits, arch, window=window, alibi_slopes=alibi_slopes,
                              softcap=softcap, block_table=block_table,
                              cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx):
        run(launch)
    return out, lse
