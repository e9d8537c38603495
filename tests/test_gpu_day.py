"""benchmarks/gpu_day.sh and the CUDA-only code paths it exercises, checked without a GPU (#17).

The script: its arguments, the refusal without a CUDA device, --dry-run's commands (parsed by
the real CLI parser), and whole runs against a stand-in Python (a recording script that answers
the CUDA check with a fake device): the summary, exit statuses, time limits, signals.

The Python paths only a GPU takes, with the device calls stubbed: kernels/_launch.run's compiled
launches and autotuner wrapper, device_arch, bench's do_bench timing, CUDA peak-memory stats,
machine_info, setup_device, inspect_command, the providers active on CUDA. (Descriptor
creation: the package has no TMA descriptor code yet; its tests come with it.)
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.testing

from tritformer import bench
from tritformer._cliargs import BENCH_PROVIDERS
from tritformer.bench import core
from tritformer.cli import _parser
from tritformer.kernels import _launch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_day.sh"
OPS = ("attention", "masked", "varlen", "gpt")
# the default step limits (the script's table) and its worst case: under 10 minutes
DEFAULT_LIMITS = {"check": 30, "nvidia-smi": 5, "versions": 15, "collect_env": 25, "pip-freeze": 10,
                  "git": 5, "validate": 100, "bench-attention": 130, "bench-masked": 65,
                  "bench-varlen": 45, "bench-gpt": 55, "inspect": 40}
STEPS = ["nvidia-smi", "versions", "collect_env", "pip-freeze", "git", "validate",
         "bench-attention", "bench-masked", "bench-varlen", "bench-gpt", "inspect"]

# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------
# A stand-in for the Python with a CUDA torch: records each call (argv as JSON), answers the
# CUDA check with FAKE_CUDA / FAKE_CAPABILITY, exits FAKE_RC_<COMMAND> for `-m tritformer
# COMMAND`, and `bench --op $FAKE_SLOW` sleeps until interrupted (then, as bench does, exits 130
# after writing a marker). -S: no site import, a fast start.
FAKE_PY = """#!{python} -S
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:1] == ["-c"]:
    if "cuda_available" in args[1]:
        cuda = os.environ.get("FAKE_CUDA", "True")
        print("cuda_available:", cuda)
        if cuda == "True":
            print("device: Fake GPU 80GB")
            print("capability:", os.environ.get("FAKE_CAPABILITY", "9.0"))
        print("torch: 2.13.0+fake CUDA 12.8")
    else:
        print("versions")
    sys.exit(0)
if args[:2] == ["-m", "tritformer"]:
    command = args[2]
    if command == "bench":
        op = args[args.index("--op") + 1]
        os.makedirs(args[args.index("--out") + 1], exist_ok=True)
        if op == os.environ.get("FAKE_SLOW"):
            print("measuring", op, flush=True)
            try:
                time.sleep(120)
            except KeyboardInterrupt:
                open(os.environ["FAKE_LOG"] + ".interrupted", "w").write(op)
                sys.exit(130)
    print(command, "output")
    sys.exit(int(os.environ.get("FAKE_RC_" + command.upper(), "0")))
print("other output")
"""


@pytest.fixture
def fake(tmp_path):
    """(python path, env, log path): the stand-in Python and a fake nvidia-smi on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    py = bindir / "fakepy"
    py.write_text(FAKE_PY.format(python=sys.executable))
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI fake'\n")
    for f in (py, smi):
        f.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    env.pop("PYTHON", None)
    return str(py), env, log


def _calls(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _script(*args, env=None, cwd=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def _summary(out: Path) -> dict:
    """summary.txt's step rows: {step: (status, exit, seconds, limit, output)}."""
    lines = (out / "summary.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "status"])
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("result:"):
            break
        name, status, rc, secs, lim, output = line.split(None, 5)
        rows[name] = (status, rc, secs, lim, output)
    return rows


def test_help_lists_every_option():
    res = _script("--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("usage: benchmarks/gpu_day.sh")
    for opt in ("--out", "--python", "--budget", "--full", "--providers", "--arch", "--dry-run", "-h"):
        assert opt in res.stdout
    assert "At most 585 s." in res.stdout  # 525 s of limits + 12 steps x 5 s grace
    assert _script("-h").stdout == res.stdout


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument: --frobnicate"),
    (["--out"], "--out needs a value"),
    (["--budget", "ten"], "--budget takes a positive number of seconds, not 'ten'"),
    (["--budget=0"], "--budget takes a positive number of seconds, not '0'"),
    (["--dry-run=yes"], "--dry-run takes no value"),
    (["--providers", "sdpa,cutlass"], "unknown provider 'cutlass'"),
    (["--arch", "sm_70"], "--arch: unknown architecture 'sm_70'"),
    (["--python", "no-such-python-here"], "python not found: 'no-such-python-here'"),
])
def test_usage_errors_exit_2(tmp_path, fake, args, message):
    py, env, log = fake
    res = _script("--python", py, "--dry-run", *args, env=env, cwd=tmp_path)
    assert res.returncode == 2, res
    assert message in res.stderr and "--help" in res.stderr and res.stdout == ""
    assert _calls(log) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_refuses_an_existing_results_folder(tmp_path, fake):
    py, env, log = fake
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.txt").write_text("an earlier run")
    res = _script("--python", py, "--out", str(tmp_path / "old"), env=env)
    assert res.returncode == 2 and "exists and is not an empty folder" in res.stderr
    assert _calls(log) == []
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert _script("--python", py, "--out", str(tmp_path / "empty"), "--dry-run", env=env).returncode == 0


def test_without_cuda_it_refuses_clearly_and_writes_nothing(tmp_path):
    # the real interpreter of this run: torch without a visible CUDA device
    assert not torch.cuda.is_available()
    res = _script("--python", sys.executable, "--out", str(tmp_path / "r"), timeout=120)
    assert res.returncode == 2
    assert f"no CUDA device is visible to {sys.executable}" in res.stderr
    assert "cuda_available: False" in res.stderr and "--dry-run" in res.stderr
    assert res.stdout == "" and not (tmp_path / "r").exists()


def test_without_cuda_stand_in(tmp_path, fake):
    py, env, log = fake
    res = _script("--python", py, "--out", str(tmp_path / "r"), env={**env, "FAKE_CUDA": "False"})
    assert res.returncode == 2 and "no CUDA device is visible" in res.stderr
    assert [c[0] for c in _calls(log)] == ["-c"]  # the check, nothing else
    assert not (tmp_path / "r").exists()


def _dry_lines(stdout: str) -> dict:
    """--dry-run's command lines: {step: (limit s, argv, log)}."""
    steps = {}
    for line in stdout.splitlines():
        if line.startswith("#") or "skipped:" in line or line.startswith("check "):
            continue
        words = shlex.split(line)
        assert words[-2] == ">", line
        steps[words[0]] = (int(words[1].rstrip("s")), words[2:-2], words[-1])
    return steps


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, fake):
    py, env, log = fake
    out = tmp_path / "results"
    res = _script("--dry-run", "--python", py, "--out", str(out), "--arch", "sm_86", env=env)
    assert res.returncode == 0, res.stderr
    assert _calls(log) == [] and not out.exists()  # nothing run, nothing written
    steps = _dry_lines(res.stdout)
    assert list(steps) == STEPS  # (nvidia-smi: the fake one on PATH)
    assert steps["nvidia-smi"][1] == ["nvidia-smi"]
    assert steps["validate"] == (100, [py, "-m", "tritformer", "validate", "--quick"],
                                 f"{out}/validate.txt")
    for op in OPS:
        limit, argv, logfile = steps[f"bench-{op}"]
        assert argv[:3] == [py, "-m", "tritformer"] and logfile == f"{out}/bench/{op}.log"
        assert argv[3:] == ["bench", "--op", op, "--quick", "--out", f"{out}/bench/{op}",
                            "--providers", *BENCH_PROVIDERS]  # every provider, as the CLI knows them
    assert steps["inspect"][1][3:] == ["inspect", "--op", "attention", "masked", "varlen", "--arch",
                                       "sm_86", "--head-dim", "64", "128", "--dtype", "bf16", "--jobs", "0"]
    assert steps["pip-freeze"][1] == [py, "-m", "pip", "freeze"]
    assert steps["collect_env"][1] == [py, "-m", "torch.utils.collect_env"]
    # every tritformer command is one the real CLI accepts (flag names, choices)
    for name, (_, argv, _) in steps.items():
        if argv[1:3] == ["-m", "tritformer"]:
            args = _parser().parse_args(argv[3:])
            assert args.command in ("validate", "bench", "inspect"), name
    limits = {name: limit for name, (limit, _, _) in steps.items()}
    check = [line for line in res.stdout.splitlines() if line.startswith("check ")]
    assert len(check) == 1 and "(no CUDA device: exit 2)" in check[0]
    limits["check"] = int(check[0].split()[1].rstrip("s"))
    assert limits == DEFAULT_LIMITS
    assert sum(limits.values()) + 5 * len(limits) < 600  # the 10-minute bound, grace included


def test_dry_run_options(tmp_path, fake):
    py, env, log = fake
    env = {**env, "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    res = _script("--dry-run", "--python", py, "--full", "--budget", "1050",
                  "--providers", "sdpa_flash, flex", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "nvidia-smi       skipped: nvidia-smi not found" in res.stdout
    assert "sm_XX" in res.stdout  # the arch is detected at run time
    steps = _dry_lines(res.stdout)
    assert "nvidia-smi" not in steps and list(steps) == STEPS[1:]
    # the default folder: a UTC timestamp, relative to the working directory (not created)
    folder = steps["validate"][2].split("/")[0]
    assert folder.startswith("gpu-day-20") and folder.endswith("Z") and len(folder) == len("gpu-day-20261206T215036Z")
    assert not (tmp_path / folder).exists() and _calls(log) == []
    assert steps["validate"][1][3:] == ["validate"]  # --full: no --quick
    assert steps["bench-gpt"][1][3:] == ["bench", "--op", "gpt", "--out", f"{folder}/bench/gpt",
                                         "--providers", "sdpa_flash", "flex"]
    # --budget 1050: twice the default limits
    assert {n: lim for n, (lim, _, _) in steps.items()} == {
        n: 2 * lim for n, lim in DEFAULT_LIMITS.items() if n in steps}


def test_python_from_the_environment(tmp_path, fake):
    py, env, _ = fake
    res = _script("--dry-run", env={**env, "PYTHON": py}, cwd=tmp_path)
    assert res.returncode == 0 and _dry_lines(res.stdout)["validate"][1][0] == py


def _run(tmp_path, fake, *args, budget="100", **fake_env):
    """A run against the stand-in Python; --budget 100: limits of 1 s (nvidia-smi, git) to 25 s."""
    py, env, log = fake
    out = tmp_path / "results"
    res = _script("--python", py, "--out", str(out), "--budget", budget, *args,
                  env={**env, **fake_env})
    return res, out, _calls(log)


def test_a_run_writes_one_folder_with_a_summary(tmp_path, fake):
    res, out, calls = _run(tmp_path, fake)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = _summary(out)
    assert list(rows) == STEPS
    in_git = (SCRIPT.parents[1] / ".git").exists()  # else the git step is skipped
    assert rows.pop("git")[:2] == (("ok", "0") if in_git else ("skipped", "-"))
    assert all(status == "ok" and rc == "0" for status, rc, *_ in rows.values()), rows
    text = (out / "summary.txt").read_text()
    assert "device: Fake GPU 80GB (compute capability 9.0)" in text
    assert "result: all 11 steps passed" in text
    assert (out / "env" / "device.txt").read_text().startswith("cuda_available: True\n")
    assert (out / "env" / "nvidia-smi.txt").read_text().startswith("NVIDIA-SMI fake\n")
    assert (out / "validate.txt").read_text().startswith("validate output\n")
    assert "# gpu_day.sh: validate exit 0 after" in (out / "validate.txt").read_text()
    if in_git:
        assert len((out / "env" / "git.txt").read_text().split()[0]) >= 40  # the commit measured
    for op in OPS:
        assert (out / "bench" / op).is_dir() and (out / "bench" / f"{op}.log").is_file()
    # the stand-in was called for the check, versions, collect_env, pip, validate, 4 benches, inspect
    assert [c[:3] for c in calls if c[0] == "-m"] == [
        ["-m", "torch.utils.collect_env"], ["-m", "pip", "freeze"],
        ["-m", "tritformer", "validate"]] + [["-m", "tritformer", "bench"]] * 4 + [
        ["-m", "tritformer", "inspect"]]
    assert calls[-1][calls[-1].index("--arch") + 1] == "sm_90"
    assert res.stdout.rstrip().endswith("result: all 11 steps passed")


def test_a_failing_step_does_not_stop_the_others(tmp_path, fake):
    # --budget 10: every limit 1 s (validate, bench-attention 2 s), the stand-in's calls take 0.1 s
    res, out, calls = _run(tmp_path, fake, FAKE_RC_VALIDATE="1", FAKE_RC_INSPECT="3",
                           FAKE_SLOW="masked", budget="10")
    assert res.returncode == 1
    rows = _summary(out)
    assert list(rows) == STEPS
    assert rows["validate"][:2] == ("FAILED", "1")
    assert rows["inspect"][:2] == ("FAILED", "3")
    # the masked sweep outran its limit (1 s at --budget 10): SIGINT, as bench gets it
    assert rows["bench-masked"][:2] == ("TIMEOUT", "124") and rows["bench-masked"][3] == "1"
    assert Path(str(fake[2]) + ".interrupted").read_text() == "masked"
    assert all(rows[s][0] in ("ok", "skipped") for s in STEPS
               if s not in ("validate", "inspect", "bench-masked"))
    assert [c[c.index("--op") + 1] for c in calls if c[2:3] == ["bench"]] == list(OPS)
    assert "result: 3 of 11 steps did not pass: validate bench-masked inspect" in \
        (out / "summary.txt").read_text()


@pytest.mark.parametrize("capability, arch", [("8.0", "sm_80"), ("8.6", "sm_86"), ("8.7", "sm_86"),
                                              ("8.9", "sm_89"), ("9.0", "sm_90"), ("10.0", "sm_90"),
                                              ("12.0", "sm_120")])
def test_inspect_arch_follows_the_device(tmp_path, fake, capability, arch):
    res, out, calls = _run(tmp_path, fake, FAKE_CAPABILITY=capability)
    assert res.returncode == 0, res.stdout
    inspect = [c for c in calls if c[2:3] == ["inspect"]]
    assert len(inspect) == 1 and inspect[0][inspect[0].index("--arch") + 1] == arch
    # the registry's config family of that capability is the one inspected
    major, minor = map(int, capability.split("."))
    assert int(arch[3:]) == _launch.arch_family(major * 10 + minor) or arch == "sm_89"


def test_arch_option_wins(tmp_path, fake):
    res, out, calls = _run(tmp_path, fake, "--arch", "sm_80", FAKE_CAPABILITY="9.0")
    assert res.returncode == 0
    assert calls[-1][calls[-1].index("--arch") + 1] == "sm_80"


# The step's own exit status is recorded whether it is still running when the trapped signal
# ends the script's `wait` early (no delay) or has already exited and been reaped by then (a
# delay in the trap, as a loaded machine gives: CI once recorded the wait's 143 instead).
@pytest.mark.parametrize("trap_delay", ["", "1"], ids=["step-running", "step-reaped"])
def test_sigterm_stops_the_running_step_and_the_rest(tmp_path, fake, trap_delay):
    py, env, log = fake
    out = tmp_path / "results"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--python", py, "--out", str(out)],
                            env={**env, "FAKE_SLOW": "attention",
                                 "GPU_DAY_TEST_TRAP_DELAY": trap_delay}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "bench" / "attention.log").exists() or \
                "measuring" not in (out / "bench" / "attention.log").read_text():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    # the step got SIGINT (bench: a partial report, exit 130), not its 130 s limit
    assert Path(str(log) + ".interrupted").read_text() == "attention"
    rows = _summary(out)
    assert rows["bench-attention"][:2] == ("interrupted", "130")
    assert [rows[s][0] for s in ("bench-masked", "bench-varlen", "bench-gpt", "inspect")] == ["not-run"] * 4
    assert "result: interrupted (SIGTERM)" in (out / "summary.txt").read_text()
    assert [c[c.index("--op") + 1] for c in _calls(log) if c[2:3] == ["bench"]] == ["attention"]


def test_script_provider_list_is_the_clis():
    text = SCRIPT.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ALL_PROVIDERS=("))
    assert tuple(line[len("ALL_PROVIDERS=("):-1].split()) == BENCH_PROVIDERS
    line = next(ln for ln in text.splitlines() if ln.startswith("ARCHS=("))
    archs = line[len("ARCHS=("):line.index(")")].split()
    inspect_arch = next(a for a in _parser()._subparsers._group_actions[0].choices["inspect"]._actions
                        if a.dest == "arch")
    assert archs == list(inspect_arch.choices)


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


# ---------------------------------------------------------------------------------------------
# kernels/_launch: what `run` does for compiled (CUDA) kernels
# ---------------------------------------------------------------------------------------------
class _Compiled:
    """A compiled kernel (not an InterpretedFunction): kernel[grid](*args, **kwargs)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs, _launch.INTERPRETER_LOCK._is_owned()))
        return launch


def _plan(fn, configs, n=100):
    return _launch.Launch(name="k", fn=fn, args={"x": "X", "n": n, "h": 4}, constexprs={"CAUSAL": True},
                          grid=lambda meta: (meta["BLOCK_M"] * 2,), configs=configs,
                          tune_key=["n", "h"], bucketed=("n",))


CFG_A = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3)
CFG_B = triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=2)


@pytest.fixture
def autotune(monkeypatch):
    """triton.autotune replaced: records (configs, key) and returns recording tuners."""
    made = []

    class Tuner(_Compiled):
        def __init__(self, fn, configs, key):
            super().__init__()
            self.fn, self.configs, self.key = fn, configs, key

    def fake_autotune(configs, key, **kw):
        assert kw == {}

        def wrap(fn):
            made.append(Tuner(fn, configs, key))
            return made[-1]
        return wrap
    monkeypatch.setattr(_launch, "_TUNERS", {})
    monkeypatch.setattr(triton, "autotune", fake_autotune)
    return made


def test_compiled_single_config_gets_warps_and_stages_without_the_interpreter_lock(autotune):
    fn = _Compiled()
    _launch.run(_plan(fn, [CFG_A]))
    assert fn.calls == [((128,), ("X", 100, 4),
                         {"CAUSAL": True, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3}, False)]
    assert autotune == []


def test_interpreted_launch_takes_the_first_config_under_the_lock(autotune):
    from triton.runtime.interpreter import InterpretedFunction

    class Interpreted(InterpretedFunction, _Compiled):
        def __init__(self):
            _Compiled.__init__(self)
        __getitem__ = _Compiled.__getitem__

    fn = Interpreted()
    assert _launch.is_interpreted(fn) and not _launch.is_interpreted(_Compiled())
    _launch.run(_plan(fn, [CFG_B, CFG_A]))  # several candidates: still no autotuner
    assert fn.calls == [((64,), ("X", 100, 4), {"CAUSAL": True, "BLOCK_M": 32}, True)]
    assert autotune == []


def test_compiled_several_configs_go_through_one_autotuner_per_bucket(autotune):
    fn = _Compiled()
    for n in (100, 120, 127, 200):
        _launch.run(_plan(fn, [CFG_A, CFG_B], n))
    assert fn.calls == []  # only through the tuners
    assert len(autotune) == 2  # buckets 128 (100, 120, 127) and 256 (200)
    first, second = autotune
    assert first.fn is fn and first.configs == [CFG_A, CFG_B]
    # Triton's key: the exact names and every constexpr; n enters bucketed, in ours
    assert first.key == ["h", "CAUSAL"]
    assert [args for _, args, _, _ in first.calls] == [("X", 100, 4), ("X", 120, 4), ("X", 127, 4)]
    assert [args for _, args, _, _ in second.calls] == [("X", 200, 4)]
    for grid, _, kwargs, locked in first.calls + second.calls:
        # the tuner gets the grid function (it calls it with each config) and the constexprs only
        assert kwargs == {"CAUSAL": True} and grid({"BLOCK_M": 16}) == (32,) and not locked
    assert sorted(key[3] for key in _launch._TUNERS) == [(("n", 128),), (("n", 256),)]
    _launch.run(_plan(fn, [CFG_B, CFG_A], 100))  # other candidates: another tuner
    assert len(autotune) == 3


@pytest.mark.parametrize("capability, arch, family", [((8, 0), 80, 80), ((8, 6), 86, 86),
                                                      ((8, 9), 89, 86), ((9, 0), 90, 90),
                                                      ((10, 0), 100, 90), ((12, 0), 120, 120)])
def test_device_arch_of_a_cuda_tensor(monkeypatch, capability, arch, family):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: seen.append(d) or capability)
    t = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert _launch.device_arch(t) == arch and _launch.arch_family(arch) == family
    assert seen == [torch.device("cuda", 1)]
    assert _launch.device_arch(torch.empty(0)) is None and len(seen) == 1  # CPU: no device query


# ---------------------------------------------------------------------------------------------
# bench: timing, memory, machine info, device setup, providers on CUDA
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def do_bench(monkeypatch):
    seen = []

    def fake(fn, quantiles=None, **kw):
        seen.append((fn, quantiles, kw))
        return [1.5, 1.25, 2]  # ms at the quantiles asked (an int among them)
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    return seen


@pytest.fixture
def cuda_memory(monkeypatch):
    """torch.cuda's memory stats: 1000 bytes live before the call, a peak of 5000 during it."""
    events = []
    stats = {"memory_allocated": 1000, "max_memory_allocated": 5000}
    for name in ("synchronize", "reset_peak_memory_stats", *stats):
        monkeypatch.setattr(torch.cuda, name,
                            lambda *a, name=name: events.append(name) or stats.get(name))
    return events


def test_time_ms_on_cuda_is_do_bench_at_the_median_p20_p80(do_bench):
    calls = []
    fn = lambda: calls.append(1)
    for adaptive in (False, True):  # CPU's adaptive timing does not apply on CUDA
        res = bench.time_ms(fn, "cuda", reps=7, adaptive=adaptive)
        assert res == (1.5, 1.25, 2.0) and all(type(x) is float for x in res)
    assert do_bench == [(fn, [0.5, 0.2, 0.8], {})] * 2
    assert calls == []  # do_bench (stubbed) makes the calls, not time_ms


def test_peak_bytes_on_cuda_from_the_allocator_stats(cuda_memory):
    fn = lambda: cuda_memory.append("fn")
    assert bench.peak_bytes(fn, "cuda") == 4000
    assert cuda_memory == ["synchronize", "memory_allocated", "reset_peak_memory_stats", "fn",
                           "synchronize", "max_memory_allocated"]


def test_timed_rows_on_cuda_add_tflops(do_bench, cuda_memory):
    rows = []
    core._timed_rows("attention", "tritformer", "triton", "cuda", {"fwd": lambda: None}, "seqlen",
                     1024, dict(batch=1, heads=2, head_dim=64, causal=True), "bf16", rows.append, 3,
                     flops={"fwd": 3e12}, bytes_moved={"fwd": 6e9}, max_error=0.01)
    got = {r["metric"]: (r["value"], r["p20"], r["p80"], r["unit"]) for r in rows}
    assert got["max_error"] == (0.01, None, None, "abs")
    assert got["latency"] == (1.5, 1.25, 2.0, "ms")
    # the fast end of the latency (p20) is the high end of the throughput (p80)
    assert got["tflops"][:3] == pytest.approx((2000.0, 1500.0, 2400.0)) and got["tflops"][3] == "TFLOP/s"
    assert got["gbps"][:3] == pytest.approx((4000.0, 3000.0, 4800.0)) and got["gbps"][3] == "GB/s"
    assert got["peak_memory"] == (4000, None, None, "bytes")
    assert {r["mode"] for r in rows} == {"fwd"} and {r["dtype"] for r in rows} == {"bf16"}


def test_timed_rows_on_cpu_have_no_tflops(monkeypatch):
    monkeypatch.setattr(core, "time_ms", lambda fn, device, reps, adaptive: (1.0, 1.0, 1.0))
    monkeypatch.setattr(core, "peak_bytes", lambda fn, device: 10)
    rows = []
    core._timed_rows("attention", "naive", "pytorch", "cpu", {"fwd": lambda: None}, "seqlen", 64,
                     {}, "fp32", rows.append, 3, flops={"fwd": 3e12}, bytes_moved={"fwd": 6e9})
    assert [r["metric"] for r in rows] == ["latency", "peak_memory"]


def test_machine_info_on_cuda_names_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    info = bench.machine_info("cuda")
    assert info["device"] == "NVIDIA H100 80GB HBM3"
    assert (info["torch"], info["triton"]) == (torch.__version__, triton.__version__)
    assert bench.device_peak(info["device"], "bf16") == (989.4, 3350.0)
    assert bench.machine_info("cpu")["device"].startswith("cpu (")


def test_setup_device_on_cuda_leaves_the_interpreter_off(monkeypatch):
    from tritformer import _interp_patch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_interp_patch, "apply", lambda: pytest.fail("interpreter set up on CUDA"))
    before = dict(os.environ)
    assert bench.setup_device() == "cuda"
    assert dict(os.environ) == before


@pytest.mark.parametrize("capability, arch", [((9, 0), "sm_90"), ((8, 0), "sm_80")])
def test_inspect_command_on_cuda(monkeypatch, capability, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    cmd = bench.inspect_command(["attention", "varlen"], "cuda")
    assert cmd == ["inspect", "--op", "attention", "varlen", "--arch", arch, "--head-dim", "64",
                   "128", "--dtype", "bf16"]


@pytest.mark.parametrize("installed", [False, True])
def test_providers_on_cuda_flash_attn_when_installed(monkeypatch, installed):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn"
                        else real(name, *a))
    for dtype, off in [(torch.bfloat16, {}),
                       (torch.float32, {"sdpa_flash": "sdpa_flash takes fp16/bf16 only",
                                        "sdpa_cudnn": "sdpa_cudnn takes fp16/bf16 only",
                                        "flash_attn": "flash_attn takes fp16/bf16 only"})]:
        if not installed:
            off = {**off, "flash_attn": "flash_attn is not installed"}
        skipped = {}
        active = core._active_providers(bench.attention_providers(), BENCH_PROVIDERS, "cuda", dtype,
                                        skipped, "attention")
        assert [p.name for p in active] == [p for p in BENCH_PROVIDERS if p not in off]
        assert skipped == {f"attention {name}": why for name, why in off.items()}
    # the masked and varlen sweeps: the same rule for their flash_attn variants
    for table in (bench.masked_providers("padding"), bench.varlen_providers()):
        reason = table["flash_attn"].why_not("cuda", torch.bfloat16)
        assert reason == (None if installed else "flash_attn is not installed")
        assert table["flash_attn"].why_not("cpu", torch.bfloat16) == "flash_attn runs on CUDA only"
