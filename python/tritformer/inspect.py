"""Ahead-of-time compilation of the shipped kernel configs for NVIDIA targets, with no GPU.

For each kernel, architecture and shipped config this builds the launch plan the real launcher
would build (from meta tensors), compiles it with Triton's bundled toolchain and reads back:
registers per thread and spill bytes (bundled `ptxas -v`), shared memory bytes (Triton's
metadata), and tensor-core instruction counts (`wgmma.mma_async` + `mma.sync`, counted in the
PTX). Needs Triton's compiler, so it must run without TRITON_INTERPRET; the CLI
re-runs itself in a clean subprocess when the interpreter is on.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

ARCHES = {"sm_80": 80, "sm_90": 90}
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class Row:
    kernel: str
    arch: str
    dtype: str
    head_dim: int
    causal: bool
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma: int
    error: str = ""

    @property
    def ok(self) -> bool:
        from tritformer.kernels._launch import SHARED_MEMORY_LIMIT
        return (not self.error and self.spill_bytes == 0
                and self.shared_bytes <= SHARED_MEMORY_LIMIT[ARCHES[self.arch]])


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


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def compile_launch(launch, cfg, arch: str) -> tuple[int, int, int, int]:
    """(registers, spill bytes, shared bytes, MMA instruction count) of one launch and config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = ARCHES[arch]
    signature, constexprs, attrs = _signature(launch, cfg)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = ck.asm["ptx"]
    regs, spills = _ptxas_usage(ptx, capability)
    # tensor-core instructions: wgmma (Hopper warpgroup MMA) and mma.sync (Ampere-style; also
    # what sm_90 uses for tiles too small for a warpgroup)
    mma = len(re.findall(r"wgmma\.mma_async|mma\.sync", ptx))
    return regs, spills, ck.metadata.shared, mma


def _attention_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool):
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    # contiguous [B, H, N, D]: strides and lengths divisible by 16. GQA 4:1: the dK/dV program's
    # loop over the group's query heads (an MHA plan passes GROUP=1, which the JIT specialises
    # away) costs registers: fp16 D=64 32x128/8 warps measured 216 regs MHA, 254 GQA on sm_80
    B, H, H_KV, N = 2, 8, 2, 1024
    q, o, do = (torch.empty(B, H, N, head_dim, **meta) for _ in range(3))
    k, v = (torch.empty(B, H_KV, N, head_dim, **meta) for _ in range(2))
    lse = torch.empty(B, H, N, device="meta", dtype=torch.float32)
    delta = torch.empty_like(lse)
    scale = head_dim ** -0.5
    cap = ARCHES[arch]
    opts = K.Options(scale=scale, right=0 if causal else None)
    return (K.plan_forward(q, k, v, o, lse, opts, cap)
            + K.plan_backward(do, q, k, v, o, lse, None, delta, q.clone(), k.clone(), v.clone(),
                              opts, cap))


def _masked_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool):
    """The heaviest masked variant: every switch on (float mask whose gradient the dQ kernel
    writes, key padding, ALiBi, softcap, dropout, sliding window; right edge 0 when causal)."""
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    B, H, N = 2, 4, 1024
    q, k, v, o, do = (torch.empty(B, H, N, head_dim, **meta) for _ in range(5))
    lse = torch.empty(B, H, N, device="meta", dtype=torch.float32)
    opts = K.Options(scale=head_dim ** -0.5, left=256, right=0 if causal else 256,
                     attn_mask=torch.empty(1, H, N, N, **meta).expand(B, H, N, N),
                     key_padding_mask=torch.empty(B, N, device="meta", dtype=torch.bool),
                     alibi_slopes=torch.empty(B, H, device="meta"), softcap=30.0, dropout_p=0.1,
                     seed=1234)
    cap = ARCHES[arch]
    dmask = torch.empty(B, H, N, N, device="meta")
    return (K.plan_forward(q, k, v, o, lse, opts, cap)
            + K.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q.clone(),
                              k.clone(), v.clone(), opts, cap, dmask)[1:])


def _varlen_plans(arch: str, dtype: torch.dtype, head_dim: int, causal: bool):
    """Packed sequences ([1, H, total, D] views of [total, H, D], cu_seqlens), GQA 4:1."""
    from tritformer.kernels import attention as K
    meta = dict(device="meta", dtype=dtype)
    T, H = 8192, 8
    view = lambda h: torch.empty(T, h, head_dim, **meta).transpose(0, 1)[None]  # noqa: E731
    q, k, v, o, do = view(H), view(2), view(2), view(H), view(H)
    lse = torch.empty(1, H, T, device="meta", dtype=torch.float32)
    cu = torch.empty(9, device="meta", dtype=torch.int32)
    opts = K.Options(scale=head_dim ** -0.5, right=0 if causal else None, cu_seqlens_q=cu,
                     cu_seqlens_k=cu, max_seqlen_q=2048, max_seqlen_k=2048)
    cap = ARCHES[arch]
    return (K.plan_forward(q, k, v, o, lse, opts, cap)
            + K.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q.clone(),
                              k.clone(), v.clone(), opts, cap)[1:])


SOFTMAX_ROWS = (1024, 16384, 65536)  # one 4-warp tile, the largest single tile, multi-tile


def _softmax_plans(arch: str, dtype: torch.dtype, n_cols: int, causal: bool):
    """Forward with a broadcast bool mask (the heaviest variant) and backward, [4, 8, 128, C]."""
    from tritformer.kernels import softmax as K
    x = torch.empty(4, 8, 128, n_cols, device="meta", dtype=dtype)
    mask = torch.empty(1, 8, 128, n_cols, device="meta", dtype=torch.bool).expand(x.shape)
    return (K.plan_forward(x, mask, torch.empty_like(x), 0.125, causal)
            + K.plan_backward(x, torch.empty_like(x), torch.empty_like(x), 0.125))


def _ffn_plans(arch: str, dtype: torch.dtype, hidden: int, _causal: bool):
    """Every GEMM variant the FFN ops launch: M = 4096 tokens, hidden 1024 -> 4096 -> 1024."""
    from tritformer.kernels import ffn as K
    cap = ARCHES[arch]
    e = lambda *s: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
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


def _decode_plans(arch: str, dtype: torch.dtype, head_dim: int, _causal: bool):
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
    return plans


def inspect(archs=("sm_80", "sm_90"), head_dims=(64, 128, 256), dtypes=("fp16", "fp32"),
            causal=(False, True), progress=None,
            ops=("attention", "masked", "varlen", "softmax", "ffn", "decode")) -> list[Row]:
    cases = []
    if "attention" in ops:
        cases += [(_attention_plans, a, dt, d, c) for a in archs for dt in dtypes
                  for d in head_dims for c in causal]
    if "masked" in ops:
        cases += [(_masked_plans, a, dt, d, c) for a in archs for dt in dtypes
                  for d in head_dims for c in causal]
    if "varlen" in ops:
        cases += [(_varlen_plans, a, dt, d, c) for a in archs for dt in dtypes
                  for d in head_dims for c in causal]
    if "softmax" in ops:
        cases += [(_softmax_plans, a, dt, n, c) for a in archs for dt in dtypes
                  for n in SOFTMAX_ROWS for c in causal]
    if "ffn" in ops:
        cases += [(_ffn_plans, a, dt, 1024, False) for a in archs for dt in dtypes]
    if "decode" in ops:  # decoding is causal by construction (Nq > 1: the last Nq positions)
        cases += [(_decode_plans, a, dt, d, True) for a in archs for dt in dtypes
                  for d in head_dims]
    rows = []
    for plans, arch, dt, d, c in cases:
        for launch in plans(arch, DTYPE_NAMES[dt], d, c):
            for cfg in launch.configs:
                desc = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
                desc = f"{desc} warps={cfg.num_warps} stages={cfg.num_stages}".strip()
                try:
                    regs, spills, smem, mma = compile_launch(launch, cfg, arch)
                    err = ""
                except Exception as e:  # an unshippable config is a failing row, not a crash
                    regs, spills, smem, mma, err = -1, -1, -1, -1, f"{type(e).__name__}: {e}"[:200]
                tag = {_masked_plans: "+masked", _varlen_plans: "+varlen"}.get(plans, "")
                rows.append(Row(launch.name + tag, arch, dt, d, c, desc, regs, spills, smem, mma, err))
                if progress:
                    progress(rows[-1])
    return rows


def _interpreting() -> bool:
    if "tritformer.kernels.attention" in sys.modules:
        from tritformer.kernels._launch import is_interpreted
        return is_interpreted(sys.modules["tritformer.kernels.attention"]._attn_fwd)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "dtype", "D/C", "causal", "config", "regs", "spill B", "smem B", "mma", "ok")
    body = [(r.kernel, r.arch, r.dtype, str(r.head_dim), "y" if r.causal else "n", r.config,
             str(r.registers), str(r.spill_bytes), str(r.shared_bytes), str(r.mma),
             "ok" if r.ok else ("FAIL " + r.error if r.error else "FAIL")) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(args, argv: list[str]) -> int:
    if _interpreting():
        # kernels decorated under the interpreter cannot be compiled: start a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "tritformer", *argv], env=env).returncode
    rows = inspect(args.arch, args.head_dim, args.dtype, (False, True),
                   progress=lambda r: print(".", end="", flush=True, file=sys.stderr),
                   ops=args.op)
    print(file=sys.stderr)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} kernel configs compiled, {len(bad)} failing "
          f"(spills, shared memory over the limit, or compile errors)")
    return 1 if bad else 0
