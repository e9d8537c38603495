"""Device math shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh in fp32 within 1.7 ulp (measured on [0, 3] against float64; NaN stays NaN).

    |x| < 0.625: Cephes' tanhf polynomial x + x z P(z), z = x^2 (<= 0.8 ulp, no cancellation
    near 0); above: 1 - 2 / (1 + exp(2|x|)), which saturates to 1 without overflow trouble.
    libdevice's tanh would not run in Triton's interpreter. The earlier (1 - e) / (1 + e) form
    reached 3.8 ulp at |x| ~ 0.3, which softcap * tanh(s / softcap) multiplies into the scores."""
    ax = tl.abs(x)
    z = x * x
    p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
         + 1.33314422036e-1) * z - 3.33332819422e-1
    small = ax + ax * z * p
    big = 1.0 - 2.0 / (1.0 + tl.math.exp2(2.8853900817779268 * ax))  # exp(2|x|)
    r = tl.where(ax < 0.625, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def tanh_scaled16(v, k):
    """tanh(v * k) for scores of 16-bit inputs: 1 - 2 / (1 + exp(2 v k)), the reciprocal as
    rsqrt(y^2) (y = 1 + exp(2 v k) > 0; y^2 = inf gives 0, so tanh saturates to 1; exp = 0 gives
    -1; NaN stays NaN). Per element: FMUL, EX2, FADD, FMUL, RSQ, FFMA (the accurate `tanh`: about
    20 instructions and 2 MUFU with a full-range division; the scalar 2 k log2(e) is per program).

    Absolute error about 2^-21 (one rounding of 1 - 2r plus the MUFU approximations; no
    cancellation trouble in absolute terms, which is what the softmax sees: softcap * tanh enters
    the scores, whose 16-bit inputs carry 2^-11 (fp16) / 2^-8 (bf16) relative error). Not for
    fp32 inputs: near 0 its relative error grows (1 - 2r cancels), where `tanh` keeps 1.7 ulp.
    In Triton's interpreter exp2 and rsqrt are numpy's correctly rounded fp32 functions; on the
    GPU ex2.approx / rsqrt.approx add about 2^-22 relative each."""
    y = 1.0 + tl.math.exp2(v * (k * 2.8853900817779268))  # exp(2 v k)
    return 1.0 - 2.0 * tl.math.rsqrt(y * y)


@triton.jit
def _tf32_head(x):
    """x with its low 13 mantissa bits cleared: exactly a tf32 value, |x - head| < 2^-10 |x|;
    +-inf and zero unchanged."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_split3(x):
    """x = x0 + x1 + x2 exactly, each piece a tf32 value (x1 < 2^-10 |x|, x2 < 2^-20 |x|):
    products of pieces are exact on tensor cores (and in the interpreter's MMA model). inf:
    (inf, 0, 0); NaN stays NaN in x1 and x2."""
    x0 = _tf32_head(x)
    r = tl.where(x == x0, 0.0, x - x0)  # exact for finite x (a truncation's remainder)
    x1 = _tf32_head(r)
    return x0, x1, r - x1


@triton.jit
def dot_f32_exact(a, b):
    """a @ b for fp32 tiles with products exact to ~2^-30 and a bounded summation chain, from a
    zero accumulator (add the running accumulator after, once).

    Plain tl.dot in fp32 has neither: "tf32x3" (Triton's split) keeps ~22 of the operands' 24
    bits and drops small*small, so products err by ~2^-21 |a||b| where PyTorch's fp32 products
    are exact; "ieee" (FMA) makes a sequential chain over K, whose rounding grows with K (the
    key count, for P @ V) where PyTorch's kernels sum in vector lanes. Here each operand splits
    exactly into three tf32 pieces (_tf32_split3) and the six products of order <= 2 run as
    tf32 MMAs: the dropped a1 b2 + a2 b1 + a2 b2 are below 2^-29 |a||b|, and the MMA adds each
    k-step of 8 products to the accumulator at once, so the chain has K / 8 steps (the
    interpreter's MMA model sums a step exactly; tensor cores align its products with
    truncation, still one step per 8 products). Smallest terms first, as Triton's 3xTF32; a
    NaN from them (an inf operand times a zero piece) falls back to 0, so an inf operand gives
    inf as the big product alone does (NaN operands give NaN through a0 b0).

    Cost: six MMAs and three pieces per operand live at once; only tiles with registers to
    spare take it (decode's 16-row fp32 tiles at BLOCK_D <= 64; past it, the same chain over
    slices of K: dot_f32_exact_small, then dot_f32_exact_big). The attention forward does
    not: its backward recomputes the scores with DOT_PRECISION, and scores other than the
    forward's lse skew P (tests/test_fuzz.py, test_fp32_small_head_dim_sequential_pv)."""
    a0, a1, a2 = _tf32_split3(a)
    b0, b1, b2 = _tf32_split3(b)
    small = tl.dot(a1, b1, input_precision="tf32")
    small = tl.dot(a0, b2, small, input_precision="tf32")
    small = tl.dot(a2, b0, small, input_precision="tf32")
    small = tl.dot(a0, b1, small, input_precision="tf32")
    small = tl.dot(a1, b0, small, input_precision="tf32")
    small = tl.where(small != small, 0.0, small)
    return tl.dot(a0, b0, small, input_precision="tf32")


@triton.jit
def dot_prec(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with tl.dot's input_precision PRECISION, or PRECISION "exact" (fp32 tiles:
    dot_f32_exact, its sum added to acc once), or "exact_scores" (exact in dot_prec0 only, the
    scores and dP; "tf32x3" here and in the _fma forms). The attention kernels run "exact" for
    fp32 at BLOCK_D <= 16 and "exact_scores" at 32..64 (options._attn_dot_precision)."""
    if PRECISION == "exact":
        return acc + dot_f32_exact(a, b)
    elif PRECISION == "exact_scores":
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def dot_prec0(a, b, PRECISION: tl.constexpr):
    """a @ b from a zero accumulator, as dot_prec, except that "exact_scores" runs exact here:
    the attention kernels compute their scores and dP with it."""
    if PRECISION == "exact" or PRECISION == "exact_scores":
        return dot_f32_exact(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_prec_fma(a, b, acc, PRECISION: tl.constexpr):
    """dot_prec, with "exact" run as the FMA chain ("ieee"): the backward's dV, dK and dQ dots
    at fp32 BLOCK_D <= 16 (its score and dP recompute stay exact: P must be the forward's, and
    dP - delta cancels for one key; six MMAs in every dot spilled the masked dK/dV tiles,
    132-528 B, AOT sm_80 / sm_90). "exact_scores": "tf32x3"."""
    if PRECISION == "exact":
        return tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "exact_scores":
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def dot_prec0_fma(a, b, PRECISION: tl.constexpr):
    """dot_prec_fma from a zero accumulator."""
    if PRECISION == "exact":
        return tl.dot(a, b, input_precision="ieee")
    elif PRECISION == "exact_scores":
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_f32_exact_small(a, b, acc):
    """acc plus the five small products of dot_f32_exact (a1 b1, a0 b2, a2 b0, a0 b1, a1 b0, in
    its order). With dot_f32_exact_big, dot_f32_exact over K in slices: the small products of
    every slice first, chained in one accumulator, then the big ones, so that only one slice's
    pieces are live at a time."""
    a0, a1, a2 = _tf32_split3(a)
    b0, b1, b2 = _tf32_split3(b)
    acc = tl.dot(a1, b1, acc, input_precision="tf32")
    acc = tl.dot(a0, b2, acc, input_precision="tf32")
    acc = tl.dot(a2, b0, acc, input_precision="tf32")
    acc = tl.dot(a0, b1, acc, input_precision="tf32")
    return tl.dot(a1, b0, acc, input_precision="tf32")


@triton.jit
def dot_f32_exact_big(a, b, acc):
    """acc plus a0 b0, the big product of dot_f32_exact (after every slice's small products:
    clear NaN from them first, with exact_small_nan)."""
    return tl.dot(_tf32_head(a), _tf32_head(b), acc, input_precision="tf32")


@triton.jit
def exact_small_nan(small):
    """dot_f32_exact's NaN rule for the small products' sum: NaN (an inf operand times a zero
    piece) becomes 0, so that an inf operand gives inf as its big product alone does."""
    return tl.where(small != small, 0.0, small)


# fp32 at BLOCK_D 128: the width of the slices of D in which dot_f32_exact_sliced loads its
# operands (the attention kernels' scores and dP, options._attn_dot_precision)
EXACT_SLICE = tl.constexpr(16)


@triton.jit
def dot_f32_exact_sliced(a_rows, stride_ad, a_ok, b_cols, stride_bd, b_ok,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIDTH: tl.constexpr,
                         A_VOLATILE: tl.constexpr = False, COMPENSATED: tl.constexpr = True):
    """dot_f32_exact of A [M, HEAD_DIM] and B [HEAD_DIM, N] read from memory in WIDTH-wide
    slices of the head dim: the small products of every slice chained in one accumulator, then
    the big ones, so that only one slice's tf32 pieces are live at a time. a_rows: A's row pointers [M, 1] (column 0),
    stride_ad its column stride, a_ok [M, 1] its rows to read; b_cols: B's column pointers
    [1, N] (row 0), stride_bd its row stride, b_ok [1, N]. Unread entries are zero.

    At full width the six MMAs and three pieces of each [*, 128] fp32 operand spilled every
    attention backward tile (AOT, Triton 3.9: dK/dV 16x16/8/1 8-84 B, dQ 16x16/8/1 20-28 B,
    masked dK/dV 896 B); the slices reload A and B from L1 instead. The second pass's loads are
    the first's (CSE may keep them or reload). A_VOLATILE: A's loads are not hoisted out of the
    caller's loops (the dK/dV kernel's K / V slices: hoisted into its GQA head loop they were
    kept in 106,496 B of shared memory at 16x16/8/1, over sm_86's 99 KB; reloaded: 8 KB).

    The big products are compensated across slices: each slice's a0 b0 sum from zero (WIDTH / 8
    MMA k-steps, rounded at the slice sum's magnitude) joins the running sum by TwoSum, whose
    exact rounding errors join the small terms; one rounding at the end. One chained
    accumulator (before 2026-12-08) rounded HEAD_DIM / 8 k-steps at the running sum's
    magnitude: 3.1x PyTorch's error in fp32 attention at D = 100 (scores up to ~30), 20.9x in a
    one-key decode lse (tests/test_fuzz.py). An inf part makes the TwoSum error NaN: a NaN
    compensation returns the plain sum, so inf stays inf. COMPENSATED=False keeps that single
    chain (every slice's small products, then the big ones) for the callers whose registers
    the compensation overran: the dQ kernel and the dK/dV kernel's dP (attention/backward.py);
    the forward, the dK/dV kernel's scores and decode compensate."""
    acc = tl.zeros([a_rows.shape[0], b_cols.shape[1]], dtype=tl.float32)
    if COMPENSATED:  # one pass: each slice's small products, then its big part by TwoSum
        hi = tl.zeros_like(acc)
        for c in tl.static_range(0, BLOCK_D, WIDTH):
            a, b = _exact_slice(a_rows, stride_ad, a_ok, b_cols, stride_bd, b_ok, c, HEAD_DIM,
                                WIDTH, A_VOLATILE)
            acc = dot_f32_exact_small(a, b, acc)
            part = dot_f32_exact_big(a, b, tl.zeros_like(acc))
            s = hi + part  # TwoSum: s + err = hi + part exactly
            t = s - hi
            acc += (hi - (s - t)) + (part - t)
            hi = s
        return tl.where(acc == acc, hi + acc, hi)
    else:  # every slice's small products, then the big ones, in one chain
        for c in tl.static_range(0, BLOCK_D, WIDTH):
            a, b = _exact_slice(a_rows, stride_ad, a_ok, b_cols, stride_bd, b_ok, c, HEAD_DIM,
                                WIDTH, A_VOLATILE)
            acc = dot_f32_exact_small(a, b, acc)
        acc = exact_small_nan(acc)
        for c in tl.static_range(0, BLOCK_D, WIDTH):
            a, b = _exact_slice(a_rows, stride_ad, a_ok, b_cols, stride_bd, b_ok, c, HEAD_DIM,
                                WIDTH, A_VOLATILE)
            acc = dot_f32_exact_big(a, b, acc)
        return acc


@triton.jit
def _exact_slice(a_rows, stride_ad, a_ok, b_cols, stride_bd, b_ok, c: tl.constexpr,
                 HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, A_VOLATILE: tl.constexpr):
    """The slice [c, c + WIDTH) of the head dim for dot_f32_exact_sliced: A's columns [M, WIDTH]
    and B's rows [WIDTH, N], zero past HEAD_DIM and outside a_ok / b_ok."""
    offs_c = c + tl.arange(0, WIDTH)
    ok_c = offs_c < HEAD_DIM
    a = tl.load(a_rows + offs_c[None, :] * stride_ad, mask=a_ok & ok_c[None, :], other=0.0,
                volatile=A_VOLATILE)
    b = tl.load(b_cols + offs_c[:, None] * stride_bd, mask=ok_c[:, None] & b_ok, other=0.0)
    return a, b
