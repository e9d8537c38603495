"""KV-cache append with rotary embedding: the `tritformer::kvcache_append` custom op and the public
`kvcache_append` function.

Inference only (no backward). The custom op mutates k_cache and v_cache and returns the rotated
queries; its `register_fake` only allocates that output, so `torch.compile(fullgraph=True)`
traces through it (functionalised as an in-place op on the caches). On the "torch" backend (CPU
without Triton's interpreter) the public function runs `kvcache_append_torch`, the same
semantics in torch indexing passes, instead of the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import MAX_HEAD_DIM, _dtype_name, check_flag, check_tensor
from ..backend import backend_for, is_torch

Q_POSITIONS = ("causal", "start")


def _kernels():
    from tritformer.kernels import kvcache as K  # imported at first use: see backend.py
    return K


# ---------------------------------------------------------------------------------------------
# The torch implementation (the "torch" backend, and the tests' reference)
# ---------------------------------------------------------------------------------------------
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """x [B, H, S, D] (head-major) with its first rotary_dim = 2 * cos.shape[1] dims rotated by
    cos/sin[positions[b, s]] (positions [B, S] long), computed in float32 and rounded once to
    x's dtype, as FlashAttention's rotary kernel (flash_attn_interface.apply_rotary is this on
    the [B, S, H, D] layout). A new tensor."""
    rd = 2 * cos.shape[1]
    c = cos[positions].float()[:, None]  # [B, 1, S, rd/2]
    s = sin[positions].float()[:, None]
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rd:]), dim=-1)


def kvcache_append_torch(k_cache, v_cache, k, v, cache_seqlens, q=None, rotary_cos=None,
                         rotary_sin=None, rotary_interleaved=False, q_causal=True,
                         block_table=None, cache_batch_idx=None):
    """`kvcache_append`'s semantics in torch (index_put_ through [.., N, H, D] views of the
    caches): writes k, v in place, returns q rotated (a new tensor) or None when q or the
    tables are absent. Arguments checked by the caller."""
    B, _, n_new, _ = k.shape
    dev = k.device
    rotary = rotary_cos is not None
    with torch.no_grad():
        pos = cache_seqlens.long()[:, None] + torch.arange(n_new, device=dev)  # [B, Nnew]
        k_new = apply_rotary(k, rotary_cos, rotary_sin, pos, rotary_interleaved) if rotary else k
        if block_table is not None:
            page = k_cache.shape[2]
            rows, slots = block_table.long().gather(1, pos // page), pos % page
        else:
            rows = (torch.arange(B, device=dev) if cache_batch_idx is None
                    else cache_batch_idx.long())[:, None].expand(B, n_new)
            slots = pos
        k_cache.transpose(1, 2)[rows, slots] = k_new.transpose(1, 2)
        v_cache.transpose(1, 2)[rows, slots] = v.transpose(1, 2)
        if q is None or not rotary:
            return None
        n_q = q.shape[2]
        offs = torch.arange(n_q, device=dev) if q_causal else torch.zeros(n_q, dtype=torch.long,
                                                                           device=dev)
        return apply_rotary(q, rotary_cos, rotary_sin, cache_seqlens.long()[:, None] + offs,
                            rotary_interleaved)


# ---------------------------------------------------------------------------------------------
# Checks (every one before anything is written)
# ---------------------------------------------------------------------------------------------
def _same(name, x, ref, ref_name):
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {_dtype_name(ref.dtype)}, got "
                        f"{_dtype_name(x.dtype)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def _index(name, x, shape: tuple, layout: str, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {_dtype_name(x.dtype)}")
    if x.dim() != len(shape) or any(want is not None and got != want
                                    for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on k_cache's device {device}, got {x.device}")


def check_kvcache_append_inputs(k_cache, v_cache, k, v, cache_seqlens, q, rotary_cos, rotary_sin,
                                rotary_interleaved, q_positions, block_table,
                                cache_batch_idx) -> None:
    """kvcache_append's arguments; errors name the argument. The contents of the index tensors
    (cache_seqlens against the capacity and the rotary table, block ids, cache rows) are checked
    too, with one device sync, except while torch.compile traces (the kernel then drops writes
    that would land outside the cache)."""
    paged = block_table is not None
    cache_layout = "[num_blocks, Hkv, page_block_size, D]" if paged else "[B_cache, Hkv, Nmax, D]"
    check_tensor("k_cache", k_cache, 4, cache_layout)
    check_tensor("v_cache", v_cache, 4, cache_layout)
    _same("v_cache", v_cache, k_cache, "k_cache")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got "
                         f"{tuple(v_cache.shape)}")
    n_cache, Hkv, n_max, D = k_cache.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D of k_cache must be in 1..{MAX_HEAD_DIM}, got {D}")
    check_tensor("k", k, 4, "[B, Hkv, Nnew, D]")
    check_tensor("v", v, 4, "[B, Hkv, Nnew, D]")
    for name, x in (("k", k), ("v", v)):
        _same(name, x, k_cache, "k_cache")
        if x.shape[1] != Hkv or x.shape[3] != D:
            raise ValueError(f"{name} must be [B, Hkv, Nnew, D] with k_cache's Hkv = {Hkv} and "
                             f"D = {D}, got shape {tuple(x.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape [B, Hkv, Nnew, D] = {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    B, n_new, dev = k.shape[0], k.shape[2], k_cache.device
    _index("cache_seqlens", cache_seqlens, (B,), f"[B] = [{B}]", dev)
    if q is not None:
        check_tensor("q", q, 4, "[B, Hq, Nq, D]")
        _same("q", q, k_cache, "k_cache")
        if q.shape[0] != B or q.shape[3] != D:
            raise ValueError(f"q must be [B, Hq, Nq, D] with k's B = {B} and D = {D}, got shape "
                             f"{tuple(q.shape)}")
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_cos and rotary_sin must be given together, got only "
                             f"{'rotary_cos' if rotary_sin is None else 'rotary_sin'}")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [seqlen_ro, rotary_dim / 2] or "
                                f"None, got {type(x).__name__}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a float tensor, got {_dtype_name(x.dtype)}")
            if x.dim() != 2:
                raise ValueError(f"{name} must be 2-D [seqlen_ro, rotary_dim / 2], got shape "
                                 f"{tuple(x.shape)}")
            if x.device != dev:
                raise ValueError(f"{name} must be on k_cache's device {dev}, got {x.device}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, "
                             f"got {tuple(rotary_sin.shape)}")
        if not 1 <= rotary_cos.shape[1] <= D // 2:
            raise ValueError(f"rotary_cos: rotary_dim = 2 * rotary_cos.shape[1] must be in "
                             f"2..D (D = {D}), got {2 * rotary_cos.shape[1]}")
    check_flag("rotary_interleaved", rotary_interleaved)
    if not isinstance(q_positions, str) or q_positions not in Q_POSITIONS:
        raise ValueError(f"q_positions must be 'causal' (query i at cache_seqlens[b] + i) or "
                         f"'start' (every query at cache_seqlens[b]), got {q_positions!r}")
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (the block table "
                             "already maps each batch row to its blocks)")
        _index("block_table", block_table, (B, None), f"[B, max_blocks] = [{B}, max_blocks]", dev)
        if n_max < 1:
            raise ValueError(f"k_cache: page_block_size (dim 2 of the paged cache) must be >= 1, "
                             f"got shape {tuple(k_cache.shape)}")
        capacity = block_table.shape[1] * n_max
    else:
        if cache_batch_idx is None:
            if n_cache != B:
                raise ValueError(f"k_cache must have k's batch size {B} (or pass cache_batch_idx), "
                                 f"got shape {tuple(k_cache.shape)}")
        else:
            _index("cache_batch_idx", cache_batch_idx, (B,), f"[B] = [{B}]", dev)
        capacity = n_max
    if torch.compiler.is_compiling() or B == 0:
        return
    # contents: every min / max in one transfer
    stats = [cache_seqlens.min(), cache_seqlens.max()]
    index = block_table if paged else cache_batch_idx
    if index is not None and index.numel():
        stats += [index.min(), index.max()]
    values = torch.stack(stats).tolist()
    lo, hi = values[:2]
    if lo < 0 or hi + n_new > capacity:
        b = int((cache_seqlens < 0).nonzero()[0]) if lo < 0 else int(
            (cache_seqlens.long() + n_new > capacity).nonzero()[0])
        s = int(cache_seqlens[b])
        where = (f"the paged capacity: block_table has {block_table.shape[1]} blocks of "
                 f"{n_max} per row" if paged else "Nmax, k_cache.shape[2]")
        raise ValueError(f"cache_seqlens[{b}] + Nnew = {s} + {n_new} must be in [0, "
                         f"{capacity}] ({where}), with cache_seqlens[{b}] >= 0")
    if len(values) > 2:
        ilo, ihi = values[2:]
        name = "block_table" if paged else "cache_batch_idx"
        what = "num_blocks" if paged else "B_cache"
        if ilo < 0 or ihi >= n_cache:
            raise ValueError(f"{name} entries must be in [0, {what}={n_cache}) (k_cache.shape[0]),"
                             f" got {ilo if ilo < 0 else ihi}")
    if rotary:
        n_q = 0 if q is None else q.shape[2]
        q_extent = n_q if q_positions == "causal" else min(n_q, 1)
        extent = max(n_new, q_extent)
        if extent and hi + extent > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions (seqlen_ro); "
                             f"positions up to {hi + extent - 1} are needed")


def check_inference_only(*tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in tensors):
        raise RuntimeError(
            "kvcache_append is inference-only (no backward): an input requires grad while grad "
            "mode is on. Run generation under torch.no_grad() / torch.inference_mode().")


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::kvcache_append", mutates_args=("k_cache", "v_cache"))
def _kvcache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, cache_seqlens: torch.Tensor, q: Optional[torch.Tensor],
                    rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                    rotary_interleaved: bool, q_causal: bool, block_table: Optional[torch.Tensor],
                    cache_batch_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Appends in place; returns q rotated (torch.empty_like(q)) when q and the tables are
    given, else an empty tensor (a custom op's output may not alias an input)."""
    q_out = _kernels().kvcache_append_forward(k_cache, v_cache, k, v, cache_seqlens, q,
                                              rotary_cos, rotary_sin, rotary_interleaved,
                                              q_causal, block_table, cache_batch_idx)
    return q_out if q_out is not None else k.new_empty(0)


@_kvcache_append.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, q, rotary_cos, rotary_sin, rotary_interleaved,
      q_causal, block_table, cache_batch_idx):
    if q is not None and rotary_cos is not None:
        return torch.empty_like(q)
    return k.new_empty(0)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def kvcache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, cache_seqlens: torch.Tensor, *,
                   q: Optional[torch.Tensor] = None, rotary_cos: Optional[torch.Tensor] = None,
                   rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = False,
                   q_positions: str = "causal", block_table: Optional[torch.Tensor] = None,
                   cache_batch_idx: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Append new keys and values to a KV cache in place, rotating the keys (and the queries)
    with rotary embeddings: one kernel launch (FlashAttention's `flash_attn_with_kvcache`
    append and rotary, before its attention).

    Args:
        k_cache, v_cache: the caches, written IN PLACE, any strides. Contiguous:
            [B_cache, Hkv, Nmax, D]. Paged (with ``block_table``): [num_blocks, Hkv,
            page_block_size, D] (FlashAttention's [num_blocks, page, Hkv, D] is its
            ``.transpose(1, 2)`` view). float16, bfloat16 or float32.
        k, v: [B, Hkv, Nnew, D] new tokens (Nnew may be 0), the caches' dtype, any strides:
            written at positions cache_seqlens[b] + t of row b's cache, k rotated first when
            the rotary tables are given (v never).
        cache_seqlens: int32 [B]: keys already in row b's cache (not modified; the caller adds
            Nnew afterwards, as with FlashAttention).
        q: [B, Hq, Nq, D] queries or None; rotated into a NEW tensor at positions
            cache_seqlens[b] + i (``q_positions="causal"``, FlashAttention's causal / local
            case) or all at cache_seqlens[b] (``"start"``, its non-causal case).
        rotary_cos, rotary_sin: [seqlen_ro, rotary_dim / 2] (any float dtype and strides) or
            None; rotary_dim <= D, dims past it unchanged. ``rotary_interleaved``: pairs
            (0, 1), (2, 3) ... (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX). Computed in
            float32 from the tables' values and rounded once to the tensor's dtype (bitwise
            `flash_attn_interface.apply_rotary`).
        block_table: int32 [B, max_blocks] or None: position p of row b lives in block
            block_table[b, p // page_block_size], slot p % page_block_size.
        cache_batch_idx: int32 [B] or None (contiguous caches only): row b writes cache row
            cache_batch_idx[b].

    Returns:
        q rotated (a new tensor in q's layout) when q and the tables are given; q itself when
        there are no tables; None when q is None.

    Every argument is checked before anything is written (cache_seqlens[b] + Nnew within the
    capacity, Nmax or max_blocks * page; block ids and cache rows in range; the table long
    enough for every position used). Rows mapped to the same cache slot (repeated
    cache_batch_idx entries, blocks shared between rows at a written slot) race: which one
    lands is undefined, as with FlashAttention. Not autocast: the caches keep their dtype, and
    k, v and q must have it. Inference only: raises if grad mode is on and an input requires
    grad. Where this runs: see ``tritformer.backend_for``.
    """
    check_kvcache_append_inputs(k_cache, v_cache, k, v, cache_seqlens, q, rotary_cos,
                                rotary_sin, rotary_interleaved, q_positions, block_table,
                                cache_batch_idx)
    check_inference_only(k_cache, v_cache, k, v, q, rotary_cos, rotary_sin)
    rotary = rotary_cos is not None
    q_rot = q if rotary else None  # without tables q is returned as it is: nothing to compute
    q_causal = q_positions == "causal"
    if is_torch(backend_for(k_cache)):  # CPU fallback: torch indexing passes
        out = kvcache_append_torch(k_cache, v_cache, k, v, cache_seqlens, q_rot, rotary_cos,
                                   rotary_sin, rotary_interleaved, q_causal, block_table,
                                   cache_batch_idx)
    else:
        out = torch.ops.tritformer.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, q_rot,
                                                  rotary_cos, rotary_sin, rotary_interleaved,
                                                  q_causal, block_table, cache_batch_idx)
    if q is None:
        return None
    return out if rotary else q
