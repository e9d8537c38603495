"""`--op gpt`: the reference GPT (tritformer.models.GPT) end to end, providers naive (naive
attention, unfused MLP), sdpa (torch SDPA, unfused MLP) and tritformer (fused attention, fused
FFN with the residual in its epilogue); x = sequence length T with batch * T constant. Modes fwd
(logits and loss), fwd_bwd (a training step's forward and backward) and decode (one token
against a KV cache of T - 1 positions: tritformer's split-KV decode kernel); max_error = the
logits against the float64 naive model.
"""
from __future__ import annotations

import dataclasses

import torch

from .attention import visible_pairs
from .core import DTYPES, _backend, _sweep_rows, _timed_rows


GPT_PROVIDERS = {"naive": ("naive", "torch"), "sdpa": ("sdpa", "torch"),
                 "tritformer": ("tritformer", "tritformer")}  # provider: (attn, mlp) backends


def gpt_shape(device: str):
    """GPTConfig fields of the benchmarked model: GPT-2 small on CUDA, a tiny one on CPU."""
    if device == "cuda":
        return dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    return dict(n_layer=1, n_head=2, n_embd=32, vocab_size=256)  # interpreter: tiny


def gpt_flops(model, batch: int, seqlen: int, mode: str) -> float:
    """FLOPs of `mode` (module docstring): matmuls over every Linear + causal attention."""
    cfg = model.config
    w = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if mode == "decode":
        return 2 * batch * w + cfg.n_layer * 4 * batch * seqlen * cfg.n_embd
    fwd = 2 * batch * seqlen * w + cfg.n_layer * 4 * batch * visible_pairs(seqlen, seqlen, True) * cfg.n_embd
    return fwd if mode == "fwd" else 3 * fwd


def gpt_seqlens(device: str, quick: bool) -> tuple:
    return _sweep_rows(device, quick, (256, 512, 1024), (32,), (32, 128))


def gpt_cases(device: str, quick: bool, providers: list[str]) -> int:
    return len(gpt_seqlens(device, quick)) * sum(p in GPT_PROVIDERS for p in providers)


def bench_gpt(device, quick, providers, emit, progress, skipped) -> None:
    from ..models.gpt import GPT, GPTConfig, KVCache
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    seqlens = gpt_seqlens(device, quick)
    tokens = 8192 if device == "cuda" else 32  # batch * T held constant
    shape = gpt_shape(device)
    for name in providers:
        if name not in GPT_PROVIDERS:
            skipped.setdefault(f"gpt {name}", "not a GPT provider (naive, sdpa, tritformer)")
    names = [n for n in providers if n in GPT_PROVIDERS]
    for t in seqlens:
        b = max(1, tokens // t)
        cfg = GPTConfig(block_size=t, **shape)
        torch.manual_seed(0)
        ref_model = GPT(dataclasses.replace(cfg, attn_backend="naive", mlp_backend="torch"))
        state = ref_model.state_dict()
        idx = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(t)).to(device)
        with torch.no_grad():
            ref = ref_model.double().to(device)(idx, all_logits=True)[0]
        for name in names:
            progress(f"gpt {name} T={t}")
            attn, mlp = GPT_PROVIDERS[name]
            model = GPT(dataclasses.replace(cfg, attn_backend=attn, mlp_backend=mlp))
            model.load_state_dict(state)
            model.to(device, dtype)
            with torch.no_grad():
                err = float((model(idx, all_logits=True)[0].double() - ref).abs().max())
            cache = KVCache(cfg, b, t, device, dtype)
            with torch.no_grad():
                model(idx[:, :-1], kv_cache=cache)  # prefill T - 1 positions

            def decode():
                cache.length = t - 1
                with torch.no_grad():
                    return model(idx[:, -1:], kv_cache=cache)

            def fwd():
                with torch.no_grad():
                    return model(idx, idx)

            def fwd_bwd():
                model.zero_grad(set_to_none=True)
                model(idx, idx)[1].backward()
            backend = "pytorch" if name != "tritformer" else _backend(device)
            _timed_rows("gpt", name, backend, device,
                        {"fwd": fwd, "fwd_bwd": fwd_bwd, "decode": decode}, "seqlen", t,
                        dict(batch=b, heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
                             causal=True), dtype_name, emit, reps=3,
                        flops={m: gpt_flops(model, b, t, m) for m in ("fwd", "fwd_bwd", "decode")},
                        max_error=err)


bench_gpt.cases = gpt_cases
