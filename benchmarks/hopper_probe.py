"""Probe of TMA tensor descriptors and warp specialization on Hopper (docs/hopper-triton.md), no GPU.

    python benchmarks/hopper_probe.py --interp      # numerics in Triton's interpreter (CPU tensors)
    python benchmarks/hopper_probe.py               # AOT compiles for sm_90, hot-loop table
    (--causal: the same, causal, with the diagonal mask on every key tile)

A plain FA2 forward (fp16, log2(e) folded into the scale), one program per (query tile,
batch*head), loading its tiles one of three ways (LOAD, constexpr):
  "ptr"     pointer loads (cp.async after Triton's pipelining), what the shipped forward does;
  "hdesc"   host TensorDescriptor over [B, H, N, D] (4-D, blocks [1, 1, rows, D]);
  "ddesc"   tl.make_tensor_descriptor per (batch, head) from the pointer and strides (2-D [N, D]);
            needs triton.set_allocator on a GPU (global scratch, 128 B per descriptor and program).
One key loop over every tile; the keys past N (the ragged tail) are masked to -inf when not EVEN_N.
WS puts warp_specialize on that loop: on sm_90 it takes effect only with LOAD="ddesc" and
num_warps=4 (the compile then reports 12 warps and setmaxnreg in the PTX).
Compile rows are read from the cubin Triton built (tritformer.inspect) and the SASS hot loop
(tritformer.perf); they are counts, not GPU speeds.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if __name__ == "__main__":  # TRITON_INTERPRET is read when @triton.jit is applied, so before the kernels
    if "--interp" in sys.argv[1:]:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _tile(src, z, h, row, n, stride_n, BLOCK: tl.constexpr, D: tl.constexpr, LOAD: tl.constexpr):
    if LOAD == "hdesc":
        t = src.load([z, h, row, 0]).reshape([BLOCK, D])
    elif LOAD == "ddesc":
        t = src.load([row, 0])
    else:
        offs = row + tl.arange(0, BLOCK)
        t = tl.load(src + offs[:, None] * stride_n + tl.arange(0, D)[None, :], mask=offs[:, None] < n, other=0.0)
    return t


@triton.jit
def _src(X, z, h, n, stride_z, stride_h, stride_n, BLOCK: tl.constexpr, D: tl.constexpr, LOAD: tl.constexpr):
    # one return: the compiler rejects returns of different types even in constexpr branches
    if LOAD == "hdesc":
        src = X
    elif LOAD == "ddesc":  # this head's [n, D] rows: rows >= n read as zero, stores past n are clipped
        src = tl.make_tensor_descriptor(X + z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h,
                                        shape=[n, D], strides=[stride_n, 1], block_shape=[BLOCK, D])
    else:
        src = X + z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h
    return src


@triton.jit
def probe_fwd(Q, K, V, O, Lse, stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
              stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om, H, N_CTX, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LOAD: tl.constexpr, WS: tl.constexpr, EVEN_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    z = off_hz // H
    h = off_hz % H
    m0 = start_m * BLOCK_M
    q_src = _src(Q, z, h, N_CTX, stride_qz, stride_qh, stride_qm, BLOCK_M, HEAD_DIM, LOAD)
    k_src = _src(K, z, h, N_CTX, stride_kz, stride_kh, stride_kn, BLOCK_N, HEAD_DIM, LOAD)
    v_src = _src(V, z, h, N_CTX, stride_vz, stride_vh, stride_vn, BLOCK_N, HEAD_DIM, LOAD)
    o_src = _src(O, z, h, N_CTX, stride_oz, stride_oh, stride_om, BLOCK_M, HEAD_DIM, LOAD)
    q = _tile(q_src, z, h, m0, N_CTX, stride_qm, BLOCK_M, HEAD_DIM, LOAD)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    hi = N_CTX
    if CAUSAL:
        hi = tl.minimum(N_CTX, m0 + BLOCK_M)
    # one loop, nothing after it that branches: the shape Hopper's warp specialization accepts
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k = _tile(k_src, z, h, start_n, N_CTX, stride_kn, BLOCK_N, HEAD_DIM, LOAD)
        qk = tl.dot(q, k.T)
        if not EVEN_N:  # -- keys past N_CTX -> -inf ----
            qk = tl.where((start_n + offs_n)[None, :] < N_CTX, qk, float("-inf"))
        if CAUSAL:  # the diagonal mask on every tile (a separate diagonal loop stops WS)
            qk = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # one FFMA per score
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_src, z, h, start_n, N_CTX, stride_vn, BLOCK_N, HEAD_DIM, LOAD)
        acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
        m_i = m_ij
    tl.store(Lse + off_hz.to(tl.int64) * N_CTX + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N_CTX)
    out = (acc / l_i[:, None]).to(tl.float16)
    if LOAD == "hdesc":
        o_src.store([z, h, m0, 0], out.reshape([1, 1, BLOCK_M, HEAD_DIM]))
    elif LOAD == "ddesc":
        o_src.store([m0, 0], out)
    else:
        tl.store(o_src + offs_m[:, None] * stride_om + tl.arange(0, HEAD_DIM)[None, :], out,
                 mask=offs_m[:, None] < N_CTX)


def launch_args(q, k, v, o, lse, load: str, block_m: int, block_n: int) -> list:
    """Positional arguments of probe_fwd (host descriptors for LOAD="hdesc")."""
    head_dim, (_, heads, n_ctx) = q.shape[-1], lse.shape
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    if load == "hdesc":
        from triton.tools.tensor_descriptor import TensorDescriptor
        q, k, v, o = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bs, head_dim])
                      for t, bs in ((q, block_m), (k, block_n), (v, block_n), (o, block_m)))
    return [q, k, v, o, lse, *strides, heads, n_ctx, head_dim ** -0.5 * LOG2E]


def interp(causal: bool) -> int:
    import torch
    kernel = probe_fwd
    torch.manual_seed(0)
    failures = 0
    # (B, H, N, D, BLOCK_M, BLOCK_N, stored as)
    for B, H, N, D, bm, bn, layout in [(2, 2, 100, 64, 64, 32, "bhnd"),    # ragged tail
                                       (1, 3, 77, 128, 32, 32, "bnhd"),    # [B, N, H, D] storage
                                       (1, 2, 128, 128, 64, 64, "bnhd")]:  # even
        shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
        q, k, v = (torch.randn(shape, dtype=torch.float16) for _ in range(3))
        if layout == "bnhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        s = (q.float() @ k.float().transpose(-1, -2)) * D ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        ref_o, ref_lse = torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1) / math.log(2)
        for load in ("ptr", "hdesc", "ddesc"):
            for ws in (False, True):
                o, lse = torch.empty_like(q), torch.empty(B, H, N)
                kernel[(math.ceil(N / bm), B * H)](*launch_args(q, k, v, o, lse, load, bm, bn),
                                                   HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, LOAD=load, WS=ws,
                                                   EVEN_N=N % bn == 0, CAUSAL=causal)
                err_o = (o.float() - ref_o).abs().max().item()
                err_l = (lse - ref_lse).abs().max().item()
                ok = err_o < 2e-3 and err_l < 1e-3
                failures += not ok
                print(f"{layout} {B}x{H}x{N}x{D} {bm}x{bn} {load:5s} ws={ws!s:5s} "
                      f"max|dO|={err_o:.1e} max|dlse|={err_l:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


CONFIGS = [  # (LOAD, BLOCK_M, BLOCK_N, num_warps, num_stages, WS)
    ("ptr", 128, 64, 8, 3, False), ("hdesc", 128, 64, 8, 3, False), ("ddesc", 128, 64, 8, 3, False),
    ("ptr", 128, 128, 8, 3, False), ("hdesc", 128, 128, 8, 3, False), ("ddesc", 128, 128, 8, 3, False),
    ("ddesc", 128, 64, 4, 2, True), ("ddesc", 128, 128, 4, 2, True),
    ("ddesc", 128, 128, 8, 3, True),  # 8 warps: warp_specialize is silently ignored
    ("hdesc", 128, 128, 4, 2, True),  # host descriptors: the Hopper WS pass fails
]


def compile_table(causal: bool) -> int:
    from types import SimpleNamespace as NS

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritformer import inspect as I
    from tritformer import perf as P

    kernel = probe_fwd
    B, H, N, D = 4, 32, 1024, 128
    meta = dict(device="meta", dtype=torch.float16)
    mode = "causal" if causal else "non-causal"
    print(f"Triton {triton.__version__}, sm_90, fp16 [B, H, N, D] = [{B}, {H}, {N}, {D}], {mode}, "
          "hot loop per warp per K/V tile (one consumer warpgroup's loop when WS is on)")
    print("load  tile          ws_req ws_on warps regs stack smem    scratch instr HGMMA UTMALDG LDGSTS nonMMA/MMA")
    for load, bm, bn, w, s, ws in CONFIGS:
        q, k, v, o = (torch.empty(B, H, N, D, **meta) for _ in range(4))
        lse = torch.empty(B, H, N, device="meta", dtype=torch.float32)
        args = launch_args(q, k, v, o, lse, load, bm, bn)
        launch = NS(fn=kernel, args=dict(zip(kernel.arg_names, args)),
                    constexprs=dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, LOAD=load, WS=ws, EVEN_N=True,
                                    CAUSAL=causal))
        sig, cx, attrs = I._signature(launch, NS(kwargs={}, num_warps=w, num_stages=s))
        tile = f"{bm}x{bn}/{w}w/{s}s"
        try:
            with I._observed_ptxas():
                ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": s})
        except Exception as e:  # noqa: BLE001 - the failing WS compiles are a result
            print(f"{load:5s} {tile:13s} {ws!s:6s} compile failed: {type(e).__name__}: {str(e)[-80:]}")
            continue
        res = I.cubin_resources(ck.asm["cubin"])
        sass = P.disassemble(ck.asm["cubin"])
        hot = P.analyze_sass(sass, "sm_90", w, 4 * bm * bn * D)["hot_loop"]
        ops = hot["classes"]
        ws_on = "setmaxnreg" in ck.asm["ptx"]  # warp specialization took effect
        instrs, labels = P.parse_sass(sass)
        loop, _ = P.hot_loop(instrs, labels, w)
        body = [instrs[i].base for i in loop.body if not instrs[i].never]
        print(f"{load:5s} {tile:13s} {ws!s:6s} {ws_on!s:5s} {ck.metadata.num_warps:5d} {res['registers']:4d} "
              f"{res['stack']:5d} {ck.metadata.shared:7d} {ck.metadata.global_scratch_size:7d} "
              f"{hot['instr_per_iter']:5d} {ops['mma']:5d} {body.count('UTMALDG'):7d} {body.count('LDGSTS'):6d} "
              f"{hot['non_mma_per_mma']:10.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interp", action="store_true", help="check numerics in Triton's interpreter")
    ap.add_argument("--causal", action="store_true", help="causal: the diagonal mask on every key tile")
    a = ap.parse_args()
    return interp(a.causal) if a.interp else compile_table(a.causal)


if __name__ == "__main__":
    sys.exit(main())
