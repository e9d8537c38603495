"""Attention forward: online softmax over key tiles (FlashAttention-2), out and lse.

One program per (query tile, head, sequence). `_attn_fwd` decodes the program id and calls the
tile body; the tile body sweeps the key tiles in three ranges (`_key_range`): the tiles crossing
the window's left edge, the tiles every row sees whole (the fast path: no bound or window
masks), the tiles crossing the right edge (causal diagonal) and the ragged tail. One call site
of the sweep (`_attn_fwd_inner`), by keyword. The wrapper passes its runtime arguments to the
tile body in signature order (the names are the same; tests/test_kernel_signatures.py checks
it) and the constexprs by keyword.

Forward-only switches (varlen inference, no backward kernel reads them): PAGED, K/V read from
paged caches through a block table (a block id gathered per key, int64 row offsets, table
index and block id clamped: no read outside k / v whatever the table holds); SEQUSED, each
sequence's key count cut to SeqUsedK[seq]. Both off, the generated code is the one compiled
before they existed (the K / V pointers are still formed inside the load calls, in the order
Triton emits them).
"""
import triton
import triton.language as tl

from .._constants import LN2, LOG2E
from .._math import dot_prec as _dot_acc
from .._math import EXACT_SLICE, dot_f32_exact_sliced
from .._math import dot_prec0 as _dot
from ._common import _dropout_keep, _key_range, _program_tile, _scores, _seq_info


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
                    lo, hi, i, offs_n, mask_d, n_q, n_kv, diag,
                    m_base, stride_mm, stride_mn, kpm_base, slope, sm_scale, cap_in, cap_out,
                    win_left, win_right, drop_row, DROP_COLS, dropout_p, seed,
                    bt_row, stride_btb, stride_kz, stride_vz, MAX_BLOCKS, NUM_BLOCKS,
                    BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, WIN_LEFT: tl.constexpr,
                    WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                    PAGED: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    LOG2_UNITS: tl.constexpr, TMA: tl.constexpr, q_rows, ok_m, stride_qd,
                    stride_kd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # SLICED (fp32 exact scores at BLOCK_D 128): the scores from q (q_rows: the tile's row
    # pointers) and K reloaded in slices of D (_math.dot_f32_exact_sliced), as the backward
    # recomputes them; no K tile at full width
    SLICED: tl.constexpr = DOT_PRECISION == "exact_scores" and BLOCK_D > 64 and not TMA
    # BOUNDARY=False: every key tile in [lo, hi) is full and inside every row's window, so
    # neither the key bound nor the window is evaluated (the fast path).
    # PAGED: k_base / v_base point at the kv head; key j is slot j % PAGE of block
    # bt_row[j // PAGE], gathered per key whatever the page size (k_offs / v_offs hold the
    # head-dim offsets only). One block id per tile where a page holds whole key tiles was
    # tried: fewer issue slots (`inspect --perf` sm_90 fp16 D=128 128x64: 936 vs 1156 clocks,
    # 830 unpaged) but its pipelined scalar load spilled in 8 of the 48 varlen fp16 rows of
    # sm_80/sm_90 (sm_80 D=128 128x32/8/3: 32-48 B). Table index and block id are clamped, so
    # no load leaves k / v whatever the table holds (the host checks it, except while
    # torch.compile traces).
    # TMA: k_base / v_base are tensor descriptors of this (sequence, kv head)'s [n_kv, D] rows,
    # addressed by key row; rows past n_kv read as zero (TMA's out-of-bounds fill)
    if not PAGED and not TMA:
        k_base += tl.cast(lo, tl.int64) * stride_kn
        v_base += tl.cast(lo, tl.int64) * stride_vn
    if SOFTCAP == 2 or HAS_ALIBI == 2:  # the raw scores' unit (see the online softmax below)
        unit = cap_out if SOFTCAP else sm_scale
        slope_raw = slope / unit
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        j = offs_kn[None, :]
        # -- load K^T tile [BLOCK_D, BLOCK_N], compute scores ----
        # (k_tile + k_offs inside the load call: without PAGED, the IR of before PAGED existed)
        k_tile = k_base
        if PAGED:
            blk = tl.load(bt_row + tl.minimum(offs_kn // PAGE, MAX_BLOCKS - 1) * stride_btb)
            blk = tl.minimum(tl.maximum(blk, 0), NUM_BLOCKS - 1).to(tl.int64)
            slot = (offs_kn % PAGE).to(tl.int64)
            k_tile = k_base + (blk * stride_kz + slot * stride_kn)[None, :]  # [1, BLOCK_N]
        if SLICED:
            k_cols = k_tile  # PAGED: each key's row already
            if not PAGED:
                k_cols = k_tile + offs_n[None, :] * stride_kn
            qk = dot_f32_exact_sliced(q_rows, stride_qd, ok_m, k_cols, stride_kd, j < n_kv,
                                      HEAD_DIM, BLOCK_D, EXACT_SLICE)
        else:
            if TMA:
                k = k_base.load([start_n, 0]).T
            elif BOUNDARY:
                k = tl.load(k_tile + k_offs, mask=mask_d[:, None] & (j < n_kv), other=0.0)
            else:
                k = tl.load(k_tile + k_offs, mask=mask_d[:, None], other=0.0)
            qk = _dot(q, k, DOT_PRECISION)
        # -- online softmax update ----
        # a row with no finite score so far (masked, or -inf from the data itself: on every
        # path, the fast one included) keeps m = -inf; subtract 0 instead (exp2(-inf) = 0),
        # not -inf (-inf - -inf = NaN). One select per row per tile.
        if LOG2_UNITS and not (SOFTCAP or HAS_ALIBI or MASK_KIND == 2):
            # scores are qk * scale (scale = sm_scale * log2 e > 0, folded on the host) or -inf:
            # the row max is taken on the raw products and scaled once per row, so each score
            # costs one FFMA, qk * scale - m, before its EX2
            s, _ = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
                           slope, 1.0, cap_in, cap_out, win_left, win_right, BOUNDARY=BOUNDARY,
                           WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                           HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP)
            m_ij = tl.maximum(m_i, tl.max(s, 1) * sm_scale)
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s * sm_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        elif LOG2_UNITS and MASK_KIND != 2 and (SOFTCAP == 2 or HAS_ALIBI == 2):
            # softcap and/or ALiBi: the same, on raw scores in units of `unit` > 0 (cap_out with
            # softcap, else sm_scale): tanh, or qk plus ALiBi's slope / unit times -|distance|
            s, _ = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
                           slope_raw, 1.0, cap_in, 1.0, win_left, win_right, BOUNDARY=BOUNDARY,
                           WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                           HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, base=start_n)
            m_ij = tl.maximum(m_i, tl.max(s, 1) * unit)
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s * unit - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            s, _ = _scores(qk, i, j, n_q, n_kv, diag, m_base, stride_mm, stride_mn, kpm_base,
                           slope, sm_scale, cap_in, cap_out, win_left, win_right,
                           BOUNDARY=BOUNDARY, WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT,
                           MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                           SOFTCAP=SOFTCAP, LOG2_UNITS=LOG2_UNITS, base=start_n)
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            if LOG2_UNITS:
                p = tl.math.exp2(s - m_sub[:, None])
                alpha = tl.math.exp2(m_i - m_sub)
            else:
                p = tl.math.exp2((s - m_sub[:, None]) * LOG2E)
                alpha = tl.math.exp2((m_i - m_sub) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, drop_row + i, j, DROP_COLS, dropout_p), p, 0.0)
        # -- accumulate p @ v ----
        v_tile = v_base
        if PAGED:
            v_tile = v_base + (blk * stride_vz + slot * stride_vn)[:, None]  # [BLOCK_N, 1]
        if TMA:
            v = v_base.load([start_n, 0])
        elif BOUNDARY:
            v = tl.load(v_tile + v_offs, mask=(offs_kn[:, None] < n_kv) & mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_tile + v_offs, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_ij
        if not PAGED and not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tile(tile, seq, head, Q, K, V, Out, Lse, LseLo, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_oz, stride_oh, stride_om, stride_od,
                   stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
                   H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
                   dropout_p, seed, DROP_COLS, BlockTable, SeqUsedK, stride_btz, stride_btb,
                   MAX_BLOCKS, NUM_BLOCKS,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                   DROPOUT: tl.constexpr, VARLEN: tl.constexpr, LSE_LO: tl.constexpr,
                   PAGED: tl.constexpr, SEQUSED: tl.constexpr, PAGE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, LOG2_UNITS: tl.constexpr, TMA: tl.constexpr):
    start_m = tile
    off_h = head
    off_hkv = off_h // GROUP
    z, q_start, k_start, n_q, n_kv = _seq_info(CuQ, CuK, seq, N_Q, N_KV, VARLEN)
    if SEQUSED:  # FlashAttention-3's seqused_k: the first SeqUsedK[seq] keys of the sequence
        n_kv = tl.minimum(tl.maximum(tl.load(SeqUsedK + seq), 0), n_kv)
    if PAGED:  # never past the table's capacity; no key at all without a block
        n_kv = tl.minimum(n_kv, tl.where(NUM_BLOCKS > 0, MAX_BLOCKS * PAGE, 0))
    diag = n_kv - n_q  # bottom-right alignment of causal / window / ALiBi

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # folds to all-true when HEAD_DIM == BLOCK_D
    mask_m = offs_m < n_q
    i = offs_m[:, None]

    # int64 base offsets: B*H*N*D may pass 2^31; in-tile offsets stay int32
    z64 = z.to(tl.int64)
    q_rows = (Q + z64 * stride_qz + off_h.to(tl.int64) * stride_qh
              + (q_start + start_m * BLOCK_M).to(tl.int64) * stride_qm
              + tl.arange(0, BLOCK_M)[:, None] * stride_qm)
    q_ptrs = q_rows + offs_d[None, :] * stride_qd
    if PAGED:  # the kv head of the paged caches; key rows per tile in _attn_fwd_inner
        k_base = K + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_hkv.to(tl.int64) * stride_vh
        k_offs = offs_d[:, None] * stride_kd  # [BLOCK_D, 1], plus each key's row
        v_offs = offs_d[None, :] * stride_vd  # [1, BLOCK_D]
    elif TMA:
        # sm_90: K / V tiles by TMA (launch.tma_layout_ok: last stride 1, 16-byte aligned base
        # and strides, HEAD_DIM == BLOCK_D): no per-thread pointer tensors, no cp.async fences
        k_base = tl.make_tensor_descriptor(
            K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn,
            shape=[n_kv, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(
            V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn,
            shape=[n_kv, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D])
        k_offs = 0  # (unused)
        v_offs = 0
    else:
        k_base = K + z64 * stride_kz + off_hkv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
        v_base = V + z64 * stride_vz + off_hkv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
        k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
        v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, BLOCK_D]
    bt_row = BlockTable  # (unused unless PAGED)
    if PAGED:  # this sequence's row of the block table
        bt_row = BlockTable + seq.to(tl.int64) * stride_btz
    m_base = Mask + z64 * stride_mz + off_h.to(tl.int64) * stride_mh
    kpm_base = Kpm + z64 * stride_kpz
    row0 = (z * H + off_h).to(tl.int64) * N_Q + q_start  # lse row of query 0 of this sequence
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + seq * H + off_h)
        if LOG2_UNITS:
            slope = slope * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the query tile stays on chip for the whole loop
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    lo, full_lo, full_hi, hi = _key_range(start_m * BLOCK_M, n_q, n_kv, diag, win_left, win_right,
                                          KvRange, seq, BLOCK_M, BLOCK_N,
                                          WIN_LEFT, WIN_RIGHT, HAS_KPM)
    # three key ranges, unrolled at compile time: [lo, full_lo) crosses the window's left edge
    # (only with WIN_LEFT), [full_lo, full_hi) is seen whole by every row (no bound or window
    # mask), [full_hi, hi) crosses the right edge (causal diagonal) and holds the ragged tail
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
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_base=k_base, v_base=v_base, k_offs=k_offs, v_offs=v_offs,
                stride_kn=stride_kn, stride_vn=stride_vn, lo=part_lo, hi=part_hi, i=i,
                offs_n=offs_n, mask_d=mask_d, n_q=n_q, n_kv=n_kv, diag=diag, m_base=m_base,
                stride_mm=stride_mm, stride_mn=stride_mn, kpm_base=kpm_base, slope=slope,
                sm_scale=sm_scale, cap_in=cap_in, cap_out=cap_out, win_left=win_left,
                win_right=win_right, drop_row=row0, DROP_COLS=DROP_COLS, dropout_p=dropout_p,
                seed=seed, bt_row=bt_row, stride_btb=stride_btb, stride_kz=stride_kz,
                stride_vz=stride_vz, MAX_BLOCKS=MAX_BLOCKS, NUM_BLOCKS=NUM_BLOCKS,
                BLOCK_N=BLOCK_N, BOUNDARY=part != 1, WIN_LEFT=WIN_LEFT,
                WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND, HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI,
                SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, PAGED=PAGED, PAGE=PAGE,
                DOT_PRECISION=DOT_PRECISION, LOG2_UNITS=LOG2_UNITS, TMA=TMA, q_rows=q_rows,
                ok_m=mask_m[:, None], stride_qd=stride_qd, stride_kd=stride_kd,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)

    # -- epilogue: one normalisation; rows with no visible key give 0 and lse = -inf ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    acc = acc * inv_l[:, None]
    log_l = tl.math.log2(l_safe) * LN2
    if LOG2_UNITS:
        lse = m_i * LN2 + log_l  # m (log2 units) * ln 2 + ln(l)
    else:
        lse = m_i + log_l  # m + ln(l)
    if LSE_LO:
        # fp32: the rounding error of that sum (TwoSum, exact), for the backward, which
        # recomputes P = exp((s - lse) - lse_lo): lse alone rounds by up to 0.5 ulp(|lse|), and
        # P of a dominant key (p ~ 1) carries the whole error into dV (14x PyTorch's error
        # at |lse| ~ 25, tests/test_fuzz.py::test_fp32_large_lse_one_dominant_key)
        m_part = lse - log_l
        l_part = lse - m_part
        lse_lo = (m_i - m_part) + (log_l - l_part)
        tl.store(LseLo + row0 + offs_m, tl.where(empty, 0.0, lse_lo), mask=mask_m)
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Lse + row0 + offs_m, lse, mask=mask_m)
    o_ptrs = (Out + z64 * stride_oz + off_h.to(tl.int64) * stride_oh
              + (q_start + offs_m)[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, LseLo, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
              stride_qz, stride_qh, stride_qm, stride_qd,
              stride_kz, stride_kh, stride_kn, stride_kd,
              stride_vz, stride_vh, stride_vn, stride_vd,
              stride_oz, stride_oh, stride_om, stride_od,
              stride_mz, stride_mh, stride_mm, stride_mn, stride_kpz,
              H, GROUP, N_Q, N_KV, sm_scale, cap_in, cap_out, win_left, win_right,
              dropout_p, seed, DROP_COLS, MAX_SEQLEN,
              BlockTable, SeqUsedK, stride_btz, stride_btb, MAX_BLOCKS, NUM_BLOCKS,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
              DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQ_LOOP: tl.constexpr,
              LSE_LO: tl.constexpr, PAGED: tl.constexpr, SEQUSED: tl.constexpr,
              PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, LOG2_UNITS: tl.constexpr,
              TMA: tl.constexpr):
    # program -> (query tile, head, sequence)
    tile, head, seq, n_tiles = _program_tile(MAX_SEQLEN, BLOCK_M, H)
    if WIN_RIGHT:
        # causal / right window: the last query tiles see the most keys; they go first (programs
        # are dispatched in id order, tiles fastest), so each head's last wave is its shortest
        # tiles, not its longest (FlashAttention-2's reversed m_block order)
        tile = n_tiles - 1 - tile
    if SEQ_LOOP:
        # varlen under torch.compile (max_seqlen not checked against cu_seqlens): a sequence
        # longer than max_seqlen is covered by looping over its tiles, never an unwritten row.
        # Only then: a loop around the tile body costs registers (sm_90 fp16 D=128: 224 -> 255
        # regs + 32-96 B spilled), so the usual launch calls the body once, without a loop.
        n_real = tl.load(CuQ + seq + 1) - tl.load(CuQ + seq)
        for t in range(tile, (n_real + BLOCK_M - 1) // BLOCK_M, n_tiles):
            _attn_fwd_tile(t, seq, head, Q, K, V, Out, Lse, LseLo, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
                           stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh,
                           stride_kn, stride_kd, stride_vz, stride_vh, stride_vn, stride_vd,
                           stride_oz, stride_oh, stride_om, stride_od, stride_mz, stride_mh,
                           stride_mm, stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale,
                           cap_in, cap_out, win_left, win_right, dropout_p, seed, DROP_COLS,
                           BlockTable, SeqUsedK, stride_btz, stride_btb, MAX_BLOCKS, NUM_BLOCKS,
                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                           WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                           HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                           DROPOUT=DROPOUT, VARLEN=VARLEN, LSE_LO=LSE_LO, PAGED=PAGED,
                           SEQUSED=SEQUSED, PAGE=PAGE, DOT_PRECISION=DOT_PRECISION,
                           LOG2_UNITS=LOG2_UNITS, TMA=TMA)
    else:
        _attn_fwd_tile(tile, seq, head, Q, K, V, Out, Lse, LseLo, Mask, Kpm, KvRange, Alibi, CuQ, CuK,
                       stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh,
                       stride_kn, stride_kd, stride_vz, stride_vh, stride_vn, stride_vd,
                       stride_oz, stride_oh, stride_om, stride_od, stride_mz, stride_mh,
                       stride_mm, stride_mn, stride_kpz, H, GROUP, N_Q, N_KV, sm_scale, cap_in,
                       cap_out, win_left, win_right, dropout_p, seed, DROP_COLS,
                       BlockTable, SeqUsedK, stride_btz, stride_btb, MAX_BLOCKS, NUM_BLOCKS,
                       HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                       WIN_LEFT=WIN_LEFT, WIN_RIGHT=WIN_RIGHT, MASK_KIND=MASK_KIND,
                       HAS_KPM=HAS_KPM, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT,
                       VARLEN=VARLEN, LSE_LO=LSE_LO, PAGED=PAGED, SEQUSED=SEQUSED, PAGE=PAGE,
                       DOT_PRECISION=DOT_PRECISION, LOG2_UNITS=LOG2_UNITS, TMA=TMA)
