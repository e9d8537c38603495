"""What `python -m tritformer bench` reports (tritformer.bench.report and core.bench_run): the
progress bar's total, rows on disk as they come, a partial report after Ctrl-C or an op's
failure, the summary, the skips one line per reason, plots and their captions."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tritformer import bench, cli


@pytest.fixture(autouse=True)
def _short_adaptive_timings(monkeypatch):
    monkeypatch.setattr(bench.core, "CPU_MIN_RUN_TIME", 0.02)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _row(op, provider, metric, value, x=64, backend=None, mode="fwd", unit=None, **kw):
    r = dict(op=op, provider=provider, backend=backend or ("pytorch" if provider in ("naive",)
                                                           else "triton-interpreter"
                                                           if provider.startswith("tritformer")
                                                           else "sdpa (cpu)"),
             mode=mode, metric=metric, unit=unit or ("bytes" if "memory" in metric or metric ==
                                                     "saved_bytes" else "ms"),
             x_name="seqlen", x_value=x, value=value, p20=None, p80=None, batch=1, heads=1,
             head_dim=64, causal=True, dtype="fp32", device="cpu (test)", torch="t",
             triton="t", tritformer="t", timestamp="t")
    r.update(kw)
    return {c: r.get(c) for c in bench.COLUMNS}


# ---------------------------------------------------------------------------------------------
# The summary, skips, table
# ---------------------------------------------------------------------------------------------
def test_summary_takes_the_largest_common_point_and_no_interpreter_speed_ratio():
    MiB = 2**20
    rows = []
    for x, (naive, sdpa, fused) in {1024: (16, 4, 1), 2048: (64, 8, 2)}.items():
        rows += [_row("attention", "naive", "peak_memory", naive * MiB, x),
                 _row("attention", "sdpa", "peak_memory", sdpa * MiB, x),
                 _row("attention", "tritformer", "peak_memory", fused * MiB, x)]
    rows += [_row("attention", "tritformer", "peak_memory", 4 * MiB, 4096),  # no baseline at 4096
             _row("attention", "sdpa", "peak_memory", 16 * MiB, 4096),
             _row("attention", "naive", "peak_memory", 256 * MiB, 8192),  # no tritformer there
             _row("attention", "naive", "latency", 1.0), _row("attention", "sdpa", "latency", 0.5),
             _row("attention", "tritformer", "latency", 900.0)]  # interpreter: no speed ratio
    lines = bench.summary_lines(rows)
    assert lines[0].split() == ["op", "metric", "at", "tritformer", "vs", "naive", "vs", "sdpa"]
    body = lines[2:]
    assert len(body) == 1, lines
    assert "seqlen=2048" in body[0] and "32x less (64 MiB)" in body[0] and "4x less (8 MiB)" in body[0]
    assert not any("latency" in line for line in lines)
    # compiled kernels (a GPU): latency and TFLOP/s as speed ratios
    gpu = [_row("attention", p, "latency", ms, 4096, backend="triton" if p == "tritformer" else "x")
           for p, ms in (("naive", 8.0), ("sdpa", 1.0), ("tritformer", 2.0))]
    gpu += [_row("attention", p, "tflops", t, 4096, unit="TFLOP/s", backend="triton"
                 if p == "tritformer" else "x") for p, t in (("naive", 10.0), ("tritformer", 40.0))]
    lines = bench.summary_lines(gpu)
    lat = next(line for line in lines if "latency fwd" in line)
    assert "2 ms (40 TFLOP/s)" in lat  # the throughput on the latency line
    assert "4x faster (8 ms)" in lat and "2x slower (1 ms)" in lat
    assert not any("tflops" in line for line in lines) and len(lines) == 3
    tfl = bench.summary_lines([r for r in gpu if r["metric"] == "tflops"])  # without latency rows
    assert "4x faster (10 TFLOP/s)" in tfl[2] and tfl[2].rstrip().endswith("-")


def test_table_names_providers_in_full_and_never_ratios_interpreter_times():
    rows = [_row("ffn", "naive", "latency", 2.0), _row("ffn", "tritformer_recompute", "latency", 8.0),
            _row("ffn", "naive", "peak_memory", 2.0 * 2**20),
            _row("ffn", "tritformer_recompute", "peak_memory", 1.0 * 2**20)]
    lines = bench.format_table(rows).splitlines()
    assert "tritformer_recompute" in lines[3]
    assert not lines[3].rstrip().endswith("x")  # interpreter latency: no ratio
    assert lines[5].rstrip().endswith("0.500x")  # memory: a ratio
    assert len({len(line) for line in lines[:2]}) == 1  # columns sized to their content


def test_skips_one_line_per_reason():
    skipped = {"attention flash_attn": "flash_attn runs on CUDA only",
               "attention sdpa_flash": "sdpa_flash runs on CUDA only",
               "varlen flash_attn": "flash_attn runs on CUDA only",
               "masked_dense flash_attn": "flash_attn takes no dense attn_mask",
               "softmax sdpa": "not a softmax provider", "softmax flex": "not a softmax provider"}
    assert bench.skip_lines(skipped) == [
        "skipped flash_attn, sdpa_flash: runs on CUDA only (2 ops: attention, varlen)",
        "skipped flash_attn: takes no dense attn_mask (1 op: masked_dense)",
        "skipped sdpa, flex: not a softmax provider (1 op: softmax)"]


def test_result_writer_keeps_csv_and_json_valid_after_every_row(tmp_path):
    w = bench.ResultWriter(str(tmp_path))
    rows = [_row("attention", p, "peak_memory", float(i)) for i, p in enumerate(("naive", "sdpa", "x"))]
    assert json.loads((tmp_path / "results.json").read_text()) == []
    for i, r in enumerate(rows):
        w.add(r)
        assert json.loads((tmp_path / "results.json").read_text()) == rows[:i + 1]
        assert [d["provider"] for d in _csv_rows(tmp_path / "results.csv")] == [
            r["provider"] for r in rows[:i + 1]]
    w.close()
    assert json.loads((tmp_path / "results.json").read_text()) == rows


def test_cpu_timing_repeats_pytorch_calls_adaptively():
    calls = [0]

    def fast():
        calls[0] += 1
    med, p20, p80 = bench.time_ms(fast, "cpu", reps=3, adaptive=True)
    assert calls[0] > 1000 and p20 <= med <= p80 < 1.0  # many calls in CPU_MIN_RUN_TIME
    calls[0] = 0
    bench.time_ms(fast, "cpu", reps=3)  # interpreter calls: 1 warm-up + reps
    assert calls[0] == 4
    assert bench.adaptive_timing("pytorch") and not bench.adaptive_timing("triton-interpreter")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def test_plots_mib_distinct_styles_bars_for_single_points_and_captions(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    figs = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(self, path, *a, **kw):
        figs[os.path.basename(path)] = self
        return real(self, path, *a, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    MiB = 2**20
    rows = [_row("attention", p, "peak_memory", v * MiB, x)
            for x in (1024, 2048) for p, v in (("naive", x / 64), ("sdpa_math", x / 64),
                                               ("sdpa", 2.0), ("tritformer", 1.0))]
    rows += [_row("softmax", p, "peak_memory", v * MiB, 4096, x_name="row_length", batch=16,
                  heads=None, head_dim=None) for p, v in (("naive", 2.0), ("tritformer", 1.0))]
    rows += [_row("softmax", p, "latency", v, x, x_name="row_length", batch=65536 // x, heads=None,
                  head_dim=None) for x in (1024, 4096) for p, v in (("naive", 1.0), ("tritformer", 9.0))]
    plots = dict((os.path.basename(p), c) for p, c in bench.plot_results(rows, str(tmp_path)))
    assert set(plots) == {"attention_peak_memory_fwd_d64_seqlen_sweep.png",
                          "softmax_peak_memory_fwd.png", "softmax_latency_fwd.png"}
    ax = figs["attention_peak_memory_fwd_d64_seqlen_sweep.png"].axes[0]
    assert ax.get_ylabel() == "peak_memory (MiB)"
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["naive"].get_ydata()[-1] == 32.0  # MiB
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines.values()}
    assert len(styles) == 4  # naive and sdpa_math coincide, but look different
    assert "B=1" in plots["attention_peak_memory_fwd_d64_seqlen_sweep.png"]
    single = figs["softmax_peak_memory_fwd.png"].axes[0]  # one x value: bars, no line
    assert not single.lines and len(single.patches) == 2
    assert "at row_length=4096" in plots["softmax_peak_memory_fwd.png"]
    cap = plots["softmax_latency_fwd.png"]
    assert "rows x row_length = 65536 held fixed" in cap and "interpreter" in cap


# ---------------------------------------------------------------------------------------------
# The command: progress, summary, partial reports
# ---------------------------------------------------------------------------------------------
def test_progress_bar_summary_and_report(tmp_path, monkeypatch, capsys):
    # a tiny attention sweep in process: 3 providers x (1 timed point + 2 memory points)
    monkeypatch.setattr(bench.attention, "attention_sweep", lambda *a, **kw: bench.AttentionSweep(
        (32,), 32, (16,), 16, "fp32", modes=("fwd",), causal=(True,), memory_seqlens=(64, 128),
        reps=1))
    out = tmp_path / "res"
    code = cli.main(["bench", "--quick", "--op", "attention", "--out", str(out), "--providers",
                     "naive", "sdpa_flash", "sdpa", "tritformer", "flash_attn"])
    got = capsys.readouterr()
    assert code == 0, got.out + got.err
    progress = [line for line in got.err.splitlines() if line.startswith("bench [")]
    assert progress[0].startswith("bench [0/9]") and "attention naive D=16 N=32" in progress[0]
    assert "ETA" in progress[1] and progress[-1].startswith("bench [9/9]")
    assert [int(line.split("[")[1].split("/")[0]) for line in progress] == list(range(10))
    assert any(line.startswith("plots [") for line in got.err.splitlines())
    stdout = got.out.splitlines()
    assert stdout[0].startswith("Summary")  # first, before anything else
    mem = next(line for line in stdout if "peak_memory fwd" in line)
    assert "seqlen=128 B=1 H=1 D=16 causal" in mem and "x less" in mem
    assert not any("latency" in line for line in stdout)  # interpreter times: no speed ratio
    skips = [line for line in stdout if line.startswith("skipped")]
    assert len(skips) == 1 and skips[0].startswith(
        "skipped sdpa_flash, flash_attn: runs on CUDA only (1 op: attention)")
    assert len((out / "skips.txt").read_text().splitlines()) == 2
    rows = _csv_rows(out / "results.csv")
    assert len(rows) == len(json.loads((out / "results.json").read_text())) == 3 * (1 + 2 + 2)
    report = (out / "report.md").read_text()
    assert "PARTIAL" not in report and "9 of 9 cases" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    if pngs:  # matplotlib installed: every plot in the report, with its caption
        html = (out / "index.html").read_text()
        for name in pngs:
            assert f"![{name}]({name})" in report and f"<img src='{name}'" in html
        assert report.count("held fixed") + report.count("B=1") >= len(pngs)
    assert "table.txt" in report and "tritformer" in (out / "table.txt").read_text()


def _fake_op(op, fail=False):
    def run(device, quick, providers, emit, progress, skipped, **kw):
        for p, mib in (("naive", 4), ("sdpa", 2), ("tritformer", 1)):
            progress(f"{op} {p}")
            emit(dict(op=op, provider=p, backend="pytorch", mode="fwd", metric="peak_memory",
                      unit="bytes", x_name="tokens", x_value=64, value=mib * 2**20, batch=64,
                      head_dim=16, dtype="fp32"))
            if fail and p == "sdpa":
                raise RuntimeError("boom")
    run.cases = lambda device, quick, providers, **kw: 3
    return run


def test_an_interrupt_wrapped_in_another_error_is_an_interrupt(tmp_path, monkeypatch, capsys):
    # Ctrl-C landing inside a class body creation (a lazy import) surfaced as RuntimeError("Error
    # calling __set_name__ ...") from the KeyboardInterrupt, and the bench reported an op failure
    # (exit 1) instead of an interrupted run (130): seen once in the SIGINT test below
    def run(device, quick, providers, emit, progress, skipped, **kw):
        progress("softmax naive")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'cached_property'") from e
    run.cases = lambda device, quick, providers, **kw: 1
    monkeypatch.setattr(bench.softmax, "bench_softmax", run)
    code = cli.main(["bench", "--op", "softmax", "--out", str(tmp_path / "res")])
    got = capsys.readouterr()
    assert code == 130 and got.out.startswith("PARTIAL: interrupted"), got.out


def test_an_op_failure_leaves_a_partial_report_and_the_other_ops_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.softmax, "bench_softmax", _fake_op("softmax", fail=True))
    monkeypatch.setattr(bench.ffn, "bench_ffn", _fake_op("ffn"))
    out = tmp_path / "res"
    code = cli.main(["bench", "--op", "softmax", "ffn", "--out", str(out)])
    got = capsys.readouterr()
    assert code == 1
    assert got.out.splitlines()[0] == ("PARTIAL: op softmax failed: RuntimeError: boom "
                                       "(after 4 of 6 cases, 5 rows)")
    assert [(r["op"], r["provider"]) for r in _csv_rows(out / "results.csv")] == [
        ("softmax", "naive"), ("softmax", "sdpa"), ("ffn", "naive"), ("ffn", "sdpa"),
        ("ffn", "tritformer")]
    assert len(json.loads((out / "results.json").read_text())) == 5
    assert "RuntimeError: boom" in (out / "errors.txt").read_text()
    report = (out / "report.md").read_text()
    assert "# tritformer bench (partial)" in report and "op softmax failed" in report
    ffn = next(line for line in got.out.splitlines() if line.startswith("ffn "))
    assert "4x less (4 MiB)" in ffn and "2x less (2 MiB)" in ffn


@pytest.mark.parametrize("reexec", [
    False,  # TRITON_INTERPRET=1 set: the bench runs in the process that gets the signal
    True,   # unset on CPU: cli.py re-runs itself with the interpreter in a child process; a
            # terminal's Ctrl-C reaches the whole process group (killpg below), and the parent
            # must wait for the child's partial report, then exit 130 without a traceback
])
def test_sigint_leaves_the_rows_so_far_and_a_partial_report(tmp_path, reexec):
    out = tmp_path / "res"
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITFORMER_BENCH_MIN_RUN_TIME": "0.02"}
    if reexec:
        env.pop("TRITON_INTERPRET")
    proc = subprocess.Popen([sys.executable, "-m", "tritformer", "bench", "--quick", "--op",
                             "attention", "--providers", "naive", "tritformer", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a test run launched in the background of a non-interactive shell
                            # inherits SIGINT ignored, and Python then keeps ignoring it: give
                            # the bench the disposition a terminal's process has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (out / "results.csv").exists() and len(_csv_rows(out / "results.csv")) >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the first row: " + proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    rows = _csv_rows(out / "results.csv")
    assert rows and len(rows) == len(json.loads((out / "results.json").read_text()))
    assert rows[0]["op"] == "attention" and rows[0]["provider"] == "naive"
    planned = bench.planned_cases(("attention",), "cpu", True, ("naive", "tritformer"))
    report = (out / "report.md").read_text()
    assert "# tritformer bench (partial)" in report
    assert re.search(r"PARTIAL: interrupted \(Ctrl-C\) after \d+ of %d cases" % planned, report)
    assert stdout.startswith("PARTIAL: interrupted")
    assert (out / "index.html").exists() and (out / "skips.txt").exists()
