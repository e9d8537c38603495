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

from .. import fallback
from .._autocast import autocast
from .._checks import check_decode_inputs, check_inference_only
from ..backend import backend_for, is_torch


def _kernels():
    from tritformer.kernels import decode as K  # imported at first use: see backend.py
    return K


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: Optional[torch.Tensor], scale: Optional[float],
                      num_splits: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Nq, D] (q's layout), lse [B, Hq, Nq] float32; num_splits None = heuristic;
    scale None = 1/sqrt(D), computed here: a SymFloat argument would specialise a dynamic graph."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _kernels().decode_forward(q, k_cache, v_cache, cache_seqlens, scale, num_splits)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
@autocast("q", "k_cache", "v_cache")  # as SDPA: torch's lower-precision list
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: Optional[torch.Tensor] = None, *,
                     scale: float | None = None, num_splits: int | None = None,
                     return_lse: bool = False):
    """Attention of new queries against a KV cache, flash-decoding style (split-KV).

    Args:
        q: [B, Hq, Nq, D] queries, the LAST Nq positions of each sequence (Nq = 1: one token
            per step; a few more, e.g. speculative decoding, also work). float16, bfloat16 or
            float32; any strides (a [B, N, H, D] tensor's ``.transpose(1, 2)`` view is read in
            place).
        k_cache: [B, Hkv, Nmax, D] preallocated key cache, q's dtype and device, any strides.
            Hq must be a multiple of Hkv (MHA, GQA, MQA: query head h reads kv head
            h // (Hq // Hkv)).
        v_cache: [B, Hkv, Nmax, D] value cache.
        cache_seqlens: int32 [B]: batch b's cache holds cache_seqlens[b] valid keys (0..Nmax),
            which already include the Nq new tokens. Positions past it are never read and may
            hold anything (even NaN). None: all Nmax positions are valid.
        scale: multiplier of q kᵀ before the softmax; default 1/sqrt(D).
        num_splits: chunks the keys of each sequence are split into, each handled by its own
            programs and merged by their log-sum-exp (flash-decoding); None picks enough to
            fill the GPU when B * Hkv alone does not. The result does not depend on it beyond
            rounding.
        return_lse: also return the log-sum-exp of the visible scores.

    Masking: with L = cache_seqlens[b], query i sees key j iff j <= L - Nq + i (causal,
    bottom-right aligned as `tritformer.attention(..., causal=True)` on the first L keys).
    With Nq=2, L=5, Nmax=7 (1 = attend, x = never read)::

        1 1 1 1 0 x x
        1 1 1 1 1 x x

    A query row that sees no key (L < Nq - i, e.g. L = 0) outputs 0 with lse = -inf.

    Returns:
        out [B, Hq, Nq, D] in q's dtype (and q's memory layout); with ``return_lse`` also
        lse [B, Hq, Nq] float32, natural log.

    Inference only: raises if grad mode is on and an input requires grad (use
    `tritformer.attention` for training). D may be 1..256. Where this runs: see
    ``tritformer.backend_for``.
    """
    check_decode_inputs(q, k_cache, v_cache, cache_seqlens, scale, num_splits, return_lse)
    check_inference_only(q, k_cache, v_cache)
    scale = None if scale is None else float(scale)
    if is_torch(backend_for(q)):  # CPU fallback: torch's SDPA (tritformer.fallback)
        out, lse = fallback.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, return_lse)
    else:
        out, lse = torch.ops.tritformer.decode_attention(q, k_cache, v_cache, cache_seqlens,
                                                         scale, num_splits)
    return (out, lse) if return_lse else out
