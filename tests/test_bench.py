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


@pytest.fixture(autouse=True)
def _short_adaptive_timings(monkeypatch):
    # PyTorch providers' CPU timings repeat for CPU_MIN_RUN_TIME s each; these tests check rows,
    # not timings
    monkeypatch.setattr(bench.core, "CPU_MIN_RUN_TIME", 0.02)


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
        with torch.no_grad(), bench.interpreter_tiles():
            fused = bench.peak_bytes(lambda: tritformer.attention(q, q, q, causal=True), "cpu")
        naive = bench.peak_bytes(lambda: reference.attention(q, q, q, causal=True), "cpu")
        return fused, naive

    (f1, n1), (f2, n2) = peaks(256), peaks(512)
    # fp32: out, lse and lse's rounding residual (kept for the backward; kernels/attention)
    out_lse = lambda n: n * 64 * 4 + 2 * n * 4
    assert (f1, f2) == (out_lse(256), out_lse(512))  # exactly: no hidden copy, no N x N buffer
    assert n1 >= 256 * 256 * 4 and 3.5 < n2 / n1 < 4.5, (n1, n2)


@pytest.mark.integration  # one interpreted forward in a fresh process (~10 s)
def test_pytest_benchmarks_alone_sets_the_interpreter_up(tmp_path):
    # `pytest benchmarks/` without tests/conftest.py: benchmarks/conftest.py must set
    # TRITON_INTERPRET before triton is imported, or the kernels' tl.zeros fails ("Cannot call
    # @triton.jit'd outside of the scope of a kernel"), as it did
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--benchmark-disable", "--rootdir", root,
                          os.path.join(root, "benchmarks", "test_bench_attention.py")
                          + "::test_attention[tritformer-fwd-full]"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-3000:]


def test_bench_cli_writes_tidy_rows_and_plots(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI sets the interpreter up itself on CPU
    env["TRITFORMER_BENCH_MIN_RUN_TIME"] = "0.02"  # rows are checked here, not timings
    out = tmp_path / "res"
    res = subprocess.run([sys.executable, "-m", "tritformer", "bench", "--quick", "--op", "attention",
                          "--providers", "naive", "sdpa", "flash_attn", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "skipped flash_attn: runs on CUDA only (1 op: attention)" in res.stdout
    assert "attention flash_attn: flash_attn runs on CUDA only" in (out / "skips.txt").read_text()
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
    steps = []
    rows, skipped = bench.run(ops=("ffn", "softmax"), quick=True, out_dir=None,
                              providers=("naive", "tritformer"), progress=steps.append)
    # the progress bar's total: each sweep declares its case count
    assert len(steps) == bench.planned_cases(("ffn", "softmax"), "cpu", True,
                                             ("naive", "tritformer")) == 3 + 3 * 2
    saved = {r["provider"]: r["value"] for r in rows if r["metric"] == "saved_bytes"}
    assert saved["tritformer"] - saved["tritformer_recompute"] == 2 * 64 * 256 * 4
    assert {r["op"] for r in rows} == {"ffn", "softmax"}
    errors = [r for r in rows if r["metric"] == "max_error"]
    assert errors and all(r["value"] < 1e-5 for r in errors)


# ---------------------------------------------------------------------------------------------
# masked and varlen ops
# ---------------------------------------------------------------------------------------------
def _keep(b, h, nq, nk, causal, attn_mask=None, kpm=None):
    """Brute force: the mask the reference applies, materialised to [B, H, Nq, Nk]."""
    keep = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if causal:
        keep &= reference.causal_mask(nq, nk)
    if attn_mask is not None:
        keep &= attn_mask
    if kpm is not None:
        keep &= ~kpm[:, None, None, :]
    return keep


@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 9), (9, 5), (1, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_visible_pairs_count_what_the_masks_leave(nq, nk, causal):
    gen = torch.Generator().manual_seed(nq * 31 + nk)
    kpm = torch.rand(3, nk, generator=gen) < 0.3
    dense = torch.rand(3, 1, nq, nk, generator=gen) < 0.6  # broadcast over 2 heads
    for am, kp in ((None, None), (None, kpm), (dense, None), (dense, kpm)):
        want = int(_keep(3, 2, nq, nk, causal, am, kp).sum())
        assert bench.masked_visible_pairs(3, 2, nq, nk, causal, am, kp) == want
    assert bench.masked_flops(3, 2, nq, nk, 16, causal, "bwd", dense, kpm) == (
        2.5 * 4 * 16 * int(_keep(3, 2, nq, nk, causal, dense, kpm).sum()))
    # no mask: the attention formula
    assert bench.masked_flops(3, 2, nq, nk, 16, causal, "fwd") == bench.attention_flops(
        3, 2, nq, nk, 16, causal, "fwd")


def test_mask_cases_pad_a_quarter_and_keep_every_row_visible():
    lengths = bench.padded_lengths(4096, 64, seed=0)
    assert lengths.min() >= 32 and lengths.max() <= 64
    assert 0.2 < 1 - lengths.float().mean() / 64 < 0.3
    case = bench.mask_case("padding", 3, 40, "cpu", seed=2)
    assert case.attn_mask is None
    assert (case.key_padding_mask.sum(1) == 40 - case.lengths).all()
    dense = bench.mask_case("dense", 2, 40, "cpu", seed=2).attn_mask
    assert dense.shape == (2, 1, 40, 40) and dense.dtype == torch.bool
    assert dense.diagonal(dim1=-2, dim2=-1).all() and (dense == dense.transpose(-1, -2)).all()
    assert not dense.all()  # more than one document per row


def test_varlen_lengths_and_flops():
    lengths = bench.varlen_lengths(1000, 128, seed=3)
    assert sum(lengths) == 1000 and max(lengths) == 128
    assert sorted(lengths)[1] >= 32  # all but the cut last one within [max/4, max]
    assert bench.varlen_visible_pairs([3, 5], [3, 5], True) == 6 + 15
    assert bench.varlen_visible_pairs([2, 4], [5, 4], False) == 10 + 16
    assert bench.varlen_flops([3, 5], [3, 5], 4, 8, True, "fwd_bwd") == 3.5 * 4 * 4 * 21 * 8
    # the packed sequences as one block-diagonal mask count the same pairs
    pk = bench.packing([3, 5, 2], [3, 5, 2], "cpu")
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 5, 2]))
    block = (doc[:, None] == doc[None, :]) & reference.causal_mask(10, 10)
    assert bench.varlen_visible_pairs(pk.seqlens_q, pk.seqlens_k, True) == int(block.sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [([3, 7, 1], [3, 7, 1]), ([2, 5], [4, 6])])
def test_varlen_sdpa_provider_pads_and_unpads(lq, lk, causal):
    # SDPA over the padded batch returns the packed result of the per-sequence reference
    pk = bench.packing(lq, lk, "cpu")
    q, k, v = bench._packed_qkv(pk, 2, 8, torch.float64, "cpu", grad=False)
    out = bench.varlen_providers()["sdpa"].fn(q, k, v, causal, pk)
    ref = reference.varlen_attention(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, causal=causal)
    torch.testing.assert_close(out, ref)


def test_flash_attn_wrappers_with_a_stand_in(monkeypatch):
    # flash_attn runs on CUDA only; its wrappers' layout work (unpad, pad back) is checked here
    # against a stand-in flash_attn_varlen_func with flash_attn's signature and conventions
    import types

    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        return reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen_func))
    case = bench.mask_case("padding", 3, 20, "cpu", seed=4)
    q, k, v = bench._qkv(3, 2, 20, 8, torch.float64, "cpu", grad=False)
    for causal in (False, True):
        out = bench._masked_flash_attn(q, k, v, causal, case)
        ref = reference.attention(q, k, v, causal=causal, key_padding_mask=case.key_padding_mask)
        valid = ~case.key_padding_mask[:, None, :, None]
        torch.testing.assert_close(out * valid, ref * valid)
        assert (out.masked_fill(valid, 0) == 0).all()
    pk = bench.packing([4, 9, 2], [4, 9, 2], "cpu")
    q, k, v = bench._packed_qkv(pk, 2, 8, torch.float64, "cpu", grad=False)
    torch.testing.assert_close(bench._varlen_flash_attn(q, k, v, True, pk),
                               reference.varlen_attention(q, k, v, pk.cu_seqlens_q,
                                                          pk.cu_seqlens_k, causal=True))


def test_reference64_in_chunks_equals_one_call():
    case = bench.mask_case("dense", 2, 24, "cpu", seed=5)
    q, k, v = bench._qkv(2, 4, 24, 8, torch.float32, "cpu", grad=False)
    whole = reference.attention(q.double(), k.double(), v.double(), causal=True,
                                attn_mask=case.attn_mask)
    chunked = bench._reference64(q, k, v, True, case.attn_mask, budget=24 * 24 * 8 * 2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_masked_and_varlen_rows(monkeypatch):
    # a tiny in-process run (the interpreter is on in tests): tidy rows, every provider's error
    # against float64 small, memory sweep rows at B = H = 1, no TFLOP/s on CPU
    tiny = lambda *a, **kw: bench.AttentionSweep((32,), 64, (16,), 16, "fp32", causal=(True,),
                                                 memory_seqlens=(64, 128), reps=1)
    monkeypatch.setattr(bench.masked, "masked_sweep", tiny)
    monkeypatch.setattr(bench.varlen, "varlen_sweep", lambda *a, **kw: bench.AttentionSweep(
        (32,), 80, (16,), 32, "fp32", reps=1))
    steps = []
    rows, skipped = bench.run(ops=("masked", "varlen"), quick=True, out_dir=None,
                              providers=bench.PROVIDERS, progress=steps.append)
    assert len(steps) == bench.planned_cases(("masked", "varlen"), "cpu", True,
                                             bench.PROVIDERS) == 2 * 3 * (1 + 2) + 3 * 2
    assert all(tuple(r) == bench.COLUMNS for r in rows)
    assert {r["op"] for r in rows} == {"masked_padding", "masked_dense", "varlen"}
    assert {r["provider"] for r in rows} == {"naive", "sdpa", "tritformer"}
    assert {r["metric"] for r in rows} == {"latency", "peak_memory", "max_error"}
    assert skipped["masked_dense flash_attn"] == "flash_attn takes no dense attn_mask"
    assert skipped["varlen flash_attn"] == "flash_attn runs on CUDA only"
    assert {r["backend"] for r in rows if r["provider"] == "tritformer"} == {"triton-interpreter"}
    errors = [r for r in rows if r["metric"] == "max_error"]
    assert len(errors) == 2 * 3 + 3 * 2 and all(r["value"] < 1e-5 for r in errors)
    for r in rows:
        assert r["x_name"] == ("max_seqlen" if r["op"] == "varlen" else "seqlen")
        assert r["mode"] in bench.MODES and r["value"] is not None
    varlen = [r for r in rows if r["op"] == "varlen"]
    assert {r["causal"] for r in varlen} == {False, True} and {r["x_value"] for r in varlen} == {32}
    assert {r["batch"] for r in varlen} == {len(bench.varlen_lengths(80, 32, seed=32))}
    sweep = {(r["op"], r["provider"], r["x_value"]): r["value"] for r in rows
             if r["metric"] == "peak_memory" and r["batch"] == 1 and r["heads"] == 1}
    assert len(sweep) == 2 * 3 * 2
    # the fused kernel allocates out and lse only; naive the scores, which grow 4x from 64 to 128
    for op in ("masked_padding", "masked_dense"):
        out_lse = 128 * 16 * 4 + 128 * 4
        assert out_lse <= sweep[(op, "tritformer", 128)] < out_lse + 2048  # no N x N buffer
        assert sweep[(op, "tritformer", 128)] < 2.2 * sweep[(op, "tritformer", 64)]
        assert sweep[(op, "naive", 128)] > 128 * 128 * 4
        assert sweep[(op, "naive", 128)] > 3 * sweep[(op, "naive", 64)]


# ---------------------------------------------------------------------------------------------
# gpt op
# ---------------------------------------------------------------------------------------------
def test_gpt_flops_count_linears_and_causal_pairs():
    from tritformer.models import GPT, GPTConfig
    m = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=2, n_head=2, n_embd=4))
    w = 2 * (4 * 12 + 4 * 4 + 4 * 16 + 16 * 4) + 4 * 10  # per layer: c_attn, c_proj, c_fc, c_proj; lm_head
    fwd = 2 * 3 * 8 * w + 2 * 4 * 3 * 36 * 4  # B=3, T=8: 36 causal pairs
    assert bench.gpt_flops(m, 3, 8, "fwd") == fwd
    assert bench.gpt_flops(m, 3, 8, "fwd_bwd") == 3 * fwd
    assert bench.gpt_flops(m, 3, 8, "decode") == 2 * 3 * w + 2 * 4 * 3 * 8 * 4


def test_gpt_rows():
    steps = []
    rows, skipped = bench.run(ops=("gpt",), quick=True, out_dir=None, progress=steps.append)
    assert len(steps) == bench.planned_cases(("gpt",), "cpu", True, bench.PROVIDERS) == 3
    assert skipped["gpt flash_attn"].startswith("not a GPT provider")
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for p in ("naive", "sdpa", "tritformer"):
        for mode in ("fwd", "fwd_bwd", "decode"):
            assert (p, mode, "latency") in got and (p, mode, "peak_memory") in got
    err = {r["provider"]: r["value"] for r in rows if r["metric"] == "max_error"}
    # fp32 logits against the float64 model: every provider at fp32 rounding level (measured
    # 2.2e-7 .. 2.6e-7 on the CPU quick shape)
    assert set(err) == {"naive", "sdpa", "tritformer"} and max(err.values()) < 1e-5, err
    assert {r["backend"] for r in rows if r["provider"] == "tritformer"} == {"triton-interpreter"}


def test_peak_fraction_rows_only_for_known_devices(monkeypatch):
    # a CUDA row on a device with a datasheet peak gets a *_peak_fraction row next to it
    assert bench.device_peak("NVIDIA H100 80GB HBM3", "bf16") == (989.4, 3350.0)
    assert bench.device_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert bench.device_peak("cpu (x86_64, 2 cores)", "fp32") is None
    monkeypatch.setattr(bench.core, "machine_info", lambda device: {"device": "NVIDIA A100-SXM4-80GB"})

    def fake_ffn(device, quick, providers, emit, progress, skipped, gated):
        emit(dict(op="ffn", provider="tritformer", backend="triton", mode="fwd", metric="tflops",
                  unit="TFLOP/s", x_name="tokens", x_value=64, value=156.0, p20=150.0, p80=160.0,
                  dtype="bf16"))
    monkeypatch.setattr(bench.ffn, "bench_ffn", fake_ffn)  # run looks it up there (registry)
    rows, _ = bench.run(ops=("ffn",), out_dir=None)
    frac = [r for r in rows if r["metric"] == "tflops_peak_fraction"]
    assert len(frac) == 1 and frac[0]["value"] == pytest.approx(0.5) and frac[0]["unit"] == "fraction"


def test_inspect_command_covers_the_benchmarked_kernels(monkeypatch, tmp_path):
    cmd = bench.inspect_command(["gpt", "softmax"], "cpu")
    assert cmd[:1] == ["inspect"]
    ops = cmd[cmd.index("--op") + 1:cmd.index("--arch")]
    assert ops == ["attention", "decode", "ffn", "softmax"]
    assert cmd[cmd.index("--arch") + 1:cmd.index("--head-dim")] == ["sm_80", "sm_90"]
    assert set(bench.inspect_command(["all"], "cpu")[2:8]) == {
        "attention", "decode", "ffn", "masked", "softmax", "varlen"}
    # run_inspect: a fresh process without TRITON_INTERPRET, table written to OUT/inspect.txt
    seen = {}

    def fake_run(argv, env, capture_output, text):
        seen.update(argv=argv, env=env)
        return subprocess.CompletedProcess(argv, 0, stdout="table\n", stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    code, out = bench.run_inspect(["softmax"], "cpu", str(tmp_path))
    assert code == 0 and out == "table\n" and (tmp_path / "inspect.txt").read_text() == "table\n"
    assert "TRITON_INTERPRET" not in seen["env"] and seen["argv"][1:4] == ["-m", "tritformer", "inspect"]


def test_ffn_bytes():
    # M = 4 tokens, d = 2, weights of 10 elements, fp32
    assert bench.ffn_bytes(4, [6, 4], 2, 4) == {"fwd": (8 + 10 + 8) * 4, "bwd": (24 + 20) * 4,
                                                "fwd_bwd": (26 + 44) * 4}


# ---------------------------------------------------------------------------------------------
# ring op (context parallelism on Gloo processes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration  # spawns 19 processes (about a minute)
def test_ring_rows_memory_per_rank_falls_with_world_size():
    steps = []
    rows, skipped = bench.run(ops=("ring",), quick=True, out_dir=None, progress=steps.append)
    assert len(steps) == bench.planned_cases(("ring",), "cpu", True, bench.PROVIDERS) == 7
    peak = {r["provider"]: r["value"] for r in rows if r["metric"] == "peak_memory"}
    sent = {r["provider"]: r["value"] for r in rows if r["metric"] == "comm_bytes"}
    assert set(peak) == {"tritformer", "ring_w2", "ring_w4", "ring_c8_w2", "ring_c8_w4",
                         "ulysses_w2", "ulysses_w4"}
    assert {r["x_value"] for r in rows} == {2048} and {r["op"] for r in rows} == {"ring"}
    # per rank: each doubling of the world size shrinks what a rank holds
    for p in ("ring", "ring_c8", "ulysses"):
        assert peak[f"{p}_w4"] < peak[f"{p}_w2"], p
    assert peak["ulysses_w4"] < peak["tritformer"]
    # the pieces: at most 13/8 of the ~13 transient shard-sized buffers on top of the four
    # output/gradient shards (out, dq, dk, dv); measured 2.6 MB against 6.0 MB (whole shards)
    shard = 1 * 4 * (2048 // 4) * 64 * 4
    assert peak["ring_c8_w4"] < 0.5 * peak["ring_w4"]
    assert peak["ring_c8_w4"] < 6 * shard
    # ring: k/v forward and back (W-1 hops each) and the fp32 dK/dV (W hops), per rank; the
    # same bytes in pieces
    assert sent["ring_w4"] == sent["ring_c8_w4"] == 2 * 3 * 2 * shard + 4 * 2 * shard
    assert not skipped


def test_ring_on_cuda_without_two_gpus_is_skipped_with_its_reason():
    from tritformer.bench import ring
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs for the NCCL sweep")
    assert ring.ring_cases("cuda", True, ["tritformer"]) == 0
    rows, skipped = [], {}
    ring.bench_ring("cuda", True, ["tritformer"], rows.append, lambda m: None, skipped)
    assert rows == [] and "2 GPUs" in skipped["ring"]
