"""Fused scaled, masked softmax: torch.library custom ops, autograd, and `tritformer.softmax`."""
from __future__ import annotations

from typing import Optional

import torch

from .. import fallback
from .._autocast import autocast
from .._checks import check_softmax_inputs
from ..backend import backend_for, is_torch


def _kernels():
    from tritformer.kernels import softmax as K  # imported at first use: see backend.py
    return K


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """The output buffer for x (the kernels write it in place, it is what the op returns): x's
    layout (torch.empty_like), or a contiguous one when that layout's leading dims (all but the
    last three) cannot be merged into one strided axis by a view: the kernels index rows as
    [D0, D1, D2, C] and must never write into a reshape copy. The fake kernels use the same
    rule, so compiled graphs see the real strides."""
    out = torch.empty_like(x)
    if x.dim() > 4 and x.numel() > 0:
        try:
            out.view(-1, *x.shape[-3:])
        except RuntimeError:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


@torch.library.custom_op("tritformer::softmax_fwd", mutates_args=())
def _softmax_fwd(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                 causal: bool, reference_backend: bool = False) -> torch.Tensor:
    """x: softmax over its last dim; mask: None or expanded to x's shape (a stride-0 view).
    reference_backend: the "torch" backend (chosen by `softmax`): float32 PyTorch."""
    out = _out_like(x)
    if not reference_backend:
        return _kernels().softmax_forward(x, mask, out, scale, causal)
    return fallback.softmax_forward(x, mask, scale, causal, out)


@_softmax_fwd.register_fake
def _(x, mask, scale, causal, reference_backend=False):
    return _out_like(x)


@torch.library.custom_op("tritformer::softmax_bwd", mutates_args=())
def _softmax_bwd(dy: torch.Tensor, y: torch.Tensor, grad_scale: float,
                 reference_backend: bool = False) -> torch.Tensor:
    """grad_scale * y * (dy - rowsum(dy * y)) over the last dim."""
    out = _out_like(y)
    if not reference_backend:
        return _kernels().softmax_backward(dy, y, out, grad_scale)
    return fallback.softmax_backward(dy, y, grad_scale, out)


@_softmax_bwd.register_fake
def _(dy, y, grad_scale, reference_backend=False):
    return _out_like(y)


def _setup_context(ctx, inputs, output):
    x, mask, scale, causal, reference_backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.reference_backend = scale, reference_backend
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[1]


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    if not ctx.mask_grad:
        dx = torch.ops.tritformer.softmax_bwd(dy, y, ctx.scale, ctx.reference_backend)
        return dx, None, None, None, None
    # an additive mask that requires grad: d(mask) = dz (the logits' gradient), dx = scale * dz
    dz = torch.ops.tritformer.softmax_bwd(dy, y, 1.0, ctx.reference_backend)
    return dz * ctx.scale, dz, None, None, None


_softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


@autocast("x", policy="softmax")  # as torch.softmax on x's device type (CUDA: fp32)
def softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0,
            mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """Fused softmax(scale · x + mask) along `dim` (Megatron-LM's fused scaled masked softmax).

    Args:
        x: float16, bfloat16 or float32, any shape and strides; accumulation in float32, the
            result in x's dtype.
        dim: the softmax dim (any; the kernel reads the moved dim through strides).
        scale: multiplies x before the mask is applied.
        mask: bool (True = keep) or an additive float mask, broadcastable to x; read through
            broadcast strides, never materialised. A float mask that requires grad gets one.
        causal: mask the upper triangle of the last two dims (softmax over the last dim):
            column j is masked for row i when j > i + (C - R), R x C the last two dims, i.e.
            bottom-right aligned as in `tritformer.attention` (the plain upper triangle when
            square).

    A row with nothing left to keep gives zeros (and zero gradient), not NaN. Rows of any length
    run fused: up to 16K elements in one on-chip tile (one read, one write), longer ones through
    a two-pass online softmax over 4K tiles.
    """
    dim = check_softmax_inputs(x, dim, scale, mask, causal)
    last = x.dim() - 1
    xm = x if dim == last else x.movedim(dim, -1)
    mm = None
    if mask is not None:
        mm = mask.expand(x.shape)
        mm = mm if dim == last else mm.movedim(dim, -1)
    y = torch.ops.tritformer.softmax_fwd(xm, mm, float(scale), bool(causal),
                                         is_torch(backend_for(x)))
    return y if dim == last else y.movedim(-1, dim)
