"""inspect's resource reading (Triton's own ptxas run) and `inspect --perf`: the SASS parser on
committed snippets of this project's kernels (tests/data/*.sass), the throughput model on
hand-computed examples, the gate, and one end-to-end AOT compile."""
import json
import os
import subprocess
import sys

import pytest

from tritformer import inspect as I
from tritformer import perf as P

DATA = os.path.join(os.path.dirname(__file__), "data")


def _sass(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def _hot(name):
    ins, labels = P.parse_sass(_sass(name))
    loops = P.find_loops(ins, labels)
    return ins, loops


# --- the SASS parser: counts read by hand from the snippets (grep -c on the loop span) -----------
def test_sm90_forward_loop_counts_and_model():
    # _attn_fwd sm_90 fp16 D=128 128x64/8: shared/notes/sass-baseline.md §3.2 measured 424 instr,
    # 12 HGMMA, 34 EX2, 34 FFMA, 130 FMUL, 36 FADD, 8 LDGSTS, 3 BAR.SYNC, serialized est. 55%
    ins, loops = _hot("sass_sm90_attn_fwd_d128_128x64w8.sass")
    assert [lp.label for lp in loops] == [".L_x_1"]
    c = P.count([ins[i] for i in loops[0].body])
    assert c.total == 427 and c["nop"] == 8  # the 8 `@!PT LDS RZ, [RZ]` never execute
    assert c.mma_shapes == {"HGMMA.64x64x16.F32": 8, "HGMMA.64x128x16.F32": 4}
    assert (c["mufu_ex2"], c["ffma"], c["fmul"], c["fadd"]) == (34, 34, 130, 36)
    assert (c["gmem_load"], c.opcodes["LDGSTS"], c["smem_load"], c["smem_store"]) == (8, 8, 0, 0)
    assert c.opcodes["BAR"] == 3 and c.opcodes["WARPGROUP"] == 3 and c["sync"] == 13
    assert c.total == sum(c.classes.values())
    r = P.analyze_sass(_sass("sass_sm90_attn_fwd_d128_128x64w8.sass"), "sm_90", 8,
                       P.useful_flops("attn_fwd", {"BLOCK_M": 128, "BLOCK_N": 64}, {"HEAD_DIM": 128}))
    h = r["hot_loop"]
    assert h["replication"] == 1.0
    m = h["model"]
    assert (m["T_mma"], m["T_ex2"], m["T_fp32"], m["T_issue"]) == (1024, 544, 400, (427 - 12) * 2)
    assert m["serialized"] == pytest.approx(1024 / (1024 + 830))
    assert abs(m["serialized"] - 0.55) < 0.01 and m["overlapped"] == 1.0
    assert m["binding_serialized"] == "T_issue"


def test_sm80_forward_loop_counts_and_model():
    # sass-baseline.md §3.2: 348 instr, 64 HMMA, 18 EX2, 18 FFMA, 98 FMUL, 20 FADD, 40 LDS/LDSM,
    # 4 LDGSTS, serialized est. 64%
    ins, loops = _hot("sass_sm80_attn_fwd_d128_128x32w8.sass")
    assert len(loops) == 1
    c = P.count([ins[i] for i in loops[0].body])
    assert c.total == 352 and c.mma_shapes == {"HMMA.16816.F32": 64}
    assert (c["mufu_ex2"], c["ffma"], c["fmul"], c["fadd"], c["smem_load"]) == (18, 18, 98, 20, 40)
    assert c["gmem_load"] == 4
    m = P.model(P.MACHINES["sm_80"], c, 8)
    assert m["T_mma"] == 64 * 2 * 16 * 8 * 16 * 8 / 2048 == 1024
    assert m["T_fp32"] == (18 + 98 + 20) * 256 / 64 and m["T_issue"] == (352 - 64) * 8 / 4
    assert m["serialized"] == pytest.approx(1024 / (1024 + 576))


def test_nested_loops_exclusive_bodies_and_hot_loop():
    # dK/dV GQA: the group loop (.L_x_4, no MMA of its own) around the query-tile loop (.L_x_2)
    ins, loops = _hot("sass_sm80_attn_bwd_dkdv_d64_gqa_nested.sass")
    by = {lp.label: lp for lp in loops}
    outer, inner = by[".L_x_4"], by[".L_x_2"]
    assert (outer.depth, inner.depth) == (0, 1)
    assert outer.start < inner.start and inner.end < outer.end
    assert not set(outer.body) & set(range(inner.start, inner.end + 1))
    assert len(outer.body) + (inner.end - inner.start + 1) == outer.end - outer.start + 1
    assert P.count([ins[i] for i in outer.body])["mma"] == 0
    ci = P.count([ins[i] for i in inner.body])
    assert ci.total == 313 and ci.mma_shapes == {"HMMA.16816.F32": 64} and ci["mufu_ex2"] == 16
    hot, _ = P.hot_loop(*P.parse_sass(_sass("sass_sm80_attn_bwd_dkdv_d64_gqa_nested.sass")), 8)
    assert hot.label == ".L_x_2"
    # useful: 4 GEMMs of 32x128x64 per streamed query tile; 64 HMMA x 4096 flop x 8 warps
    r = P.analyze_sass(_sass("sass_sm80_attn_bwd_dkdv_d64_gqa_nested.sass"), "sm_80", 8,
                       P.useful_flops("attn_bwd_dkdv", {"BLOCK_M": 32, "BLOCK_N": 128},
                                      {"HEAD_DIM": 64}))
    assert r["hot_loop"]["label"] == ".L_x_2" and r["hot_loop"]["replication"] == 1.0


def test_predicated_mmas_and_self_loop():
    ins, loops = _hot("sass_sm80_predicated_mma_edited.sass")
    assert [lp.label for lp in loops] == [".L_x_2"]  # `.L_x_9: BRA .L_x_9` after EXIT is no loop
    c = P.count([ins[i] for i in loops[0].body])
    # 7 HMMA lines: one @!PT (never runs: a NOP), two under @P2/@!P3 (counted, flagged)
    assert c["mma"] == 6 and c.mma_predicated == 2 and c["nop"] == 1
    assert c["smem_load"] == 3 and c["control"] == 1 and c.total == 11


def test_mma_shapes():
    assert P.mma_shape("HGMMA.64x128x16.F32.BF16") == (64, 128, 16)
    assert P.mma_shape("HMMA.16816.F32") == (16, 8, 16)
    assert P.mma_shape("HMMA.1688.F32.TF32") == (16, 8, 8)


# --- the model on hand-computed examples -----------------------------------------------------
def _counts(shapes, total, **classes):
    mma = sum(shapes.values())
    return P.Counts(total, dict(classes, mma=mma), shapes, 0, {})


def test_model_hand_example_sm90():
    # 12 HGMMA.64x64x16 per warp, 8 warps = 2 warpgroups: 12 * 2*64*64*16 * 2 = 3145728 flop
    # -> T_mma 768 clk; EX2 10 x 256 threads / 16 = 160; (20+12) x 256 / 128 = 64;
    # issue (212 - 12) x 8 / 4 = 400
    c = _counts({"HGMMA.64x64x16.F32": 12}, 212, mufu_ex2=10, ffma=20, fmul=12)
    m = P.model(P.MACHINES["sm_90"], c, 8)
    assert (m["T_mma"], m["T_ex2"], m["T_fp32"], m["T_issue"]) == (768, 160, 64, 400)
    assert m["serialized"] == pytest.approx(768 / 1168) and m["overlapped"] == 1.0
    # issue-bound: 1012 instructions -> T_issue 2000 > T_mma
    m = P.model(P.MACHINES["sm_90"], _counts({"HGMMA.64x64x16.F32": 12}, 1012), 8)
    assert m["overlapped"] == pytest.approx(768 / 2000) and m["binding_overlapped"] == "T_issue"
    assert m["serialized"] == pytest.approx(768 / 2768)


def test_model_hand_example_sm80_tf32_and_mufu():
    # HMMA.1688 TF32: 2*16*8*8 = 2048 flop per warp, 10 per warp x 4 warps = 81920 at the TF32
    # rate 1024/clk -> 80 clk; MUFU EX2 4 + RCP 4 = 8 x 128 / 16 = 64
    c = _counts({"HMMA.1688.F32.TF32": 10}, 30, mufu_ex2=4, mufu_other=4)
    m = P.model(P.MACHINES["sm_80"], c, 4)
    assert m["T_mma"] == 80 and m["T_ex2"] == 64 and m["T_issue"] == 20
    assert m["binding_serialized"] == "T_ex2" and m["serialized"] == pytest.approx(80 / 144)


def test_model_without_mma():
    m = P.model(P.MACHINES["sm_80"], _counts({}, 40, ffma=8), 4)
    assert m["serialized"] is None and m["T_mma"] == 0


def test_occupancy_hand_examples():
    h100, a100 = P.MACHINES["sm_90"], P.MACHINES["sm_80"]
    # 234 regs -> 240 x 32 = 7680 per warp; 16384 / 7680 = 2 warps per sub-partition = 8/SM
    assert P.occupancy(h100, 234, 131072, 8) == {"ctas": 1, "by_regs": 1, "by_smem": 1, "by_warps": 8}
    assert P.occupancy(h100, 212, 114688, 4)["ctas"] == 2
    o = P.occupancy(a100, 196, 65536, 8)
    assert (o["by_regs"], o["by_smem"], o["ctas"]) == (1, 2, 1)
    assert P.occupancy(a100, 32, 0, 4)["ctas"] == 16  # warp-limited: 64 / 4


def test_useful_flops():
    assert P.useful_flops("attn_fwd", {"BLOCK_M": 128, "BLOCK_N": 64}, {"HEAD_DIM": 128}) == 4194304
    # replicated 64-row dQ tile on 8 warps: 3.15 MFLOP useful (sass-baseline.md §3.6)
    assert P.useful_flops("attn_bwd_dq+varlen", {"BLOCK_M": 64, "BLOCK_N": 64},
                          {"HEAD_DIM": 128}) == 3145728
    assert P.useful_flops("attn_bwd_dkdv", {"BLOCK_M": 32, "BLOCK_N": 64}, {"HEAD_DIM": 128}) == 2097152
    assert P.useful_flops("gemm", {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, {"EPI": 2}) == 2 * 2 * 128 * 64 * 32
    assert P.useful_flops("softmax_fwd", {}, {}) == 0


# --- ptxas log, failing warnings ---------------------------------------------------------------
# the log of Triton's ptxas run for _attn_bwd_dkdv sm_90 fp16 D=128 causal GQA 4:1 32x64/8 warps
# (Triton 3.9.0), with a C7515 line in ptxas's warning format appended
LOG = """ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_attn_bwd_dkdv' for 'sm_90a'
ptxas-blackwell info    : Function properties for _attn_bwd_dkdv
    24 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 310.407 ms
ptxas-blackwell /tmp/tmpa1b2c3.ptx, line 4242; warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '_attn_bwd_dkdv'
"""


def test_parse_ptxas_log_spills_and_warnings():
    u = I.parse_ptxas_log(LOG)
    assert (u["registers"], u["stack"], u["spill_stores"], u["spill_loads"]) == (255, 24, 24, 24)
    assert len(u["warnings"]) == 1 and u["warnings"][0]["code"] == "C7515"
    assert "/tmp" not in u["warnings"][0]["text"]
    # the message alone (no code) is recognised too
    u = I.parse_ptxas_log("ptxas warning : Potential Performance Loss: wgmma.mma_async "
                          "instructions are serialized due to ...")
    assert u["warnings"][0]["code"] == "C7515"


def test_c7515_fails_a_config_like_a_spill():
    row = I.Row("attn_bwd_dkdv", "sm_90", "fp16", 128, True, "cfg", 200, 0, 65792, 36)
    assert row.ok and row.status == "ok"
    row.warnings = I.parse_ptxas_log(LOG)["warnings"]
    assert not row.ok and row.status == "FAIL C7515"
    row.warnings = [{"code": "C7510", "text": "some other warning"}]  # kept, not failing
    assert row.ok
    row.spill_bytes = 48
    assert row.status == "FAIL spill"


# --- the gate -----------------------------------------------------------------------------------
def _row(serialized=0.55, replication=1.0, nmm=34.6, **kw):
    r = dict(kernel="attn_fwd", arch="sm_90", dtype="fp16", head_dim=128, causal=False, heads="mha",
             config="BLOCK_M=128 BLOCK_N=64 warps=8 stages=3", error="", **kw)
    r["perf"] = {"hot_loop": {"model": {"serialized": serialized}, "replication": replication,
                              "non_mma_per_mma": nmm}}
    return r


def test_gate():
    base = P.baseline([_row()], "3.9.0")
    assert P.gate([_row()], base, "3.9.0") == ([], [])
    assert P.gate([_row(serialized=0.55 * 0.99)], base, "3.9.0")[0] == []   # within 2%
    assert len(P.gate([_row(serialized=0.50)], base, "3.9.0")[0]) == 1
    assert len(P.gate([_row(replication=1.5)], base, "3.9.0")[0]) == 1
    assert len(P.gate([_row(nmm=36.0)], base, "3.9.0")[0]) == 1
    fails, notes = P.gate([_row(serialized=0.1)], base, "3.7.1")  # per Triton version
    assert fails == [] and "skipped" in notes[0]
    new = dict(_row(), config="BLOCK_M=64 BLOCK_N=64 warps=4 stages=3")
    assert P.gate([new], base, "3.9.0")[0] == []
    broken = dict(_row(), error="PTXASError")
    broken["perf"] = None
    assert len(P.gate([broken], base, "3.9.0")[0]) == 1


def test_committed_baseline_is_well_formed():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "perf_baseline.json")
    with open(path) as f:
        base = json.load(f)
    assert base["triton"] and base["configs"] and base["tolerance"] == P.GATE_TOLERANCE
    for rid, m in base["configs"].items():
        assert rid.startswith("attn_") and 0 < m["serialized"] <= 1 and m["replication"] >= 1, rid


# --- one end-to-end compile (no interpreter: a clean subprocess) ---------------------------------
E2E = r"""
import json, subprocess
from tritformer import inspect as I
job = (("attention", "sm_80", "fp16", 64, False, "mha"), 0, 0)   # attn_fwd, first sm_80 config
row = I.run_job(job, perf=True)
launch = I.PLANS["attention"]("sm_80", I.DTYPE_NAMES["fp16"], 64, False, "mha")[0]
ck = I.compile_launch(launch, launch.configs[0], "sm_80")
# faithful: Triton's own ptxas command, rerun on the same PTX, gives the same cubin byte for byte
import os, tempfile
with tempfile.TemporaryDirectory() as tmp:
    src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    open(src, "w").write(ck.ptx)
    cmd = [ck.ptxas_cmd[0], *I.ptxas_flags(ck.ptxas_cmd), src, "-o", out]
    subprocess.run(cmd, check=True, capture_output=True)
    same = open(out, "rb").read() == ck.cubin
print(json.dumps({"row": row.as_dict(), "same": same, "flags": I.ptxas_flags(ck.ptxas_cmd)}))
"""


def test_end_to_end_one_config():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", E2E], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    row, flags = out["row"], out["flags"]
    assert out["same"], "rerunning Triton's ptxas command did not reproduce its cubin"
    assert "-lineinfo" in flags and "--regAllocOptLevel=2" in flags and "--gpu-name=sm_80" in flags
    assert row["registers"] > 0 and row["error"] == "" and row["kernel"] == "attn_fwd"
    h = row["perf"]["hot_loop"]
    assert h["mma_shapes"] and all(op.startswith("HMMA") for op in h["mma_shapes"])
    assert h["replication"] == 1.0 and 0 < h["model"]["serialized"] < 1
    assert row["occupancy"]["ctas"] >= 1


def test_perf_on_an_arch_without_a_throughput_model_is_a_clear_error():
    # sm_86/sm_89/sm_120 compile and are checked by inspect, but the model has no published
    # per-SM rates for them: --perf says so before compiling anything (was a KeyError)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tritformer", "inspect", "--perf", "--arch", "sm_86",
                        "--op", "softmax"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no throughput model for sm_86" in r.stderr
