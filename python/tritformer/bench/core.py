"""Benchmark infrastructure shared by the op sweeps (tritformer.bench.<op>): timing, peak memory,
tidy rows (`COLUMNS`), CSV/JSON/PNG output, the terminal table, the providers' plumbing, device
setup, and `run`/`main`, which iterate the ops' `bench` declarations in tritformer.registry.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch

from .. import registry
from .._cliargs import BENCH_PROVIDERS

OPS = registry.names("bench")  # attention, masked, varlen, softmax, ffn, gated_ffn, gpt

# declared in tritformer._cliargs (the CLI's --providers choices, torch-free):
# sdpa = torch's default dispatch; sdpa_<backend> pins one SDPA backend (attention op only;
# flash / efficient / cudnn are CUDA kernels, math runs everywhere)
PROVIDERS = BENCH_PROVIDERS
# softmax / FFN: the unfused PyTorch sequence ("naive") against the fused kernels; for the FFNs
# also "tritformer_recompute" (recompute=True), whose point is the saved_bytes metric
MODES = ("fwd", "bwd", "fwd_bwd")
COLUMNS = ("op", "provider", "backend", "mode", "metric", "unit", "x_name", "x_value", "value",
           "p20", "p80", "batch", "heads", "head_dim", "causal", "dtype", "device", "torch",
           "triton", "tritformer", "timestamp")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_ms(fn: Callable[[], object], device: str, reps: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: do_bench on CUDA, a wall-clock timer (1 warm-up) on CPU."""
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _percentiles(samples)


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's C++ side prints start/stop and allocator notes on fd 2; hide them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes the call allocates beyond what was live before it (outputs included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


# ---------------------------------------------------------------------------------------------
# Providers: fn(q, k, v, causal, ...) -> out, whether usable here, which backend
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Provider:
    name: str
    fn: Callable
    why_not: Callable[[str, torch.dtype], Optional[str]]  # None when usable, else the reason
    backend: Callable[[str], str]


def _module_missing(mod: str) -> Optional[str]:
    import importlib.util
    return None if importlib.util.find_spec(mod) else f"{mod} is not installed"


def _cuda_only(name: str, mod: str | None = None):
    def why(device, dtype):
        if device != "cuda":
            return f"{name} runs on CUDA only"
        if mod and _module_missing(mod):
            return _module_missing(mod)
        if name == "flash_attn" and dtype == torch.float32:
            return "flash_attn takes fp16/bf16 only"
        return None
    return why


def _active_providers(table, names, device, dtype, skipped, op) -> list[Provider]:
    active = []
    for name in names:
        if name not in table:
            skipped[f"{op} {name}"] = "a provider of the attention op only"
            continue
        reason = table[name].why_not(device, dtype)
        if reason:
            skipped[f"{op} {name}"] = reason
        else:
            active.append(table[name])
    return active


def _backend(device):
    from ..backend import backend_for
    return backend_for(torch.empty(0, device=device))


# ---------------------------------------------------------------------------------------------
# Device and machine
# ---------------------------------------------------------------------------------------------
# Datasheet peaks (dense, no sparsity) of known GPUs, matched by a substring of the device name:
# (TFLOP/s by dtype for tensor-core math; fp32 = what our fp32 paths use, 3xTF32 / FMA, so the
# non-tensor fp32 peak), memory GB/s. Fractions are reported only for these.
DEVICE_PEAKS = {
    "H100": ({"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, 3350.0),   # H100 SXM5
    "A100": ({"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0),   # A100 SXM4 80GB
}


def device_peak(device_name: str, dtype_name: str) -> tuple[float, float] | None:
    """(peak TFLOP/s, peak GB/s) of a known device for this dtype, else None."""
    for key, (tflops, gbps) in DEVICE_PEAKS.items():
        if key in device_name and dtype_name in tflops:
            return tflops[dtype_name], gbps
    return None


def machine_info(device: str) -> dict:
    import triton
    from .. import __version__
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "tritformer": __version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def setup_device() -> str:
    """CUDA when available; else CPU with the kernels in Triton's interpreter (set up here)."""
    if torch.cuda.is_available():
        return "cuda"
    if "tritformer.kernels.attention" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from .. import _interp_patch
    _interp_patch.apply()
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def _sweep_rows(device: str, quick: bool, gpu: tuple, cpu_quick: tuple, cpu_full: tuple):
    return gpu if device == "cuda" else (cpu_quick if quick else cpu_full)


def _timed_rows(op, name, backend, device, fn_by_mode, x_name, x_value, shape, dtype_name,
                emit, reps, flops=None, bytes_moved=None, max_error=None):
    """Latency (+ TFLOP/s or GB/s on CUDA) and peak memory of each mode, one row each."""
    def row(mode, metric, unit, value, p20=None, p80=None):
        emit(dict(op=op, provider=name, backend=backend, mode=mode, metric=metric, unit=unit,
                  x_name=x_name, x_value=x_value, value=value, p20=p20, p80=p80, **shape,
                  dtype=dtype_name))
    if max_error is not None:
        row("fwd", "max_error", "abs", max_error)
    for mode, fn in fn_by_mode.items():
        med, p20, p80 = time_ms(fn, device, reps)
        row(mode, "latency", "ms", med, p20, p80)
        if device == "cuda" and flops:
            fl = flops[mode]
            row(mode, "tflops", "TFLOP/s", fl / med * 1e-9, fl / p80 * 1e-9, fl / p20 * 1e-9)
        if device == "cuda" and bytes_moved:
            by = bytes_moved[mode]
            row(mode, "gbps", "GB/s", by / med * 1e-6, by / p80 * 1e-6, by / p20 * 1e-6)
        row(mode, "peak_memory", "bytes", peak_bytes(fn, device))


def _fwd_bwd_fns(fn, leaves, grad_out_like):
    def fwd():
        with torch.no_grad():
            return fn()
    out = fn()
    g = torch.randn_like(grad_out_like if grad_out_like is not None else out)
    return {"fwd": fwd,
            "bwd": lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
            "fwd_bwd": lambda: torch.autograd.grad(fn(), leaves, g)}


def _leaf_modes(fn, leaves, modes) -> dict:
    fns = _fwd_bwd_fns(fn, leaves, None)
    return {m: fns[m] for m in modes}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_results(rows: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.json")]
    with open(paths[0], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return paths + plot_results(rows, out_dir)


def plot_results(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per (op, metric, mode, head_dim): a line per (provider, causal) against x."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["metric"] == "max_error":
            continue
        memory_sweep = r["metric"] == "peak_memory" and r["batch"] == 1 and r["heads"] == 1
        key = (r["op"], r["metric"], r["mode"], r["head_dim"], "seqlen_sweep" if memory_sweep else "")
        groups.setdefault(key, []).append(r)
    paths = []
    for (op, metric, mode, d, tag), rs in sorted(groups.items(), key=str):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lines: dict[tuple, list] = {}
        for r in rs:
            lines.setdefault((r["provider"], r["causal"]), []).append((r["x_value"], r["value"]))
        for (prov, causal), pts in sorted(lines.items(), key=str):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    label=f"{prov}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        if metric in ("peak_memory", "latency"):
            ax.set_yscale("log")
        unit = rs[0]["unit"]
        ax.set_xlabel(rs[0]["x_name"])
        ax.set_ylabel(f"{metric} ({unit})")
        where = rs[0]["device"]
        shape = ""
        if op in ("attention", "masked_padding", "masked_dense"):
            shape = "B=1 H=1" if tag else f"B*N={rs[0]['batch'] * rs[0]['x_value']} H={rs[0]['heads']}"
        elif op == "varlen":
            shape = f"packed, H={rs[0]['heads']}"
        interp = " (Triton interpreter times: not GPU speed)" if (
            metric == "latency" and any("interpreter" in r["backend"] for r in rs)) else ""
        dim = "" if d is None else f"D={d} "
        ax.set_title(f"{op} {mode} {metric}, {dim}{rs[0]['dtype']} {shape}{interp}\n{where}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        name = f"{op}_{metric}_{mode}{'' if d is None else f'_d{d}'}{'_' + tag if tag else ''}.png"
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.4g}"


def format_table(rows: list[dict]) -> str:
    """Terminal table: one line per measurement, peak memory also as a ratio to naive."""
    naive = {(r["op"], r["mode"], r["metric"], r["x_value"], r["batch"], r["heads"],
              r["head_dim"], r["causal"]): r["value"] for r in rows if r["provider"] == "naive"}
    head = (f"{'op':<14} {'provider':<11} {'backend':<22} {'mode':<8} {'D':>4} {'causal':<6} "
            f"{'seqlen':>7} {'metric':<12} {'value':>14} {'p20..p80':>21} {'vs naive':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        key = (r["op"], r["mode"], r["metric"], r["x_value"], r["batch"], r["heads"], r["head_dim"],
               r["causal"])
        ratio = ""
        # interpreter latencies against PyTorch's are no speed ratio: only memory is compared
        comparable = r["metric"] == "peak_memory" or (
            r["metric"] == "latency" and "interpreter" not in r["backend"])
        if comparable and naive.get(key) and r["value"] is not None:
            ratio = f"{r['value'] / naive[key]:.3f}x"
        spread = ("-" if r["p20"] is None else f"{_fmt(r['p20'], r['unit'])}..{_fmt(r['p80'], r['unit'])}")
        val = _fmt(r["value"], r["unit"]) + ("" if r["unit"] == "bytes" else f" {r['unit']}")
        d = "-" if r["head_dim"] is None else r["head_dim"]
        causal = "-" if r["causal"] is None else str(r["causal"])
        out.append(f"{r['op']:<14} {r['provider'][:11]:<11} {r['backend'][:22]:<22} {r['mode']:<8} "
                   f"{d:>4} {causal:<6} {r['x_value']:>7} {r['metric']:<12} "
                   f"{val:>14} {spread:>21} {ratio:>9}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Running the ops' sweeps
# ---------------------------------------------------------------------------------------------
def run(ops=("all",), quick=False, out_dir="bench-results", providers=PROVIDERS,
        progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    device = setup_device()
    info = machine_info(device)
    wanted = OPS if "all" in ops else tuple(ops)
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    t0 = time.time()
    count = [0]

    def emit(r):
        r.update(info)
        rows.append({c: r.get(c) for c in COLUMNS})
        peak = device_peak(info["device"], r.get("dtype") or "")
        if peak and r["metric"] in ("tflops", "gbps"):  # as a fraction of the datasheet peak
            frac = dict(r, metric=r["metric"] + "_peak_fraction", unit="fraction")
            top = peak[0] if r["metric"] == "tflops" else peak[1]
            for c in ("value", "p20", "p80"):
                frac[c] = None if r[c] is None else r[c] / top
            rows.append({c: frac.get(c) for c in COLUMNS})

    def prog(msg):
        count[0] += 1
        if progress:
            progress(f"[{count[0]:3d}] {time.time() - t0:6.1f}s  {msg}")

    for op in wanted:  # each op's sweep, as declared in tritformer.registry
        spec = registry.get(op).bench
        if spec is None:
            raise ValueError(f"{op!r} has no benchmark (ops: {', '.join(OPS)})")
        registry.resolve(spec.run)(device, quick, list(providers), emit, prog, skipped,
                                   **dict(spec.kwargs))
    return rows, skipped


# inspect's kernels behind each benchmarked op (registry: the ops' bench.kernels)
INSPECT_OPS = {op.name: op.bench.kernels for op in registry.OPS if op.bench is not None}


def inspect_command(ops, device: str) -> list[str]:
    """`tritformer inspect` argv for the kernels of the benchmarked ops: this GPU's arch family
    (sm_80 / sm_90) on CUDA, both without one; the benchmarks' dtype (bf16 on CUDA; fp16
    elsewhere, whose configs bf16 shares); head dims 64 and 128 (the sweep's)."""
    wanted = OPS if "all" in ops else tuple(ops)
    kernels = sorted({k for op in wanted for k in INSPECT_OPS.get(op, ())})
    if device == "cuda":
        archs = ["sm_90" if torch.cuda.get_device_capability()[0] >= 9 else "sm_80"]
    else:
        archs = ["sm_80", "sm_90"]
    return ["inspect", "--op", *kernels, "--arch", *archs, "--head-dim", "64", "128",
            "--dtype", "bf16" if device == "cuda" else "fp16"]


def run_inspect(ops, device: str, out_dir: Optional[str]) -> tuple[int, str]:
    """Run `tritformer inspect` for the benchmarked kernels in a fresh process (the kernels of
    this one may be interpreted); its table is written to OUT/inspect.txt."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "tritformer", *inspect_command(ops, device)],
                         env=env, capture_output=True, text=True)
    text = res.stdout + (res.stderr if res.returncode else "")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "inspect.txt"), "w") as f:
            f.write(text)
    return res.returncode, text


def main(args) -> int:
    def progress(msg):
        print(f"\r{msg:<78}", end="", file=sys.stderr, flush=True)

    rows, skipped = run(args.op, args.quick, args.out, args.providers, progress)
    print(file=sys.stderr)
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    if not rows:
        print("no measurements")
        return 1
    print(format_table(rows))
    cpu = rows[0]["device"].startswith("cpu")
    if cpu:
        print("\nCPU run: tritformer latencies are Triton-interpreter times; they say nothing about "
              "GPU speed. Memory and max error are the meaningful columns here.")
    for path in write_results(rows, args.out):
        print(f"wrote {path}")
    if getattr(args, "inspect", False):
        print("\ninspect (AOT compile of the benchmarked kernels' shipped configs):", flush=True)
        code, text = run_inspect(args.op, rows[0]["device"].startswith("cpu") and "cpu" or "cuda",
                                 args.out)
        print(text)
        print(f"wrote {os.path.join(args.out, 'inspect.txt')}")
        if code:
            return code
    return 0
