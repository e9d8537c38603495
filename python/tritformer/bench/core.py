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


# s of calls per adaptive CPU timing (blocked_autorange); tests shorten it
CPU_MIN_RUN_TIME = float(os.environ.get("TRITFORMER_BENCH_MIN_RUN_TIME", "0.25"))


def adaptive_timing(backend: str) -> bool:
    """CPU timings repeat adaptively for PyTorch providers; Triton-interpreter calls (seconds
    each, no GPU speed anyway) get a fixed count."""
    return "interpreter" not in (backend or "")


def time_ms(fn: Callable[[], object], device: str, reps: int = 3,
            adaptive: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: do_bench on CUDA. On CPU with adaptive=True (PyTorch
    providers): torch.utils.benchmark.Timer.blocked_autorange, blocks of calls until
    CPU_MIN_RUN_TIME seconds, so a fast call is repeated enough for a stable median (the
    quantiles are over the blocks' per-call times); else `reps` wall-clock calls after 1 warm-up."""
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    if adaptive:
        from torch.utils import benchmark as tb
        timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=CPU_MIN_RUN_TIME)
        return _percentiles([t * 1e3 for t in m.times])
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
        med, p20, p80 = time_ms(fn, device, reps, adaptive=adaptive_timing(backend))
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
# Output: the row stream
# ---------------------------------------------------------------------------------------------
class ResultWriter:
    """The one place rows go to disk, as they are produced: OUT/results.csv (header once, each
    row appended and flushed) and OUT/results.json (a JSON list kept valid after every row: the
    closing bracket is rewritten in place; `close` rewrites the whole file atomically)."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "results.csv")
        self.json_path = os.path.join(out_dir, "results.json")
        self.rows: list[dict] = []
        self._csv = open(self.csv_path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._csv.flush()
        self._json = open(self.json_path, "wb")
        self._json.write(b"[]\n")
        self._json.flush()
        self._tail = 1  # offset of the closing bracket

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._writer.writerow(row)
        self._csv.flush()
        self._json.seek(self._tail)
        self._json.write(((",\n" if len(self.rows) > 1 else "\n") + json.dumps(row)).encode())
        self._tail = self._json.tell()
        self._json.write(b"\n]\n")
        self._json.truncate()
        self._json.flush()

    def close(self) -> None:
        if self._csv.closed:
            return
        self._csv.close()
        self._json.close()
        tmp = f"{self.json_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.rows, f, indent=1)
        os.replace(tmp, self.json_path)


def write_results(rows: list[dict], out_dir: str) -> list[str]:
    """CSV, JSON and plots of finished rows at once (`bench_run` streams them instead)."""
    from .report import plot_results
    w = ResultWriter(out_dir)
    for r in rows:
        w.add(r)
    w.close()
    return [w.csv_path, w.json_path] + [p for p, _ in plot_results(rows, out_dir)]


# ---------------------------------------------------------------------------------------------
# Running the ops' sweeps
# ---------------------------------------------------------------------------------------------
def _wanted(ops) -> tuple:
    return OPS if "all" in ops else tuple(ops)


def planned_cases(ops, device: str, quick: bool, providers) -> Optional[int]:
    """The cases (progress steps) the run will take: each op's sweep function declares its
    count as `.cases(device, quick, providers, **kwargs)`; None when one does not."""
    total = 0
    for op in _wanted(ops):
        spec = registry.get(op).bench
        count = getattr(registry.resolve(spec.run), "cases", None) if spec else None
        if count is None:
            return None
        total += count(device, quick, list(providers), **dict(spec.kwargs))
    return total


@dataclasses.dataclass
class BenchRun:
    """A run's rows and how it ended (`partial`: interrupted, or an op failed)."""
    ops: tuple
    quick: bool
    providers: tuple
    device: str
    info: dict
    out_dir: Optional[str]
    planned: Optional[int] = None
    rows: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    failures: dict = dataclasses.field(default_factory=dict)  # op: "Error: message"
    interrupted: bool = False
    cases_done: int = 0
    current: str = ""
    seconds: float = 0.0
    files: list = dataclasses.field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.interrupted or bool(self.failures)

    def status(self) -> list[str]:
        done = (f"{self.cases_done} of {self.planned or '?'} cases, {len(self.rows)} "
                f"row{'s' * (len(self.rows) != 1)}")
        out = []
        if self.interrupted:
            out.append(f"PARTIAL: interrupted (Ctrl-C) after {done}"
                       + (f", during: {self.current}" if self.current else ""))
        for op, err in self.failures.items():
            out.append(f"PARTIAL: op {op} failed: {err} (after {done})")
        return out


class _CaseProgress:
    """A ProgressBar (tritformer.progress: tqdm on a terminal, plain lines elsewhere) over the
    planned cases: a case counts as done when the next one starts or its op returns; the bar
    shows the case running."""

    def __init__(self, res: BenchRun, enabled: bool, callback):
        self.res, self.callback, self.pending = res, callback, False
        self.t0 = time.time()
        self.bar = None
        if enabled:
            from ..progress import ProgressBar
            self.bar = ProgressBar(res.planned or 0, desc="bench", unit="case")

    def _advance(self, postfix: str) -> None:
        if self.bar is not None:
            self.bar.total = max(self.bar.total, self.res.cases_done)
            step = self.res.cases_done - self.bar.n
            self.bar.update(step, postfix=postfix, force=True)
            if step == 0 and self.bar.uses_tqdm:  # tqdm redraws on progress only
                self.bar._bar.refresh()

    def __call__(self, msg: str) -> None:
        if self.pending:
            self.res.cases_done += 1
        self.pending = True
        self.res.current = msg
        if self.bar is not None:
            self.bar.total = max(self.bar.total, self.res.cases_done + 1)
        self._advance(msg)
        if self.callback:
            self.callback(f"[{self.res.cases_done + 1:3d}/{self.res.planned or '?'}] "
                          f"{time.time() - self.t0:6.1f}s  {msg}")

    def op_done(self, ok: bool) -> None:
        """The op returned (its last case is done) or raised (its case is not)."""
        if self.pending and ok:
            self.res.cases_done += 1
            self._advance("done" if self.res.cases_done >= (self.res.planned or 0) else "")
        self.pending = False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bench_run(ops=("all",), quick=False, out_dir: Optional[str] = None, providers=PROVIDERS,
              progress: Callable[[str], None] | None = None, bar: bool = False,
              echo: bool = False, keep_going: bool = False) -> BenchRun:
    """Run the ops' sweeps (tritformer.registry declarations). With out_dir, every row goes to
    OUT/results.csv and OUT/results.json as it is produced, and the report (summary,
    report.md / index.html, table.txt, skips.txt, plots) is written from the rows so far however
    the run ends: completed, Ctrl-C (KeyboardInterrupt re-raised after it) or an op's exception
    (recorded, then the next op with keep_going, else re-raised). bar: a progress bar with the
    planned case count and an ETA on stderr; echo: the summary and skips on stdout."""
    device = setup_device()
    info = machine_info(device)
    wanted = _wanted(ops)
    for op in wanted:
        if registry.get(op).bench is None:
            raise ValueError(f"{op!r} has no benchmark (ops: {', '.join(OPS)})")
    res = BenchRun(wanted, quick, tuple(providers), device, info, out_dir,
                   planned=planned_cases(wanted, device, quick, providers))
    writer = ResultWriter(out_dir) if out_dir else None
    t0 = time.time()

    def add(r):
        r = {c: r.get(c) for c in COLUMNS}
        res.rows.append(r)
        if writer:
            writer.add(r)

    def emit(r):
        r.update(info)
        add(r)
        peak = device_peak(info["device"], r.get("dtype") or "")
        if peak and r["metric"] in ("tflops", "gbps"):  # as a fraction of the datasheet peak
            frac = dict(r, metric=r["metric"] + "_peak_fraction", unit="fraction")
            top = peak[0] if r["metric"] == "tflops" else peak[1]
            for c in ("value", "p20", "p80"):
                frac[c] = None if r[c] is None else r[c] / top
            add(frac)

    prog = _CaseProgress(res, bar, progress)
    try:
        for op in wanted:  # each op's sweep, as declared in tritformer.registry
            spec = registry.get(op).bench
            try:
                registry.resolve(spec.run)(device, quick, list(providers), emit, prog,
                                           res.skipped, **dict(spec.kwargs))
                prog.op_done(True)
            except Exception as e:
                if _from_interrupt(e):
                    # Ctrl-C inside a class body or an import surfaces as another exception
                    # (e.g. "Error calling __set_name__") caused by the KeyboardInterrupt
                    raise KeyboardInterrupt from e
                prog.op_done(False)
                res.failures[op] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                if out_dir:
                    import traceback
                    with open(os.path.join(out_dir, "errors.txt"), "a", encoding="utf-8") as f:
                        f.write(f"op {op} during {res.current!r}:\n{traceback.format_exc()}\n")
                if not keep_going:
                    raise
    except KeyboardInterrupt:
        res.interrupted = True
        raise
    finally:
        prog.close()
        res.seconds = time.time() - t0
        if writer:
            writer.close()
            finish_report(res, echo=echo, bar=bar)
    return res


def _from_interrupt(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in e's chain of causes / contexts."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run(ops=("all",), quick=False, out_dir: Optional[str] = None, providers=PROVIDERS,
        progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """(rows, skipped) of the ops' sweeps (`bench_run`)."""
    res = bench_run(ops, quick, out_dir, providers, progress)
    return res.rows, res.skipped


def finish_report(res: BenchRun, echo: bool = False, bar: bool = False) -> list[str]:
    """From the rows written so far: skips.txt, table.txt, report.md and index.html (first
    without plots, so a second Ctrl-C while plotting still leaves a report), the summary on
    stdout (echo), then the plots and the report again with them."""
    from . import report as R
    out = res.out_dir
    os.makedirs(out, exist_ok=True)
    R._write_atomic(os.path.join(out, "skips.txt"), R.skips_text(res.skipped))
    R._write_atomic(os.path.join(out, "table.txt"), R.format_table(res.rows) + "\n")
    summary = R.summary_lines(res.rows)
    skips = R.skip_lines(res.skipped)
    cpu = res.device != "cuda"
    notes = []
    if cpu:
        notes.append("CPU run: the fused kernels run in Triton's interpreter, so their times "
                     "say nothing about GPU speed and are never shown as speed ratios; memory "
                     "and max error are the meaningful comparisons here.")
    status = res.status()
    title = "tritformer bench" + (" (partial)" if res.partial else "")
    meta = [f"ops: {' '.join(res.ops)}{' (--quick)' if res.quick else ''}; providers: "
            f"{' '.join(res.providers)}",
            f"device: {res.info['device']}; torch {res.info['torch']}, triton "
            f"{res.info['triton']}, tritformer {res.info['tritformer']}; {res.info['timestamp']}",
            f"{res.cases_done} of {res.planned or '?'} cases, {len(res.rows)} rows in "
            f"{res.seconds:.1f} s", *notes]
    files = [f"results.csv ({len(res.rows)} rows)", "results.json",
             "table.txt (the full table)", "skips.txt"]
    if res.failures:
        files.append("errors.txt (tracebacks)")
    R.write_report(out, title, status, meta, summary, skips, None, files,
                   plots_note="(drawing the plots...)")
    if echo:
        for s in status:
            print(s)
        print("Summary: tritformer against naive and SDPA at the largest point all ran "
              f"(full table: {os.path.join(out, 'table.txt')})")
        print("\n".join(summary))
        if notes:
            print(notes[0])
        if skips:
            print("\n".join(skips))
            print(f"(every skip: {os.path.join(out, 'skips.txt')})")
        sys.stdout.flush()
    plot_bar, started = None, [False]
    if bar:
        from ..progress import ProgressBar
        plot_bar = ProgressBar(len(R.plot_groups(res.rows)), desc="plots", unit="plot")

    def plot_progress(name):
        plot_bar.update(1 if started[0] else 0, postfix=name, force=True)
        started[0] = True
    plots = []
    try:
        plots = R.plot_results(res.rows, out, progress=plot_progress if plot_bar else None)
    finally:
        if plot_bar:
            if plots:
                plot_bar.update(plot_bar.total - plot_bar.n, postfix="done", force=True)
            plot_bar.close()
    written = R.write_report(out, title, status, meta, summary, skips, plots, files)
    res.files = [os.path.join(out, "results.csv"), os.path.join(out, "results.json"), *written,
                 os.path.join(out, "table.txt"), os.path.join(out, "skips.txt")] + [
        p for p, _ in plots]
    return res.files


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
    """`python -m tritformer bench`: a progress bar (planned cases, ETA) on stderr; the summary,
    the skips (one line per reason) and where the files are on stdout. Exit status 0; 1 when an
    op failed (the other ops still ran) or nothing was measured; 130 on Ctrl-C (the rows so far
    are on disk, and the report says it is partial)."""
    try:
        res = bench_run(args.op, args.quick, args.out, args.providers, bar=True, echo=True,
                        keep_going=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows so far are in {os.path.join(args.out, 'results.csv')}; "
              f"partial report: {os.path.join(args.out, 'report.md')}", file=sys.stderr)
        return 130
    rows = res.rows
    print(f"report: {os.path.join(args.out, 'report.md')} and index.html (every plot with its "
          f"caption); rows: results.csv, results.json ({len(rows)}); "
          f"{sum(f.endswith('.png') for f in res.files)} plots")
    if res.failures:
        print(f"failed: {', '.join(res.failures)} (tracebacks: "
              f"{os.path.join(args.out, 'errors.txt')})", file=sys.stderr)
        return 1
    if not rows:
        print("no measurements")
        return 1
    if getattr(args, "inspect", False):
        print("\ninspect (AOT compile of the benchmarked kernels' shipped configs):", flush=True)
        code, text = run_inspect(args.op, res.device, args.out)
        print(text)
        print(f"wrote {os.path.join(args.out, 'inspect.txt')}")
        if code:
            return code
    return 0
