"""The CPU production fallback (backend "torch", tritformer/fallback.py; issue 20, item 3).

Every op's fallback against the float64 reference within the numerics criterion (forward and
gradients) over the kernels' semantics: bottom-right causal with Nq != Nk, rows without a key,
sliding window, key padding, bool / float masks (with the mask's gradient), ALiBi, GQA / MQA,
softcap and dropout (plain-torch path), lse, varlen, decode with garbage past the cache length,
the SDPA drop-in's top-left causal. The tests run with Triton's interpreter on (conftest), so
the fallback is forced by replacing `backend_for` in the op modules, with the kernel launchers
replaced by failures. And the reason it exists: it is faster than the naive reference.
"""
import time

import pytest
import torch

import tritformer
from tritformer import backend as backend_mod
from tritformer import fallback, reference
from tritformer.kernels import attention as KA
from tritformer.kernels import decode as KD
from tritformer.ops import attention as ops_attention
from tritformer.ops import decode as ops_decode
from tritformer.ops import ffn as ops_ffn
from tritformer.ops import softmax as ops_softmax
from tritformer.testing import (assert_checks, check_attention, check_decode_attention, check_ffn,
                                check_gated_ffn, check_sdpa, check_softmax, check_varlen_attention)


@pytest.fixture
def torch_backend(monkeypatch):
    for mod in (ops_attention, ops_decode, ops_ffn, ops_softmax, backend_mod):
        monkeypatch.setattr(mod, "backend_for", lambda t: "torch")

    def fail(*args, **kwargs):
        pytest.fail("a kernel was launched on the torch backend")
    for mod, name in ((KA, "attention_forward"), (KA, "attention_backward"), (KD, "decode_forward")):
        monkeypatch.setattr(mod, name, fail)


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


def _kpm():
    kp = torch.zeros(2, 11, dtype=torch.bool)
    kp[0, 7:] = True
    kp[1] = True  # every key padded: out 0, lse -inf, zero gradient
    return kp


def _float_mask():
    m = torch.randn(2, 1, 9, 11)
    m[0, 0, 4] = float("-inf")  # a row with no key
    m[1, 0, :, 3] = float("-inf")
    return m.requires_grad_()


# (name, (B, Hq, Hkv, Nq, Nk, D), options)
DENSE = [
    ("causal", (2, 2, 2, 33, 33, 16), dict(causal=True)),
    ("causal-Nq<Nk-gqa", (2, 4, 2, 5, 40, 16), dict(causal=True, return_lse=True)),
    ("causal-Nq>Nk-empty-rows", (1, 2, 2, 20, 7, 8), dict(causal=True, return_lse=True)),
    ("window", (1, 2, 1, 17, 17, 16), dict(window=(3, 2))),
    ("window-causal-Nq<Nk", (1, 2, 2, 6, 19, 16), dict(causal=True, window=(4, -1), return_lse=True)),
    ("key-padding", (2, 2, 2, 9, 11, 16), dict(causal=True, key_padding_mask=_kpm(), return_lse=True)),
    ("bool-mask", (2, 2, 2, 9, 11, 16), dict(attn_mask=torch.rand(2, 1, 9, 11) > 0.6)),
    ("float-mask-grad", (2, 2, 2, 9, 11, 16), dict(attn_mask=_float_mask(), return_lse=True)),
    ("alibi", (2, 4, 4, 12, 12, 16), dict(causal=True, alibi_slopes=torch.rand(2, 4), return_lse=True)),
    ("mqa-scale", (1, 4, 1, 8, 13, 32), dict(scale=0.3, return_lse=True)),
    ("softcap", (1, 2, 2, 10, 10, 16), dict(causal=True, softcap=5.0, return_lse=True)),
    ("dropout", (1, 2, 2, 10, 12, 16), dict(dropout_p=0.25)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name,shape,options", DENSE, ids=[c[0] for c in DENSE])
def test_attention(torch_backend, name, shape, options, dtype):
    q, k, v = _qkv(*shape, dtype)
    options = dict(options)
    if "attn_mask" in options and options["attn_mask"].dtype != torch.bool:
        options["attn_mask"] = options["attn_mask"].detach().to(dtype).requires_grad_()
    if "alibi_slopes" in options:
        options["alibi_slopes"] = options["alibi_slopes"].to(dtype)
    assert_checks(check_attention(q, k, v, **options), name)


def test_empty_rows_are_zero_with_zero_gradient(torch_backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 6, 3, 8, torch.float32))
    out, lse = tritformer.attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :, :3] == 0).all() and torch.isneginf(lse[:, :, :3]).all()
    assert torch.isfinite(lse[:, :, 3:]).all()
    out.sum().backward()
    assert (q.grad[:, :, :3] == 0).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen(torch_backend):
    cu = torch.tensor([0, 5, 5, 17, 18], dtype=torch.int32)  # an empty and a one-token sequence
    cuk = torch.tensor([0, 9, 12, 20, 20], dtype=torch.int32)  # ... and one without keys
    q, k, v = torch.randn(18, 4, 16), torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    assert_checks(check_varlen_attention(q, k, v, cu, cuk, 12, 9, causal=True, return_lse=True,
                                         alibi_slopes=torch.rand(4, 4)), "varlen causal alibi")
    assert_checks(check_varlen_attention(q.half(), k.half(), v.half(), cu, cuk, 12, 9,
                                         window=(2, 1), softcap=3.0), "varlen window softcap fp16")


@pytest.mark.parametrize("L,S", [(7, 12), (12, 7)])
def test_sdpa_drop_in_top_left_causal(torch_backend, L, S):
    q, k, v = _qkv(2, 4, 2, L, S, 16, torch.float32)
    assert_checks(check_sdpa(q, k, v, is_causal=True, enable_gqa=True), "sdpa is_causal")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_decode(torch_backend, dtype):
    B, Hq, Hkv, Nq, n_max, D = 3, 4, 2, 2, 16, 16
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    kc, vc = torch.randn(B, Hkv, n_max, D, dtype=dtype), torch.randn(B, Hkv, n_max, D, dtype=dtype)
    lens = torch.tensor([0, 1, 9], dtype=torch.int32)  # no key / half the rows empty / a prefix
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:] = float("nan")  # garbage past the length never reaches the result
        vc[b, :, n:] = float("nan")
    assert_checks(check_decode_attention(q, kc, vc, lens), "decode")
    full = torch.full((B,), n_max, dtype=torch.int32)
    assert_checks(check_decode_attention(q, kc.nan_to_num(), vc.nan_to_num(), full), "decode full")
    assert_checks(check_decode_attention(q, kc.nan_to_num(), vc.nan_to_num()), "decode no lengths")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_softmax(torch_backend, dtype):
    x = torch.randn(2, 3, 7, 9, dtype=dtype)
    keep = torch.rand(1, 3, 7, 9) > 0.4
    keep[0, 1, 2] = False  # a row with nothing left: 0, zero gradient
    assert_checks(check_softmax(x, scale=0.7, mask=keep, causal=True), "softmax bool causal")
    m = torch.randn(1, 3, 1, 9, dtype=dtype)
    m[0, :, 0, 4] = float("-inf")  # softmax over dim 1: the rows at column 4 are empty
    assert_checks(check_softmax(x, dim=1, mask=m), "softmax dim 1 empty rows")
    assert_checks(check_softmax(x, mask=torch.randn(1, 1, 7, 9, dtype=dtype).requires_grad_()),
                  "softmax float mask grad")
    y = tritformer.softmax(torch.randn(2, 5), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert (y == 0).all()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_ffn(torch_backend, activation):
    x = torch.randn(9, 12)
    w1, w2 = torch.randn(20, 12) / 4, torch.randn(10, 20) / 4
    b1, b2 = torch.randn(20), torch.randn(10)
    for recompute in (False, True):
        assert_checks(check_ffn(x, w1, b1, w2, b2, activation=activation, residual=torch.randn(9, 10),
                                recompute=recompute), f"ffn {activation} {recompute}")
        assert_checks(check_gated_ffn(x.bfloat16(), w1.bfloat16(), w1.flip(0).bfloat16(), w2.bfloat16(),
                                      activation=activation, recompute=recompute, b_up=b1.bfloat16()),
                      f"gated {activation} {recompute}")


def test_direct_call_and_no_recursion_through_patched_sdpa(monkeypatch):
    # callable whatever backend_for says; torch's builtin SDPA even when F's name is replaced
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        tritformer.scaled_dot_product_attention)
    q, k, v = _qkv(1, 2, 2, 5, 8, 16, torch.float64)
    out, lse = fallback.attention(q, k, v, None, None, 0, True)
    ref, ref_lse = reference._attention(q, k, v, None, None, 0, True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.float())


def test_reference_name_still_routes_to_the_fallback(monkeypatch):
    monkeypatch.setattr(ops_attention, "backend_for", lambda t: "reference")
    monkeypatch.setattr(KA, "attention_forward", None)
    q, k, v = _qkv(1, 2, 2, 5, 8, 16, torch.float32)
    seen = []
    real = fallback.attention
    monkeypatch.setattr(fallback, "attention", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    tritformer.attention(q, k, v, causal=True)
    assert seen


def test_fallback_faster_than_naive_reference():
    """The point of the fallback: one fixed CPU case (causal training attention, fp32, forward +
    backward), the fallback against the naive reference it replaced (reference._attention in
    fp32), interleaved in one run, best of 3 each. Measured: 1.6-2.0x on a loaded 2-core
    machine."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 4, 512, 512, 64, torch.float32))

    def run(fn):
        t = time.perf_counter()
        fn().sum().backward()
        return time.perf_counter() - t

    fast = lambda: fallback.attention(q, k, v, None, None, 0)[0]
    naive = lambda: reference._attention(q, k, v, None, None, 0)
    run(fast), run(naive)  # warm-up
    t_fast, t_naive = [], []
    for _ in range(3):
        t_fast.append(run(fast))
        t_naive.append(run(naive))
    ratio = min(t_naive) / min(t_fast)
    print(f"fallback {min(t_fast) * 1e3:.1f} ms, naive reference {min(t_naive) * 1e3:.1f} ms: {ratio:.2f}x")
    assert ratio > 1.15, (t_fast, t_naive)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_rows_without_finite_score_from_the_data(torch_backend, causal, gqa):
    # the kernels' rule (tests/test_empty_rows.py) on the fallback: a key of -inf with positive
    # queries makes every score of that head -inf; SDPA's backward gave NaN in dq there
    g = torch.Generator().manual_seed(0)
    Hkv = 1 if gqa else 2
    q = torch.randn(2, 2, 24, 16, generator=g).abs() + 0.1
    k, v = (torch.randn(2, Hkv, 40, 16, generator=g) for _ in range(2))
    k[0, Hkv - 1] = float("-inf")  # batch 0: every score of the last kv head's group is -inf
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = tritformer.attention(*leaves, causal=causal, return_lse=True)
    dead = slice(1, 2) if not gqa else slice(0, 2)  # the query heads reading that kv head
    assert torch.isneginf(lse[0, dead]).all() and torch.equal(out[0, dead], torch.zeros_like(out[0, dead]))
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for name, t in zip("qkv", leaves):
        assert torch.isfinite(t.grad).all(), name
    assert torch.equal(leaves[0].grad[0, dead], torch.zeros_like(leaves[0].grad[0, dead]))
    ref = tritformer.reference.attention(q[1:], k[1:], v[1:], causal=causal)
    torch.testing.assert_close(out[1:], ref, rtol=1e-5, atol=1e-6)
