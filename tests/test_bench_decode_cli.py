"""`python -m tritformer bench --op decode` (tritformer.bench.decode): the CLI's op and providers,
rows of every provider available here on a tiny in-process sweep, the skip reasons of missing
peers, paged == contiguous, the bytes formula, and what the report makes of the rows."""
import importlib.machinery
import inspect
import json
import math
import sys
import types

import pytest
import torch

from tritformer import bench, cli, reference
from tritformer.bench import decode as D


@pytest.fixture(autouse=True)
def _short_adaptive_timings(monkeypatch):
    monkeypatch.setattr(bench.core, "CPU_MIN_RUN_TIME", 0.02)  # rows are checked, not timings


# B in {1, 2} x cache_len 40 (not a multiple of the 16-key pages: ragged last pages), GQA 2:1
TINY = D.DecodeSweep((1, 2), (40,), 4, 2, 16, "fp32", 16, reps=1)
AVAILABLE = ("naive", "sdpa", "tritformer", "tritformer_paged")  # + sdpa_math (refusing below)


@pytest.fixture
def tiny_sweep(monkeypatch):
    monkeypatch.setattr(D, "decode_sweep", lambda device, quick: TINY)  # run and cases read it


def test_cli_takes_the_decode_op_and_its_providers():
    p = cli._parser()
    args = p.parse_args(["bench", "--op", "decode", "--providers", "sdpa", "tritformer", "flash_attn"])
    assert args.op == ["decode"] and args.providers == ["sdpa", "tritformer", "flash_attn"]
    assert "decode" in bench.OPS and bench.INSPECT_OPS["decode"] == ("decode",)
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--op", "decode", "--providers", "tritformer_paged"])  # comes with tritformer
    # tritformer brings tritformer_paged, flash_attn brings flash_attn_paged (skipped on CPU)
    skipped = {}
    active = D._decode_active(["tritformer", "flash_attn", "flex"], "cpu", TINY, skipped)
    assert [p.name for p in active] == ["tritformer", "tritformer_paged"]
    assert skipped == {"decode flash_attn": "flash_attn runs on CUDA only",
                       "decode flash_attn_paged": "flash_attn_paged runs on CUDA only",
                       "decode flex": "not a decode provider"}


def test_sweeps_gpu_grid_and_small_cpu_defaults():
    gpu = D.decode_sweep("cuda", False)
    assert gpu.batches == (1, 8, 32, 128) and gpu.cache_lens == (1024, 4096, 16384)
    assert (gpu.heads_q, gpu.heads_kv, gpu.head_dim, gpu.dtype, gpu.page_size) == (32, 8, 128, "fp16", 256)
    for quick in (True, False):
        cpu = D.decode_sweep("cpu", quick)
        assert cpu.dtype == "fp32" and cpu.heads_q == D.DECODE_HEAD_RATIO * cpu.heads_kv
        assert max(cpu.batches) * max(cpu.cache_lens) <= 16 * 2048  # interpreter-sized
    assert bench.planned_cases(("decode",), "cpu", True, bench.PROVIDERS) == 5 * 2 * 2


def test_lengths_seeded_first_row_full_others_in_the_upper_half():
    lengths = D.decode_lengths(500, 64, seed=7)
    assert lengths == D.decode_lengths(500, 64, seed=7) and lengths[0] == 64
    assert min(lengths) >= 32 and max(lengths) == 64 and len(set(lengths)) > 10
    assert D.decode_lengths(1, 64, seed=1) == [64]


def test_decode_bytes_counts_valid_keys_and_q_out():
    # K and V of 10 + 6 valid keys, 2 kv heads, D=8, plus q and out of 2 rows x 4 heads, fp16
    assert bench.decode_bytes([10, 6], 4, 2, 8, 2) == (2 * 16 * 2 * 8 + 2 * 2 * 4 * 8) * 2
    assert D.page_count([40, 17, 16], 16) == 3 + 2 + 1


def test_paged_cache_holds_the_contiguous_keys_and_gives_the_same_output():
    case = D.decode_case(3, 40, 4, 2, 16, torch.float32, "cpu", 16, seed=5, lengths=[40, 17, 33])
    assert case.block_table.dtype == torch.int32 and case.block_table.shape == (3, 3)
    assert case.k_pages.shape == (3 + 2 + 3, 16, 2, 16)  # just the pages the rows use
    used = sorted(case.block_table[0].tolist() + case.block_table[1, :2].tolist()
                  + case.block_table[2].tolist())
    assert used == list(range(8))  # every block once (shuffled)
    for b, n in enumerate(case.lengths):  # the pages, read back through the table, are the keys
        k = case.k_pages[case.block_table[b].long()].flatten(0, 1)[:n].transpose(0, 1)
        torch.testing.assert_close(k, case.k[b, :, :n], rtol=0, atol=0)
    p = D.decode_providers()
    with torch.no_grad(), D.interpreter_tiles():  # the sweep's tiles: 64 keys
        flat = p["tritformer"].fn(case)
        paged = p["tritformer_paged"].fn(case)
        ref = D.decode_reference64(case)
    assert flat.shape == paged.shape == case.q.shape
    torch.testing.assert_close(paged, flat, rtol=1e-6, atol=1e-6)
    assert (flat.double() - ref).abs().max() < 1e-5
    # every other available provider agrees with the float64 reference too
    for name in ("naive", "sdpa", "sdpa_math"):
        with torch.no_grad():
            assert (p[name].fn(case).double() - ref).abs().max() < 1e-5, name


def test_reference64_reads_only_each_rows_valid_keys():
    case = D.decode_case(2, 24, 2, 1, 8, torch.float32, "cpu", 16, seed=2, lengths=[24, 9])
    ref = D.decode_reference64(case)
    case.k[1, :, 9:] = float("nan")  # past the length: never read
    torch.testing.assert_close(D.decode_reference64(case), ref)
    want = reference.attention(case.q[1:].double(), case.k[1:, :, :9].double(),
                               case.v[1:, :, :9].double())
    torch.testing.assert_close(ref[1:], want)


def _fake_flash_attn(monkeypatch, with_block_table=True):
    """A stand-in flash_attn module: tritformer's flash_attn_with_kvcache under flash-attn's
    name (same signature and layouts), found by importlib like the real one."""
    from tritformer import flash_attn_interface
    mod = types.ModuleType("flash_attn")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fn = flash_attn_interface.flash_attn_with_kvcache
    if not with_block_table:
        def fn(q, k_cache, v_cache, cache_seqlens=None):
            return flash_attn_interface.flash_attn_with_kvcache(q, k_cache, v_cache,
                                                                cache_seqlens=cache_seqlens)
    mod.flash_attn_with_kvcache = fn
    monkeypatch.setitem(sys.modules, "flash_attn", mod)


def test_missing_or_unfit_flash_attn_is_skipped_with_its_reason(monkeypatch):
    import importlib.util
    fa, fa_paged = (D.decode_providers(256)[n].why_not for n in ("flash_attn", "flash_attn_paged"))
    assert fa("cpu", torch.float16) == "flash_attn runs on CUDA only"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert fa("cuda", torch.float16) == "flash_attn is not installed"
    assert fa_paged("cuda", torch.float16) == "flash_attn_paged needs flash_attn, which is not installed"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    _fake_flash_attn(monkeypatch)
    assert fa("cuda", torch.float16) is None and fa_paged("cuda", torch.float16) is None
    assert fa("cuda", torch.float32) == "flash_attn takes fp16/bf16 only"
    small = D.decode_providers(16)["flash_attn_paged"].why_not("cuda", torch.float16)
    assert small == "flash_attn_paged needs pages of a multiple of 256 keys (the sweep's: 16)"
    _fake_flash_attn(monkeypatch, with_block_table=False)
    assert "takes no block_table" in fa_paged("cuda", torch.bfloat16)
    # the report's skip lines: one per reason, flash_attn's shared with the other ops
    lines = bench.skip_lines({"attention flash_attn": "flash_attn is not installed",
                              "decode flash_attn": "flash_attn is not installed",
                              "decode flash_attn_paged": "flash_attn_paged needs flash_attn, "
                                                         "which is not installed"})
    assert lines == ["skipped flash_attn: is not installed (2 ops: attention, decode)",
                     "skipped flash_attn_paged: needs flash_attn, which is not installed (1 op: decode)"]


def test_flash_attn_wrappers_pass_flash_attn_layouts(monkeypatch):
    # flash-attn runs on CUDA only: its wrappers' transposes and arguments are checked with the
    # stand-in (flash-attn's signature and [B, N, H, D] / paged layouts)
    _fake_flash_attn(monkeypatch)
    assert "block_table" in inspect.signature(sys.modules["flash_attn"].flash_attn_with_kvcache).parameters
    case = D.decode_case(3, 40, 4, 2, 16, torch.float32, "cpu", 16, seed=6)
    ref = D.decode_reference64(case)
    for fn in (D._decode_flash_attn, D._decode_flash_attn_paged):
        with torch.no_grad(), D.interpreter_tiles():
            out = fn(case)
        assert out.shape == case.q.shape and (out.double() - ref).abs().max() < 1e-5


def test_interpreter_tiles_do_not_mutate_the_shipped_table():
    from tritformer.kernels import decode as K
    shipped = K.INTERPRETER_CONFIGS
    before = {k: (dict(v.kwargs), v.num_warps) for k, v in shipped.items()}
    with D.interpreter_tiles():
        assert K.INTERPRETER_CONFIGS is not shipped
        assert K.INTERPRETER_CONFIGS["split"].kwargs["BLOCK_N"] == D.INTERPRETER_BLOCK_N
    assert K.INTERPRETER_CONFIGS is shipped
    assert {k: (dict(v.kwargs), v.num_warps) for k, v in shipped.items()} == before


def test_tiny_run_rows_for_every_available_provider(monkeypatch):
    one = D.DecodeSweep((2,), (40,), 4, 2, 16, "fp32", 16, reps=1)  # TINY's B=2 point only
    monkeypatch.setattr(D, "decode_sweep", lambda device, quick: one)

    def refusing(name):  # a pinned SDPA backend that cannot take the inputs raises, as torch's do
        def fn(case):
            raise RuntimeError("No available kernel. Aborting execution.")
        return fn
    monkeypatch.setattr(D, "_decode_sdpa_pinned", refusing)
    steps = []
    rows, skipped = bench.run(ops=("decode",), quick=True, out_dir=None, providers=bench.PROVIDERS,
                              progress=steps.append)
    # planned: 5 providers x 1 point (sdpa_math would be dropped after its first refusal)
    assert len(steps) == bench.planned_cases(("decode",), "cpu", True, bench.PROVIDERS) == 5
    assert skipped["decode sdpa_math"] == "sdpa_math refused the call: No available kernel. Aborting execution."
    assert all(tuple(r) == bench.COLUMNS for r in rows)
    assert {r["op"] for r in rows} == {"decode"} and {r["provider"] for r in rows} == set(AVAILABLE)
    assert skipped["decode flash_attn"] == "flash_attn runs on CUDA only"
    assert skipped["decode flash_attn_paged"] == "flash_attn_paged runs on CUDA only"
    assert skipped["decode sdpa_efficient"] == "sdpa_efficient runs on CUDA only"
    assert skipped["decode flex"] == "not a decode provider"
    got = {(r["provider"], r["batch"], r["metric"]): r for r in rows}
    for p in AVAILABLE:
        for b in one.batches:
            for metric in ("max_error", "latency", "peak_memory"):
                r = got[(p, b, metric)]
                assert r["x_name"] == "cache_len" and r["x_value"] == 40 and r["mode"] == "fwd"
                assert r["heads"] == 4 and r["head_dim"] == 16 and r["causal"] is None
                assert r["value"] is not None and math.isfinite(r["value"]), r
            assert got[(p, b, "max_error")]["value"] < 1e-5, (p, b)
            assert got[(p, b, "latency")]["value"] > 0 and got[(p, b, "peak_memory")]["value"] > 0
    assert not any(r["metric"] in ("gbps", "tflops") for r in rows)  # no rates on CPU
    assert {r["backend"] for r in rows if r["provider"].startswith("tritformer")} == {"triton-interpreter"}
    # memory: the fused contiguous call allocates out (+ lse and a small split workspace), far
    # below naive's expanded K/V and scores
    mem = {p: got[(p, 2, "peak_memory")]["value"] for p in AVAILABLE}
    out_bytes = 2 * 4 * 16 * 4
    assert out_bytes <= mem["tritformer"] < mem["naive"] / 4, mem


def test_cli_run_report_shows_batch_per_row_and_a_plot_per_batch(tmp_path, tiny_sweep, capsys):
    out = tmp_path / "res"
    code = cli.main(["bench", "--quick", "--op", "decode", "--out", str(out), "--providers",
                     "naive", "tritformer", "flash_attn"])
    got = capsys.readouterr()
    assert code == 0, got.out + got.err
    stdout = got.out.splitlines()
    summary = [line for line in stdout if line.startswith("decode ")]
    assert any("peak_memory fwd  " in line and "cache_len=40 B=2 H=4 D=16" in line
               and "x less" in line for line in summary)
    assert any("peak_memory fwd paged" in line for line in summary)
    assert not any("latency" in line for line in summary)  # interpreter: no speed ratio
    assert "skipped flash_attn, flash_attn_paged: runs on CUDA only (1 op: decode)" in stdout
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 3 * 2 * 3  # 3 providers x 2 batches x (error, latency, memory)
    table = (out / "table.txt").read_text()
    assert "cache_len=40 B=1" in table and "cache_len=40 B=2" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    if pngs:  # matplotlib installed
        assert "decode_peak_memory_fwd_d16_b1.png" in pngs and "decode_peak_memory_fwd_d16_b2.png" in pngs
        report = (out / "report.md").read_text()
        assert "B=2, H=4, D=16, fp32; one new query per row" in report
        assert "causal" not in report.split("## Plots")[1].split("## Files")[0]
