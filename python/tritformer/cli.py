"""Command line: `python -m tritformer {validate,inspect}` (also the `tritformer` script)."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritformer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check every op against the float64 reference (error-ratio criterion)")
    v.add_argument("--quick", action="store_true", help="a smaller grid of cases")
    v.add_argument("--dtype", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "bf16", "fp32"])

    i = sub.add_parser("inspect", help="compile the shipped kernel configs ahead of time for NVIDIA GPUs "
                                       "and report registers, spills, shared memory and tensor-core use")
    i.add_argument("--arch", nargs="+", choices=["sm_80", "sm_90"], default=["sm_80", "sm_90"])
    i.add_argument("--head-dim", nargs="+", type=int, choices=[64, 128, 256], default=[64, 128, 256],
                   help="head-dim buckets to compile (64 covers D<=64, 128 D<=128, 256 D<=256)")
    i.add_argument("--dtype", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "fp32"])
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        from . import validate
        return validate.main(args)
    from . import inspect
    return inspect.main(args, sys.argv[1:] if argv is None else list(argv))
