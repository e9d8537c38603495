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
# (curand's default, FlashAttention's draw). Each round is about 2 IMAD.WIDE + 2 LOP3 per draw,
# and the draw bounds the dropout loops (integer issue): 10 -> 7 rounds moved sm_90 fp16 causal
# serialized ESTIMATES (Triton 3.9 `inspect --perf`, dropout the only switch) fwd D=64
# 128x64/8/3 0.218 -> 0.249, D=128 0.343 -> 0.382; dK/dV D=64 32x128/8/2 0.258 -> 0.278; dQ
# D=128 128x32/8/2 0.412 -> 0.447. docs/masked-performance.md has the rest.
DROPOUT_ROUNDS = tl.constexpr(7)


@triton.jit
def _philox_keep4(seed, row, g, dropout_p):
    """Keep bits of keys 4g .. 4g + 3 of lse rows `row` (row and g broadcast against each
    other), one Philox4x32-7 draw (DROPOUT_ROUNDS) per (row, g): counter (g, row & 0xffffffff,
    row >> 32, 0), key seed; output k is key 4g + k's bit, kept iff >= p * 2^32 as an unsigned
    integer (p rounded to fp32 first, the kernels' argument type; the keep rate is 1 - p to
    2^-32)."""
    p = tl.to_tensor(dropout_p).to(tl.float32)
    thresh = tl.minimum((p * 4294967296.0).to(tl.int64), 4294967295).to(tl.uint32)
    row = row.to(tl.int64)  # the mask kernel's rows are int32
    r0, r1, r2, r3 = tl.philox(seed, g.to(tl.uint32), row.to(tl.uint32),
                               (row >> 32).to(tl.uint32), 0, n_rounds=DROPOUT_ROUNDS)
    return r0 >= thresh, r1 >= thresh, r2 >= thresh, r3 >= thresh


@triton.jit
def _dropout_keep(seed, row, col, DROP_COLS, dropout_p):
    """Dropout keep bits of lse rows `row` and keys `col`: [M, N] for row [M, 1] and col [1, N]
    (forward, dQ, the mask kernel), or the transposed tile [N, M] for col [N, 1] and row [1, M]
    (dK/dV). col: N consecutive keys from a multiple of 4 (N a multiple of 4).

    One Philox draw per 4 keys of a row (_philox_keep4: key j is output j % 4 of the draw of
    group j // 4), interleaved back into the tile. The bit of (seed, lse row, key) depends on
    nothing else: not the tile config, the kernel, the orientation or DROP_COLS (unused by this
    scheme; kept in the kernels' signatures)."""
    if col.shape[0] == 1:  # [M, N]: keys along axis 1
        N: tl.constexpr = col.shape[1]
        tl.static_assert(N % 4 == 0)
        c, _ = tl.split(tl.reshape(col, [1, N // 4, 2, 2]))
        c, _ = tl.split(c)  # [1, N/4]: the first key of each group
        k0, k1, k2, k3 = _philox_keep4(seed, row, c >> 2, dropout_p)
        M: tl.constexpr = k0.shape[0]
        x = tl.join(tl.join(k0, k2), tl.join(k1, k3))  # [M, N/4, 2, 2]: [.., a, b] = k_(2a + b)
        return tl.reshape(x, [M, N])
    else:  # [N, M]: keys along axis 0
        N: tl.constexpr = col.shape[0]
        tl.static_assert(N % 4 == 0)
        c, _ = tl.split(tl.permute(tl.reshape(col, [N // 4, 2, 2, 1]), [0, 3, 1, 2]))
        c, _ = tl.split(c)  # [N/4, 1]
        k0, k1, k2, k3 = _philox_keep4(seed, row, c >> 2, dropout_p)
        M: tl.constexpr = k0.shape[1]
        x = tl.join(tl.join(k0, k2), tl.join(k1, k3))  # [N/4, M, 2, 2]
        return tl.reshape(tl.permute(x, [0, 2, 3, 1]), [N, M])


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

