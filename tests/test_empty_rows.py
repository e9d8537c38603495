"""One rule for rows with no finite score, on every path: output 0, lse -inf, zero gradient.

A score row can be all -inf because of masking (causal, window, mask, padding: covered in
test_attention_masks.py) or because of the data itself (a key of -inf with a positive query).
The kernels have a boundary-tile path (masks evaluated) and an unmasked fast path for interior
key tiles (taken once Nk spans a whole tile: 32+ keys in the interpreter's configs); both must
follow the rule, forward and backward.
"""
import pytest
import torch

import tritformer


def _qkv(nq, nk, B=2, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g).abs() + 0.1  # positive: q . (-inf) = -inf
    k = torch.randn(B, H, nk, D, generator=g)
    v = torch.randn(B, H, nk, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("nk", [
    20,   # keys fit the ragged boundary tile: masked path
    80,   # whole interior tiles: the unmasked fast path (+ a ragged tail)
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # 3xTF32 dots; 16-bit MMA
def test_attention_rows_without_finite_score(nk, causal, dtype):
    q, k, v = (t.to(dtype) for t in _qkv(24, nk))
    k[0, 1] = float("-inf")  # batch 0, head 1: every score is -inf
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = tritformer.attention(*leaves, causal=causal, return_lse=True)
    assert torch.isneginf(lse[0, 1]).all()
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.isfinite(out).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    dq, dk, dv = (t.grad for t in leaves)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), name
        assert torch.equal(g[0, 1], torch.zeros_like(g[0, 1])), name
    # the other heads are untouched: as attention over them alone
    ref = tritformer.reference.attention(q[1:].float(), k[1:].float(), v[1:].float(), causal=causal)
    torch.testing.assert_close(out[1:].float(), ref, rtol=1e-4 if dtype == torch.float32 else 2e-3,
                               atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("nk", [20, 80])  # boundary-tile path; interior fast path
def test_attention_query_row_of_minus_inf(nk):
    q, k, v = _qkv(24, nk)
    k = k.abs() + 0.1
    q[1, 0, 5] = float("-inf")  # one query row: its scores are all -inf
    out, lse = tritformer.attention(q, k, v, return_lse=True)
    assert torch.isneginf(lse[1, 0, 5]) and torch.equal(out[1, 0, 5], torch.zeros(16))
    assert torch.isfinite(out).all() and torch.isfinite(lse).sum() == lse.numel() - 1


@pytest.mark.parametrize("nk", [20, 80])
def test_varlen_sequence_without_finite_score(nk):
    q, k, v = _qkv(24, nk, B=1)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [T, H, D]
    cu_q = torch.tensor([0, 10, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, nk // 2, nk], dtype=torch.int32)
    k[nk // 2:] = float("-inf")  # sequence 1's keys
    out, lse = tritformer.varlen_attention(q, k, v, cu_q, cu_k, 14, nk - nk // 2,
                                           return_lse=True)
    assert torch.equal(out[10:], torch.zeros_like(out[10:]))
    assert torch.isneginf(lse[:, 10:]).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("num_splits", [1, 3])  # direct output; partials + combine
@pytest.mark.parametrize("n", [20, 100])        # boundary tiles only; interior fast path too
def test_decode_rows_without_finite_score(n, num_splits):
    q, k, v = _qkv(1, n)
    k[1] = float("-inf")  # batch 1's whole cache
    out, lse = tritformer.decode_attention(q, k, v, num_splits=num_splits, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()
