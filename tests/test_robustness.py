"""Numerical robustness: huge logits, values near fp16's max, NaN inputs, empty tensors."""
import pytest
import torch

import tritformer
from tritformer import reference
from tritformer.testing import assert_checks, check_attention, check_softmax


def test_attention_huge_logits_fp32():
    # |q k^T * scale| up to ~1e4: the running max keeps exp2 finite; the criterion still holds
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 40, 16, generator=g) * 30
    k = torch.randn(1, 2, 50, 16, generator=g) * 30
    v = torch.randn(1, 2, 50, 16, generator=g)
    scores = (q @ k.transpose(-1, -2)).abs().max()
    assert scores > 5e3, scores
    assert_checks(check_attention(q, k, v, scale=1.0, causal=True))


def test_fp16_inputs_near_the_max():
    # 60000 is near fp16's max (65504): the kernels scale and accumulate in fp32
    x = torch.full((3, 40), 6e4, dtype=torch.float16)
    x[:, ::3] = -6e4
    y = tritformer.softmax(x)
    ref = reference.softmax(x.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-3)  # fp16 resolution of 1/27
    q = torch.full((1, 1, 8, 16), 250.0, dtype=torch.float16)  # q.k = 1e6: overflows fp16
    v = torch.randn(1, 1, 8, 16).half()
    out = tritformer.attention(q, q, v)  # scores stay in fp32 in the kernel
    torch.testing.assert_close(out.float(), v.float().mean(2, keepdim=True).expand_as(out),
                               rtol=0, atol=2e-3)


def test_nan_inputs_propagate_without_crashing():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    q[0, 1, 7, 3] = float("nan")  # one query row: only its output row is NaN
    out = tritformer.attention(q, k, v)
    assert out[0, 1, 7].isnan().all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 1, 7] = False
    torch.testing.assert_close(out[mask], reference.attention(q, k, v)[mask])

    x = torch.randn(4, 30)
    x[2, 5] = float("nan")
    y = tritformer.softmax(x)
    assert y[2].isnan().all() and torch.isfinite(y[[0, 1, 3]]).all()

    x = torch.randn(5, 12)
    x[3, 0] = float("nan")
    w1, w2 = torch.randn(20, 12), torch.randn(7, 20)
    y = tritformer.ffn(x, w1, None, w2, None)
    assert y[3].isnan().all() and torch.isfinite(y[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("op", ["softmax", "ffn", "gated_ffn"])
def test_empty_tensors(op):
    if op == "softmax":
        x = torch.randn(0, 7, requires_grad=True)
        y = tritformer.softmax(x)
    else:
        x = torch.randn(0, 12, requires_grad=True)
        ws = [torch.randn(20, 12, requires_grad=True), torch.randn(20, 12, requires_grad=True),
              torch.randn(7, 20, requires_grad=True)]
        y = (tritformer.ffn(x, ws[0], None, ws[2], None) if op == "ffn"
             else tritformer.gated_ffn(x, *ws))
        assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    if op != "softmax":
        assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws if w.grad is not None)


def test_softmax_minus_inf_inputs():
    # -inf logits are masked entries; a row of -inf only is empty: zeros, not NaN
    x = torch.randn(3, 9)
    x[0, :4] = float("-inf")
    x[1] = float("-inf")
    assert_checks(check_softmax(x))
    y = tritformer.softmax(x)
    assert torch.equal(y[1], torch.zeros(9))
