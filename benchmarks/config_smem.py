"""Record the measured shared memory of every shipped kernel config (tests/data/config_smem.json).

    python benchmarks/config_smem.py --arch sm_86 sm_120          # compile (no GPU), then write
    python benchmarks/config_smem.py --from rows_sm86.json ...     # from saved inspect rows

Compiles what `python -m tritformer inspect` compiles (every op, head dims 64/128/256, fp16 and
fp32, causal and not) and stores, per target and per inspect row (kernel, dtype, D/C, causal,
heads, config), the shared memory bytes Triton's compile assigns the kernel (`metadata.shared`,
what the launch requests). The compile stops once that is known, after the LLVM stage (before
PTX and ptxas); `--from` records full inspect rows instead.
tests/test_config_smem.py checks from this file that no shipped config of a recorded target
exceeds its family's shared-memory limit (kernels._launch.SHARED_MEMORY_LIMIT) and that every
shipped config of a recorded target was measured: a table change needs a re-run for the
targets it touches. Targets are merged into the existing file (one can be re-recorded alone).
The measurement is Triton's `metadata.shared`, the bytes the launch requests: an analytic bound
from tile sizes and stages would have to model Triton's pipelining buffers and layout-conversion
scratch, which vary by kernel; the compile is exact. Time: about 14 minutes per target on two
shared cores (Triton 3.9, about 390 compiles); `--missing` after a table change: seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "config_smem.json"
HEAD_DIMS, DTYPES, CAUSAL = (64, 128, 256), ("fp16", "fp32"), (False, True)


def row_key(kernel: str, dtype: str, head_dim: int, causal: bool, heads: str, config: str) -> str:
    return f"{kernel}|{dtype}|{head_dim}|{'causal' if causal else 'full'}|{heads}|{config}"


def _record(rows: list[dict], data: dict) -> None:
    for r in rows:
        entry = data["targets"].setdefault(r["arch"], {})
        key = row_key(r["kernel"], r["dtype"], r["head_dim"], r["causal"], r["heads"], r["config"])
        entry[key] = r["shared_bytes"]


class _Done(Exception):
    pass


def shared_bytes(launch, cfg, arch: str) -> int:
    """Triton's shared memory for one launch and config on `arch`, compiling up to LLVM IR."""
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from tritformer import inspect as I

    def add_stages(self, stages, options, language):
        real_add_stages(self, stages, options, language)

        def stop(src, metadata):
            raise _Done(metadata["shared"])
        stages["ptx"] = stop

    signature, constexprs, attrs = I._signature(launch, cfg)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    real_add_stages, old_dir = CUDABackend.add_stages, knobs.cache.dir
    with tempfile.TemporaryDirectory() as cache:
        CUDABackend.add_stages, knobs.cache.dir = add_stages, cache
        try:
            triton.compile(src, target=GPUTarget("cuda", I.ARCHES[arch], 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except _Done as done:
            return int(done.args[0])
        finally:
            CUDABackend.add_stages, knobs.cache.dir = real_add_stages, old_dir
    raise RuntimeError("the compile did not reach the LLVM stage")


def _measure(job) -> dict:
    from tritformer import inspect as I
    (op, arch, dt, d, c, heads), li, ci = job
    launch = I.PLANS[op](arch, I.DTYPE_NAMES[dt], d, c, heads)[li]
    cfg = launch.configs[ci]
    return dict(kernel=launch.name + I._tag(op), arch=arch, dtype=dt, head_dim=d, causal=c,
                heads=heads, config=I._describe(cfg), shared_bytes=shared_bytes(launch, cfg, arch))


def _job_key(job) -> str:
    from tritformer import inspect as I
    (op, arch, dt, d, c, heads), li, ci = job
    launch = I.PLANS[op](arch, I.DTYPE_NAMES[dt], d, c, heads)[li]
    return row_key(launch.name + I._tag(op), dt, d, c, heads, I._describe(launch.configs[ci]))


def shipped_jobs(arch: str) -> dict:
    """{row key: inspect job} of every config `inspect` compiles for `arch`."""
    from tritformer import inspect as I
    return {_job_key(j): j for j in I.jobs_for(I.cases([arch], HEAD_DIMS, DTYPES, CAUSAL, I.ALL_OPS))}


def measure(jobs_to_run: list, jobs: int) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for i, row in enumerate(pool.map(_measure, jobs_to_run)):
            print(f"[{i + 1}/{len(jobs_to_run)}] {row['arch']} {row['kernel']} {row['dtype']} "
                  f"D={row['head_dim']} {row['config']}: {row['shared_bytes']} B", flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=[], help="targets to compile (sm_86, sm_120, ...)")
    p.add_argument("--from", dest="rows", nargs="*", default=[],
                   help="JSON lists of inspect rows (Row.as_dict) to record instead of compiling")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--missing", action="store_true",
                   help="with --arch: measure only the shipped configs the file lacks (after a "
                        "table change) and drop the recorded ones no longer shipped")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the kernels must be compilable")
    import triton

    from tritformer import inspect as I
    out = pathlib.Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"targets": {}}
    data["triton"] = triton.__version__
    for path in args.rows:
        _record(json.loads(pathlib.Path(path).read_text()), data)
    for arch in args.arch:
        shipped = shipped_jobs(arch)
        known = data["targets"].pop(arch, {}) if args.missing else {}
        data["targets"][arch] = {k: v for k, v in known.items() if k in shipped}
        todo = [job for key, job in shipped.items() if key not in known]
        _record(measure(todo, args.jobs or I.default_jobs()), data)
    data["targets"] = {a: dict(sorted(rows.items())) for a, rows in sorted(data["targets"].items())}
    out.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(f"wrote {out}: " + ", ".join(f"{a} {len(r)} rows" for a, r in data["targets"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
