"""Every public op under torch.autocast follows its torch counterpart (issue 14, item 7).

CPU autocast with bfloat16 (the interpreter runs on CPU). The counterparts: SDPA for the
attention ops, F.linear for the FFNs (both in torch's lower-precision list: inputs cast to the
autocast dtype), torch.softmax for softmax (not in CPU's lists: computed in x's own dtype).
Each case: the output dtype is the counterpart's under the same autocast; mixed float32 /
bfloat16 inputs are accepted (torch casts them); the values pass the numerics criterion
(tritformer.numerics) against float64 on the cast inputs, with PyTorch's own bfloat16
computation as the baseline; gradients come back in each input's own dtype and pass it too.
"""
import pytest
import torch

import tritformer
from tritformer import numerics, reference

F = torch.nn.functional
BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t


def _leaves(inputs, dtype=None):
    """Fresh leaves (the float ones require grad), cast to dtype (the autocast cast) if given."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            t = t.detach() if dtype is None else _cast(t.detach(), BF16).to(dtype)
            t = t.clone().requires_grad_()
        out.append(t)
    return out


def _check(op, ref_fn, inputs, want_dtype, grads=True):
    """op under autocast on `inputs` (their own dtypes) vs ref_fn on the bf16-cast inputs in
    float64 (truth) and in bf16 (PyTorch's error); forward and, with grads, each input's grad."""
    kin = _leaves(inputs)
    with _autocast():
        out = op(*kin)
    assert out.dtype == want_dtype
    rin, bin_ = _leaves(inputs, torch.float64), _leaves(inputs, BF16)
    ref, base = ref_fn(*rin), ref_fn(*bin_)
    checks = [numerics.check("out", out, ref, base, eps_dtype=BF16)]
    if grads:
        do = torch.randn_like(ref)
        out.backward(do.to(out.dtype))
        ref.backward(do)
        base.backward(do.to(base.dtype))
        for i, (k, r, b) in enumerate(zip(kin, rin, bin_)):
            if isinstance(k, torch.Tensor) and k.requires_grad:
                assert k.grad.dtype == k.dtype, f"input {i}: grad {k.grad.dtype} for a {k.dtype} input"
                checks.append(numerics.check(f"grad {i}", k.grad, r.grad, b.grad,
                                             factor=numerics.GRAD_FACTOR, eps_dtype=BF16))
    numerics.assert_checks(checks)
    return out


def _sdpa_dtype(*tensors):
    with _autocast():
        return F.scaled_dot_product_attention(*tensors).dtype


# mixed on purpose: q float32, k bfloat16, v float32 (torch casts all three to bfloat16)
def _qkv(B=2, Hq=4, Hkv=2, Nq=9, Nk=13, D=16):
    return (torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D, dtype=BF16),
            torch.randn(B, Hkv, Nk, D))


def test_attention():
    # dense fwd + bwd, GQA, causal, a float32 additive mask (cast to bf16 as SDPA's is)
    q, k, v = _qkv()
    mask = torch.randn(9, 13)
    _check(lambda q, k, v, m: tritformer.attention(q, k, v, causal=True, attn_mask=m),
           lambda q, k, v, m: reference.attention(q, k, v, causal=True, attn_mask=m),
           (q, k, v, mask), _sdpa_dtype(q, k.float().repeat_interleave(2, 1), v.repeat_interleave(2, 1)))


def test_attention_float32_inputs_become_bf16():
    # the case: all float32 -> bfloat16, as torch's SDPA under autocast
    q, k, v = (t.float() for t in _qkv(Hkv=4))
    assert _sdpa_dtype(q, k, v) == BF16
    _check(tritformer.attention, reference.attention, (q, k, v), BF16)


def test_varlen_attention():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = torch.randn(12, 2, 16), torch.randn(12, 1, 16, dtype=BF16), torch.randn(12, 1, 16)
    _check(lambda q, k, v: tritformer.varlen_attention(q, k, v, cu, cu, 7, 7, causal=True),
           lambda q, k, v: reference.varlen_attention(q, k, v, cu, cu, causal=True),
           (q, k, v), BF16)


def test_decode_attention():
    # inference only: forward under no_grad
    q, k, v = _qkv(Nq=1, Nk=40)
    lens = torch.tensor([40, 17], dtype=torch.int32)
    with torch.no_grad():
        _check(lambda q, k, v: tritformer.decode_attention(q, k, v, lens),
               lambda q, k, v: reference.decode_attention(q, k, v, lens),
               (q, k, v), BF16, grads=False)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa(is_causal):
    # the drop-in: mixed dtypes accepted and bf16 out, as torch's own under autocast
    q, k, v = _qkv(Hkv=4)
    out = _check(lambda q, k, v: tritformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                 (q, k, v), _sdpa_dtype(q, k, v))
    with _autocast():
        assert out.dtype == F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).dtype


def test_sdpa_fallback_path():
    # Ev != E: torch's own SDPA serves it (fallback) with the autocast cast applied first
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16, dtype=BF16), torch.randn(1, 2, 7, 8)
    with _autocast():
        got = tritformer.scaled_dot_product_attention(q, k, v)
        want = F.scaled_dot_product_attention(q, k, v)
    assert got.dtype == want.dtype == BF16
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same torch kernel on the same bf16


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_softmax_follows_torch_softmax(dtype):
    # CPU autocast leaves softmax alone: x's own dtype, as torch.softmax
    x = torch.randn(3, 5, 7, dtype=dtype)
    with _autocast():
        want = torch.softmax(x, -1).dtype
    assert want == dtype
    mask = torch.randn(5, 7)  # a float32 mask with a bf16 x: accepted with or without autocast
    _check(lambda x, m: tritformer.softmax(x, scale=0.5, mask=m),
           lambda x, m: reference.softmax(x, scale=0.5, mask=m).to(x.dtype),
           (x, mask), want)


def _ffn_inputs():
    return (torch.randn(2, 3, 16), torch.randn(32, 16, dtype=BF16), torch.randn(32),
            torch.randn(8, 32), torch.randn(8, dtype=BF16))


def test_ffn():
    ins = _ffn_inputs()
    with _autocast():
        want = reference.ffn(*ins).dtype  # F.linear, gelu, F.linear: torch under autocast
    _check(tritformer.ffn, reference.ffn, ins, want)
    assert want == BF16


@pytest.mark.parametrize("res_dtype", [torch.float32, BF16])
def test_ffn_residual_promotes_as_torch(res_dtype):
    # torch: linear(...) (bf16 under autocast) + residual: a float32 residual promotes to float32
    ins = _ffn_inputs()
    res = torch.randn(2, 3, 8, dtype=res_dtype)
    with _autocast():
        want = reference.ffn(*ins, residual=res).dtype
    assert want == res_dtype
    _check(lambda *a: tritformer.ffn(*a[:5], residual=a[5]),
           lambda *a: reference.ffn(*a[:5], residual=a[5]), (*ins, res), want)


def test_gated_ffn():
    ins = (torch.randn(6, 16, dtype=BF16), torch.randn(24, 16), torch.randn(24, 16, dtype=BF16),
           torch.randn(16, 24))
    with _autocast():
        want = reference.gated_ffn(*ins).dtype
    assert want == BF16
    _check(tritformer.gated_ffn, reference.gated_ffn, ins, want)


def test_no_autocast_still_refuses_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must have q's dtype"):
        tritformer.attention(q, k, v)


def test_autocast_under_compile():
    # fullgraph: the autocast state, the casts and the op body's autocast-off region all trace
    torch._dynamo.reset()
    q, k, v = _qkv()

    def f(q, k, v):
        with _autocast():
            return tritformer.attention(q, k, v, causal=True)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert got.dtype == BF16
    torch.testing.assert_close(got, f(q, k, v), rtol=0, atol=0)  # same kernel, same bf16 inputs
