"""Packed variable-length sequences: tritformer.varlen_attention against the per-sequence loop
and the float64 reference (error-ratio criterion), forward and backward.

Interpreter tiles: 64 query rows x 32 keys (forward, dQ), 32 x 64 (dK/dV); the lengths below put
sequence starts inside tiles, leave ragged tails, and include empty sequences.
"""
import pytest
import torch

import tritformer
from tritformer.kernels import attention as K
from tritformer.testing import check_varlen_attention


def packed(lens_q, lens_k, Hq=4, Hkv=2, D=32, dtype=torch.float16):
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), Hq, D, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def check_varlen(q, k, v, cu_q, cu_k, **kw):
    """Kernel vs float64 reference, bounded by the reference in q's dtype: out, lse and grads
    (tritformer.testing.check_varlen_attention), asserted."""
    lens = lambda cu: int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    checks = check_varlen_attention(q, k, v, cu_q, cu_k, lens(cu_q), lens(cu_k),
                                    return_lse=True, **kw)
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad)


SELF = ([70, 5, 33], [70, 5, 33])       # self-attention; sequences start at rows 70, 75: inside tiles
CROSS = ([5, 0, 40, 17], [9, 3, 40, 70])  # other key lengths per sequence, an empty query sequence


@pytest.mark.parametrize("lens,kw", [
    (SELF, {}),
    (SELF, {"causal": True}),                    # bottom-right within each sequence
    (CROSS, {"causal": True}),                   # Nq < Nk and Nq > Nk per sequence
    (CROSS, {"window": (8, 3)}),
    (CROSS, {"alibi_slopes": "per_seq"}),        # slopes [num_seqs, Hq]
    (SELF, {"softcap": 3.0, "causal": True}),
    (([1], [100]), {}),                          # one query against a long context
    (([30, 30], [0, 20]), {"causal": True}),     # a sequence with no keys: its rows are 0
], ids=["self", "self-causal", "cross-causal", "cross-window", "cross-alibi", "softcap",
        "one-query", "no-keys"])
def test_varlen_against_reference(lens, kw):
    q, k, v, cu_q, cu_k = packed(*lens)
    if kw.get("alibi_slopes") == "per_seq":
        kw = {"alibi_slopes": torch.rand(len(lens[0]), 4)}
    check_varlen(q, k, v, cu_q, cu_k, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_varlen_dtypes(dtype):
    q, k, v, cu_q, cu_k = packed([20, 47], [33, 47], dtype=dtype, D=40)
    check_varlen(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=torch.rand(4))


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_the_per_sequence_loop(causal):
    # each sequence's tiles start at its own first token: the packed run does exactly the
    # per-sequence arithmetic, so outputs and gradients are bitwise equal
    lens = [37, 70, 1]
    q, k, v, cu_q, cu_k = packed(lens, lens)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = tritformer.varlen_attention(*leaves, cu_q, cu_k, max(lens), max(lens), causal=causal)
    g = torch.randn_like(out)
    out.backward(g)
    for s, (a, b) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        seq = [x[a:b].transpose(0, 1)[None].clone().requires_grad_() for x in (q, k, v)]
        o = tritformer.attention(*seq, causal=causal)
        o.backward(g[a:b].transpose(0, 1)[None])
        assert torch.equal(out[a:b], o[0].transpose(0, 1)), s
        for x, y in zip(leaves, seq):
            assert torch.equal(x.grad[a:b], y.grad[0].transpose(0, 1)), s


def test_varlen_dropout_uses_the_kernel_mask_per_sequence():
    # keep bits: lse row (h, t) x key j of the sequence, DROP_COLS = max_seqlen_k; the reference
    # takes the kernel's bits regenerated from the same seed, forward and backward
    q, k, v, cu_q, cu_k = packed([20, 33], [41, 30])
    check_varlen(q, k, v, cu_q, cu_k, dropout_p=0.3, causal=True)


def test_lse_layout():
    q, k, v, cu_q, cu_k = packed([10, 20], [10, 20])
    out, lse = tritformer.varlen_attention(q, k, v, cu_q, cu_k, 20, 20, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 30) and lse.dtype == torch.float32


def test_max_seqlen_larger_than_needed_is_fine():
    q, k, v, cu_q, cu_k = packed([10, 20], [15, 5])
    a = tritformer.varlen_attention(q, k, v, cu_q, cu_k, 20, 15)
    b = tritformer.varlen_attention(q, k, v, cu_q, cu_k, 200, 150)  # extra programs do nothing
    assert torch.equal(a, b)


def _bad(**over):
    q, k, v, cu_q, cu_k = packed([10, 20], [10, 20])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=20)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 10, 30])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 20, 10], dtype=torch.int32)), ValueError, "cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 10, 30], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 10, 29], dtype=torch.int32)), ValueError, "cu_seqlens_k "
                                                                                  "must end at the total length 30"),
    (dict(cu_seqlens_k=torch.tensor([0, 30], dtype=torch.int32)), ValueError, "same length"),
    (dict(max_seqlen_q=19), ValueError, r"max_seqlen_q=19 is smaller than the longest sequence \(20\)"),
    (dict(max_seqlen_k=5), ValueError, r"max_seqlen_k=5 is smaller"),
    (dict(max_seqlen_k=2.0), TypeError, "max_seqlen_k must be an int"),
    (dict(q=torch.randn(1, 30, 4, 32)), ValueError, r"q must have 3 dimensions \[total_q, Hq, D\]"),
    (dict(k=torch.randn(30, 3, 32, dtype=torch.float16), v=torch.randn(30, 3, 32, dtype=torch.float16)),
     ValueError, "multiple of k/v's head count"),
    # k/v shapes are named in varlen's own layout, not the kernels' [1, H, T, D] views
    (dict(v=torch.randn(31, 2, 32, dtype=torch.float16)), ValueError,
     r"^v must have k's shape \[total_k, Hkv, D\] = \(30, 2, 32\), got \(31, 2, 32\)"),
    (dict(v=torch.randn(30, 2, 16, dtype=torch.float16)), ValueError,
     r"^v must have q's head dim D=32, got shape \(30, 2, 16\)"),
])
def test_bad_input(over, exc, match, monkeypatch):
    monkeypatch.setattr(K, "attention_forward", lambda *a: pytest.fail("kernel launched"))
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        tritformer.varlen_attention(**args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(alibi_slopes=torch.rand(3, 4)), ValueError, r"alibi_slopes must have shape \[Hq\] = \[4\] "
                                                      r"or \[B, Hq\] = \[2, 4\]"),
    (dict(window=(-2, 0)), ValueError, "window values must be >= -1"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be < 1"),
])
def test_bad_options(kw, exc, match, monkeypatch):
    monkeypatch.setattr(K, "attention_forward", lambda *a: pytest.fail("kernel launched"))
    with pytest.raises(exc, match=match):
        tritformer.varlen_attention(**_bad(), **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_too_small_max_seqlen_under_compile_still_covers_every_row(causal):
    # Under torch.compile the host cannot read cu_seqlens, so a max_seqlen below the longest
    # sequence is not caught; the kernels then loop over the tiles the grid does not cover
    # (interpreter tiles: 64 query rows, 64 keys in dK/dV: 70 rows need two, the grid has one).
    q, k, v, cu_q, cu_k = packed(*SELF, dtype=torch.float32)
    want = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    got = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    ref = tritformer.varlen_attention(*want, cu_q, cu_k, 70, 70, causal=causal)
    ref.backward(dout)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: tritformer.varlen_attention(q, k, v, cu_q, cu_k, 8, 8,
                                                                   causal=causal),
                       fullgraph=True, backend="aot_eager")
    out = fn(*got)
    out.backward(dout)
    assert torch.equal(out, ref)
    for a, b in zip(got, want):
        assert torch.equal(a.grad, b.grad)
