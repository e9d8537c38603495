"""The reference GPT end to end (tritformer.models.GPT) per provider: a training step's forward,
forward + backward, and one cached decode step. GPT-2 small on CUDA, a tiny model on CPU."""
import dataclasses

import pytest
import torch

from tritformer import bench, numerics
from tritformer.models import GPT, GPTConfig, KVCache

DEVICE = bench.setup_device()  # idempotent; conftest.py ran it before any kernel import
SEQLEN, BATCH = (1024, 8) if DEVICE == "cuda" else (32, 1)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "decode"])
@pytest.mark.parametrize("provider", list(bench.GPT_PROVIDERS))
def test_gpt(benchmark, provider, mode):
    attn, mlp = bench.GPT_PROVIDERS[provider]
    cfg = GPTConfig(block_size=SEQLEN, attn_backend=attn, mlp_backend=mlp, **bench.gpt_shape(DEVICE))
    torch.manual_seed(0)
    model = GPT(cfg).to(DEVICE, DTYPE)
    idx = torch.randint(0, cfg.vocab_size, (BATCH, SEQLEN), device=DEVICE)
    benchmark.group = f"gpt {mode} T={SEQLEN}"
    benchmark.extra_info.update(bench.machine_info(DEVICE), tflop=bench.gpt_flops(model, BATCH, SEQLEN, mode) * 1e-12)
    if mode == "fwd":
        with torch.no_grad():
            logits, loss = benchmark(lambda: model(idx, idx))
        assert logits.shape == (BATCH, SEQLEN, cfg.vocab_size) and torch.isfinite(loss)
    elif mode == "fwd_bwd":
        benchmark(lambda: model(idx, idx)[1].backward())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    else:
        cache = KVCache(cfg, BATCH, SEQLEN, DEVICE, DTYPE)
        with torch.no_grad():
            model(idx[:, :-1], kv_cache=cache)

        def step():
            cache.length = SEQLEN - 1
            with torch.no_grad():
                return model(idx[:, -1:], kv_cache=cache)[0]
        logits = benchmark(step)
        # the cached step = the last position of a full forward (numerics criterion: float64
        # naive model as reference, naive in the benchmark dtype as PyTorch's own error)
        naive = GPT(dataclasses.replace(cfg, attn_backend="naive", mlp_backend="torch"))
        naive.load_state_dict(model.state_dict())
        with torch.no_grad():
            ref = naive.to(DEVICE, torch.float64)(idx)[0]
            base = naive.to(DEVICE, DTYPE)(idx)[0]
        numerics.assert_close("decode logits", logits, ref, base)
