"""Property-based tests: hypothesis draws shapes, strides, dtypes and options for every op and
compares with the float64 reference under the error-ratio criterion, forward and backward.

Bounded for CI (a fixed, derandomized set of examples, about a minute in the interpreter).
Before a release run the deeper search:

    TRITFORMER_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py -n 2

(random seeds; failing examples are printed with the exact arguments to reproduce them).
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tritformer.validate import check_attention, check_ffn, check_gated_ffn, check_softmax  # noqa: E402

DEEP = int(os.environ.get("TRITFORMER_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    return settings(max_examples=DEEP or examples, deadline=None, derandomize=not DEEP,
                    database=None, suppress_health_check=list(HealthCheck))


DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])


def assert_checks(checks, case):
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, f"{case}\n" + "\n".join(bad)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@fuzz(8)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3),
       Nq=st.integers(1, 80), Nk=st.integers(1, 80), D=st.sampled_from([1, 8, 16, 33, 64, 100]),
       dtype=DTYPES, causal=st.booleans(), layout=st.sampled_from(["bhnd", "bnhd"]),
       scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16))
def test_attention(B, Hkv, group, Nq, Nk, D, dtype, causal, layout, scale, seed):
    g = _gen(seed)
    Hq = Hkv * group

    def t(h, n):
        if layout == "bnhd":  # a transposed [B, N, H, D] projection, read through strides
            return torch.randn(B, n, h, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=g).to(dtype)

    q, k, v = t(Hq, Nq), t(Hkv, Nk), t(Hkv, Nk)
    assert_checks(check_attention(q, k, v, causal=causal, scale=scale, return_lse=True),
                  (B, Hq, Hkv, Nq, Nk, D, dtype, causal, layout, scale))


@st.composite
def softmax_case(draw):
    rank = draw(st.integers(1, 4))
    dim = draw(st.integers(-rank, rank - 1))
    # the softmax dim up to 300, the others small: the interpreter runs one program per row
    # (~1 ms each), so the row count (numel / shape[dim]) must stay small
    shape = [draw(st.integers(1, 300)) if i == dim % rank else draw(st.integers(1, 4))
             for i in range(rank)]
    causal = rank >= 2 and dim % rank == rank - 1 and draw(st.booleans())
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask_shape = None
    if kind != "none":  # broadcastable: any dim may be 1, leading dims may be dropped
        mask_shape = [s if draw(st.booleans()) else 1 for s in shape]
        mask_shape = mask_shape[draw(st.integers(0, rank - 1)):]
    return shape, dim, causal, kind, mask_shape


@fuzz(40)
@given(case=softmax_case(), dtype=DTYPES, scale=st.floats(0.05, 4.0), seed=st.integers(0, 2**16),
       transposed=st.booleans())
def test_softmax(case, dtype, scale, seed, transposed):
    shape, dim, causal, kind, mask_shape = case
    g = _gen(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    if transposed and x.dim() >= 2 and not causal:  # non-contiguous input
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    mask = None
    if kind == "bool":
        mask = torch.rand(*mask_shape, generator=g) > 0.3
    elif kind == "float":
        mask = torch.randn(*mask_shape, generator=g).masked_fill(
            torch.rand(*mask_shape, generator=g) < 0.2, float("-inf")).to(dtype)
    assert_checks(check_softmax(x, dim, scale=scale, mask=mask, causal=causal),
                  (shape, dim, causal, kind, mask_shape, dtype, scale))


@fuzz(8)
@given(M=st.integers(1, 70), d_in=st.integers(1, 50), hidden=st.integers(1, 70),
       d_out=st.integers(1, 40), act=st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"]),
       bias=st.booleans(), residual=st.booleans(), recompute=st.booleans(), gated=st.booleans(),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_ffn(M, d_in, hidden, d_out, act, bias, residual, recompute, gated, dtype, seed):
    g = _gen(seed)
    x = torch.randn(M, d_in, generator=g).to(dtype)
    w = lambda o, i: (torch.randn(o, i, generator=g) / i ** 0.5).to(dtype)  # noqa: E731
    b = lambda n: (torch.randn(n, generator=g) * 0.5).to(dtype) if bias else None  # noqa: E731
    case = (M, d_in, hidden, d_out, act, bias, residual, recompute, gated, dtype)
    if gated:
        checks = check_gated_ffn(x, w(hidden, d_in), w(hidden, d_in), w(d_out, hidden),
                                 activation=act, recompute=recompute, b_gate=b(hidden),
                                 b_up=b(hidden), b_down=b(d_out))
    else:
        res = torch.randn(M, d_out, generator=g).to(dtype) if residual else None
        checks = check_ffn(x, w(hidden, d_in), b(hidden), w(d_out, hidden), b(d_out),
                           activation=act, residual=res, recompute=recompute)
    assert_checks(checks, case)
