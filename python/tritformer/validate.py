"""`python -m tritformer validate`: every op against the float64 reference, error-ratio criterion.

`check_attention` is also the tests' helper: one implementation of the comparison everywhere.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from . import numerics, reference


def check_attention(q, k, v, *, causal=False, scale=None, grads=True, return_lse=False) -> list[numerics.Check]:
    """Run tritformer.attention forward (and backward) and check out (lse, dq, dk, dv).

    Error of the kernel vs a float64 reference, bounded by PyTorch's own error in q's dtype
    (reference.attention run in that dtype).
    """
    from .ops.attention import attention
    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    ref_in = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    base_in = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    out, lse = attention(*leaves, causal=causal, scale=scale, return_lse=True)
    ref, ref_lse = reference.attention(*ref_in, causal=causal, scale=scale, return_lse=True)
    base, base_lse = reference.attention(*base_in, causal=causal, scale=scale, return_lse=True)
    checks = [numerics.check("out", out, ref, base, numerics.FORWARD_FACTOR)]
    if return_lse:
        checks.append(numerics.check("lse", lse, ref_lse, base_lse, numerics.FORWARD_FACTOR))
    if grads:
        gen = torch.Generator().manual_seed(1234)
        do = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        out.backward(do)
        ref.backward(do.double())
        base.backward(do)
        # floor magnitude shared by the three gradients: dq and dk vanish by cancellation with a
        # single key (see numerics), dv never does
        gscale = max((float(r.grad.abs().max()) for r in ref_in if r.grad.numel()), default=0.0)
        for name, a, r, b in zip(("dq", "dk", "dv"), leaves, ref_in, base_in):
            checks.append(numerics.check(name, a.grad, r.grad, b.grad, numerics.GRAD_FACTOR,
                                         floor_scale=gscale))
    return checks


def _cases(quick: bool):
    # (B, Hq, Hkv, Nq, Nk, D, causal): one line per code path
    cases = [
        (2, 4, 4, 128, 128, 64, False),   # MHA, square, full tiles
        (2, 4, 4, 128, 128, 64, True),    # causal diagonal tiles
        (1, 4, 2, 100, 157, 59, True),    # GQA, odd D, Nq < Nk (KV-cache alignment)
        (1, 4, 1, 200, 77, 128, True),    # MQA, Nq > Nk: rows with no visible key
        (1, 2, 2, 1, 300, 96, False),     # single query against a long cache
        (1, 2, 2, 33, 1, 40, False),      # single key
        (1, 1, 1, 65, 65, 256, True),     # largest head dim
    ]
    return cases[:3] if quick else cases


def main(args) -> int:
    interpreting = not torch.cuda.is_available()
    if interpreting:
        if "tritformer.kernels.attention" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
        from . import _interp_patch
        _interp_patch.apply()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from .backend import backend_for
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    grid = [(dt, c) for dt in args.dtype for c in _cases(args.quick)]
    backend = backend_for(torch.empty(0, device=device))
    print(f"validate: attention on {device} ({backend}), {len(grid)} cases", file=sys.stderr)
    rows, failed, t0 = [], 0, time.time()
    for n, (dt, (B, Hq, Hkv, Nq, Nk, D, causal)) in enumerate(grid, 1):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, h, s, D, generator=gen).to(device, dtypes[dt])
                   for h, s in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
        name = f"attention {dt} B={B} H={Hq}/{Hkv} N={Nq}x{Nk} D={D}{' causal' if causal else ''}"
        for c in check_attention(q, k, v, causal=causal, return_lse=True):
            rows.append((name, c))
            failed += not c.ok
        elapsed = time.time() - t0
        print(f"\r[{n}/{len(grid)}] {elapsed:5.1f}s  {name:<60}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'out':<4}  {'max err':>10}  {'torch err':>10}  {'ratio':>6}  result")
    for name, c in rows:
        print(f"{name:<{w}}  {c.name:<4}  {c.error:10.3e}  {c.baseline:10.3e}  {c.ratio:6.2f}  "
              f"{'pass' if c.ok else 'FAIL ' + c.detail}")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
