"""Command line: `python -m tritformer {bench,validate,inspect,train,generate}` (also the
`tritformer` script)."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__, registry
from ._cliargs import (BENCH_PROVIDERS, DTYPE_NAMES, HelpFormatter, add_generate_arguments,
                       add_train_arguments)


def _parser() -> argparse.ArgumentParser:
    """The parser, built without importing torch, Triton or the benchmarks (`--help` is fast):
    registry and _cliargs are declarations only."""
    p = argparse.ArgumentParser(prog="tritformer", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, **kw):
        return sub.add_parser(name, formatter_class=HelpFormatter, description=kw.get("help"), **kw)

    b = command("bench", help="benchmark the fused kernels against naive attention, SDPA and "
                              "peers; CSV/JSON/PNG results (on CPU: memory, errors, "
                              "interpreter times)")
    ops = ("all",) + registry.names("bench")
    b.add_argument("--op", nargs="+", choices=ops, default=["all"], metavar="OP",
                   help="ops to benchmark: " + ", ".join(ops))
    b.add_argument("--quick", action="store_true", help="small sweep (a few minutes on a 2-core CPU)")
    b.add_argument("--out", default="bench-results", help="directory for results.csv/json and plots")
    b.add_argument("--providers", nargs="+", choices=BENCH_PROVIDERS, default=list(BENCH_PROVIDERS),
                   metavar="PROVIDER", help="implementations to compare, of " + ", ".join(BENCH_PROVIDERS)
                   + " (those unavailable here are skipped)")
    b.add_argument("--inspect", action="store_true",
                   help="also compile the benchmarked kernels' configs ahead of time and report "
                        "registers, spills, shared memory, tensor-core use (OUT/inspect.txt; "
                        "minutes on a CPU)")

    v = command("validate", help="check every op against the float64 reference (error-ratio criterion)")
    v.add_argument("--quick", action="store_true", help="a smaller grid of cases")
    v.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=list(DTYPE_NAMES),
                   help="input dtypes")

    i = command("inspect", help="compile the shipped kernel configs ahead of time for NVIDIA GPUs "
                                "and report registers, spills, shared memory and tensor-core use")
    i.add_argument("--arch", nargs="+", choices=["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"],
                   default=["sm_80", "sm_90"],
                   help="GPU architectures to compile for")
    i.add_argument("--head-dim", nargs="+", type=int, choices=[64, 128, 256], default=[64, 128, 256],
                   help="head-dim buckets to compile (64 covers D<=64, 128 D<=128, 256 D<=256)")
    i.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=["fp16", "fp32"],
                   help="kernel dtypes (bf16 shares fp16's configs)")
    i.add_argument("--op", nargs="+", choices=list(registry.names("inspect")),
                   default=list(registry.names("inspect")), metavar="OP",
                   help="kernels to compile, of " + ", ".join(registry.names("inspect"))
                   + " (D/C column: head dim, softmax row length, or FFN model "
                        "dim); masked: every mask/bias/dropout switch on, varlen: packed sequences, "
                        "decode: flash-decoding (split-KV) over a KV cache")
    i.add_argument("--jobs", type=int, default=0,
                   help="parallel compile processes (0: the CPUs this process may use)")
    i.add_argument("--perf", action="store_true",
                   help="also disassemble each cubin, count the hot loop's instructions and print "
                        "the throughput model's ESTIMATES per kernel (tritformer.perf)")
    i.add_argument("--json", metavar="FILE", help="with --perf: write every row (resources, counts, "
                                                  "model) as JSON")
    i.add_argument("--gate", metavar="FILE", help="implies --perf: fail when a config's serialized "
                                                  "estimate falls, or its replication or non-MMA "
                                                  "instructions per MMA rise, against this baseline")
    i.add_argument("--record", metavar="FILE", help="implies --perf: write the gate baseline")
    i.add_argument("--note", help="with --record: a note stored in the baseline (e.g. the commit)")

    t = command("train", help="train a byte-level GPT on the fused kernels (one process, or "
                              "many under torchrun: DDP); checkpoints, log.csv, loss.png")
    add_train_arguments(t)

    g = command("generate", help="stream text from a `train` checkpoint or a GPT-2 directory")
    add_generate_arguments(g)
    return p


def _interpreter_rerun(command: str, argv) -> int | None:
    """validate and bench run the kernels in Triton's interpreter when there is no GPU. The
    interpreter only takes over @triton.jit functions created after TRITON_INTERPRET=1 was set,
    Triton's own library (tl.zeros, tl.cdiv ...) included, and `import tritformer` has already
    imported triton (through torch._dynamo): a kernel helper calling tl.zeros then fails with
    "Cannot call @triton.jit'd outside of the scope of a kernel". So such a command re-runs
    itself in a process that has the variable from the start (None: no re-run needed)."""
    import subprocess

    import torch
    if (command not in ("validate", "bench") or torch.cuda.is_available()
            or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return None
    import signal
    argv = sys.argv[1:] if argv is None else list(argv)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tritformer", *argv], env=env)
    # Ctrl-C reaches the child too (same process group): let it write its partial report and
    # exit 130, rather than subprocess.run killing it 0.25 s later and printing a traceback
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    return 128 - code if code < 0 else code


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    args = _parser().parse_args(argv)
    rerun = _interpreter_rerun(args.command, argv)
    if rerun is not None:
        return rerun
    if args.command == "bench":
        from . import bench
        return bench.main(args)
    if args.command in ("train", "generate"):
        from . import generate, train
        try:
            return (train if args.command == "train" else generate).main(args)
        except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
            print(f"tritformer {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command == "validate":
        from . import validate
        return validate.main(args)
    from . import inspect
    return inspect.main(args, sys.argv[1:] if argv is None else list(argv))
