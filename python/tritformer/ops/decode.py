"""Flash-decoding attention for KV-cache generation: the `tritformer::decode_attention` custom op
and the public `decode_attention` function.

Inference only: there is no backward (training uses `tritformer.attention`). The custom op has a
`register_fake` that only allocates the output shapes, so `torch.compile(fullgraph=True)` traces
through it. On the "torch" backend (CPU without Triton's interpreter) the public function
runs `tritformer.fallback` (torch's SDPA) instead of the kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import fallback, reference
from .._autocast import autocast
from .._checks import check_decode_inputs, check_inference_only
from ..backend import backend_for, is_torch
from .kvcache import check_kvcache_append_inputs, kvcache_append


def _kernels():
    from tritformer.kernels import decode as K  # imported at first use: see backend.py
    return K


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: Optional[torch.Tensor], scale: Optional[float],
                      num_splits: Optional[int], window_left: Optional[int],
                      window_right: Optional[int], alibi_slopes: Optional[torch.Tensor],
                      softcap: Optional[float], block_table: Optional[torch.Tensor],
                      cache_leftpad: Optional[torch.Tensor],
                      cache_batch_idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Nq, D] (q's layout), lse [B, Hq, Nq] float32; num_splits None = heuristic;
    scale None = 1/sqrt(D), computed here: a SymFloat argument would specialise a dynamic graph.
    window_left / window_right: key offsets from the bottom-right diagonal, None = unbounded."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _kernels().decode_forward(q, k_cache, v_cache, cache_seqlens, scale, num_splits,
                                     window=(window_left, window_right),
                                     alibi_slopes=alibi_slopes, softcap=softcap,
                                     block_table=block_table, cache_leftpad=cache_leftpad,
                                     cache_batch_idx=cache_batch_idx)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, num_splits, window_left, window_right,
      alibi_slopes, softcap, block_table, cache_leftpad, cache_batch_idx):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: Optional[torch.Tensor] = None, *,
                     scale: float | None = None, num_splits: int | None = None,
                     return_lse: bool = False, causal: bool = True,
                     window: Optional[tuple[int, int]] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, softcap: float | None = None,
                     block_table: Optional[torch.Tensor] = None,
                     cache_leftpad: Optional[torch.Tensor] = None,
                     cache_batch_idx: Optional[torch.Tensor] = None,
                     k_new: Optional[torch.Tensor] = None, v_new: Optional[torch.Tensor] = None,
                     rotary_cos: Optional[torch.Tensor] = None,
                     rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = False):
    """Attention of new queries against a KV cache, flash-decoding style (split-KV).

    Args:
        q: [B, Hq, Nq, D] queries, the LAST Nq positions of each sequence (Nq = 1: one token
            per step; a few more, e.g. speculative decoding or chunked prefill, also work).
            float16, bfloat16 or float32; any strides (a [B, N, H, D] tensor's
            ``.transpose(1, 2)`` view is read in place).
        k_cache: [B, Hkv, Nmax, D] preallocated key cache, q's dtype and device, any strides.
            Hq must be a multiple of Hkv (MHA, GQA, MQA: query head h reads kv head
            h // (Hq // Hkv)). With ``block_table``: paged, [num_blocks, Hkv, page_size, D]
            (FlashAttention's / vLLM's [num_blocks, page_size, Hkv, D] storage passes as its
            ``.transpose(1, 2)`` view); with ``cache_batch_idx``: [B_cache, Hkv, Nmax, D].
        v_cache: the value cache, k_cache's shape.
        cache_seqlens: int32 [B]: batch b's cache holds cache_seqlens[b] valid keys (0..Nmax,
            paged: 0..max_blocks * page_size), which already include the Nq new tokens.
            Positions past it are never read and may hold anything (even NaN). None: all Nmax
            positions are valid.
        scale: multiplier of q kᵀ before the softmax; default 1/sqrt(D).
        num_splits: chunks the keys of each sequence are split into, each handled by its own
            programs and merged by their log-sum-exp (flash-decoding); None picks enough to
            fill the GPU when B * Hkv alone does not. The result does not depend on it beyond
            rounding.
        return_lse: also return the log-sum-exp of the visible scores.
        causal: query i sees keys up to its own position (default True; with Nq = 1 every
            valid key either way). False: every query sees all of the row's keys.
        window: (left, right) as `tritformer.attention`'s (FlashAttention's window_size, -1 =
            unbounded), relative to each query's position; causal sets right = 0.
        alibi_slopes: [Hq] or [B, Hq] float: bias -slope * |pos(i) - j| (FlashAttention's).
        softcap: scores become softcap * tanh(scores / softcap) (None or 0: off).
        block_table: int32 [B, max_blocks]: position p of row b lives in cache block
            block_table[b, p // page_size], slot p % page_size. Any page size; entries past a
            row's length are never read (and not checked).
        cache_leftpad: int32 [B]: row b's keys start at position cache_leftpad[b] (left padding:
            positions before it are never read); query positions stay cache_seqlens[b] - Nq + i.
        cache_batch_idx: int32 [B]: row b reads cache row cache_batch_idx[b] (not with
            block_table).
        k_new, v_new: [B, Hkv, Nnew, D] new tokens, appended first (FlashAttention's
            flash_attn_with_kvcache k / v): written into the caches IN PLACE at positions
            cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 by `tritformer.kvcache_append`
            (one launch), then attended to. With them cache_seqlens counts the keys BEFORE
            the append (required; not modified: the caller advances it, as with
            FlashAttention) and row b sees cache_seqlens[b] + Nnew keys.
        rotary_cos, rotary_sin: [seqlen_ro, rotary_dim / 2] (need k_new): k_new is rotated at
            its positions before it is written, and q at cache_seqlens[b] + i (causal or with
            a window) or cache_seqlens[b] (otherwise), as FlashAttention. rotary_interleaved:
            GPT-J pairs (0, 1), (2, 3) ..; default GPT-NeoX (i, i + rotary_dim / 2).

    Masking: with L = cache_seqlens[b], query i sits at position L - Nq + i (bottom-right
    aligned as `tritformer.attention(..., causal=True)` on the first L keys) and, causal, sees
    key j iff j <= L - Nq + i. With Nq=2, L=5, Nmax=7 (1 = attend, x = never read)::

        1 1 1 1 0 x x
        1 1 1 1 1 x x

    A query row that sees no key (L < Nq - i, e.g. L = 0) outputs 0 with lse = -inf.

    Appending new tokens (with rotary embeddings) before attending: ``k_new`` / ``v_new``
    below (`tritformer.kvcache_append` then this kernel; FlashAttention's interface:
    `tritformer.flash_attn.flash_attn_with_kvcache`).

    Returns:
        out [B, Hq, Nq, D] in q's dtype (and q's memory layout); with ``return_lse`` also
        lse [B, Hq, Nq] float32, natural log.

    Inference only: raises if grad mode is on and an input requires grad (use
    `tritformer.attention` for training). Under torch.autocast the attention follows SDPA's
    rule (q and the caches cast to the autocast dtype); the append does not (it writes the
    caches in their own dtype: k_new, v_new and q must have it). D may be 1..256. Index tensors are checked before
    the launch (one device sync each), except under torch.compile, where the kernel clamps
    them so that it never reads outside the cache. Where this runs: see
    ``tritformer.backend_for``.
    """
    appending = k_new is not None or v_new is not None
    if appending or rotary_cos is not None or rotary_sin is not None:
        if k_new is None or v_new is None:
            raise ValueError("k_new and v_new must be given together (rotary_cos / rotary_sin "
                             "rotate the appended keys: they need k_new and v_new too)")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k_new / v_new (the keys already "
                             "in each row's cache, where the new ones are written)")
        left, right = reference.window_bounds(bool(causal), window)
        q_positions = "causal" if (right is not None or left is not None) else "start"
        # every argument of both launches is checked before the caches are written
        check_kvcache_append_inputs(k_cache, v_cache, k_new, v_new, cache_seqlens, q,
                                    rotary_cos, rotary_sin, rotary_interleaved, q_positions,
                                    block_table, cache_batch_idx)
        lens = cache_seqlens + k_new.shape[2]
        check_decode_inputs(q, k_cache, v_cache, lens, scale, num_splits, return_lse,
                            causal=causal, window=window, alibi_slopes=alibi_slopes,
                            softcap=softcap, block_table=block_table,
                            cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx)
        check_inference_only(q, k_cache, v_cache)
        q = kvcache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, q=q,
                           rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                           rotary_interleaved=rotary_interleaved, q_positions=q_positions,
                           block_table=block_table, cache_batch_idx=cache_batch_idx)
        cache_seqlens = lens
    return _decode(q, k_cache, v_cache, cache_seqlens, scale=scale, num_splits=num_splits,
                   return_lse=return_lse, causal=causal, window=window,
                   alibi_slopes=alibi_slopes, softcap=softcap, block_table=block_table,
                   cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx)


@autocast("q", "k_cache", "v_cache")  # as SDPA: torch's lower-precision list
def _decode(q, k_cache, v_cache, cache_seqlens=None, *, scale=None, num_splits=None,
            return_lse=False, causal=True, window=None, alibi_slopes=None, softcap=None,
            block_table=None, cache_leftpad=None, cache_batch_idx=None):
    """decode_attention without the append: checks, then the kernel (or the torch backend)."""
    check_decode_inputs(q, k_cache, v_cache, cache_seqlens, scale, num_splits, return_lse,
                        causal=causal, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                        block_table=block_table, cache_leftpad=cache_leftpad,
                        cache_batch_idx=cache_batch_idx)
    check_inference_only(q, k_cache, v_cache)
    scale = None if scale is None else float(scale)
    softcap = float(softcap) if softcap else None
    left, right = reference.window_bounds(bool(causal), window)
    plain = (left is None and right == 0 and alibi_slopes is None and softcap is None
             and block_table is None and cache_leftpad is None and cache_batch_idx is None)
    if is_torch(backend_for(q)):  # CPU fallback: torch's SDPA (tritformer.fallback)
        if plain:
            out, lse = fallback.decode_attention(q, k_cache, v_cache, cache_seqlens, scale,
                                                 return_lse)
        else:  # the caches gathered and the mask built in torch, then SDPA
            k, v, mask = reference.decode_inputs(
                q, k_cache, v_cache, cache_seqlens, causal=causal, window=window,
                alibi_slopes=alibi_slopes, block_table=block_table, cache_leftpad=cache_leftpad,
                cache_batch_idx=cache_batch_idx)
            out, lse = fallback.attention(q, k, v, scale, None, None, return_lse, attn_mask=mask,
                                          softcap=softcap)
    else:
        out, lse = torch.ops.tritformer.decode_attention(
            q, k_cache, v_cache, cache_seqlens, scale, num_splits, left, right, alibi_slopes,
            softcap, block_table, cache_leftpad, cache_batch_idx)
    return (out, lse) if return_lse else out
