"""Attention: every provider, mode and causal flag, on one shape per device kind."""
import pytest
import torch

from tritformer import bench, numerics, reference

DEVICE = bench.setup_device()  # idempotent; conftest.py ran it before any kernel import

if DEVICE == "cuda":  # FlashAttention's benchmark shape at N = 2048: B * N = 16K tokens, dim 2048
    SHAPE, DTYPE = dict(batch=8, heads=32, n=2048, d=64), torch.bfloat16
else:                 # interpreter: small
    SHAPE, DTYPE = dict(batch=1, heads=2, n=128, d=64), torch.float32

PROVIDERS = bench.attention_providers()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_attention(benchmark, provider, mode, causal):
    p = PROVIDERS[provider]
    reason = p.why_not(DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    b, h, n, d = SHAPE["batch"], SHAPE["heads"], SHAPE["n"], SHAPE["d"]
    q, k, v = bench._qkv(b, h, n, d, DTYPE, DEVICE, grad=mode != "fwd")
    benchmark.group = f"attention {mode} {'causal' if causal else 'full'} N={n} D={d}"
    benchmark.extra_info.update(bench.machine_info(DEVICE), backend=p.backend(DEVICE),
                                tflop=bench.attention_flops(b, h, n, n, d, causal, mode) * 1e-12)
    result = benchmark(bench._attention_call(p, q, k, v, causal, mode))
    if mode == "fwd":  # the benchmarked call computes the right thing: the project's criterion
        ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
        numerics.assert_close("out", result, ref, reference.attention(q, k, v, causal=causal))
    else:
        assert [g.shape for g in result] == [q.shape, k.shape, v.shape]
