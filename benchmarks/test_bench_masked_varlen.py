"""Masked attention (key padding of a padded batch, dense bool document mask) and packed
variable-length sequences: every provider and mode on one tiny shape per device kind."""
import pytest
import torch

from tritformer import bench, numerics, reference

DEVICE = bench.setup_device()  # idempotent; conftest.py ran it before any kernel import

if DEVICE == "cuda":
    SHAPE, DTYPE = dict(batch=4, heads=16, n=1024, d=64), torch.bfloat16
    VARLEN = dict(tokens=8192, max_seqlen=2048, heads=16, d=64)
else:  # interpreter: tiny
    SHAPE, DTYPE = dict(batch=2, heads=1, n=48, d=32), torch.float32
    VARLEN = dict(tokens=96, max_seqlen=48, heads=1, d=32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("variant", ["padding", "dense"])
def test_masked(benchmark, variant, provider, mode, causal):
    p = bench.masked_providers(variant).get(provider)
    if p is None:
        pytest.skip("a provider of the attention op only")
    reason = p.why_not(DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    b, h, n, d = SHAPE["batch"], SHAPE["heads"], SHAPE["n"], SHAPE["d"]
    case = bench.mask_case(variant, b, n, DEVICE, seed=1)
    q, k, v = bench._qkv(b, h, n, d, DTYPE, DEVICE, grad=mode != "fwd")
    benchmark.group = f"masked_{variant} {mode} {'causal' if causal else 'full'} N={n} D={d}"
    flops = bench.masked_flops(b, h, n, n, d, causal, mode, case.attn_mask, case.key_padding_mask)
    benchmark.extra_info.update(bench.machine_info(DEVICE), backend=p.backend(DEVICE),
                                tflop=flops * 1e-12)
    fn = lambda: p.fn(q, k, v, causal, case)
    fns = bench._fwd_bwd_fns(fn, [q, k, v], None) if mode != "fwd" else {"fwd": fn}
    if mode == "fwd":
        with torch.no_grad():
            result = benchmark(fns["fwd"])
        kw = dict(causal=causal, attn_mask=case.attn_mask, key_padding_mask=case.key_padding_mask)
        ref = reference.attention(q.double(), k.double(), v.double(), **kw)
        base = reference.attention(q, k, v, **kw)
        if case.key_padding_mask is not None:  # padded query rows are don't-care (module doc)
            pad = case.key_padding_mask[:, None, :, None]
            result, ref, base = (t.masked_fill(pad, 0) for t in (result, ref, base))
        numerics.assert_close("out", result, ref, base)
    else:
        result = benchmark(fns[mode])
        assert [g.shape for g in result] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_varlen(benchmark, provider, mode, causal):
    p = bench.varlen_providers().get(provider)
    if p is None:
        pytest.skip("a provider of the attention op only")
    reason = p.why_not(DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    lengths = bench.varlen_lengths(VARLEN["tokens"], VARLEN["max_seqlen"], seed=1)
    pk = bench.packing(lengths, lengths, DEVICE)
    h, d = VARLEN["heads"], VARLEN["d"]
    q, k, v = bench._packed_qkv(pk, h, d, DTYPE, DEVICE, grad=mode != "fwd")
    benchmark.group = (f"varlen {mode} {'causal' if causal else 'full'} "
                       f"T={VARLEN['tokens']} max={VARLEN['max_seqlen']} D={d}")
    benchmark.extra_info.update(bench.machine_info(DEVICE), backend=p.backend(DEVICE),
                                seqlens=lengths,
                                tflop=bench.varlen_flops(lengths, lengths, h, d, causal, mode) * 1e-12)
    fn = lambda: p.fn(q, k, v, causal, pk)
    if mode == "fwd":
        with torch.no_grad():
            result = benchmark(fn)
        cu = (pk.cu_seqlens_q, pk.cu_seqlens_k)
        ref = reference.varlen_attention(q.double(), k.double(), v.double(), *cu, causal=causal)
        numerics.assert_close("out", result, ref,
                              reference.varlen_attention(q, k, v, *cu, causal=causal))
    else:
        result = benchmark(bench._fwd_bwd_fns(fn, [q, k, v], None)[mode])
        assert [g.shape for g in result] == [q.shape, k.shape, v.shape]
