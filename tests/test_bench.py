"""The benchmark harness (tritformer.bench): formulas, the CPU memory measurement, the CLI."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import tritformer
from tritformer import bench, reference


@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 9), (9, 5), (1, 1), (3, 1)])
def test_visible_pairs_match_the_causal_mask(nq, nk):
    # bottom-right aligned, including Nq > Nk (leading rows see nothing)
    assert bench.visible_pairs(nq, nk, True) == int(reference.causal_mask(nq, nk).sum())
    assert bench.visible_pairs(nq, nk, False) == nq * nk


def test_attention_flops():
    fwd = bench.attention_flops(2, 3, 64, 64, 32, False, "fwd")
    assert fwd == 4 * 2 * 3 * 64 * 64 * 32
    assert bench.attention_flops(2, 3, 64, 64, 32, False, "bwd") == 2.5 * fwd
    assert bench.attention_flops(2, 3, 64, 64, 32, False, "fwd_bwd") == 3.5 * fwd
    assert bench.attention_flops(2, 3, 64, 64, 32, True, "fwd") == 4 * 2 * 3 * (64 * 65 // 2) * 32


def test_cpu_peak_bytes_sees_transient_allocations():
    mib = 1 << 20

    def two_live_then_one():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)  # peak: a + b live together
        del a
        return b

    peak = bench.peak_bytes(two_live_then_one, "cpu")
    assert 3 * mib <= peak < 3 * mib + 64 * 1024, peak


def test_fused_forward_memory_is_linear_naive_quadratic():
    # what the calls allocate on CPU: the fused kernel only its output and lse (tiles stay on
    # chip), naive attention the N x N scores; doubling N doubles one and quadruples the other
    def peaks(n):
        q = torch.randn(1, 1, n, 64)
        with torch.no_grad(), bench._large_interpreter_tiles():
            fused = bench.peak_bytes(lambda: tritformer.attention(q, q, q, causal=True), "cpu")
        naive = bench.peak_bytes(lambda: reference.attention(q, q, q, causal=True), "cpu")
        return fused, naive

    (f1, n1), (f2, n2) = peaks(256), peaks(512)
    out_lse = lambda n: n * 64 * 4 + n * 4  # noqa: E731
    assert (f1, f2) == (out_lse(256), out_lse(512))  # exactly: no hidden copy, no N x N buffer
    assert n1 >= 256 * 256 * 4 and 3.5 < n2 / n1 < 4.5, (n1, n2)


def test_bench_cli_writes_tidy_rows_and_plots(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI sets the interpreter up itself on CPU
    out = tmp_path / "res"
    res = subprocess.run([sys.executable, "-m", "tritformer", "bench", "--quick", "--op", "attention",
                          "--providers", "naive", "sdpa", "flash_attn", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "skipped flash_attn: flash_attn runs on CUDA only" in res.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == bench.COLUMNS
    assert json.loads((out / "results.json").read_text()) and len(json.loads(
        (out / "results.json").read_text())) == len(rows)
    assert {r["provider"] for r in rows} == {"naive", "sdpa"}
    assert {r["metric"] for r in rows} == {"latency", "peak_memory", "max_error"}  # no TFLOP/s on CPU
    assert all(float(r["value"]) < 1e-5 for r in rows if r["metric"] == "max_error")
    sweep = {int(r["x_value"]): float(r["value"]) for r in rows if r["provider"] == "naive"
             and r["metric"] == "peak_memory" and r["batch"] == "1" and r["heads"] == "1"}
    assert sweep[8192] > 500 * 2**20  # naive causal attention at N = 8192 allocates N^2 scores
    pytest.importorskip("matplotlib")
    assert (out / "attention_peak_memory_fwd_d64_seqlen_sweep.png").stat().st_size > 10_000


def test_ffn_rows_measure_what_recompute_saves():
    # in-process (the interpreter is on in tests): saved_bytes = what autograd keeps between
    # forward and backward; recompute drops pre-activation and activation, 2 * M * hidden * 4 B
    rows, skipped = bench.run(ops=("ffn", "softmax"), quick=True, out_dir=None,
                              providers=("naive", "tritformer"))
    saved = {r["provider"]: r["value"] for r in rows if r["metric"] == "saved_bytes"}
    assert saved["tritformer"] - saved["tritformer_recompute"] == 2 * 64 * 256 * 4
    assert {r["op"] for r in rows} == {"ffn", "softmax"}
    errors = [r for r in rows if r["metric"] == "max_error"]
    assert errors and all(r["value"] < 1e-5 for r in errors)
