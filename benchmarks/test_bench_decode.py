"""One decoding step (Nq = 1) against a KV cache: every decode provider (contiguous and paged
caches, SDPA with an explicit mask, flash-attn's kvcache when installed) on one shape per
device kind, with per-row cache lengths."""
import pytest
import torch

from tritformer import bench, numerics, reference

DEVICE = bench.setup_device()  # idempotent; conftest.py ran it before any kernel import

if DEVICE == "cuda":  # a Llama-3-8B-like layer at B=8, 4K cache; 256-key pages (flash-attn's)
    SHAPE, DTYPE, PAGE = dict(batch=8, cache_len=4096, heads_q=32, heads_kv=8, d=128), torch.float16, 256
else:                 # interpreter: tiny, ragged last pages
    SHAPE, DTYPE, PAGE = dict(batch=2, cache_len=72, heads_q=4, heads_kv=2, d=32), torch.float32, 16

PROVIDERS = bench.decode_providers(PAGE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_decode(benchmark, provider):
    p = PROVIDERS[provider]
    reason = p.why_not(DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    case = bench.decode_case(SHAPE["batch"], SHAPE["cache_len"], SHAPE["heads_q"],
                             SHAPE["heads_kv"], SHAPE["d"], DTYPE, DEVICE, PAGE, seed=1)
    benchmark.group = (f"decode B={SHAPE['batch']} cache_len={SHAPE['cache_len']} "
                       f"Hq={SHAPE['heads_q']} Hkv={SHAPE['heads_kv']} D={SHAPE['d']}")
    moved = bench.decode_bytes(case.lengths, SHAPE["heads_q"], SHAPE["heads_kv"], SHAPE["d"],
                               case.q.element_size())
    benchmark.extra_info.update(bench.machine_info(DEVICE), backend=p.backend(DEVICE),
                                lengths=case.lengths, gb=moved * 1e-9)
    try:
        with torch.no_grad(), bench.decode.interpreter_tiles():
            result = benchmark(lambda: p.fn(case))
    except RuntimeError as e:  # a pinned SDPA backend that cannot take these inputs
        if provider not in bench._SDPA_BACKENDS:
            raise
        pytest.skip(f"{provider} refused the call: {str(e).splitlines()[0]}")
    # the benchmarked call computes the right thing: the project's criterion, per row over its
    # valid keys, against float64 (reference) and the benchmark dtype (PyTorch's own error)
    base = torch.empty_like(case.q)
    for b, n in enumerate(case.lengths):
        base[b:b + 1] = reference.attention(case.q[b:b + 1], case.k[b:b + 1, :, :n],
                                            case.v[b:b + 1, :, :n])
    numerics.assert_close("out", result, bench.decode_reference64(case), base)
