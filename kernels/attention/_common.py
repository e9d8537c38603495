"""Pieces every attention kernel shares: the score pipeline, key ranges, sequence bounds,
dropout bits and the program-id decode. See the package docstring for what each switch means."""
import triton
import triton.language as tl

from .._constants import LOG2E
from .._math import tanh as _tanh
from .._math import tanh_scaled16 as _tanh16


@triton.jit
def _program_tile(MAX_SEQLEN, BLOCK: tl.constexpr, N_HEADS):
    """(tile, head, sequence, tiles per sequence) of this program. Grids are one axis (CUDA
    takes 2^31 - 1 programs on x, 65,535 on y and z), tiles fastest, so the tiles of one head
    run together. MAX_SEQLEN: the length the grid was sized for (varlen: max_seqlen_*)."""
    n_tiles = (MAX_SEQLEN + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    return pid % n_tiles, (pid // n_tiles) % N_HEADS, pid // n_tiles // N_HEADS, n_tiles


# Philox4x32 rounds of the dropout draw: 7. Salmon et al. (SC 2011) found Philox4x32 with 7
# rounds Crush-resistant (passes all of TestU01's BigCrush) and recommend 10 for a safety margin
# (curand's default, FlashAttention's draw). Each round is 4 IMAD (the halves of the two
# 32x32 -> 64 products) + 2 LOP3 per draw in the SASS (sm_90, Triton 3.9), and the draw bounds
# the dropout loops (integer issue): 10 -> 7 rounds moved sm_90 fp16 causal serialized ESTIMATES
# (Triton 3.9 `inspect --perf`, dropout the only switch, draw per 4 keys) fwd D=64 128x64/8/3
# 0.218 -> 0.249, D=128 0.343 -> 0.382; dK/dV D=64 32x128/8/2 0.258 -> 0.278; dQ D=128
# 128x32/8/2 0.412 -> 0.447. docs/masked-performance.md has the rest.
DROPOUT_ROUNDS = tl.constexpr(7)


@triton.jit
def _keep16(r, t_hi):
    """Keep bits of the two 16-bit halves of draw word r: (low half, high half) >= the
    threshold t16, compared as t_hi = t16 << 16 (no shift of the high half needed)."""
    return (r << 16) >= t_hi, r >= t_hi


@triton.jit
def _dropout_keep(seed, row, col, DROP_COLS, dropout_p):
    """Dropout keep bits of lse rows `row` and keys `col`: [M, N] for row [M, 1] and col [1, N]
    (forward, dQ, the mask kernel), or the transposed tile [N, M] for col [N, 1] and row [1, M]
    (dK/dV). col: N consecutive keys from a multiple of 32 (N a multiple of 32), or 16 keys from
    a multiple of 16.

    One Philox4x32-7 draw (DROPOUT_ROUNDS) per 8 keys: key j of lse row r is the 16-bit half
    j % 2 (0: low) of word (j // 8) % 4 of the draw at counter (4 (j // 32) + (j % 8) // 2,
    r & 0xffffffff, r >> 32, 0), key seed; kept iff that half >= t16 = min(round(p * 2^16),
    65535) (p rounded to fp32 first; the drop rate is p to 2^-17). So a draw's 8 keys,
    {8w + 2t, 8w + 2t + 1 : w = 0..3} of a 32-key chunk, are the keys one thread holds of a
    row in an MMA accumulator (mma.sync and wgmma: a thread owns columns 2t, 2t + 1 of every
    8-column block, t = lane % 4): the [M, N] tiles build their bits without moving data
    between threads. The bit of (seed, lse row, key) depends on nothing else: not the tile
    config, the kernel, the orientation or DROP_COLS (unused by this scheme; kept in the
    kernels' signatures)."""
    p = tl.to_tensor(dropout_p).to(tl.float32)
    t_hi = tl.minimum((p * 65536.0 + 0.5).to(tl.int32), 65535).to(tl.uint32) << 16
    if col.shape[0] == 1:  # [M, N]: keys along axis 1
        N: tl.constexpr = col.shape[1]
        M: tl.constexpr = row.shape[0]
        C: tl.constexpr = N // 32 if N >= 32 else 1
        W: tl.constexpr = 4 if N >= 32 else 2  # words of a draw this tile uses
        tl.static_assert(N % 32 == 0 or N == 16)
        c, _ = tl.split(tl.reshape(col, [1, C, W, 4, 2]))       # [1, C, word, t], e = 0
        c = tl.reshape(tl.permute(c, [0, 1, 3, 2]), [1, C, 4, W // 2, 2])
        c, _ = tl.split(c)
        if W == 4:
            c, _ = tl.split(c)                                  # [1, C, t]: 32c + 2t
        else:
            c = tl.reshape(c, [1, C, 4])                        # [1, 1, t]: 16-key half
        row3 = tl.expand_dims(row.to(tl.int64), 2)               # [M, 1, 1]
    else:  # [N, M]: keys along axis 0
        N: tl.constexpr = col.shape[0]
        M: tl.constexpr = row.shape[1]
        C: tl.constexpr = N // 32 if N >= 32 else 1
        W: tl.constexpr = 4 if N >= 32 else 2
        tl.static_assert(N % 32 == 0 or N == 16)
        c = tl.permute(tl.reshape(col, [C, W, 4, 2, 1]), [0, 2, 4, 1, 3])  # [C, t, 1, word, e]
        c, _ = tl.split(c)
        c = tl.reshape(c, [C, 4, 1, W // 2, 2])
        c, _ = tl.split(c)
        if W == 4:
            c, _ = tl.split(c)                                  # [C, t, 1]
        else:
            c = tl.reshape(c, [C, 4, 1])
        row3 = tl.expand_dims(row.to(tl.int64), 0)               # [1, 1, M]
    g = (c >> 5) * 4 + ((c & 7) >> 1)
    r0, r1, r2, r3 = tl.philox(seed, g.to(tl.uint32), row3.to(tl.uint32),
                               (row3 >> 32).to(tl.uint32), 0, n_rounds=DROPOUT_ROUNDS)
    if W == 2:  # a 16-key tile: words 0, 1 of the chunk's low half, 2, 3 of its high half
        up = ((c >> 4) & 1) != 0
        r0 = tl.where(up, r2, r0)
        r1 = tl.where(up, r3, r1)
    a0, a1 = _keep16(r0, t_hi)
    b0, b1 = _keep16(r1, t_hi)
    x = tl.join(tl.join(a0, a1), tl.join(b0, b1))             # [.., e, word & 1]
    if W == 4:
        c0, c1 = _keep16(r2, t_hi)
        d0, d1 = _keep16(r3, t_hi)
        x = tl.join(x, tl.join(tl.join(c0, c1), tl.join(d0, d1)))  # [.., e, word & 1, word >> 1]
        if col.shape[0] == 1:  # [M, C, t, e, w0, w1] -> [M, C, w1, w0, t, e]
            return tl.reshape(tl.permute(x, [0, 1, 5, 4, 2, 3]), [M, N])
        else:  # [C, t, M, e, w0, w1] -> [C, w1, w0, t, e, M]
            return tl.reshape(tl.permute(x, [0, 5, 4, 1, 3, 2]), [N, M])
    else:
        if col.shape[0] == 1:  # [M, 1, t, e, w0] -> [M, 1, w0, t, e]
            return tl.reshape(tl.permute(x, [0, 1, 4, 2, 3]), [M, N])
        else:  # [1, t, M, e, w0] -> [1, w0, t, e, M]
            return tl.reshape(tl.permute(x, [0, 4, 1, 3, 2]), [N, M])


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
            SOFTCAP: tl.constexpr, LOG2_UNITS: tl.constexpr = False, base=0):
    """Scores of a tile (natural units), -inf where masked, and tanh(.) for the softcap gradient.

    LOG2_UNITS (the 16-bit forward): scores in log2 units, s * log2(e). The caller passes
    sm_scale, cap_out and slope already multiplied by log2(e); the additive mask is scaled here.

    Natural units until the row max / lse is subtracted, then exp2((s - m) * log2(e)): scaling
    s by log2(e) first rounds |s| in the exponent (fp32 at |s| ~ 16: dV 5.9x PyTorch's error
    through the recomputed P, found by the fuzz tests); the difference is small and exact.

    i, j: query and key positions within the sequence, shaped to broadcast to qk's tile
    ([M, 1] and [1, N] in the forward and dQ kernels, [1, M] and [N, 1] in dK/dV). BOUNDARY:
    evaluate the window and the key bound; off the window's edges both are known to hold.
    base: the first position of the streamed tile (keys in the forward and dQ, queries in dK/dV),
    for ALiBi's distances.

    SOFTCAP: 1 = tanh accurate to fp32, 2 = the 16-bit form (_math.tanh_scaled16: one EX2 and
    one RSQ, about 2^-21 absolute).

    HAS_ALIBI, HAS_KPM, SOFTCAP: 2 for 16-bit inputs at D <= 128 (options._features), 1 else
    (the forms from before). HAS_KPM 2: the forward's and dQ's key-padding loads off the window
    edges unmasked (their key tiles lie in [0, n_kv)).

    HAS_ALIBI: 1 = slope * -|i + diag - j| from the integer distance; 2 = -|A - B| with
    A = slope * (distance of the streamed position to `base`) per row and tile and B = slope *
    (distance of the resident one) hoisted out of the loop: one FFMA and one FADD with the -|.|
    operand modifier per score (the integer form cost IADD, IMNMX, a negation, I2F and an FFMA).
    Its extra rounding is at most about 2^-23 slope (|d| + tile size), far below a 16-bit score's;
    fp32 failed the criterion with it (3.2x PyTorch's error, test_alibi). With softcap the
    kernel is MUFU-bound and B's hoisted registers spilled (sm_90 fp16 D=128 forward 128x64/8/3
    with all four light switches: 255 regs, 32 B; 254, 0 B with the exact distance a - b, then
    slope * |d|: FADD, FMUL, FADD, free under the MUFU bound). The slope's sign is
    per program (a uniform branch: both bodies are in the loop's SASS, one runs). Masked keys get
    any finite value here, then -inf."""
    if SOFTCAP == 2:
        t = _tanh16(qk, cap_in)   # tanh(qk * cap_in), cap_in = scale / softcap
        s = t * cap_out           # cap_out = softcap
    elif SOFTCAP:
        t = _tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * sm_scale
    if HAS_ALIBI == 1:
        s += slope * (-tl.abs(i + diag - j)).to(tl.float32)
    elif HAS_ALIBI:
        # the distance i + diag - j as a - b: a per streamed position and tile, b per resident
        # position (the same every tile), each an exact integer in fp32 below 2^24
        if j.shape[0] == 1:  # [M, N]: keys stream along axis 1 from base (forward, dQ)
            a = (i + diag - base).to(tl.float32)  # per query row and tile
            b = (j - base).to(tl.float32)         # per key
        else:  # [N, M]: queries stream along axis 1 from base (dK/dV)
            a = (base + diag - j).to(tl.float32)  # per key row and tile
            b = (base - i).to(tl.float32)         # per query
        if not SOFTCAP:  # -|slope a - slope b|, two FADDs per score
            if slope >= 0:  # per program: slope * -|d| = -|slope * d|
                s -= tl.abs(slope * a - slope * b)
            else:
                s += tl.abs(slope * a - slope * b)
        else:  # with softcap: the exact distance, then slope * |d| rounded once
            s -= slope * tl.abs(a - b)
    if MASK_KIND != 0:
        inb = (i < n_q) & (j < n_kv)
        m_ptrs = m_base + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn
        if MASK_KIND == 1:
            keep_m = tl.load(m_ptrs, mask=inb, other=0)
            s = tl.where(keep_m != 0, s, float("-inf"))
        else:
            bias = tl.load(m_ptrs, mask=inb, other=0.0).to(tl.float32)
            if LOG2_UNITS:
                bias = bias * LOG2E
            s += bias
    if HAS_KPM:
        if BOUNDARY or j.shape[0] != 1 or HAS_KPM == 1:
            pad = tl.load(kpm_base + j, mask=j < n_kv, other=1)
        else:  # forward / dQ off the edges: the key tile lies in [0, n_kv) (_key_range)
            pad = tl.load(kpm_base + j)
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



@triton.jit
def _load_lse(Lse, row, mask):
    # rows past N_Q and rows with no visible key (lse = -inf) get +inf, so P = exp(s - lse) = 0
    lse = tl.load(Lse + row, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _dropout_mask_kernel(Out, n_rows, n_cols, dropout_p, seed,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[r, c] = the attention kernels' dropout keep bit of lse row r, key c (DROP_COLS = n_cols)."""
    n_col_tiles = (n_cols + BLOCK_C - 1) // BLOCK_C  # program -> (row tile, column tile), axis 0
    rows = (tl.program_id(0) // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = (tl.program_id(0) % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    keep = _dropout_keep(seed, rows, cols, n_cols, dropout_p)
    tl.store(Out + rows.to(tl.int64) * n_cols + cols, keep, mask=(rows < n_rows) & (cols < n_cols))

