"""Fused attention: torch.library custom ops, autograd, and the public `attention` function.

Layers (as in flash-attention's interface): `tritformer::attention_fwd` / `attention_bwd` custom
ops around the kernel launchers, `register_fake` allocating output shapes only, and
`register_autograd` wiring the backward, so `torch.compile(fullgraph=True)` traces through.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from .._checks import check_attention_inputs
from ..backend import backend_for


def _kernels():
    from tritformer.kernels import attention as K  # imported at first use: see backend.py
    return K


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if backend_for(q) != "reference":
        return _kernels().attention_forward(q, k, v, causal, scale)
    # reference path (CPU without the interpreter): fp32 math, same output layout as the kernel
    o, lse = reference.attention(q.float(), k.float(), v.float(), causal=causal, scale=scale,
                                 return_lse=True)
    out = torch.empty_like(q)
    out.copy_(o)
    return out, lse.float().contiguous()


@_attention_fwd.register_fake
def _(q, k, v, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tritformer::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend_for(q) != "reference":
        return _kernels().attention_backward(do, q, k, v, out, lse, causal, scale, dlse)
    # the body of a custom op runs below autograd: the gradient is written out, not traced
    g = reference.attention_backward(do.float(), q.float(), k.float(), v.float(), causal=causal,
                                     scale=scale, dlse=None if dlse is None else dlse.float())
    res = tuple(torch.empty_like(x) for x in (q, k, v))
    for r, gi in zip(res, g):
        r.copy_(gi)
    return res


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.tritformer.attention_bwd(dout, q, k, v, out, lse, dlse, ctx.causal,
                                                    ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False):
    """Fused softmax attention, FlashAttention-2 style: softmax(q kᵀ · scale + mask) v.

    Args:
        q: [B, Hq, Nq, D] queries. float16, bfloat16 or float32; any strides (a [B, N, H, D]
            tensor's ``.transpose(1, 2)`` view is read in place, no copy).
        k: [B, Hkv, Nk, D] keys, same dtype and device. Hq must be a multiple of Hkv:
            Hkv == Hq is multi-head, 1 < Hkv < Hq grouped-query (query head h reads kv head
            h // (Hq // Hkv)), Hkv == 1 multi-query attention.
        v: [B, Hkv, Nk, D] values.
        causal: mask key j for query i when j > i + (Nk - Nq): aligned to the bottom-right
            corner (FlashAttention's convention; torch SDPA's ``is_causal`` is top-left), so a
            block of new queries attends to a longer KV cache. With Nq=2, Nk=5 (1 = attend)::

                1 1 1 1 0
                1 1 1 1 1

            and with Nq=5, Nk=2 the first three queries see no key at all::

                0 0
                0 0
                0 0
                1 0
                1 1

            A query row with no visible key outputs 0 (lse = -inf) and gets zero gradient.
        scale: multiplier of q kᵀ before the softmax; default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out [B, Hq, Nq, D] in q's dtype (and q's memory layout); with ``return_lse`` also
        lse [B, Hq, Nq] float32, natural log. Gradients flow to q, k, v (and through lse).

    D may be 1..256 (any value; tiles are padded to a power of two on chip), Nq and Nk any
    length including 0 and 1. Where this runs: see ``tritformer.backend_for``.
    """
    check_attention_inputs(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.tritformer.attention_fwd(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out
