"""`--op softmax`: the unfused PyTorch softmax (scaled, causal) against the fused kernel; GB/s
from the bytes the kernel must move (tritformer.bench's docstring)."""
from __future__ import annotations

import torch

from .core import DTYPES, _backend, _fwd_bwd_fns, _sweep_rows, _timed_rows


SOFTMAX_PROVIDERS = ("naive", "tritformer")


def softmax_cols(device: str, quick: bool) -> tuple:
    """Row lengths of the sweep; rows x row length is held fixed (2^26 on CUDA, 2^16 on CPU)."""
    return _sweep_rows(device, quick, (1024, 2048, 4096, 8192, 16384, 65536), (1024, 4096, 32768),
                       (1024, 4096, 16384, 65536, 262144))


def softmax_cases(device: str, quick: bool, providers: list[str]) -> int:
    return len(softmax_cols(device, quick)) * sum(p in SOFTMAX_PROVIDERS for p in providers)


def bench_softmax(device, quick, providers, emit, progress, skipped) -> None:
    from .. import reference
    from ..ops.softmax import softmax
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    # rows x columns; attention-score shaped [B, H, N, N] with a causal mask on CUDA
    cols = softmax_cols(device, quick)
    impls = {"naive": lambda x: reference.softmax(x, -1, scale=0.125, causal=True),
             "tritformer": lambda x: softmax(x, -1, scale=0.125, causal=True)}
    for name in providers:
        if name not in impls:
            skipped.setdefault(f"softmax {name}", "not a softmax provider")
    for c in cols:
        rows = max(1, (2 ** 26 if device == "cuda" else 2 ** 16) // c)
        x0 = torch.randn(rows, c, generator=torch.Generator().manual_seed(c)).mul(3).to(device, dtype)
        ref = reference.softmax(x0.double(), -1, scale=0.125, causal=True)
        nbytes = x0.numel() * x0.element_size()
        for name in (n for n in providers if n in impls):
            progress(f"softmax {name} C={c}")
            x = x0.clone().requires_grad_()
            fn = impls[name]
            with torch.no_grad():
                err = float((fn(x0).double() - ref).abs().max())
            _timed_rows("softmax", name, "pytorch" if name == "naive" else _backend(device),
                        device, _fwd_bwd_fns(lambda: fn(x), [x], None), "row_length", c,
                        dict(batch=rows, heads=None, head_dim=None, causal=True), dtype_name, emit,
                        reps=3, bytes_moved={"fwd": 2 * nbytes, "bwd": 3 * nbytes,
                                             "fwd_bwd": 5 * nbytes}, max_error=err)


bench_softmax.cases = softmax_cases
