"""Masked attention: attn_mask, key_padding_mask, window, ALiBi, softcap, dropout, alone and
combined, forward and backward against the float64 reference (error-ratio criterion).

Interpreter tiles (kernels/attention.py INTERPRETER_CONFIGS): forward/dQ 64 query rows x 32 keys,
dK/dV 32 query rows x 64 keys. Nq=70 / Nk=83 give two query tiles, three key tiles with a ragged
tail, and a bottom-right diagonal offset of 13.
"""
import pytest
import torch
import triton
import triton.language as tl

import tritformer
from tritformer.kernels import attention as K
from tritformer.kernels._math import tanh, tanh_scaled16
from tritformer.testing import assert_checks, check_attention

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def qkv(B=1, Hq=2, Hkv=1, Nq=70, Nk=83, D=32, dtype=torch.float16):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


def padding(B, Nk, lengths):
    """key_padding_mask [B, Nk], True past each row's length."""
    return torch.arange(Nk)[None, :] >= torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------------
# each feature alone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (70, 83),        # full [Nq, Nk] mask, broadcast over B and H
    (1, 2, 70, 83),  # per-head mask, broadcast over B
    (2, 1, 1, 83),   # per-batch key mask: rows of the tile read through stride 0
])
def test_bool_mask(dtype, shape):
    q, k, v = qkv(B=2, dtype=dtype)
    mask = torch.rand(shape) > 0.4
    assert_checks(check_attention(q, k, v, attn_mask=mask, return_lse=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (2, 2, 70, 83),  # full mask: its gradient is dS itself
    (70, 83),        # broadcast over B and H: the gradient is dS summed over them
    (2, 1, 1, 83),   # a key bias per batch row
])
def test_float_mask_with_gradient(dtype, shape):
    q, k, v = qkv(B=2, dtype=dtype)
    mask = (torch.randn(shape) * 2).to(dtype)
    mask[..., 5] = float("-inf")  # -inf entries: gradient 0 there, no NaN
    assert_checks(check_attention(q, k, v, attn_mask=mask.requires_grad_(), causal=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask(dtype):
    # row 0: 40 valid keys (tiles 64.. skipped); row 1: holes inside and a padded first key
    q, k, v = qkv(B=2, dtype=dtype)
    kpm = padding(2, 83, [40, 83])
    kpm[1, 0] = kpm[1, 33:37] = True
    assert_checks(check_attention(q, k, v, key_padding_mask=kpm, return_lse=True))


@pytest.mark.parametrize("window,causal", [
    ((16, 16), False),   # both edges inside the tiles: masked tiles on both sides
    ((0, 0), False),     # only the diagonal
    ((40, -1), False),   # left edge only
    ((-1, 7), False),    # right edge only, 7 keys past the diagonal
    ((20, 5), True),     # causal overrides right = 0 (FlashAttention's rule)
    ((100, 100), False), # wider than the sequences: the plain path
])
@pytest.mark.parametrize("nq,nk", [(70, 83), (90, 40)])
def test_sliding_window(window, causal, nq, nk):
    q, k, v = qkv(Nq=nq, Nk=nk)
    assert_checks(check_attention(q, k, v, window=window, causal=causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(dtype, per_batch):
    q, k, v = qkv(B=2, Hq=2, Hkv=1, dtype=dtype)
    slopes = torch.rand(2, 2) if per_batch else 2.0 ** -torch.arange(1, 3, dtype=torch.float32)
    assert_checks(check_attention(q, k, v, alibi_slopes=slopes, causal=True, return_lse=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (False, (20, 9))])
def test_alibi_slope_signs(dtype, causal, window):
    """Negative and zero slopes (ALiBi's bias slope * -|d| for any sign): the 16-bit kernels
    form it as -|slope * a - slope * b|, valid for slope >= 0 only, and branch per head on the
    sign; keys on both sides of the diagonal (not causal) and a window's edges."""
    # fp16 not causal (the fused backward, keys on both sides): slopes <= -0.5 gave NaN in dQ
    # through the ragged key tile's keys past the end (test_backward_paths.py,
    # test_keys_past_the_end_never_reach_dq)
    q, k, v = qkv(B=2, Hq=4, Hkv=2, dtype=dtype)
    slopes = torch.tensor([[0.5, -0.25, 0.0, -0.03125], [-0.5, 0.125, -1.0, 0.0625]])
    assert_checks(check_attention(q, k, v, alibi_slopes=slopes, causal=causal, window=window,
                                  return_lse=True))


@triton.jit
def _tanh_kernel(X, Fast, Exact, k, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(Fast + offs, tanh_scaled16(x, k))
    tl.store(Exact + offs, tanh(x * k))


def test_tanh_scaled16():
    """_math.tanh_scaled16 (the 16-bit kernels' softcap tanh) against float64: within 2^-21
    absolute over the whole range (linear part, saturation, overflow of exp), exact +-1 at
    +-inf and past the saturation, NaN kept; the accurate fp32 `tanh` for comparison."""
    x = torch.cat([torch.linspace(-40, 40, 8192), torch.linspace(-1e-3, 1e-3, 8187),
                   torch.tensor([0.0, float("inf"), -float("inf"), float("nan"), 1e30])])
    k = 0.37
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    _tanh_kernel[(1,)](x, fast, exact, k, N=x.numel())
    ref = torch.tanh(x.double() * torch.tensor(k, dtype=torch.float32).double())
    finite = torch.isfinite(ref)
    assert (fast.double() - ref)[finite].abs().max().item() <= 2.0 ** -21
    ref32 = torch.tanh((x * k).double())  # `tanh` takes the fp32 product: 1.7 ulp of it
    assert (exact.double() - ref32)[finite].abs().max().item() <= 2.0 ** -23
    assert fast[-4:-1].tolist()[:2] == [1.0, -1.0] and fast[-2].isnan() and fast[-1] == 1.0
    assert (fast[:8192][x[:8192].abs() > 30].abs() == 1.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [
    0.5,   # strongly capped: tanh saturates, gradient factor (1 - t^2) near 0
    30.0,  # Gemma-2's value: scores mostly in tanh's linear part (the small-|x| series)
])
def test_softcap(dtype, softcap):
    q, k, v = qkv(dtype=dtype)
    assert_checks(check_attention(q * 2, k, v, softcap=softcap, return_lse=True))


@pytest.mark.parametrize("dtype,p", [(torch.float16, 0.1), (torch.bfloat16, 0.5),
                                     (torch.float32, 0.3)], ids=str)
def test_dropout_matches_reference_with_the_kernel_mask(dtype, p):
    # the reference uses the keep bits regenerated from the same seed: forward and all three
    # gradients must agree, which shows the backward regenerates the forward's mask (GQA: the
    # dK/dV program regenerates the bits of both query heads of its group)
    q, k, v = qkv(B=1, Hq=2, Hkv=1, dtype=dtype)
    assert_checks(check_attention(q, k, v, dropout_p=p, causal=True))


# ---------------------------------------------------------------------------------------------
# combinations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    # causal + padding + GQA + dropout
    dict(causal=True, key_padding_mask="pad", dropout_p=0.2),
    # window + ALiBi (local attention with a position bias)
    dict(window=(24, 8), alibi_slopes="slopes"),
    # float mask with grad + causal + softcap
    dict(causal=True, attn_mask="float_grad", softcap=5.0),
    # bool mask + padding + window + ALiBi + softcap + dropout: every switch on
    dict(attn_mask="bool", key_padding_mask="pad", window=(30, 2), alibi_slopes="slopes",
         softcap=4.0, dropout_p=0.3),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_combinations(case, dtype):
    q, k, v = qkv(B=2, Hq=2, Hkv=1, dtype=dtype)
    make = {"pad": lambda: padding(2, 83, [83, 51]),
            "slopes": lambda: torch.rand(2),
            "bool": lambda: torch.rand(2, 1, 70, 83) > 0.3,
            "float_grad": lambda: torch.randn(70, 83, dtype=dtype).requires_grad_()}
    kw = {name: make[val]() if isinstance(val, str) else val for name, val in case.items()}
    assert_checks(check_attention(q, k, v, return_lse=True, **kw))


def test_dtype_of_float_mask_may_differ_from_q():
    # an fp32 additive mask on fp16 inputs (what a user building the mask in fp32 passes)
    q, k, v = qkv()
    assert_checks(check_attention(q, k, v, attn_mask=torch.randn(70, 83)))


# ---------------------------------------------------------------------------------------------
# rows with nothing to attend, skipped tiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["bool_mask", "float_mask", "padding", "window"])
def test_rows_with_no_key_are_zero_with_zero_gradient(how):
    Nq, Nk = 60, 50
    kw = {}
    if how == "bool_mask":  # rows 3 and 17 see nothing
        mask = torch.rand(Nq, Nk) > 0.5
        mask[[3, 17]] = False
        kw["attn_mask"] = mask
    elif how == "float_mask":  # the same with -inf in an additive mask
        mask = torch.randn(Nq, Nk)
        mask[[3, 17]] = float("-inf")
        kw["attn_mask"] = mask
    elif how == "padding":  # the whole second batch row is padding
        kw["key_padding_mask"] = padding(2, Nk, [Nk, 0])
    else:  # window (0, 0): query i sees only key i + Nk - Nq = i - 10; rows 0..9 see nothing
        kw["window"] = (0, 0)
    q, k, v = (x.requires_grad_() for x in qkv(B=2, Nq=Nq, Nk=Nk))
    out, lse = tritformer.attention(q, k, v, return_lse=True, **kw)
    empty = torch.isneginf(lse)
    assert empty.any() and not torch.isnan(lse).any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    out.float().sum().backward()
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty]))
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert_checks(check_attention(q.detach(), k.detach(), v.detach(), return_lse=True, **kw))


@pytest.mark.parametrize("how", [
    "padding",  # batch row 0 has 40 valid keys of 128: key tiles 64.. lie past the last one
    "window",   # window (8, 8) with Nk - Nq = 128: keys 0..119 are in no row's window
    "interior",  # batch row 0's keys 64..127 are padding between valid keys on both sides:
                 # tiles inside [first valid, last valid] skipped by options._kv_range's counts
])
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
def test_fully_masked_tiles_are_not_visited(how, deterministic, request):
    if how == "interior":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "the forward and dQ kernels skip leading / trailing all-padding key tiles only "
            "(_key_range). Interior ones, skipped by a branch around the tile body on per-16-key "
            "valid counts, measured (AOT, 2026-12-07): forward 16-bit light estimates +1-2% but "
            "new spills on Triton 3.7.1 (light sm_90 D=128 128x64/8/3 16 B; masked fp32 sm_80 "
            "D=64 72 B, sm_90 D=256 8 B) and masked -4%; dQ spilled on 3.9 (light sm_80 D=128 "
            "64x32/4 944 B), also with the loads kept outside the branch")))
    # NaN in the keys/values of whole key tiles that the masking leaves empty (64-aligned: the
    # dK/dV tile; forward/dQ tiles are 32 keys): a kernel that loads them, even to multiply by
    # p = 0, returns NaN; one that skips them returns the reference result, and the dK/dV
    # programs of skipped tiles write zeros.
    if how == "padding":
        B, Nq, Nk = 2, 64, 128
        kw = {"key_padding_mask": padding(B, Nk, [40, 100])}
        poison = torch.zeros(B, Nk, dtype=torch.bool)
        poison[0, 64:] = True
    elif how == "interior":
        B, Nq, Nk = 2, 64, 192
        kpm = padding(B, Nk, [190, 150])
        kpm[0, 64:128] = True
        kw = {"key_padding_mask": kpm}
        poison = torch.zeros(B, Nk, dtype=torch.bool)
        poison[0, 64:128] = True
    else:
        B, Nq, Nk = 1, 64, 192
        kw = {"window": (8, 8)}
        poison = torch.zeros(B, Nk, dtype=torch.bool)
        poison[:, :64] = True
    q, k, v = qkv(B=B, Nq=Nq, Nk=Nk)
    clean = [k.clone(), v.clone()]
    for x in (k, v):
        x.transpose(1, 2)[poison] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = tritformer.attention(*leaves, **kw, deterministic=deterministic)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(leaves[0].grad).all()
    for g in (leaves[1].grad, leaves[2].grad):
        g = g.transpose(1, 2)
        assert torch.equal(g[poison], torch.zeros_like(g[poison]))
        assert torch.isfinite(g).all()
    for x in clean:
        x.transpose(1, 2)[poison] = 0.0
    assert_checks(check_attention(q, *clean, **kw))
    ref = tritformer.attention(q, *clean, **kw)
    assert torch.equal(out, ref)  # poisoned but skipped == clean


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_same_seed_same_output_different_seed_differs():
    q, k, v = qkv(B=1, Hq=2, Hkv=2)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = tritformer.attention(*leaves, dropout_p=0.3)
        out.float().sum().backward()
        outs.append((out, [x.grad for x in leaves]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))  # backward too
    assert not torch.equal(outs[0][0], outs[2][0])


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_dropped_fraction(p):
    # q = 0: uniform P = 1/Nk; v = identity: out[i, j] = keep[i, j] / (Nk (1 - p)), so the
    # zeros of the output are exactly the dropped probabilities
    Nq, Nk = 256, 64
    q = torch.zeros(2, 1, Nq, Nk)
    v = torch.eye(Nk).expand(2, 1, Nk, Nk).contiguous()
    out = tritformer.attention(q, torch.randn(2, 1, Nk, Nk), v, dropout_p=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (Nk * (1 - p))))
    n = out.numel()
    frac = 1 - kept.sum().item() / n
    se = (p * (1 - p) / n) ** 0.5
    assert abs(frac - p) < 4 * se, (frac, p, se)


def test_dropout_check_detects_a_different_mask(monkeypatch):
    # the comparison can fail: a reference mask from another seed must not pass
    real = K.dropout_keep_mask
    monkeypatch.setattr(K, "dropout_keep_mask", lambda seed, *a: real(seed + 1, *a))
    q, k, v = qkv()
    assert not all(c.ok for c in check_attention(q, k, v, dropout_p=0.3))


def test_dropout_keeps_lse():
    q, k, v = qkv()
    _, lse = tritformer.attention(q, k, v, return_lse=True)
    _, lse_d = tritformer.attention(q, k, v, return_lse=True, dropout_p=0.5)
    assert torch.equal(lse, lse_d)
