"""`python -m tritformer validate`: every op against the float64 reference, error-ratio criterion.

The cases are the ops' `validate` declarations in tritformer.registry; the checks are
tritformer.testing's (check_attention, ...: the tests' helpers, one implementation of the
comparison everywhere).
"""
from __future__ import annotations

import os
import sys

import torch

from . import registry
# the check_* helpers lived here before tritformer.testing; importable from here for compatibility
from .testing.checks import (check_attention, check_decode_attention, check_ffn,  # noqa: F401
                             check_gated_ffn, check_sdpa, check_softmax, check_varlen_attention)


def grid(dtypes, quick: bool) -> list[tuple]:
    """(op, dtype name, case) in report order: op by op (registry order), dtype, case."""
    return [(op.name, dt, c) for op in registry.OPS if op.validate is not None
            for dt in dtypes for c in op.validate.selected(quick)]


# Seconds per case, for the estimate printed before the run: measured on a 2-core CPU in
# Triton's interpreter (`validate --quick`, 33 cases in 275 s: each op's time over its cases;
# a softmax case is 0.5 s or 40-60 s, by its shape); on a GPU a case is dominated by compiling
# its kernels the first time, a second or two.
INTERPRETER_SECONDS_PER_CASE = {"attention": 5.0, "masked": 5.0, "varlen": 5.0, "softmax": 20.0,
                                "ffn": 4.0, "decode": 6.0}
GPU_SECONDS_PER_CASE = 2.0


def estimate_seconds(cases, interpreting: bool) -> float:
    """A rough duration of `cases` (grid rows): the number of cases of each op times its
    seconds per case above."""
    if not interpreting:
        return GPU_SECONDS_PER_CASE * len(cases)
    default = max(INTERPRETER_SECONDS_PER_CASE.values())
    return sum(INTERPRETER_SECONDS_PER_CASE.get(op, default) for op, _, _ in cases)


def main(args) -> int:
    interpreting = not torch.cuda.is_available()
    if interpreting:
        if "tritformer.kernels.attention" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
        from . import _interp_patch
        _interp_patch.apply()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from .backend import backend_for
    from .progress import ProgressBar, format_seconds
    cases = grid(args.dtype, args.quick)
    backend = backend_for(torch.empty(0, device=device))
    print(f"validate: attention (masks, options, varlen), decode, softmax, ffn on {device} "
          f"({backend}), {len(cases)} cases ({', '.join(args.dtype)})", file=sys.stderr)
    per_case = ("measured in Triton's interpreter on a 2-core CPU" if interpreting
                else "mostly compiling the kernels")
    print(f"expected duration: about {format_seconds(estimate_seconds(cases, interpreting))} "
          f"(each op's cases x its seconds per case, {per_case}; the ETA below follows the "
          "actual pace)", file=sys.stderr, flush=True)
    bar = ProgressBar(len(cases), desc="validate", unit="case", stream=sys.stderr)
    rows, failed = [], 0
    for n, (op, dt, case) in enumerate(cases, 1):
        gen = torch.Generator().manual_seed(n)
        name, checks = registry.resolve(registry.get(op).validate.run)(case, dt, device, gen, n)
        for c in checks:
            rows.append((name, c))
            failed += not c.ok
        bar.update(postfix=f"{failed} failed  {name}" if failed else name)
    bar.close()
    print(f"done in {format_seconds(bar.elapsed)}", file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'out':<9}  {'max err':>10}  {'torch err':>10}  {'ratio':>6}  result")
    for name, c in rows:
        print(f"{name:<{w}}  {c.name:<9}  {c.error:10.3e}  {c.baseline:10.3e}  {c.ratio_text:>6}  "
              f"{'pass' if c.ok else 'FAIL ' + c.detail}")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
