"""`python -m tritformer validate`: every op against the float64 reference, error-ratio criterion.

The cases are the ops' `validate` declarations in tritformer.registry; the checks are
tritformer.testing's (check_attention, ...: the tests' helpers, one implementation of the
comparison everywhere).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from . import registry
# the check_* helpers lived here before tritformer.testing; importable from here for compatibility
from .testing.checks import (check_attention, check_decode_attention, check_ffn,  # noqa: F401
                             check_gated_ffn, check_sdpa, check_softmax, check_varlen_attention)


def grid(dtypes, quick: bool) -> list[tuple]:
    """(op, dtype name, case) in report order: op by op (registry order), dtype, case."""
    return [(op.name, dt, c) for op in registry.OPS if op.validate is not None
            for dt in dtypes for c in op.validate.selected(quick)]


def main(args) -> int:
    interpreting = not torch.cuda.is_available()
    if interpreting:
        if "tritformer.kernels.attention" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
        from . import _interp_patch
        _interp_patch.apply()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from .backend import backend_for
    cases = grid(args.dtype, args.quick)
    backend = backend_for(torch.empty(0, device=device))
    print(f"validate: attention (masks, options, varlen), decode, softmax, ffn on {device} "
          f"({backend}), {len(cases)} cases", file=sys.stderr)
    rows, failed, t0 = [], 0, time.time()
    for n, (op, dt, case) in enumerate(cases, 1):
        gen = torch.Generator().manual_seed(n)
        name, checks = registry.resolve(registry.get(op).validate.run)(case, dt, device, gen, n)
        for c in checks:
            rows.append((name, c))
            failed += not c.ok
        elapsed = time.time() - t0
        print(f"\r[{n}/{len(cases)}] {elapsed:5.1f}s  {name:<60}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'out':<9}  {'max err':>10}  {'torch err':>10}  {'ratio':>6}  result")
    for name, c in rows:
        print(f"{name:<{w}}  {c.name:<9}  {c.error:10.3e}  {c.baseline:10.3e}  {c.ratio:6.2f}  "
              f"{'pass' if c.ok else 'FAIL ' + c.detail}")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
