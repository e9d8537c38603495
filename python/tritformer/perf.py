"""Performance without a GPU: the SASS of a compiled kernel, read loop by loop, and a throughput
model that turns the hot loop's instruction counts into ESTIMATES of the fraction of peak.

Method (`python -m tritformer inspect --perf`):

1. The cubin Triton built (the real one, see inspect.py) is disassembled with Triton's bundled
   `nvdisasm -c`. A loop is a label plus the last backward branch (`BRA`) to it; a loop's
   per-iteration body is its span minus the spans of the loops nested inside it. The hot loop is
   the loop whose body has the most tensor-core (MMA) work; with no MMA anywhere, the longest
   loop. The self-branch after EXIT (`.L_x_N: BRA .L_x_N`) is not a loop.
2. Counts are per warp (one SASS line = one warp instruction) per iteration. `@!PT` lines never
   execute and count as NOPs, but still take an issue slot. Predicated MMAs (`@P0 HGMMA`) are
   counted as executed (an upper bound) and reported separately.
3. MMA FLOPs executed per iteration: `HGMMA.MxNxK` is a warpgroup instruction (4 warps issue the
   same line, one MMA of 2*M*N*K flops per warpgroup); `HMMA.16816` etc. are per-warp MMAs of
   2*16*8*16 flops. Useful FLOPs come from the config (`useful_flops`), so the replication factor
   executed / useful exposes tiles whose warps redo the same product (e.g. a 64-row tile on 8
   warps on sm_90: both warpgroups compute the same QK^T).

Throughput model (per SM per clock; dense, no sparsity):

| arch | MMA fp16/bf16 flop | MMA tf32 flop | MUFU | FP32 lanes | warp-instr issue |
|---|---|---|---|---|---|
| sm_90 (H100 SXM: 989 TFLOP/s / (132 SMs x 1.83 GHz)) | 4096 | 2048 | 16 | 128 | 4 |
| sm_80 (A100 SXM: 312 TFLOP/s / (108 SMs x 1.41 GHz)) | 2048 | 1024 | 16 | 64 | 4 |

Per CTA and hot-loop iteration: T_mma = executed MMA flops / MMA rate; T_ex2 = MUFU (EX2 and the
other MUFU ops) x threads / 16; T_fp32 = (FFMA + FMUL + FADD) x threads / FP32 lanes;
T_issue = non-MMA warp instructions x warps / 4. Two bounds on the fraction of MMA peak:
serialized = T_mma / (T_mma + max(T_ex2, T_fp32, T_issue)) (the softmax/epilogue work of an
iteration does not overlap its MMAs, as the SASS of these kernels implies: a wgmma wait and
BAR.SYNC every iteration) and overlapped = T_mma / max(all four) (perfect overlap, FA3-style).
The binding term is the largest non-MMA term (serialized) or the largest of all (overlapped).
Useful fraction = serialized / replication.

What the model cannot say (every figure is an ESTIMATE, an upper bound, never a GPU speed):
instruction latency and dependency stalls (2 warps per scheduler at 8 warps/CTA), the stalls at
barriers and wgmma waits themselves, ptxas's C7515 wgmma serialisation, memory bandwidth and
latency (LDGSTS/TMA traffic is counted, not timed), L2/DRAM, the prologue, epilogue and the
boundary (masked) loop copies, tail waves and load imbalance across SMs, clock throttling, and
cross-CTA overlap when 2 CTAs fit on an SM (occupancy is reported, not modelled). Measured
against a GPU it has been optimistic (FlashAttention-3's paper measured Triton's tutorial forward
at about 0.40 of H100 peak where this model gives about 0.6).

The gate (`inspect --perf --gate FILE`, baseline written by `--record FILE`): a config fails when
its serialized estimate falls, or its replication factor or non-MMA instructions per MMA rise, by
more than GATE_TOLERANCE (2% relative) against the baseline; the baseline is per Triton version
(another version compiles other SASS: the gate is skipped there, with a message).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Optional

# ---------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?"
                    r"([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([.$\w]+)\)")
_BRANCHES = {"BRA", "JMP", "BRX", "JMX"}


@dataclasses.dataclass
class Instr:
    index: int
    addr: int
    pred: str            # "" (always), "@P0", "@!PT" (never) ...
    opcode: str          # full dotted opcode, e.g. HGMMA.64x64x16.F32
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def never(self) -> bool:
        return self.pred == "@!PT"

    @property
    def predicated(self) -> bool:
        return self.pred not in ("", "@PT", "@!PT")

    @property
    def target(self) -> Optional[str]:
        if self.base not in _BRANCHES:
            return None
        m = _TARGET.search(self.operands)
        return m.group(1) if m else None


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions (in address order) and labels -> index of the instruction they precede.
    Accepts `nvdisasm -c` output (labels `.L_x_N:` and branch targets `(.L_x_N)`)."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            instrs.append(Instr(len(instrs), int(m.group(1), 16), m.group(2) or "", m.group(3),
                                m.group(4).strip()))
            continue
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
    return instrs, labels


@dataclasses.dataclass
class Loop:
    label: str
    start: int   # index of the first instruction (the label's)
    end: int     # index of the backward branch (inclusive)
    depth: int = 0
    body: list = dataclasses.field(default_factory=list, repr=False)  # exclusive body indices


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Loops = label + the last backward branch to it; each gets its exclusive body (its span
    minus nested loops' spans) and its nesting depth. Self-branches (the idle loop after EXIT,
    a span of one instruction) are not loops."""
    ends: dict[str, int] = {}
    for ins in instrs:
        t = ins.target
        if t is not None and t in labels and labels[t] <= ins.index:
            ends[t] = max(ends.get(t, -1), ins.index)
    loops = [Loop(t, labels[t], e) for t, e in ends.items() if e > labels[t]]
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        inner = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        lp.depth = sum(1 for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end)
        covered = set()
        for o in inner:
            covered.update(range(o.start, o.end + 1))
        lp.body = [i for i in range(lp.start, lp.end + 1) if i not in covered]
    return loops


# ---------------------------------------------------------------------------------------------
# Instruction classes
# ---------------------------------------------------------------------------------------------
MMA_OPS = {"HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BGMMA", "HMMA2"}
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32),
                "8816": (8, 8, 16), "8832": (8, 8, 32)}
FP32_OPS = {"FFMA", "FMUL", "FADD"}
OTHER_FP_OPS = {"FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FRND", "F2F", "F2FP", "F2I", "I2F",
                "I2FP", "F2IP", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "DADD", "DMUL",
                "DFMA"}
SMEM_LOAD, SMEM_STORE = {"LDS", "LDSM"}, {"STS", "STSM"}
GMEM_LOAD = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LD"}
GMEM_STORE = {"STG", "UTMASTG", "ST", "RED", "ATOM", "ATOMG", "REDG"}
LOCAL = {"LDL", "STL"}
SYNC_OPS = {"BAR", "WARPGROUP", "MEMBAR", "FENCE", "SYNCS", "DEPBAR", "LDGDEPBAR", "WARPSYNC",
            "ERRBAR", "CCTL", "ARRIVES", "UTMACCTL", "UTMACMDFLUSH"}
CONTROL = {"BRA", "JMP", "BRX", "JMX", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "YIELD", "BPT",
           "WARPSYNC", "KILL", "NANOSLEEP"}
SHUFFLE = {"SHFL"}


def mma_shape(opcode: str) -> Optional[tuple[int, int, int]]:
    """(m, n, k) of an MMA opcode: HGMMA.64x128x16.F32 -> (64, 128, 16); HMMA.16816.F32 ->
    (16, 8, 16)."""
    parts = opcode.split(".")
    if len(parts) < 2:
        return None
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", parts[1])
    if m:
        return tuple(int(x) for x in m.groups())
    return _HMMA_SHAPES.get(parts[1])


def classify(ins: Instr) -> str:
    b = ins.base
    if ins.never or b == "NOP":
        return "nop"
    if b in MMA_OPS:
        return "mma"
    if b == "MUFU":
        return "mufu_ex2" if ins.opcode.startswith("MUFU.EX2") else "mufu_other"
    if b in FP32_OPS:
        return b.lower()
    if b in OTHER_FP_OPS:
        return "fp_other"
    if b in SMEM_LOAD:
        return "smem_load"
    if b in SMEM_STORE:
        return "smem_store"
    if b in GMEM_LOAD:
        return "gmem_load"
    if b in GMEM_STORE:
        return "gmem_store"
    if b in LOCAL:
        return "local"
    if b in SYNC_OPS:
        return "sync"
    if b in CONTROL:
        return "control"
    if b in SHUFFLE:
        return "shuffle"
    return "int"  # integer, predicate, uniform-datapath, moves, constant loads, S2R ...


CLASSES = ("mma", "mufu_ex2", "mufu_other", "ffma", "fmul", "fadd", "fp_other", "smem_load",
           "smem_store", "gmem_load", "gmem_store", "local", "sync", "shuffle", "int", "control",
           "nop")


@dataclasses.dataclass
class Counts:
    """Per-warp instruction counts of a set of SASS lines (a loop body)."""
    total: int = 0
    classes: dict = dataclasses.field(default_factory=dict)
    mma_shapes: dict = dataclasses.field(default_factory=dict)   # opcode -> count
    mma_predicated: int = 0
    opcodes: dict = dataclasses.field(default_factory=dict)      # base opcode -> count

    def __getitem__(self, key: str) -> int:
        return self.classes.get(key, 0)

    @property
    def non_mma(self) -> int:
        return self.total - self["mma"]


def count(instrs: list[Instr]) -> Counts:
    classes, shapes, ops = Counter(), Counter(), Counter()
    pred_mma = 0
    for ins in instrs:
        c = classify(ins)
        classes[c] += 1
        ops[ins.base] += 1
        if c == "mma":
            shapes[ins.opcode] += 1
            pred_mma += ins.predicated
    return Counts(len(instrs), dict(classes), dict(shapes), pred_mma, dict(ops))


def mma_flops(shapes: dict, num_warps: int) -> dict:
    """Executed MMA flops per CTA, by rate class ('f16' or 'tf32'), from per-warp counts."""
    out = {"f16": 0, "tf32": 0}
    for opcode, n in shapes.items():
        shape = mma_shape(opcode)
        if shape is None:
            continue
        m, nn, k = shape
        # HGMMA etc. (warpgroup MMA): the 4 warps of a warpgroup issue one MMA between them
        units = num_warps // 4 if "GMMA" in opcode.split(".")[0] else num_warps
        kind = "tf32" if ".TF32" in opcode else "f16"
        out[kind] += n * 2 * m * nn * k * units
    return out


# ---------------------------------------------------------------------------------------------
# Throughput model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    mma_f16: int         # dense fp16/bf16 MMA flop / clk / SM
    mma_tf32: int
    mufu: int            # MUFU results / clk / SM
    fp32: int            # FP32 lanes / clk / SM
    issue: int           # warp instructions issued / clk / SM (4 schedulers)
    smem_per_sm: int     # bytes of shared memory per SM usable by CTAs
    smem_reserved: int = 1024  # per CTA (driver-reserved)
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_ctas: int = 32


MACHINES = {
    "sm_90": Machine("H100 SXM", 4096, 2048, 16, 128, 4, 228 * 1024),
    "sm_80": Machine("A100 SXM", 2048, 1024, 16, 64, 4, 164 * 1024),
}


def occupancy(machine: Machine, registers: int, shared: int, num_warps: int) -> dict:
    """CTAs per SM from registers (allocated per warp in 256-register units, 8-register
    granularity per thread, split over 4 sub-partitions), shared memory and warps."""
    if registers <= 0:
        return {"ctas": 0, "by_regs": 0, "by_smem": 0, "by_warps": 0}
    per_warp = math.ceil(registers * 32 / 256) * 256
    warps_by_regs = (machine.regs_per_sm // 4 // per_warp) * 4
    by_regs = warps_by_regs // num_warps
    by_smem = machine.smem_per_sm // (shared + machine.smem_reserved)
    by_warps = machine.max_warps // num_warps
    return {"ctas": min(by_regs, by_smem, by_warps, machine.max_ctas), "by_regs": by_regs,
            "by_smem": by_smem, "by_warps": by_warps}


def model(machine: Machine, counts: Counts, num_warps: int) -> dict:
    """ESTIMATE: per-iteration clocks of each pipe for one CTA, and the two bounds."""
    flops = mma_flops(counts.mma_shapes, num_warps)
    threads = num_warps * 32
    terms = {
        "T_mma": flops["f16"] / machine.mma_f16 + flops["tf32"] / machine.mma_tf32,
        "T_ex2": (counts["mufu_ex2"] + counts["mufu_other"]) * threads / machine.mufu,
        "T_fp32": (counts["ffma"] + counts["fmul"] + counts["fadd"]) * threads / machine.fp32,
        "T_issue": counts.non_mma * num_warps / machine.issue,
    }
    other = max(("T_ex2", "T_fp32", "T_issue"), key=lambda t: terms[t])
    t_mma = terms["T_mma"]
    out = dict(terms, executed_flops=flops["f16"] + flops["tf32"])
    if t_mma <= 0:
        return dict(out, serialized=None, overlapped=None, binding_serialized=other,
                    binding_overlapped=other)
    return dict(out, serialized=t_mma / (t_mma + terms[other]),
                overlapped=t_mma / max(terms.values()), binding_serialized=other,
                binding_overlapped=max(terms, key=lambda t: terms[t]))


def useful_flops(kernel: str, kwargs: dict, constexprs: dict) -> int:
    """MMA flops one hot-loop iteration must do for the config (0: no matrix product).

    attn_fwd: QK^T and PV per K/V tile, 2 x 2*BM*BN*D. attn_bwd_dkdv (per streamed Q tile):
    QK^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q: 4 x 2*BM*BN*D. attn_bwd_fused (the same
    with dQ's dS K, atomically added): 5 x 2*BM*BN*D. attn_bwd_dq (per streamed
    K/V tile): QK^T, dP, dQ += dS K: 3 x 2*BM*BN*D. decode split: QK^T and PV per K/V tile,
    BLOCK_M (padded) rows. FFN GEMM: 2*BM*BN*BK per K step, twice for the gated (dual) GEMM."""
    d = constexprs.get("HEAD_DIM", 0)
    bm, bn = kwargs.get("BLOCK_M", constexprs.get("BLOCK_M", 0)), kwargs.get("BLOCK_N", 0)
    base = kernel.split("+")[0]
    if base == "attn_fwd":
        return 4 * bm * bn * d
    if base == "attn_bwd_dkdv":
        return 8 * bm * bn * d
    if base == "attn_bwd_fused":
        return 10 * bm * bn * d
    if base == "attn_bwd_dq":
        return 6 * bm * bn * d
    if base == "decode_split":
        return 4 * bm * bn * d
    if "BLOCK_K" in kwargs:
        dual = int(constexprs.get("EPI", -1)) == 2  # EPI_GATED: two accumulators over one A
        return 2 * bm * bn * kwargs["BLOCK_K"] * (2 if dual else 1)
    return 0


# ---------------------------------------------------------------------------------------------
# One cubin
# ---------------------------------------------------------------------------------------------
def disassemble(cubin: bytes) -> str:
    """`nvdisasm -c` (Triton's bundled copy) of a cubin."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True,
                             text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {res.stderr[-500:]}")
    return res.stdout


def hot_loop(instrs: list[Instr], labels: dict[str, int], num_warps: int):
    """(hot loop or None, all loops): the loop whose own body has the most MMA flops; among
    equals the shortest (the attention kernels' unmasked full-tile loop, not its boundary copy
    with the same MMAs); with no MMA in any loop, the one with the longest body."""
    loops = find_loops(instrs, labels)
    if not loops:
        return None, loops

    def work(lp):
        c = count([instrs[i] for i in lp.body])
        f = mma_flops(c.mma_shapes, num_warps)
        flops = f["f16"] + f["tf32"]
        return (flops, -len(lp.body) if flops else len(lp.body))
    return max(loops, key=work), loops


def analyze_sass(text: str, arch: str, num_warps: int, useful: int = 0) -> dict:
    """Counts and model of the hot loop of one kernel's SASS (`nvdisasm -c` text)."""
    instrs, labels = parse_sass(text)
    hot, loops = hot_loop(instrs, labels, num_warps)
    whole = count(instrs)
    out = {"instructions": len(instrs), "loops": len(loops),
           "function_mma_shapes": whole.mma_shapes, "hot_loop": None}
    if hot is None:
        return out
    c = count([instrs[i] for i in hot.body])
    m = model(MACHINES[arch], c, num_warps)
    mma_n = c["mma"]
    executed = m["executed_flops"]
    out["hot_loop"] = {
        "label": hot.label, "depth": hot.depth, "span": [instrs[hot.start].addr, instrs[hot.end].addr],
        "instr_per_iter": c.total, "classes": {k: c[k] for k in CLASSES},
        "mma_shapes": c.mma_shapes, "mma_predicated": c.mma_predicated,
        "non_mma_per_mma": (c.non_mma / mma_n) if mma_n else None,
        "useful_flops": useful,
        "replication": (executed / useful) if (useful and executed) else None,
        "model": m,
        "useful_serialized": (m["serialized"] * useful / executed)
        if (useful and executed and m["serialized"] is not None) else None,
    }
    return out


# ---------------------------------------------------------------------------------------------
# Reports: tables, JSON, the gate
# ---------------------------------------------------------------------------------------------
def row_id(r: dict) -> str:
    return "|".join(str(r[k]) for k in ("kernel", "arch", "dtype", "head_dim", "causal", "heads",
                                        "config"))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _shapes(shapes: dict) -> str:
    return " ".join(f"{n}x{op.split('.')[0]}.{op.split('.')[1]}" for op, n in sorted(shapes.items())
                    ) or "-"


PERF_HEAD = ("arch", "dtype", "D", "causal", "heads", "config", "regs", "spill", "smem",
             "CTA/SM", "instr/iter", "MMA/iter", "repl", "EX2", "FP32", "LDS/STS", "LDG*",
             "sync", "int", "nonMMA/MMA", "T_mma", "T_ex2", "T_fp32", "T_issue",
             "serial est", "overlap est", "useful est", "binding", "warnings")


def perf_line(r: dict) -> tuple:
    h = (r.get("perf") or {}).get("hot_loop")
    occ = r.get("occupancy") or {}
    base = (r["arch"], r["dtype"], str(r["head_dim"]), "y" if r["causal"] else "n", r["heads"],
            r["config"], str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
            str(occ.get("ctas", "-")))
    warn = ",".join(sorted({w["code"] for w in r.get("warnings", []) if w.get("code")})) or "-"
    if r.get("error"):
        return base + ("ERROR " + r["error"][:60],) + ("",) * (len(PERF_HEAD) - len(base) - 2) + (warn,)
    if not h:
        return base + ("no loop",) + ("-",) * (len(PERF_HEAD) - len(base) - 2) + (warn,)
    c, m = h["classes"], h["model"]
    return base + (
        str(h["instr_per_iter"]), _shapes(h["mma_shapes"]), _f(h["replication"], 2),
        str(c["mufu_ex2"] + c["mufu_other"]), str(c["ffma"] + c["fmul"] + c["fadd"]),
        f"{c['smem_load']}/{c['smem_store']}", str(c["gmem_load"]), str(c["sync"]), str(c["int"]),
        _f(h["non_mma_per_mma"]), f"{m['T_mma']:.0f}", f"{m['T_ex2']:.0f}", f"{m['T_fp32']:.0f}",
        f"{m['T_issue']:.0f}", _pct(m["serialized"]), _pct(m["overlapped"]),
        _pct(h["useful_serialized"]), m["binding_serialized"] if m["serialized"] is not None else "-", warn)


def format_perf_tables(rows: list[dict]) -> str:
    """One table per kernel (ESTIMATE columns marked 'est')."""
    out = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        body = [perf_line(r) for r in rows if r["kernel"] == kernel]
        widths = [max(len(x[i]) for x in [PERF_HEAD, *body]) for i in range(len(PERF_HEAD))]
        line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()
        out += [f"== {kernel}: hot loop, per warp per iteration; T_* in clocks per CTA "
                f"(ESTIMATES, see tritformer.perf)", line(PERF_HEAD),
                line(["-" * w for w in widths]), *map(line, body), ""]
    return "\n".join(out)


GATE_TOLERANCE = 0.02  # relative: 2% of a metric (about 8 instructions in a 400-instruction loop)
GATE_METRICS = ("serialized", "replication", "non_mma_per_mma")


def gate_metrics(r: dict) -> Optional[dict]:
    h = (r.get("perf") or {}).get("hot_loop")
    if not h or h["model"]["serialized"] is None:
        return None
    return {"serialized": h["model"]["serialized"], "replication": h["replication"],
            "non_mma_per_mma": h["non_mma_per_mma"]}


def baseline(rows: list[dict], triton_version: str, note: str = "") -> dict:
    return {"triton": triton_version, "note": note, "tolerance": GATE_TOLERANCE,
            "configs": {row_id(r): m for r in rows if (m := gate_metrics(r)) is not None}}


def gate(rows: list[dict], base: dict, triton_version: str) -> tuple[list[str], list[str]]:
    """(failures, notes). A config fails when its serialized estimate falls, or its replication
    factor or non-MMA instructions per MMA rise, by more than the tolerance against the
    baseline; a config that now fails to compile or lost its MMA loop fails too. Configs absent
    from the baseline are noted, not gated (a new shipped config needs a new baseline)."""
    tol = float(base.get("tolerance", GATE_TOLERANCE))
    if base.get("triton") != triton_version:
        return [], [f"baseline recorded with Triton {base.get('triton')}, running {triton_version}: "
                    f"gate skipped (the baseline is per Triton version)"]
    failures, notes = [], []
    seen = set()
    for r in rows:
        rid = row_id(r)
        ref = base["configs"].get(rid)
        if ref is None:
            if gate_metrics(r) is not None:
                notes.append(f"{rid}: not in the baseline (not gated)")
            continue
        seen.add(rid)
        cur = gate_metrics(r)
        if cur is None:
            failures.append(f"{rid}: no MMA hot loop or compile error ({r.get('error', '')[:80]})")
            continue
        if cur["serialized"] < ref["serialized"] * (1 - tol):
            failures.append(f"{rid}: serialized estimate {cur['serialized']:.3f} < baseline "
                            f"{ref['serialized']:.3f}")
        for key in ("replication", "non_mma_per_mma"):
            if ref.get(key) is not None and cur[key] is not None and cur[key] > ref[key] * (1 + tol):
                failures.append(f"{rid}: {key} {cur[key]:.3f} > baseline {ref[key]:.3f}")
    return failures, notes


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
