"""KV-cache append with rotary embedding: a Triton kernel and its host launcher.

One launch writes the new keys and values of a generation step into the cache IN PLACE (rotating
the keys first when rotary cos/sin tables are given) and, in the same launch, rotates the
queries into a new tensor. It replaces the torch indexing passes FlashAttention's
`flash_attn_with_kvcache` semantics needed before (flash_attn_interface, issue #19).

Layouts, head-major [B, H, N, D], any strides (FlashAttention's [B, N, H, D] tensors are passed
as their ``.transpose(1, 2)`` views):
  k, v             [B, Hkv, Nnew, D]   new tokens of batch row b, at positions
                                       cache_seqlens[b] + t, t in [0, Nnew)
  k_cache/v_cache  contiguous: [B_cache, Hkv, Nmax, D]; row b writes cache row b, or
                   cache_batch_idx[b] when given.
                   paged (block_table [B, max_blocks]): [num_blocks, Hkv, page, D]; position p
                   of row b lives in block block_table[b, p // page], slot p % page.
  q / q_out        [B, Hq, Nq, D]: query i of row b rotated at cache_seqlens[b] + i (causal) or
                   cache_seqlens[b] (Q_CAUSAL=False, FlashAttention's non-causal case)
  cos/sin          [seqlen_ro, rotary_dim / 2], any float dtype and strides

Rotary (FlashAttention's, and flash_attn_interface.apply_rotary's formula): the first
rotary_dim = 2 * ROT_HALF dims of a row are rotated in pairs, (0, 1), (2, 3) ... when
INTERLEAVED (GPT-J), else (i, i + ROT_HALF) (GPT-NeoX); the rest pass through unchanged. In
float32, with cos/sin read in their own dtype and converted exactly (so fp16 tables are what
FlashAttention's tests pass):
    out[first of a pair]  = x * cos - x_partner * sin
    out[second of a pair] = x_partner * sin + x * cos
rounded once to the tensor's dtype. Interleaved pairs are split from the loaded tile in
registers (reshape + split, join back); NeoX partners sit rotary_dim / 2 apart, at no alignment
a tile could rely on (rotary_dim < D, not a power of two), and are read with a second, permuted
load of the same rows (the sign of the first of a pair is put on sin: a - b is a + (-b)
exactly). The launch is compiled without FMA contraction (enable_fp_fusion=False) so that
the GPU kernel rounds exactly as the torch expression does (three roundings, no fused one):
bitwise equal to apply_rotary and to the CPU fallback on every backend.

Grid: one axis (kernels._launch.flat_grid). A program takes BLOCK_R rows of one batch row,
row r = head * N + token (a decode step, N = 1: one row per head), and all D dims of each
row (a row is contiguous in memory when its D stride is 1, whatever the other strides). Programs
[0, KV_PROGRAMS) append keys and values (B * cdiv(Hkv * Nnew, BLOCK_R)); the next
B * cdiv(Hq * Nq, BLOCK_R) rotate queries (only when ROTATE_Q).

Safety: the host checks every index before launching (ops/kvcache.py), except while
torch.compile traces. The kernel does not rely on it: a row whose position is outside
[0, capacity), whose block id is outside [0, num_blocks) or whose cache row is outside
[0, B_cache) is not written at all, and rotary table reads clamp the position into
[0, seqlen_ro), so unchecked inputs never touch memory outside the tensors. All offsets are
int64 (a paged pool passes 2^31 elements easily); the caches are written in place, so they are
never copied to make offsets smaller.

This module knows nothing of autograd (inference only): the launcher takes tensors and returns
tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, device_arch, flat_grid, is_interpreted, run


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_rotated(X, src, stride_xd, pos, mask_r, Cos, Sin,
                  stride_cn, stride_cd, stride_sn, stride_sd, ROT_HALF, offs_d, mask_d,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Rows X + src[r] (int64 element offsets, [BLOCK_R]) as a [BLOCK_R, BLOCK_D] tile in X's
    dtype, rotated at positions pos [BLOCK_R] (already clamped into the table) when ROTARY."""
    offs_dx = offs_d.to(tl.int64) * stride_xd
    x = tl.load(X + src[:, None] + offs_dx[None, :], mask=mask_r[:, None] & mask_d[None, :],
                other=0.0)
    if ROTARY:
        p64 = pos.to(tl.int64)
        if INTERLEAVED:
            # pairs (2j, 2j + 1): the tile as [BLOCK_R, BLOCK_D / 2, 2], split into the even and
            # odd dims (registers only: no second load of x)
            j = tl.arange(0, BLOCK_D // 2)
            rot = j < ROT_HALF  # pairs past rotary_dim pass through
            m = mask_r[:, None] & rot[None, :]
            c = tl.load(Cos + p64[:, None] * stride_cn + (j.to(tl.int64) * stride_cd)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            s = tl.load(Sin + p64[:, None] * stride_sn + (j.to(tl.int64) * stride_sd)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_R, BLOCK_D // 2, 2]))
            xe, xo = x_even.to(tl.float32), x_odd.to(tl.float32)
            y_even = (xe * c - xo * s).to(x.dtype)
            y_odd = (xo * c + xe * s).to(x.dtype)
            y_even = tl.where(rot[None, :], y_even, x_even)
            y_odd = tl.where(rot[None, :], y_odd, x_odd)
            x = tl.reshape(tl.join(y_even, y_odd), [BLOCK_R, BLOCK_D])
        else:
            # pairs (j, j + ROT_HALF): each dim with its partner, read from memory again (the
            # halves need not be aligned to anything: rotary_dim < D, not a power of two)
            first = offs_d < ROT_HALF
            j = tl.where(first, offs_d, offs_d - ROT_HALF)
            partner = tl.where(first, offs_d + ROT_HALF, offs_d - ROT_HALF)
            rot = offs_d < 2 * ROT_HALF  # dims past rotary_dim pass through
            m = mask_r[:, None] & rot[None, :]
            xp = tl.load(X + src[:, None] + (partner.to(tl.int64) * stride_xd)[None, :], mask=m,
                         other=0.0).to(tl.float32)
            c = tl.load(Cos + p64[:, None] * stride_cn + (j.to(tl.int64) * stride_cd)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            s = tl.load(Sin + p64[:, None] * stride_sn + (j.to(tl.int64) * stride_sd)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            s = tl.where(first[None, :], -s, s)  # x * c - xp * s for the first of a pair
            y = x.to(tl.float32) * c + xp * s
            x = tl.where(rot[None, :], y.to(x.dtype), x)
    return x


@triton.jit
def _kvcache_append(K, V, KCache, VCache, SeqLens, BlockTable, BatchIdx, Cos, Sin, Q, QOut,
                    stride_kz, stride_kh, stride_kn, stride_kd,
                    stride_vz, stride_vh, stride_vn, stride_vd,
                    stride_kcz, stride_kch, stride_kcn, stride_kcd,
                    stride_vcz, stride_vch, stride_vcn, stride_vcd,
                    stride_qz, stride_qh, stride_qm, stride_qd,
                    stride_oz, stride_oh, stride_om, stride_od,
                    stride_cn, stride_cd, stride_sn, stride_sd,
                    stride_lens, stride_btz, stride_btm, stride_bidx,
                    HKV, N_NEW, HQ, N_Q, PAGE, CAPACITY, NUM_CACHE, SEQLEN_RO, ROT_HALF,
                    KV_PROGRAMS, KV_TILES, Q_TILES,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, ROTARY: tl.constexpr,
                    INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, Q_CAUSAL: tl.constexpr):
    # PAGE: the paged cache's block size, or Nmax for a contiguous cache (then CAPACITY = Nmax);
    # NUM_CACHE: num_blocks (paged) or B_cache (contiguous)
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # folds to all-true when HEAD_DIM == BLOCK_D
    offs = tl.arange(0, BLOCK_R)
    if pid < KV_PROGRAMS:
        # -- append: rows (kv head, new token) of batch row b ----
        b = pid // KV_TILES
        r = (pid % KV_TILES) * BLOCK_R + offs
        mask_r = r < HKV * N_NEW
        h = (r // N_NEW).to(tl.int64)
        t = r % N_NEW
        b64 = b.to(tl.int64)
        p = tl.load(SeqLens + b64 * stride_lens).to(tl.int64) + t  # [BLOCK_R] cache positions
        ok = mask_r & (p >= 0) & (p < CAPACITY)
        p = tl.where(ok, p, 0)
        if PAGED:
            blk = tl.load(BlockTable + b64 * stride_btz + (p // PAGE) * stride_btm, mask=ok,
                          other=0).to(tl.int64)
            ok = ok & (blk >= 0) & (blk < NUM_CACHE)
            z = tl.where(ok, blk, 0)
            n = p % PAGE
        else:
            if HAS_BATCH_IDX:
                z = tl.load(BatchIdx + b64 * stride_bidx).to(tl.int64) + offs * 0
                ok = ok & (z >= 0) & (z < NUM_CACHE)
                z = tl.where(ok, z, 0)
            else:
                z = b64 + offs * 0
            n = p
        pos = tl.minimum(p, SEQLEN_RO - 1)  # the table row (ok rows: p < seqlen_ro, checked)
        t64 = t.to(tl.int64)
        mask_w = ok[:, None] & mask_d[None, :]
        # keys, rotated
        x = _load_rotated(K, b64 * stride_kz + h * stride_kh + t64 * stride_kn, stride_kd, pos,
                          mask_r, Cos, Sin, stride_cn, stride_cd, stride_sn, stride_sd, ROT_HALF,
                          offs_d, mask_d, BLOCK_R, BLOCK_D, ROTARY, INTERLEAVED)
        dst = z * stride_kcz + h * stride_kch + n * stride_kcn
        tl.store(KCache + dst[:, None] + (offs_d.to(tl.int64) * stride_kcd)[None, :], x,
                 mask=mask_w)
        # values, copied
        src = b64 * stride_vz + h * stride_vh + t64 * stride_vn
        x = tl.load(V + src[:, None] + (offs_d.to(tl.int64) * stride_vd)[None, :],
                    mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        dst = z * stride_vcz + h * stride_vch + n * stride_vcn
        tl.store(VCache + dst[:, None] + (offs_d.to(tl.int64) * stride_vcd)[None, :], x,
                 mask=mask_w)
    else:
        if ROTATE_Q:
            # -- queries: rows (query head, query) of batch row b, into a new tensor ----
            qpid = pid - KV_PROGRAMS
            b = qpid // Q_TILES
            r = (qpid % Q_TILES) * BLOCK_R + offs
            mask_r = r < HQ * N_Q
            h = (r // N_Q).to(tl.int64)
            i = r % N_Q
            b64 = b.to(tl.int64)
            p = tl.load(SeqLens + b64 * stride_lens).to(tl.int64) + offs * 0
            if Q_CAUSAL:
                p = p + i
            pos = tl.minimum(tl.maximum(p, 0), SEQLEN_RO - 1)
            i64 = i.to(tl.int64)
            x = _load_rotated(Q, b64 * stride_qz + h * stride_qh + i64 * stride_qm, stride_qd,
                              pos, mask_r, Cos, Sin, stride_cn, stride_cd, stride_sn, stride_sd,
                              ROT_HALF, offs_d, mask_d, BLOCK_R, BLOCK_D, True, INTERLEAVED)
            dst = b64 * stride_oz + h * stride_oh + i64 * stride_om
            tl.store(QOut + dst[:, None] + (offs_d.to(tl.int64) * stride_od)[None, :], x,
                     mask=mask_r[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
# Interpreter: 8 rows per program, so that the tests' Hkv * Nnew = 10 rows take two programs
# (a ragged second tile) while a whole small batch row stays a few programs (the interpreter's
# cost is per program).
INTERPRETER_ROWS = 8
# GPU: a copy with a gather, bandwidth-bound and without a loop: one tile of about 2K elements
# per 4-warp program (16 per thread; D = 128: 16 rows), one stage. Rows capped at 64 (small D).
GPU_TILE_ELEMENTS = 2048
GPU_MAX_ROWS = 64


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(arch: int | None, block_d: int) -> list:
    """The kernel's config (one: nothing to tune) for a compute capability (None: the
    interpreter) and padded head dim."""
    if arch is None:
        return [triton.Config({"BLOCK_R": INTERPRETER_ROWS}, num_warps=4, num_stages=1)]
    rows = max(1, min(GPU_MAX_ROWS, GPU_TILE_ELEMENTS // block_d))
    return [triton.Config({"BLOCK_R": rows}, num_warps=4, num_stages=1)]


# ---------------------------------------------------------------------------------------------
# Host launcher
# ---------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor | None, prefix: str, axes: str) -> dict:
    s = t.stride() if t is not None else (0,) * len(axes)
    return {f"stride_{prefix}{a}": s[i] for i, a in enumerate(axes)}


def plan_append(k_cache, v_cache, k, v, cache_seqlens, q, q_out, cos, sin, interleaved: bool,
                q_causal: bool, block_table, cache_batch_idx, arch: int | None) -> list[Launch]:
    """The launch (one; none when there is nothing to write) appending k, v at cache_seqlens
    and, when q_out is given, writing q rotated into it (cos/sin must be given then)."""
    B, Hkv, n_new, D = k.shape
    rotary = cos is not None
    rotate_q = q_out is not None
    Hq, n_q = (q.shape[1], q.shape[2]) if rotate_q else (0, 0)
    paged = block_table is not None
    if paged:
        page, capacity = k_cache.shape[2], block_table.shape[1] * k_cache.shape[2]
    else:
        page = capacity = k_cache.shape[2]
    block_d = block_d_for(D)
    configs = configs_for(arch, block_d)
    rows = configs[0].kwargs["BLOCK_R"]
    kv_tiles = triton.cdiv(Hkv * n_new, rows)
    q_tiles = triton.cdiv(Hq * n_q, rows) if rotate_q else 0
    kv_programs, q_programs = B * kv_tiles, B * q_tiles
    if kv_programs + q_programs == 0:
        return []
    dummy = cache_seqlens  # pointer arguments a switch turns off are never read
    args = {
        "K": k, "V": v, "KCache": k_cache, "VCache": v_cache, "SeqLens": cache_seqlens,
        "BlockTable": block_table if paged else dummy,
        "BatchIdx": cache_batch_idx if cache_batch_idx is not None else dummy,
        "Cos": cos if rotary else dummy, "Sin": sin if rotary else dummy,
        "Q": q if rotate_q else dummy, "QOut": q_out if rotate_q else dummy,
        **_strides(k, "k", "zhnd"), **_strides(v, "v", "zhnd"),
        **_strides(k_cache, "kc", "zhnd"), **_strides(v_cache, "vc", "zhnd"),
        **_strides(q if rotate_q else None, "q", "zhmd"),
        **_strides(q_out if rotate_q else None, "o", "zhmd"),
        **_strides(cos if rotary else None, "c", "nd"), **_strides(sin if rotary else None, "s", "nd"),
        "stride_lens": cache_seqlens.stride(0),
        **_strides(block_table if paged else None, "bt", "zm"),
        "stride_bidx": cache_batch_idx.stride(0) if cache_batch_idx is not None else 0,
        "HKV": Hkv, "N_NEW": n_new, "HQ": Hq, "N_Q": n_q, "PAGE": page, "CAPACITY": capacity,
        "NUM_CACHE": k_cache.shape[0], "SEQLEN_RO": cos.shape[0] if rotary else 1,
        "ROT_HALF": cos.shape[1] if rotary else 0,
        "KV_PROGRAMS": kv_programs, "KV_TILES": max(kv_tiles, 1), "Q_TILES": max(q_tiles, 1),
    }
    constexprs = {
        "HEAD_DIM": D, "BLOCK_D": block_d, "PAGED": paged,
        "HAS_BATCH_IDX": cache_batch_idx is not None, "ROTARY": rotary,
        "INTERLEAVED": bool(interleaved), "ROTATE_Q": rotate_q, "Q_CAUSAL": bool(q_causal),
        # a launch option, not a kernel argument (the interpreter drops it): no FMA contraction,
        # so the rotation rounds as the torch expression does (module docstring)
        "enable_fp_fusion": False,
    }
    return [Launch("kvcache_append", _kvcache_append, args, constexprs,
                   lambda meta: flat_grid(kv_programs + q_programs), configs,
                   ["HEAD_DIM", "PAGED", "ROTARY", "ROTATE_Q"])]


def _arch_for(t: torch.Tensor) -> int | None:
    return None if is_interpreted(_kvcache_append) else device_arch(t)


def kvcache_append_forward(k_cache, v_cache, k, v, cache_seqlens, q=None, cos=None, sin=None,
                           interleaved: bool = False, q_causal: bool = True, block_table=None,
                           cache_batch_idx=None):
    """Write k, v into k_cache / v_cache in place (k rotated when cos/sin are given) and return
    q rotated into a new tensor (torch.empty_like(q)), or None when q or the tables are absent.
    Arguments as the module docstring; checked by the caller."""
    rotate_q = q is not None and cos is not None
    q_out = torch.empty_like(q) if rotate_q else None
    for launch in plan_append(k_cache, v_cache, k, v, cache_seqlens, q, q_out, cos, sin,
                              interleaved, q_causal, block_table, cache_batch_idx,
                              _arch_for(k_cache)):
        run(launch)
    return q_out
