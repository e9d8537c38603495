"""Ahead-of-time compilation of the shipped kernel configs for NVIDIA targets, with no GPU.

For each kernel, architecture and shipped config this builds the launch plan the real launcher
would build (from meta tensors), compiles it with Triton's bundled toolchain and reads back, from
the cubin Triton itself built: registers per thread, spill bytes and every ptxas warning (the log
of Triton's own ptxas run, captured with its exact command line: `-lineinfo -v
--regAllocOptLevel=2 ...`), the stack frame (cross-checked against `cuobjdump -res-usage` of the
cubin), shared memory bytes (Triton's metadata) and tensor-core instruction counts (PTX). A config
fails on any spill, on ptxas C7515 (wgmma serialized: the warpgroup MMAs lose their pipelining),
on shared memory over the limit, or on a compile error. Attention plans are compiled for MHA and
for GQA 4:1 (GROUP == 1 is specialised away by the JIT, so they are different kernels).

Compiles run in parallel worker processes (`jobs`), each in a fresh Triton cache so that ptxas
always runs and its log is Triton's; rows are streamed as they finish, in plan order. With
`perf=True` each cubin is also disassembled and its hot loop modelled (tritformer.perf).
Needs Triton's compiler, so it must run without TRITON_INTERPRET; the CLI re-runs itself in a
clean subprocess when the interpreter is on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor

import torch

from . import registry

# compute capability per target; the config table each compiles is kernels._launch.arch_family's
# (sm_86 and sm_89 share one, within 99 KB of shared memory), and the shared-memory limit a config
# is checked against is that family's (SHARED_MEMORY_LIMIT)
ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_120": 120}
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FAILING_WARNINGS = ("C7515",)  # wgmma serialized: fails a config like a spill


def shared_memory_limit(arch: str) -> int:
    """Bytes of shared memory per block a config compiled for `arch` ("sm_86") may use: its
    config family's opt-in maximum."""
    from tritformer.kernels._launch import SHARED_MEMORY_LIMIT, arch_family
    return SHARED_MEMORY_LIMIT[arch_family(ARCHES[arch])]


@dataclasses.dataclass
class Row:
    kernel: str
    arch: str
    dtype: str
    head_dim: int
    causal: bool
    config: str
    registers: int
    spill_bytes: int            # spill stores + spill loads (ptxas)
    shared_bytes: int
    mma: int
    error: str = ""
    heads: str = "mha"          # mha or gqa4 (attention); "-" where heads do not apply
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0        # ptxas stack frame (= cuobjdump STACK)
    warnings: list = dataclasses.field(default_factory=list)  # [{"code", "text"}], every one
    ptxas_cmd: list = dataclasses.field(default_factory=list)  # flags only (no temp paths)
    perf: dict = None           # tritformer.perf.analyze_sass (inspect --perf)
    occupancy: dict = None

    @property
    def failing_warnings(self) -> list:
        return [w for w in self.warnings if w.get("code") in FAILING_WARNINGS]

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_bytes == 0 and not self.failing_warnings
                and self.shared_bytes <= shared_memory_limit(self.arch))

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.error:
            return "FAIL " + self.error
        why = []
        if self.spill_bytes:
            why.append("spill")
        why += sorted({w["code"] for w in self.failing_warnings})
        if self.shared_bytes > shared_memory_limit(self.arch):
            why.append("smem")
        return "FAIL " + ",".join(why)

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), ok=self.ok, status=self.status)


def _signature(launch, cfg):
    """Signature, constexprs and attrs as the JIT would specialise them for these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = dict(launch.args, **launch.constexprs, **cfg.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(launch.fn.arg_names):
        value = values[name]
        if name in launch.constexprs or name in cfg.kwargs:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # integers equal to 1 are specialised away by the JIT
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = ty
        if key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# ---------------------------------------------------------------------------------------------
# ptxas: Triton's own run, observed
# ---------------------------------------------------------------------------------------------
class _PtxasSpy:
    """Stands in for the `subprocess` module inside Triton's NVIDIA backend: forwards every call,
    and records each ptxas command line and the log ptxas wrote (Triton sends ptxas's stderr to a
    temporary file it deletes, and keeps nothing of it on success)."""

    def __init__(self, real):
        self._real = real
        self.calls = []  # [(argv, log)]

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        try:
            return self._real.run(cmd, *args, **kwargs)
        finally:
            err = kwargs.get("stderr")
            if isinstance(cmd, (list, tuple)) and "ptxas" in os.path.basename(str(cmd[0])):
                log = ""
                if hasattr(err, "name") and os.path.exists(err.name):
                    with open(err.name) as f:
                        log = f.read()
                self.calls.append((list(cmd), log))


@contextlib.contextmanager
def _observed_ptxas():
    """Fresh Triton cache (so ptxas runs) and the spy on Triton's backend for the duration."""
    from triton import knobs
    import triton.backends.nvidia.compiler as nv
    spy, real, old_dir = _PtxasSpy(nv.subprocess), nv.subprocess, knobs.cache.dir
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache
        nv.subprocess = spy
        try:
            yield spy
        finally:
            nv.subprocess = real
            knobs.cache.dir = old_dir


_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)
_CODE = re.compile(r"\b(C\d{4})\b")
_SERIALIZED = "wgmma.mma_async instructions are serialized"  # the text of C7515


def parse_ptxas_log(log: str) -> dict:
    """registers, spill stores/loads, stack frame and every warning of a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", log)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                        log)
    warnings = []
    for line in log.splitlines():
        if _WARNING.search(line):
            code = _CODE.search(line)
            code = code.group(1) if code else ("C7515" if _SERIALIZED in line else "")
            text = re.sub(r"\S+\.ptx\b", "<ptx>", line.strip())  # temp paths vary per run
            warnings.append({"code": code, "text": text})
    return {"registers": int(regs.group(1)) if regs else -1,
            "stack": sum(int(a) for a, _, _ in frames),
            "spill_stores": sum(int(b) for _, b, _ in frames),
            "spill_loads": sum(int(c) for _, _, c in frames), "warnings": warnings}


def cubin_resources(cubin: bytes) -> dict:
    """REG / STACK / SHARED of the cubin's kernel, from Triton's bundled `cuobjdump -res-usage`."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3))}


@dataclasses.dataclass
class Compiled:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    mma: int
    warnings: list
    ptxas_cmd: list       # Triton's ptxas argv (paths included)
    ptxas_log: str
    ptx: str
    cubin: bytes

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


def compile_launch(launch, cfg, arch: str) -> Compiled:
    """Compile one launch and config as the JIT would, and read the resources of the cubin
    Triton built (its own ptxas log; registers and stack cross-checked with cuobjdump)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = ARCHES[arch]
    signature, constexprs, attrs = _signature(launch, cfg)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with _observed_ptxas() as spy:
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if "enable_fp_fusion" in launch.constexprs:  # a compile option, as the JIT takes it
            options["enable_fp_fusion"] = launch.constexprs["enable_fp_fusion"]
        ck = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    runs = [(cmd, log) for cmd, log in spy.calls if any(a.startswith("--gpu-name") for a in cmd)]
    if len(runs) != 1:
        raise RuntimeError(f"expected one ptxas run by Triton, saw {len(runs)}")
    cmd, log = runs[0]
    usage = parse_ptxas_log(log)
    res = cubin_resources(ck.asm["cubin"])
    if (res["registers"], res["stack"]) != (usage["registers"], usage["stack"]):
        raise RuntimeError(f"ptxas log {usage} disagrees with the cubin {res}")
    ptx = ck.asm["ptx"]
    # tensor-core instructions: wgmma (Hopper warpgroup MMA) and mma.sync (Ampere-style; also
    # what sm_90 uses for tiles too small for a warpgroup)
    mma = len(re.findall(r"wgmma\.mma_async|mma\.sync", ptx))
    return Compiled(usage["registers"], usage["spill_stores"], usage["spill_loads"], usage["stack"],
                    ck.metadata.shared, mma, usage["warnings"], cmd, log, ptx, ck.asm["cubin"])


def ptxas_flags(cmd: list) -> list:
    """Triton's ptxas argv without the binary and the temporary input/output paths."""
    flags, skip = [], False
    for a in cmd[1:]:
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True
            continue
        if a.endswith(".ptx"):
            continue
        flags.append(a)
    return flags


GROUPS = {"mha": 1, "gqa4": 4}  # query heads per K/V head in the attention plans


def _attention_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool, heads: str = "mha"):
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    # contiguous [B, H, N, D]: strides and lengths divisible by 16. MHA and GQA 4:1 compile to
    # different kernels: an MHA plan passes GROUP=1, which the JIT specialises away (the dK/dV
    # program's loop over the group's query heads disappears); GQA's loop costs registers: fp16
    # D=64 32x128/8 warps measured 216 regs MHA, 254 GQA on sm_80
    B, H, N = 2, 8, 1024
    H_KV = H // GROUPS[heads]
    q, o, do = (torch.empty(B, H, N, head_dim, **meta) for _ in range(3))
    k, v = (torch.empty(B, H_KV, N, head_dim, **meta) for _ in range(2))
    lse = torch.empty(B, H, N, device="meta", dtype=torch.float32)
    delta = torch.empty_like(lse)
    scale = head_dim ** -0.5
    cap = ARCHES[arch]
    opts = K.Options(scale=scale, right=0 if causal else None)
    lo = _lse_lo(K, lse, dtype)
    return (K.plan_forward(q, k, v, o, lse, opts, cap, lo)
            + K.plan_backward(do, q, k, v, o, lse, None, delta, q.clone(), k.clone(), v.clone(),
                              opts, cap, None, lo)
            + _fused_backward(K, do, q, k, v, o, lse, delta, opts, cap, None, lo))


def _fused_backward(K, do, q, k, v, o, lse, delta, opts, cap, dmask, lo):
    """The non-deterministic backward's fused kernel (attn_bwd_fused: dK/dV with dQ's fp32
    atomics into an fp32 accumulator), without the preprocess the deterministic plan has. GQA
    as the fused path runs it on a GPU (launch._gqa_split_for): split over its whole group, one
    query head per program, partial dK/dV in an fp32 workspace [B, Hq, Nk, D]."""
    acc = torch.empty(q.shape, device="meta", dtype=torch.float32)
    split = q.shape[1] // k.shape[1]
    dk, dv = k.clone(), v.clone()
    if split > 1:
        dk, dv = (torch.empty(k.shape[0], q.shape[1], *k.shape[2:], device="meta",
                              dtype=torch.float32) for _ in range(2))
    return K.plan_backward(do, q, k, v, o, lse, None, delta, acc, dk, dv, opts, cap, dmask, lo,
                           split=split, deterministic=False)[1:]


def _lse_lo(K, lse, dtype):
    """The lse residual buffer the ops pass for this dtype (fp32), so that the kernels compiled
    here are the ones that run."""
    return torch.empty_like(lse) if K.lse_residual_for(dtype) else None


def _masked_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool, heads: str = "mha"):
    """The heaviest kernel of each masked config table (options._variant): "masked", every
    switch on (float mask whose gradient the dQ kernel writes, key padding, ALiBi, softcap,
    dropout, sliding window; right edge 0 when causal), named attn_*; "light", the four
    switches without a mask or dropout (key padding, ALiBi, softcap, left window edge), named
    attn_*+light; dropout as the only switch (right edge 0 when causal), named
    attn_*+dropout; and key padding or a left window edge alone where they take their own
    descriptor cells (options._tma_cell: sm_90 16-bit at D = 64 / 128, the sm_80 D = 128
    forward; elsewhere they run the light table, whose heaviest kernel is attn_*+light), named
    attn_*+kpm and attn_*+window."""
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    B, H, N = 2, 4, 1024
    q, o, do = (torch.empty(B, H, N, head_dim, **meta) for _ in range(3))
    k, v = (torch.empty(B, H // GROUPS[heads], N, head_dim, **meta) for _ in range(2))
    lse = torch.empty(B, H, N, device="meta", dtype=torch.float32)
    light = dict(scale=head_dim ** -0.5, left=256, right=0 if causal else 256,
                 key_padding_mask=torch.empty(B, N, device="meta", dtype=torch.bool),
                 alibi_slopes=torch.empty(B, H, device="meta"), softcap=30.0)
    heavy = K.Options(**light, attn_mask=torch.empty(1, H, N, N, **meta).expand(B, H, N, N),
                      dropout_p=0.1, seed=1234)
    cap = ARCHES[arch]
    dmask = torch.empty(B, H, N, N, device="meta")
    lo = _lse_lo(K, lse, dtype)

    def plans(opts, dm):
        return (K.plan_forward(q, k, v, o, lse, opts, cap, lo)
                + K.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q.clone(),
                                  k.clone(), v.clone(), opts, cap, dm, lo)[1:]
                + _fused_backward(K, do, q, k, v, o, lse, torch.empty_like(lse), opts, cap, dm,
                                  lo))

    drop = K.Options(scale=head_dim ** -0.5, right=0 if causal else None, dropout_p=0.1,
                     seed=1234)
    kpm = K.Options(scale=light["scale"], right=0 if causal else None,
                    key_padding_mask=light["key_padding_mask"])
    window = K.Options(scale=light["scale"], left=light["left"], right=light["right"])
    # (tag, options, only the launches that take descriptors: the single-switch cells)
    tables = (("light", K.Options(**light), False), ("dropout", drop, False),
              ("kpm", kpm, True), ("window", window, True))
    return plans(heavy, dmask) + [
        dataclasses.replace(launch, name=f"{launch.name}+{tag}")
        for tag, opts, tma_only in tables for launch in plans(opts, None)
        if not tma_only or launch.constexprs.get("TMA")]


def _varlen_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool, heads: str = "gqa4"):
    """Packed sequences ([1, H, total, D] views of [total, H, D], cu_seqlens), MHA or GQA 4:1."""
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    T, H = 8192, 8
    view = lambda h: torch.empty(T, h, head_dim, **meta).transpose(0, 1)[None]
    q, k, v, o, do = view(H), view(H // GROUPS[heads]), view(H // GROUPS[heads]), view(H), view(H)
    lse = torch.empty(1, H, T, device="meta", dtype=torch.float32)
    cu = torch.empty(9, device="meta", dtype=torch.int32)
    # seqlens_checked: the eager path (max_seqlen checked on the host). Under torch.compile the
    # kernels add a loop over tiles past max_seqlen (SEQ_LOOP), not compiled here: it costs
    # registers (sm_90 fp16 D=128 forward: 255 regs and 32-96 B spilled, Triton 3.9)
    opts = K.Options(scale=head_dim ** -0.5, right=0 if causal else None, cu_seqlens_q=cu,
                     cu_seqlens_k=cu, max_seqlen_q=2048, max_seqlen_k=2048, seqlens_checked=True)
    cap = ARCHES[arch]
    lo = _lse_lo(K, lse, dtype)
    return (K.plan_forward(q, k, v, o, lse, opts, cap, lo)
            + K.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q.clone(),
                              k.clone(), v.clone(), opts, cap, None, lo)[1:]
            + _fused_backward(K, do, q, k, v, o, lse, torch.empty_like(lse), opts, cap, None, lo)
            + _paged_varlen_plans(K, q, o, lse, opts, dtype, head_dim, heads, cap))


# the paged plan's page: 16 (vLLM's default). PAGE is a constexpr (shifts for powers of two),
# so each page size is its own kernel; they differ only in those integer ops
PAGE_BLOCK_SIZE = 16


def _paged_varlen_plans(K, q, o, lse, opts, dtype, head_dim: int, heads: str, cap: int):
    """The varlen forward over a paged KV cache (block_table, FlashAttention's layout
    [num_blocks, page, Hkv, D] viewed [num_blocks, Hkv, page, D]) with seqused_k: forward only
    (inference), no lse residual. Named attn_fwd+paged16 (the page size)."""
    T, H_KV, page = q.shape[2], q.shape[1] // GROUPS[heads], PAGE_BLOCK_SIZE
    n_seq = opts.cu_seqlens_q.shape[0] - 1
    kc, vc = (torch.empty(2 * T // page, page, H_KV, head_dim, device="meta",
                          dtype=dtype).permute(0, 2, 1, 3) for _ in range(2))
    paged = dataclasses.replace(
        opts, seqused_k=torch.empty(n_seq, device="meta", dtype=torch.int32),
        block_table=torch.empty(n_seq, opts.max_seqlen_k // page, device="meta",
                                dtype=torch.int32))
    return [dataclasses.replace(launch, name=f"{launch.name}+paged{page}")
            for launch in K.plan_forward(q, kc, vc, o, lse, paged, cap)]


def _softmax_plans(arch: str, dtype: torch.dtype, n_cols: int, causal: bool, _heads: str = "-"):
    """Forward with a broadcast bool mask (the heaviest variant) and backward, [4, 8, 128, C]."""
    from tritformer.kernels import softmax as K
    x = torch.empty(4, 8, 128, n_cols, device="meta", dtype=dtype)
    mask = torch.empty(1, 8, 128, n_cols, device="meta", dtype=torch.bool).expand(x.shape)
    return (K.plan_forward(x, mask, torch.empty_like(x), 0.125, causal)
            + K.plan_backward(x, torch.empty_like(x), torch.empty_like(x), 0.125))


def _ffn_plans(arch: str, dtype: torch.dtype, hidden: int, _causal: bool, _heads: str = "-"):
    """Every GEMM variant the FFN ops launch: M = 4096 tokens, hidden 1024 -> 4096 -> 1024."""
    from tritformer.kernels import ffn as K
    cap = ARCHES[arch]
    e = lambda *s: torch.empty(*s, device="meta", dtype=dtype)
    M, H = 4096, 4 * hidden
    x, w1, w2, b1 = e(M, hidden), e(H, hidden), e(hidden, H), e(H)
    hm, pre, y = e(M, H), e(M, H), e(M, hidden)
    return (K.plan_gemm(x, w1.t(), hm, epi=K.EPI_BIAS_ACT, act=1, bias=b1, pre=pre, arch=cap)
            + K.plan_gemm(hm, w2.t(), y, epi=K.EPI_BIAS_ACT, act=0, bias=e(hidden), residual=y, arch=cap)
            + K.plan_gemm(y, w2, hm, epi=K.EPI_DACT, act=1, aux=pre, arch=cap)
            + K.plan_gemm(y.t(), hm, e(hidden, H), arch=cap)  # weight gradient: transposed A
            + K.plan_gemm(x, w1.t(), hm, epi=K.EPI_GATED, act=4, b2=w1.t(), bias=b1, bias2=e(H),
                          pre=pre, pre2=e(M, H), arch=cap)
            + K.plan_gemm(y, w2, hm, epi=K.EPI_DGATED, act=4, aux=pre, aux2=e(M, H), c2=e(M, H), arch=cap))


def _decode_plans(arch: str, dtype: torch.dtype, head_dim: int, _causal: bool, _heads: str = "-"):
    """Flash-decoding, GQA 8:1: the split kernel for every query tile the config table ships
    (Nq = 1, 4, 8 new tokens: 8, 32, 64 rows -> 16, 32, 64-row tiles, up to the bucket's cap),
    each with a workspace (num_splits > 1) and with the single-split store; and the combine."""
    from tritformer.kernels import decode as K
    cap = ARCHES[arch]
    meta = dict(device="meta", dtype=dtype)
    B, H, H_KV, N_MAX, S = 4, 32, 4, 4096, 8
    k, v = (torch.empty(B, H_KV, N_MAX, head_dim, **meta) for _ in range(2))
    seqlens = torch.empty(B, device="meta", dtype=torch.int32)
    max_m = K.max_block_m(cap, K._block_d(head_dim), torch.empty(0, dtype=dtype).element_size())
    plans = []
    for n_q in (1, 4, 8)[:{16: 1, 32: 2, 64: 3}[max_m]]:
        q = torch.empty(B, H, n_q, head_dim, **meta)
        lse = torch.empty(B, H, n_q, device="meta", dtype=torch.float32)
        o_part = torch.empty(B, H, n_q, S, head_dim, device="meta", dtype=torch.float32)
        lse_part = torch.empty(B, H, n_q, S, device="meta", dtype=torch.float32)
        for splits in (S, 1):
            for launch in K.plan_decode(q, k, v, seqlens, torch.empty_like(q), lse, o_part,
                                        lse_part, head_dim ** -0.5, splits, cap):
                if launch.name == "decode_split":
                    tag = f"+m{launch.constexprs['BLOCK_M']}" + ("+single" if splits == 1 else "")
                    plans.append(dataclasses.replace(launch, name=launch.name + tag))
                elif n_q == 1:  # the combine kernel does not depend on the query tile
                    plans.append(launch)
        # serving variants of the split kernel (#19): a paged cache (256-key pages, vLLM's
        # [num_blocks, page, Hkv, D] storage read through its transpose view), and every
        # option at once (paged, left padding, sliding window, ALiBi, softcap)
        pages = torch.empty(B * N_MAX // 256, 256, H_KV, head_dim, **meta).transpose(1, 2)
        table = torch.empty(B, N_MAX // 256, device="meta", dtype=torch.int32)
        serving = {"paged": dict(block_table=table),
                   "all": dict(block_table=table, cache_leftpad=seqlens, window=(1024, 0),
                               alibi_slopes=torch.empty(H, device="meta"), softcap=30.0)}
        for tag, opts in serving.items():
            launch = K.plan_decode(q, pages, pages, seqlens, torch.empty_like(q), lse, o_part,
                                   lse_part, head_dim ** -0.5, S, cap, **opts)[0]
            name = f"{launch.name}+m{launch.constexprs['BLOCK_M']}+{tag}"
            plans.append(dataclasses.replace(launch, name=name))
    return plans


def _kvcache_plans(arch: str, dtype: torch.dtype, head_dim: int, _causal: bool, _heads: str = "-"):
    """KV-cache append + rotary (kvcache_append), a decode step of 8 rows x 8 kv heads (32 query
    heads): the contiguous head-major cache with NeoX rotary (keys and queries), the paged cache
    in FlashAttention's [num_blocks, page, Hkv, D] layout with GPT-J (interleaved) rotary, and
    the plain append into a batch-indexed cache (no rotary, no queries)."""
    from tritformer.kernels import kvcache as K
    cap = ARCHES[arch]
    B, H_KV, H, N_MAX, PAGE = 8, 8, 32, 4096, 256

    def e(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)

    def fa(*s):  # [B, N, H, D] storage viewed as [B, H, N, D]
        return e(s[0], s[2], s[1], s[3]).transpose(1, 2)

    lens, table, bidx = e(B, dt=torch.int32), e(B, 16, dt=torch.int32), e(B, dt=torch.int32)
    cos = e(N_MAX, head_dim // 2)
    variants = (
        ("+neox", e(B, H_KV, N_MAX, head_dim), e(B, H, 1, head_dim), True, False, None, None),
        ("+paged+gptj", fa(1024, H_KV, PAGE, head_dim), fa(B, H, 1, head_dim), True, True, table,
         None),
        ("+plain", e(B, H_KV, N_MAX, head_dim), None, False, False, None, bidx),
    )
    plans = []
    for tag, cache, q, rotary, interleaved, bt, bi in variants:
        k = e(B, H_KV, 1, head_dim)
        (launch,) = K.plan_append(cache, torch.empty_like(cache), k, k.clone(), lens, q,
                                  None if q is None else torch.empty_like(q),
                                  cos if rotary else None, cos if rotary else None, interleaved,
                                  True, bt, bi, cap)
        plans.append(dataclasses.replace(launch, name=launch.name + tag))
    return plans


class _Plans(Mapping):
    """{op: plan builder} of the ops with an `inspect` declaration in tritformer.registry (the
    builders above), resolved on lookup."""

    def __getitem__(self, op):
        spec = registry.get(op).inspect
        if spec is None:
            raise KeyError(op)
        return registry.resolve(spec.plans)

    def __iter__(self):
        return iter(registry.names("inspect"))

    def __len__(self):
        return len(registry.names("inspect"))


PLANS = _Plans()
ALL_OPS = registry.names("inspect")
SOFTMAX_ROWS = registry.SOFTMAX_ROWS  # one 4-warp tile, the largest single tile, multi-tile


def _tag(op: str) -> str:
    return registry.get(op).inspect.tag


def cases(archs, head_dims, dtypes, causal, ops) -> list[tuple]:
    """(op, arch, dtype, D/C, causal, heads) plan cases, in report order (each op's sizes,
    causal and heads from its registry declaration)."""
    return [c for op in ops for a in archs for dt in dtypes
            for c in registry.get(op).inspect.cases(op, a, dt, head_dims, causal)]


def _describe(cfg) -> str:
    desc = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{desc} warps={cfg.num_warps} stages={cfg.num_stages}".strip()


def jobs_for(case_list) -> list[tuple]:
    """One job per distinct compile: (case, launch index, config index). Launches that compile
    to the same kernel (the backward preprocess of MHA and GQA plans, ...) are compiled once."""
    jobs, seen = [], set()
    for case in case_list:
        op, arch, dt, d, c, heads = case
        for li, launch in enumerate(PLANS[op](arch, DTYPE_NAMES[dt], d, c, heads)):
            for ci, cfg in enumerate(launch.configs):
                sig, consts, _ = _signature(launch, cfg)
                key = (arch, launch.fn.__name__ if hasattr(launch.fn, "__name__") else launch.name,
                       launch.name, tuple(sig.items()), tuple((k, repr(v)) for k, v in consts.items()),
                       cfg.num_warps, cfg.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                jobs.append((case, li, ci))
    return jobs


def run_job(job, perf: bool = False) -> Row:
    """Compile one job (in a worker process) and return its row."""
    (op, arch, dt, d, c, heads), li, ci = job
    launch = PLANS[op](arch, DTYPE_NAMES[dt], d, c, heads)[li]
    cfg = launch.configs[ci]
    row = Row(launch.name + _tag(op), arch, dt, d, c, _describe(cfg), -1, -1, -1, -1,
              heads=heads)
    try:
        ck = compile_launch(launch, cfg, arch)
    except Exception as e:  # an unshippable config is a failing row, not a crash
        row.error = f"{type(e).__name__}: {e}"[:200].replace("\n", " ")
        return row
    row.registers, row.spill_bytes, row.shared_bytes, row.mma = (ck.registers, ck.spill_bytes,
                                                                 ck.shared, ck.mma)
    row.spill_stores, row.spill_loads, row.stack_bytes = ck.spill_stores, ck.spill_loads, ck.stack
    row.warnings, row.ptxas_cmd = ck.warnings, ptxas_flags(ck.ptxas_cmd)
    if perf:
        from tritformer import perf as P
        useful = P.useful_flops(launch.name, cfg.kwargs, launch.constexprs)
        try:
            row.perf = P.analyze_sass(P.disassemble(ck.cubin), arch, cfg.num_warps, useful)
        except Exception as e:
            row.error = f"SASS analysis: {type(e).__name__}: {e}"[:200]
        row.occupancy = P.occupancy(P.MACHINES[arch], ck.registers, ck.shared, cfg.num_warps)
    return row


def _run_job_perf(job):
    return run_job(job, True)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def inspect(archs=("sm_80", "sm_90"), head_dims=(64, 128, 256), dtypes=("fp16", "fp32"),
            causal=(False, True), progress=None, ops=ALL_OPS, jobs: int = 1,
            perf: bool = False) -> list[Row]:
    """Compile every shipped config of `ops` (in `jobs` worker processes); `progress(row)` is
    called for each row as it is ready, in plan order."""
    work = jobs_for(cases(archs, head_dims, dtypes, causal, ops))
    fn = _run_job_perf if perf else run_job
    rows = []
    if jobs <= 1 or len(work) <= 1:
        results = map(fn, work)
        pool = None
    else:  # fork: the workers inherit the imported kernels (spawn would re-import torch + triton)
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
        results = pool.map(fn, work)
    try:
        for row in results:
            rows.append(row)
            if progress:
                progress(row)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


def _interpreting() -> bool:
    if "tritformer.kernels.attention" in sys.modules:
        from tritformer.kernels._launch import is_interpreted
        return is_interpreted(sys.modules["tritformer.kernels.attention"]._attn_fwd)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


HEAD = ("kernel", "arch", "dtype", "D/C", "causal", "heads", "config", "regs", "spill B", "smem B",
        "mma", "ok")
WIDTHS = (28, 5, 5, 5, 6, 5, 46, 4, 7, 6, 4, 0)  # streamed rows: fixed widths


def _cols(r: Row) -> tuple:
    return (r.kernel, r.arch, r.dtype, str(r.head_dim), "y" if r.causal else "n", r.heads, r.config,
            str(r.registers), str(r.spill_bytes), str(r.shared_bytes), str(r.mma), r.status)


def format_row(r: Row) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(_cols(r), WIDTHS)).rstrip()


def format_table(rows: list[Row]) -> str:
    body = [_cols(r) for r in rows]
    widths = [max(len(x[i]) for x in [HEAD, *body]) for i in range(len(HEAD))]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()
    return "\n".join([line(HEAD), line(["-" * w for w in widths]), *map(line, body)])


def format_warnings(rows: list[Row]) -> str:
    """Every ptxas warning, once per distinct text, with the configs it came from."""
    seen: dict[str, list] = {}
    for r in rows:
        for w in r.warnings:
            seen.setdefault(w["text"], []).append(f"{r.kernel} {r.arch} {r.dtype} D={r.head_dim} "
                                                   f"{'causal' if r.causal else 'full'} {r.heads} "
                                                   f"[{r.config}]")
    out = []
    for text, where in seen.items():
        out.append(f"ptxas: {text}")
        out += [f"    {w}" for w in where]
    return "\n".join(out)


def _triton_version() -> str:
    import triton
    return triton.__version__


def _kernel_sources() -> dict:
    """sha256 of each kernel source file the baseline was recorded from (the kernels change under
    concurrent work; the baseline names the exact sources)."""
    import hashlib
    import pathlib

    import tritformer.kernels._launch as launch_mod
    root = pathlib.Path(launch_mod.__file__).parent
    return {f"kernels/{p.relative_to(root).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.py"))}


def main(args, argv: list[str]) -> int:
    if _interpreting():
        # kernels decorated under the interpreter cannot be compiled: start a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "tritformer", *argv], env=env).returncode
    from tritformer import perf as P
    perf = bool(args.perf or args.gate or args.record)
    unmodelled = [a for a in args.arch if a not in P.MACHINES] if perf else []
    if unmodelled:  # before any compile: the model needs the arch's published per-SM rates
        print(f"inspect --perf: no throughput model for {', '.join(unmodelled)} (modelled: "
              f"{', '.join(sorted(P.MACHINES))}); without --perf/--gate/--record, inspect "
              "compiles and checks every arch", file=sys.stderr)
        return 2
    jobs = args.jobs or default_jobs()
    print("  ".join(h.ljust(w) for h, w in zip(HEAD, WIDTHS)).rstrip(), flush=True)
    print("  ".join("-" * max(w, 2) for w in WIDTHS[:-1]) + "  --", flush=True)
    rows = inspect(args.arch, args.head_dim, args.dtype, (False, True),
                   progress=lambda r: print(format_row(r), flush=True), ops=args.op, jobs=jobs,
                   perf=perf)
    bad = [r for r in rows if not r.ok]
    warnings = format_warnings(rows)
    if warnings:
        print("\n" + warnings)
    print(f"\n{len(rows)} kernel configs compiled, {len(bad)} failing "
          f"(spills, ptxas {'/'.join(FAILING_WARNINGS)}, shared memory over the limit, or compile "
          f"errors); registers, spills and warnings from Triton's own ptxas run "
          f"(e.g. {' '.join(rows[0].ptxas_cmd) if rows and rows[0].ptxas_cmd else '-'})")
    status = 1 if bad else 0
    if not perf:
        return status
    dicts = [r.as_dict() for r in rows]
    print("\n" + P.format_perf_tables(dicts))
    print("All model figures are ESTIMATES (upper bounds from instruction counts; see "
          "`tritformer.perf` and the README), not GPU measurements.")
    if args.json:
        P.write_json(args.json, {"triton": _triton_version(), "rows": dicts})
        print(f"wrote {args.json}")
    if args.record:
        base = P.baseline(dicts, _triton_version(), args.note or "")
        base["kernel_sources"] = _kernel_sources()
        P.write_json(args.record, base)
        print(f"recorded the baseline in {args.record}")
    if args.gate:
        import json
        with open(args.gate) as f:
            base = json.load(f)
        failures, notes = P.gate(dicts, base, _triton_version())
        for n in notes:
            print(f"gate: {n}")
        for fl in failures:
            print(f"gate FAIL: {fl}")
        print(f"gate: {len(failures)} regressions against {args.gate} "
              f"(tolerance {base.get('tolerance', P.GATE_TOLERANCE):.0%} relative)")
        if failures:
            status = 1
    return status
