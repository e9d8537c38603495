"""Every tensor argument of every op, replaced by a strided, an offset and an expanded view
(tritformer.testing.layout_variants), against the float64 reference with the numerics criterion.

A kernel that reads an argument as if it were contiguous reads the NaN/huge-integer padding
around these views (or past their storage: the interpreter's bounds checker fails the launch),
so each case fails loudly rather than by luck. The grad_output of each backward gets the same
treatment at the end of the file.
"""
import pytest
import torch

import tritformer
from tritformer.testing import (assert_checks, check_attention, check_decode_attention,
                                check_ffn, check_gated_ffn, check_sdpa, check_softmax,
                                check_varlen_attention, layout_variants, offset, strided)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _variants(make_args, names):
    """(arg name, layout) ids and the argument dicts with that argument replaced."""
    cases = []
    base = make_args()
    for name in names:
        for layout, _ in layout_variants(base[name]):
            cases.append(pytest.param(name, layout, id=f"{name}-{layout}"))
    return cases


def _replace(args, name, layout):
    args = dict(args)
    args[name] = dict(layout_variants(args[name]))[layout]
    return args


# -- attention: every option at once (the masked kernel variant), GQA 2:1 ----------------------
def _attention_args():
    g = _g()
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 20, 24, 16
    return dict(
        q=torch.randn(B, Hq, Nq, D, generator=g), k=torch.randn(B, Hkv, Nk, D, generator=g),
        v=torch.randn(B, Hkv, Nk, D, generator=g),
        attn_mask=torch.randn(B, 1, Nq, Nk, generator=g),           # broadcast over heads
        key_padding_mask=torch.arange(Nk)[None, :] >= torch.tensor([[24], [17]]),
        alibi_slopes=torch.rand(Hq, generator=g))


@pytest.mark.parametrize("name,layout", _variants(
    _attention_args, ["q", "k", "v", "attn_mask", "key_padding_mask", "alibi_slopes"]))
def test_attention_arguments(name, layout):
    args = _replace(_attention_args(), name, layout)
    assert_checks(check_attention(**args, causal=True, return_lse=True))


# -- varlen: three packed sequences (one empty), alibi per sequence ------------------------------
def _varlen_args():
    g = _g(1)
    cu_q = torch.tensor([0, 5, 5, 19], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 25], dtype=torch.int32)
    return dict(q=torch.randn(19, 2, 16, generator=g), k=torch.randn(25, 1, 16, generator=g),
                v=torch.randn(25, 1, 16, generator=g), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                alibi_slopes=torch.rand(3, 2, generator=g))


@pytest.mark.parametrize("name,layout", _variants(
    _varlen_args, ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"]))
def test_varlen_arguments(name, layout):
    args = _replace(_varlen_args(), name, layout)
    assert_checks(check_varlen_attention(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
        args.pop("cu_seqlens_k"), 14, 16, causal=True, return_lse=True, **args))


# -- decode: ragged cache lengths, three splits (the partials and the combine kernel) ------------
def _decode_args():
    g = _g(2)
    return dict(q=torch.randn(2, 4, 2, 16, generator=g),
                k_cache=torch.randn(2, 2, 30, 16, generator=g),
                v_cache=torch.randn(2, 2, 30, 16, generator=g),
                cache_seqlens=torch.tensor([30, 11], dtype=torch.int32))


@pytest.mark.parametrize("num_splits", [1, 3])  # 1: output written by the split kernel directly
@pytest.mark.parametrize("name,layout", _variants(
    _decode_args, ["q", "k_cache", "v_cache", "cache_seqlens"]))
def test_decode_arguments(name, layout, num_splits):
    args = _replace(_decode_args(), name, layout)
    assert_checks(check_decode_attention(**args, num_splits=num_splits))


# -- SDPA drop-in: a float mask that broadcasts over heads ---------------------------------------
def _sdpa_args():
    g = _g(3)
    return dict(q=torch.randn(2, 2, 12, 16, generator=g), k=torch.randn(2, 2, 18, 16, generator=g),
                v=torch.randn(2, 2, 18, 16, generator=g),
                attn_mask=torch.randn(2, 1, 12, 18, generator=g))


@pytest.mark.parametrize("name,layout", _variants(_sdpa_args, ["q", "k", "v", "attn_mask"]))
def test_sdpa_arguments(name, layout):
    args = _replace(_sdpa_args(), name, layout)
    assert_checks(check_sdpa(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("attn_mask")))


# -- softmax: a float mask broadcast over the middle dim -----------------------------------------
def _softmax_args():
    g = _g(4)
    return dict(x=torch.randn(3, 4, 40, generator=g), mask=torch.randn(3, 1, 40, generator=g))


@pytest.mark.parametrize("name,layout", _variants(_softmax_args, ["x", "mask"]))
def test_softmax_arguments(name, layout):
    args = _replace(_softmax_args(), name, layout)
    assert_checks(check_softmax(args["x"], scale=0.7, mask=args["mask"]))


# -- ffn / gated_ffn: every weight, bias and the residual ----------------------------------------
def _ffn_args():
    g = _g(5)
    return dict(x=torch.randn(2, 5, 24, generator=g), w1=torch.randn(32, 24, generator=g) * 0.2,
                b1=torch.randn(32, generator=g), w2=torch.randn(20, 32, generator=g) * 0.2,
                b2=torch.randn(20, generator=g), residual=torch.randn(2, 5, 20, generator=g))


@pytest.mark.parametrize("name,layout", _variants(
    _ffn_args, ["x", "w1", "b1", "w2", "b2", "residual"]))
def test_ffn_arguments(name, layout):
    args = _replace(_ffn_args(), name, layout)
    assert_checks(check_ffn(**args, activation="gelu"))


def _gated_args():
    g = _g(6)
    return dict(x=torch.randn(2, 5, 24, generator=g),
                w_gate=torch.randn(32, 24, generator=g) * 0.2,
                w_up=torch.randn(32, 24, generator=g) * 0.2,
                w_down=torch.randn(20, 32, generator=g) * 0.2,
                b_gate=torch.randn(32, generator=g), b_up=torch.randn(32, generator=g),
                b_down=torch.randn(20, generator=g))


@pytest.mark.parametrize("name,layout", _variants(
    _gated_args, ["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"]))
def test_gated_ffn_arguments(name, layout):
    args = _replace(_gated_args(), name, layout)
    assert_checks(check_gated_ffn(**args, activation="silu"))


# -- grad_output of every backward in a strided / offset layout: the same gradients as with a
# contiguous one (the same kernels, so bitwise) ---------------------------------------------------
def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves]


_OPS = {
    "attention": (lambda q, k, v: tritformer.attention(q, k, v, causal=True),
                  lambda g: [torch.randn(2, 2, 20, 16, generator=g),
                             torch.randn(2, 1, 24, 16, generator=g),
                             torch.randn(2, 1, 24, 16, generator=g)], (2, 2, 20, 16)),
    "softmax": (lambda x: tritformer.softmax(x, scale=0.5),
                lambda g: [torch.randn(3, 4, 40, generator=g)], (3, 4, 40)),
    "ffn": (lambda x, w1, w2: tritformer.ffn(x, w1, None, w2, None),
            lambda g: [torch.randn(6, 24, generator=g), torch.randn(32, 24, generator=g) * 0.2,
                       torch.randn(20, 32, generator=g) * 0.2], (6, 20)),
    "gated_ffn": (lambda x, wg, wu, wd: tritformer.gated_ffn(x, wg, wu, wd),
                  lambda g: [torch.randn(6, 24, generator=g), torch.randn(32, 24, generator=g) * 0.2,
                             torch.randn(32, 24, generator=g) * 0.2,
                             torch.randn(20, 32, generator=g) * 0.2], (6, 20)),
}


@pytest.mark.parametrize("layout", ["strided", "offset"])
@pytest.mark.parametrize("op", sorted(_OPS))
def test_grad_output_layouts(op, layout):
    fn, make, out_shape = _OPS[op]
    g = _g(7)
    inputs = make(g)
    dy = torch.randn(out_shape, generator=g)
    want = _grads(fn, inputs, dy)
    got = _grads(fn, inputs, strided(dy) if layout == "strided" else offset(dy))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
