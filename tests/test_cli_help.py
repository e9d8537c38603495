"""The command line's surface: defaults in every --help, --version, a --help that imports no
torch, the warm-up clamp, the progress output (total and ETA), validate's ratio column."""
import argparse
import io
import os
import re
import subprocess
import sys

import pytest

from tritformer import _cliargs, cli, progress
from tritformer.numerics import Check

COMMANDS = ("bench", "validate", "inspect", "train", "generate")


def _run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "--quick", "--help"],
                                  ["--version"]])
def test_help_and_version_import_no_torch(argv):
    # -X importtime lists every module the process imported (on stderr)
    res = _run("-X", "importtime", "-m", "tritformer", *argv)
    assert res.returncode == 0, res.stderr[-3000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
               if line.startswith("import time:")}
    assert "tritformer.cli" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "triton", "numpy")
                   or m.startswith("tritformer.bench") or m.startswith("tritformer.ops"))
    assert not heavy, heavy[:20]


def test_version():
    res = _run("-m", "tritformer", "--version")
    import tritformer
    assert res.returncode == 0 and res.stdout.strip() == f"tritformer {tritformer.__version__}"


def test_every_option_with_a_default_shows_it():
    parser = cli._parser()
    subs = _subparsers(parser)
    assert set(subs) == set(COMMANDS)
    for name, sub in subs.items():
        assert isinstance(sub._get_formatter(), _cliargs.HelpFormatter), name
        fmt = sub._get_formatter()
        for action in sub._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS:
                continue
            assert "default" in fmt._get_help_string(action), (name, action.option_strings)
    text = " ".join(subs["train"].format_help().split())  # one line: argparse wraps
    assert "optimiser steps in total (default: 2000)" in text
    assert "--warmup WARMUP warm-up steps" in text and "(default: 100)" in text
    assert "(default: fp16 bf16 fp32)" in " ".join(subs["validate"].format_help().split())
    assert "(default: all)" in " ".join(subs["bench"].format_help().split())


def test_dtype_names():
    parse = cli._parser().parse_args
    assert parse(["validate"]).dtype == ["fp16", "bf16", "fp32"]
    assert parse(["train"]).dtype == "fp32"
    # train's older spellings still work, as the one name
    assert parse(["train", "--dtype", "bfloat16"]).dtype == "bf16"
    assert parse(["train", "--dtype", "float32"]).dtype == "fp32"
    with pytest.raises(SystemExit):
        parse(["train", "--dtype", "float16"])


def test_bench_providers_are_the_clis():
    from tritformer import bench
    assert bench.PROVIDERS == _cliargs.BENCH_PROVIDERS


def test_warmup_clamped_with_a_note():
    from tritformer import train
    args = cli._parser().parse_args(["train", "--steps", "50", "--warmup", "100"])
    note = train.clamp_warmup(args)
    assert args.warmup == 10 and "--warmup 100" in note and "10 steps" in note
    assert train.lr_at(9, args) < args.lr and train.lr_at(10, args) == pytest.approx(args.lr)
    args = cli._parser().parse_args(["train"])  # the defaults: 100 of 2000, within 20%
    assert train.clamp_warmup(args) is None and args.warmup == 100


def test_train_prints_the_note_and_progress_with_total_and_eta(tmp_path, capsys):
    # PyTorch backends: no interpreter, a second
    from tritformer import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(32, 127)) * 40)
    args = cli._parser().parse_args(
        ["train", "--data", str(corpus), "--steps", "4", "--warmup", "100", "--batch-size", "2",
         "--eval-interval", "0", "--eval-iters", "1", "--log-interval", "2", "--block-size", "16",
         "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--attn-backend", "sdpa",
         "--mlp-backend", "torch", "--out", str(tmp_path / "out")])
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "note: --warmup 100 is more than 20% of --steps 4; warming up over 1 step instead" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert re.search(r"\| ETA \d+s$", lines[0]) and re.search(r"\| val \d\.\d+ \| done in \d+s$", lines[1])


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_with_eta():
    out = io.StringIO()
    bar = progress.ProgressBar(4, desc="validate", stream=out, every=2)
    for i in range(4):
        bar.update(postfix=f"case {i}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"validate \[2/4\] \d+s, ETA \d+s  case 1", lines[0]), lines
    assert re.fullmatch(r"validate \[4/4\] \d+s, done  case 3", lines[1]), lines


def test_progress_on_a_terminal_without_tqdm_redraws_one_line():
    out = _Tty()
    bar = progress.ProgressBar(3, stream=out, use_tqdm=False)
    for _ in range(3):
        bar.update(postfix="x")
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[3/3]" in text


def test_progress_uses_tqdm_on_a_terminal():
    pytest.importorskip("tqdm")
    out = _Tty()
    bar = progress.ProgressBar(5, desc="train", unit="step", stream=out)
    assert bar.uses_tqdm
    for _ in range(5):
        bar.update(postfix="loss 1.0")
    bar.close()
    assert "5/5" in out.getvalue() and "loss 1.0" in out.getvalue()


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (None, 0.4, 42, 185, 3725)] == ["?", "0s", "42s", "3m05s", "1h02m"]


def test_check_says_exact_where_pytorch_is_exact():
    exact = Check("out", error=1e-8, baseline=0.0, bound=2e-8)
    assert exact.ratio_text == "exact" and "ratio exact" in str(exact) and "ratio inf" not in str(exact)
    c = Check("out", error=3e-4, baseline=2e-4, bound=4e-4)
    assert c.ratio_text == "1.50" and "ratio 1.50" in str(c)  # the numbers as before


def test_validate_estimate_counts_the_cases():
    from tritformer import validate
    quick, full = validate.grid(["fp16"], True), validate.grid(["fp16", "bf16", "fp32"], False)
    est = validate.estimate_seconds(quick, interpreting=True)
    assert 0 < est < validate.estimate_seconds(full, interpreting=True)
    assert validate.estimate_seconds(quick, interpreting=False) == validate.GPU_SECONDS_PER_CASE * len(quick)
