"""Scalar arguments and empty head counts as torch takes them (issue 14, item 9).

One rule for every op's scalar arguments (tritformer/_checks.py): reals accept Python and NumPy
ints and floats (numbers.Real, as torch does), ints accept Python and NumPy ints
(numbers.Integral), flags accept only a bool (as torch's is_causal); bool is refused where a
number is expected. Errors name the argument and come before any launch. Shapes are small:
every case is one interpreted launch (or none).
"""
import numpy as np
import pytest
import torch

import tritformer


def _qkv(B=1, Hq=2, Hkv=1, Nq=5, Nk=7, D=16):
    return torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)


def _varlen():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return (torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16), cu, cu)


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


# --- NumPy scalars: accepted, and the same result as the Python scalar they equal -------------
def test_attention_numpy_scalars():
    q, k, v = _qkv()
    s = np.float32(0.3)
    got = tritformer.attention(q, k, v, scale=s, softcap=np.float64(5.0), dropout_p=np.float32(0),
                               window=(np.int64(3), np.int32(0)), return_lse=True)
    want = tritformer.attention(q, k, v, scale=float(s), softcap=5.0, dropout_p=0.0,
                                window=(3, 0), return_lse=True)
    _same(got, want)


def test_varlen_numpy_scalars():
    q, k, v, cu, _ = _varlen()
    got = tritformer.varlen_attention(q, k, v, cu, cu, np.int64(5), np.int32(5),
                                      scale=np.float64(0.2), window=(np.int64(2), np.int64(-1)))
    want = tritformer.varlen_attention(q, k, v, cu, cu, 5, 5, scale=0.2, window=(2, -1))
    _same(got, want)


def test_decode_numpy_scalars():
    q, k, v = _qkv(Nq=1, Nk=40)
    s = np.float32(0.25)
    got = tritformer.decode_attention(q, k, v, scale=s, num_splits=np.int64(2))
    _same(got, tritformer.decode_attention(q, k, v, scale=float(s), num_splits=2))


def test_softmax_numpy_scalars():
    x = torch.randn(3, 4, 5)
    _same(tritformer.softmax(x, np.int64(1), scale=np.float32(0.5)),
          tritformer.softmax(x, 1, scale=0.5))
    _same(tritformer.softmax(x, np.int64(-1)), tritformer.softmax(x, 2))


def test_sdpa_numpy_scalars_as_torch():
    q, k, v = _qkv(Hkv=2)
    s = np.float32(0.3)
    got = tritformer.scaled_dot_product_attention(q, k, v, dropout_p=np.float64(0.0), scale=s)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=np.float64(0.0), scale=s))  # torch takes them too
    _same(got, tritformer.scaled_dot_product_attention(q, k, v, scale=float(s)))


# --- refused, naming the argument -------------------------------------------------------------
def _attn(**kw):
    return lambda: tritformer.attention(*_qkv(), **kw)


def _vl(**kw):
    q, k, v, cu, _ = _varlen()
    args = {"max_seqlen_q": 5, "max_seqlen_k": 5, **kw}
    mq, mk = args.pop("max_seqlen_q"), args.pop("max_seqlen_k")
    return lambda: tritformer.varlen_attention(q, k, v, cu, cu, mq, mk, **args)


def _dec(**kw):
    return lambda: tritformer.decode_attention(*_qkv(Nq=1), **kw)


def _sm(**kw):
    return lambda: tritformer.softmax(torch.randn(3, 4), **kw)


def _sdpa(**kw):
    return lambda: tritformer.scaled_dot_product_attention(*_qkv(Hkv=2), **kw)


@pytest.mark.parametrize("call, exc, match", [
    # flags are bools only, as torch's is_causal (1 and np.bool_ refused there too)
    (_attn(return_lse=1), TypeError, "return_lse must be a bool, got int"),
    (_attn(causal=1), TypeError, "causal must be a bool, got int"),
    (_attn(causal=np.bool_(True)), TypeError, "causal must be a bool"),
    (_vl(return_lse=1), TypeError, "return_lse must be a bool, got int"),
    (_vl(causal="yes"), TypeError, "causal must be a bool, got str"),
    (_dec(return_lse=1), TypeError, "return_lse must be a bool, got int"),
    (_sm(causal=1), TypeError, "causal must be a bool, got int"),
    (_sdpa(is_causal=1), TypeError, "is_causal must be a bool, got int"),
    # bool stays refused where a number is expected
    (_attn(scale=True), TypeError, "scale must be a float or None, got bool"),
    (_attn(window=(np.bool_(True), 0)), TypeError, "window must be a"),
    (_sm(dim=True), TypeError, "dim must be an int, got bool"),
    (_dec(num_splits=True), TypeError, "num_splits must be an int or None, got bool"),
    (_vl(max_seqlen_q=True), TypeError, "max_seqlen_q must be an int, got bool"),
    # NumPy values are checked as the Python ones
    (_attn(scale=np.float32("inf")), ValueError, "scale must be finite"),
    (_attn(softcap=np.float64(-1.0)), ValueError, "softcap must be >= 0"),
    (_attn(dropout_p=np.float32(1.0)), ValueError, "dropout_p must be < 1"),
    (_attn(window=(np.int64(-2), 0)), ValueError, "window values must be >= -1"),
    (_vl(max_seqlen_k=np.int64(-1)), ValueError, "max_seqlen_k must be >= 0"),
    (_vl(max_seqlen_k=np.float32(5)), TypeError, "max_seqlen_k must be an int, got float32"),
    (_dec(num_splits=np.int64(0)), ValueError, "num_splits must be >= 1"),
    (_sm(dim=np.int64(2)), ValueError, "dim must be in"),
    (_sm(scale=np.float64("nan")), ValueError, "scale must be finite"),
    (_sdpa(dropout_p=np.float32(1.5)), ValueError, "dropout_p must be <= 1"),
])
def test_refused(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- zero heads -------------------------------------------------------------------------------
def test_attention_zero_heads_is_empty():
    # Hq = Hkv = 0: an empty output (as torch's SDPA), no launch; gradients are empty too
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, Hq=0, Hkv=0))
    out, lse = tritformer.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 0, 5, 16) and lse.shape == (2, 0, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_varlen_and_decode_zero_heads_are_empty():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    e = torch.randn(8, 0, 16)
    assert tritformer.varlen_attention(e, e, e, cu, cu, 5, 5).shape == (8, 0, 16)
    assert tritformer.decode_attention(*_qkv(Hq=0, Hkv=0, Nq=1)).shape == (1, 0, 1, 16)


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_sdpa_zero_heads_as_torch(enable_gqa):
    q, k, v = _qkv(B=2, Hq=0, Hkv=0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    got = tritformer.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    assert got.shape == want.shape == (2, 0, 5, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: tritformer.attention(*_qkv(Hq=2, Hkv=0)), r"k/v have no heads \(Hkv = 0\) but q has 2"),
    (lambda: tritformer.decode_attention(*_qkv(Hq=2, Hkv=0, Nq=1)),
     r"k_cache/v_cache have no heads \(Hkv = 0\) but q has 2"),
    # torch answers zeros here (a size-0 dim broadcast against 2); without enable_gqa both refuse
    (lambda: tritformer.scaled_dot_product_attention(*_qkv(Hq=2, Hkv=0), enable_gqa=True),
     "key has no heads but query has 2"),
])
def test_query_heads_without_kv_heads_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
