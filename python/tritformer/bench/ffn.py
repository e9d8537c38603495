"""`--op ffn` and `--op gated_ffn`: the unfused PyTorch MLP against the fused FFN kernels
(and their recompute=True variant, whose point is the saved_bytes metric)."""
from __future__ import annotations

import torch

from .core import DTYPES, _backend, _fwd_bwd_fns, _sweep_rows, _timed_rows


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of fn() (held between forward and backward)."""
    from torch.autograd.graph import saved_tensors_hooks
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def ffn_bytes(m: int, weight_numels: list[int], d: int, itemsize: int) -> dict:
    """The bytes an FFN call must move at least (module docstring): forward reads x and every
    weight/bias once and writes y; backward reads dy, x and the weights and writes dx and one
    gradient per weight (activations it saved or recomputes are not counted)."""
    w = sum(weight_numels)
    fwd = (m * d + w + m * d) * itemsize
    bwd = (m * d + m * d + w + m * d + w) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def ffn_tokens(device: str, quick: bool) -> tuple:
    return _sweep_rows(device, quick, (512, 2048, 8192, 16384), (64,), (64, 256))


def ffn_providers(providers) -> list[str]:
    """naive and tritformer as asked; tritformer_recompute comes with tritformer."""
    return [n for n in ("naive", "tritformer", "tritformer_recompute")
            if n in providers or (n == "tritformer_recompute" and "tritformer" in providers)]


def ffn_cases(device: str, quick: bool, providers: list[str], gated: bool = False) -> int:
    return len(ffn_tokens(device, quick)) * len(ffn_providers(providers))


def bench_ffn(device, quick, providers, emit, progress, skipped, gated: bool) -> None:
    from .. import reference
    from ..ops.ffn import ffn, gated_ffn
    op = "gated_ffn" if gated else "ffn"
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    d, hidden = (1024, 4096) if device == "cuda" else (64, 256)
    if gated:
        hidden = hidden * 2 // 3  # Llama's intermediate size keeps the parameter count
    tokens = ffn_tokens(device, quick)
    gen = torch.Generator().manual_seed(0)
    w = lambda o, i: (torch.randn(o, i, generator=gen) / i ** 0.5).to(device, dtype).requires_grad_()
    if gated:
        weights = [w(hidden, d), w(hidden, d), w(d, hidden)]
        impls = {"naive": lambda x: reference.gated_ffn(x, *weights, activation="silu"),
                 "tritformer": lambda x: gated_ffn(x, *weights),
                 "tritformer_recompute": lambda x: gated_ffn(x, *weights, recompute=True)}
        flops_fwd = lambda m: 2 * m * 3 * d * hidden
    else:
        weights = [w(hidden, d), torch.zeros(hidden, device=device, dtype=dtype).requires_grad_(),
                   w(d, hidden), torch.zeros(d, device=device, dtype=dtype).requires_grad_()]
        impls = {"naive": lambda x: reference.ffn(x, *weights, activation="gelu"),
                 "tritformer": lambda x: ffn(x, *weights),
                 "tritformer_recompute": lambda x: ffn(x, *weights, recompute=True)}
        flops_fwd = lambda m: 2 * m * 2 * d * hidden
    wanted = ffn_providers(providers)
    for m in tokens:
        x0 = torch.randn(m, d, generator=torch.Generator().manual_seed(m)).to(device, dtype)
        w64 = [t.detach().double() for t in weights]
        x64 = x0.double()
        with torch.no_grad():
            ref = (reference.gated_ffn(x64, *w64, activation="silu") if gated
                   else reference.ffn(x64, *w64, activation="gelu"))
        for name in wanted:
            progress(f"{op} {name} M={m}")
            x = x0.clone().requires_grad_()
            fn = impls[name]
            with torch.no_grad():
                err = float((fn(x0).double() - ref).abs().max())
            leaves = [x, *weights]
            fl = flops_fwd(m)
            _timed_rows(op, name, "pytorch" if name == "naive" else _backend(device), device,
                        _fwd_bwd_fns(lambda: fn(x), leaves, None), "tokens", m,
                        dict(batch=m, heads=None, head_dim=d, causal=None), dtype_name, emit,
                        reps=3, flops={"fwd": fl, "bwd": 2 * fl, "fwd_bwd": 3 * fl},
                        bytes_moved=ffn_bytes(m, [t.numel() for t in weights], d,
                                              x0.element_size()),
                        max_error=err)
            emit(dict(op=op, provider=name, backend="pytorch" if name == "naive" else _backend(device),
                      mode="fwd", metric="saved_bytes", unit="bytes", x_name="tokens", x_value=m,
                      value=saved_bytes(lambda: fn(x)), p20=None, p80=None, batch=m, heads=None,
                      head_dim=d, causal=None, dtype=dtype_name))


bench_ffn.cases = ffn_cases
