"""Fused FFN: torch.library custom ops, autograd, and `tritformer.ffn` / `tritformer.gated_ffn`.

Kernels: kernels/ffn.py's GEMM with fused epilogues. Forward of `ffn`:
    GEMM 1  h = act(x w1ᵀ + b1)     bias + activation in the epilogue (also stores pre = x w1ᵀ + b1
                                    unless recompute)
    GEMM 2  y = h w2ᵀ + b2 (+ res)  bias + residual in the epilogue
Backward:
    dpre = (dy w2) ∘ act'(pre)      act' fused into the epilogue
    dw2 = dyᵀ h, dw1 = dpreᵀ x, dx = dpre w1   (GEMMs over transposed views, no copies)
    db2, db1: column sums in PyTorch (fp32 accumulation)
recompute=True saves neither pre nor h (2 · M · hidden · itemsize bytes per call between forward
and backward) and rebuilds both with GEMM 1 in the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import fallback, reference
from .._autocast import autocast
from .._checks import check_ffn_inputs, check_gated_ffn_inputs
from ..backend import backend_for, is_torch


def _kernels():
    from tritformer.kernels import ffn as K  # imported at first use: see backend.py
    return K


# The ops take the activation by name (reference.ACTIVATIONS); the kernels' codes are
# kernels/ffn.py's ACTIVATIONS[name] (tl.constexpr ACT_* constants), looked up at launch.


def _empty(x):
    return x.new_empty(0)


def _f(t):
    return None if t is None else t.float()


# ---------------------------------------------------------------------------------------------
# ffn
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tritformer::ffn_fwd", mutates_args=())
def _ffn_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
             b2: Optional[torch.Tensor], residual: Optional[torch.Tensor], act: str,
             recompute: bool, reference_backend: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y [M, N], h, pre) with h, pre [M, H] saved for the backward (empty when
    recompute). reference_backend: the "torch" backend (chosen by `ffn`): float32 PyTorch."""
    if reference_backend:
        return _ffn_fwd_reference(x, w1, b1, w2, b2, residual, act, recompute)
    M, H = x.shape[0], w1.shape[0]
    K = _kernels()
    h = x.new_empty(M, H)
    pre = None if recompute else x.new_empty(M, H)
    K.gemm(x, w1.t(), h, epi=K.EPI_BIAS_ACT, act=K.ACTIVATIONS[act], bias=b1, pre=pre)
    y = x.new_empty(M, w2.shape[0])
    K.gemm(h, w2.t(), y, epi=K.EPI_BIAS_ACT, act=K.ACT_NONE, bias=b2, residual=residual)
    if recompute:
        return y, _empty(x), _empty(x)
    return y, h, pre


def _ffn_fwd_reference(x, w1, b1, w2, b2, residual, act, recompute):
    """`_ffn_fwd` in float32 PyTorch; h and pre rounded to x's dtype, as the kernels save them."""
    pre = torch.nn.functional.linear(x.float(), w1.float(), _f(b1))
    h = reference.apply_activation(pre, act).to(x.dtype)
    y = torch.nn.functional.linear(h.float(), w2.float(), _f(b2))
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype), *((_empty(x), _empty(x)) if recompute else (h, pre.to(x.dtype)))


@_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, act, recompute, reference_backend=False):
    M, H = x.shape[0], w1.shape[0]
    hid = (lambda: x.new_empty(0)) if recompute else (lambda: x.new_empty(M, H))
    return x.new_empty(M, w2.shape[0]), hid(), hid()


@torch.library.custom_op("tritformer::ffn_bwd", mutates_args=())
def _ffn_bwd(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
             w2: torch.Tensor, h: torch.Tensor, pre: torch.Tensor, act: str,
             recompute: bool, reference_backend: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2); db1/db2 as fp32 column sums cast to the weights' dtype."""
    if reference_backend:
        return fallback.ffn_backward(dy, x, w1, b1, w2, h, pre, act, recompute)
    M, H = x.shape[0], w1.shape[0]
    K = _kernels()
    if recompute:
        h, pre = x.new_empty(M, H), x.new_empty(M, H)
        K.gemm(x, w1.t(), h, epi=K.EPI_BIAS_ACT, act=K.ACTIVATIONS[act], bias=b1, pre=pre)
    dpre = x.new_empty(M, H)
    K.gemm(dy, w2, dpre, epi=K.EPI_DACT, act=K.ACTIVATIONS[act], aux=pre)
    dw2 = torch.empty_like(w2)
    K.gemm(dy.t(), h, dw2)
    dw1 = torch.empty_like(w1)
    K.gemm(dpre.t(), x, dw1)
    dx = torch.empty_like(x)
    K.gemm(dpre, w1, dx)
    db1 = dpre.sum(0, dtype=torch.float32).to(x.dtype)
    db2 = dy.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dw1, db1, dw2, db2


@_ffn_bwd.register_fake
def _(dy, x, w1, b1, w2, h, pre, act, recompute, reference_backend=False):
    return (torch.empty_like(x), torch.empty_like(w1), x.new_empty(w1.shape[0]),
            torch.empty_like(w2), x.new_empty(w2.shape[0]))


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, act, recompute, reference_backend = inputs
    _, h, pre = output
    ctx.save_for_backward(x, w1, b1, w2, h, pre)
    ctx.act, ctx.recompute, ctx.reference_backend = act, recompute, reference_backend
    ctx.has = (b1 is not None, b2 is not None, residual is not None)


def _ffn_backward(ctx, dy, _dh, _dpre):
    x, w1, b1, w2, h, pre = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = torch.ops.tritformer.ffn_bwd(dy, x, w1, b1, w2, h, pre, ctx.act,
                                                          ctx.recompute, ctx.reference_backend)
    has_b1, has_b2, has_res = ctx.has
    # the residual's gradient is dy itself: returned as a copy, since a returned dy (or a view of
    # it) becomes residual.grad sharing the caller's grad_output storage, which zero_grad() or
    # clip_grad_norm_ on the residual would then rewrite. No backward returns an input.
    return (dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None,
            dy.clone() if has_res else None, None, None, None)


_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup)


@autocast("x", "w1", "b1", "w2", "b2", added="residual")  # as F.linear (+ residual)
def ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
        b2: Optional[torch.Tensor], *, activation: str = "gelu",
        residual: Optional[torch.Tensor] = None, recompute: bool = False) -> torch.Tensor:
    """Fused FFN: act(x·w1ᵀ + b1)·w2ᵀ + b2 (+ residual), weights in nn.Linear's [out, in] layout.

    Args:
        x: [..., in_features]; float16, bfloat16 or float32 (fp32 matmuls in 3xTF32 on GPU:
            fp32-level accuracy on tensor cores).
        w1: [hidden, in_features], b1: [hidden] or None.
        w2: [out_features, hidden], b2: [out_features] or None.
        activation: "gelu" (erf), "gelu_tanh", "relu" or "silu".
        residual: [..., out_features] added in the second matmul's epilogue, or None.
        recompute: keep neither the pre-activation nor the activation for the backward (saves
            2 · M · hidden · itemsize bytes per call, M = x.numel() / in_features) and rebuild
            both with the first matmul in the backward.
    Returns: [..., out_features] in x's dtype.
    """
    check_ffn_inputs(x, w1, b1, w2, b2, activation, residual, recompute)
    lead = x.shape[:-1]
    M = math.prod(lead)  # (reshape(-1, 0) is ambiguous: in_features or out_features may be 0)
    x2 = x.reshape(M, x.shape[-1])
    r2 = None if residual is None else residual.reshape(M, residual.shape[-1])
    y, _, _ = torch.ops.tritformer.ffn_fwd(x2, w1, b1, w2, b2, r2, activation, bool(recompute),
                                           is_torch(backend_for(x)))
    return y.reshape(*lead, w2.shape[0])


# ---------------------------------------------------------------------------------------------
# gated_ffn
# ---------------------------------------------------------------------------------------------
def _gate_up(K, x, wg, wu, bg, bu, act, h, g, u):
    """The dual-accumulator kernel; a missing one of the two biases is passed as zeros."""
    if bg is not None or bu is not None:
        bg = bg if bg is not None else x.new_zeros(wg.shape[0])
        bu = bu if bu is not None else x.new_zeros(wu.shape[0])
    K.gemm(x, wg.t(), h, epi=K.EPI_GATED, act=K.ACTIVATIONS[act], b2=wu.t(), bias=bg, bias2=bu,
           pre=g, pre2=u)


@torch.library.custom_op("tritformer::gated_ffn_fwd", mutates_args=())
def _gated_fwd(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
               bg: Optional[torch.Tensor], bu: Optional[torch.Tensor], bd: Optional[torch.Tensor],
               act: str, recompute: bool, reference_backend: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y, h, g, u); h, g, u [M, I] saved for the backward (empty when recompute).
    reference_backend: the "torch" backend (chosen by `gated_ffn`): float32 PyTorch."""
    if reference_backend:
        return _gated_fwd_reference(x, wg, wu, wd, bg, bu, bd, act, recompute)
    M, I = x.shape[0], wg.shape[0]
    K = _kernels()
    h = x.new_empty(M, I)
    g = None if recompute else x.new_empty(M, I)
    u = None if recompute else x.new_empty(M, I)
    _gate_up(K, x, wg, wu, bg, bu, act, h, g, u)
    y = x.new_empty(M, wd.shape[0])
    K.gemm(h, wd.t(), y, bias=bd)
    if recompute:
        return y, _empty(x), _empty(x), _empty(x)
    return y, h, g, u


def _gated_fwd_reference(x, wg, wu, wd, bg, bu, bd, act, recompute):
    """`_gated_fwd` in float32 PyTorch; h, g, u rounded to x's dtype, as the kernels save them."""
    g = torch.nn.functional.linear(x.float(), wg.float(), _f(bg))
    u = torch.nn.functional.linear(x.float(), wu.float(), _f(bu))
    h = (reference.apply_activation(g, act) * u).to(x.dtype)
    y = torch.nn.functional.linear(h.float(), wd.float(), _f(bd)).to(x.dtype)
    if recompute:
        return y, _empty(x), _empty(x), _empty(x)
    return y, h, g.to(x.dtype), u.to(x.dtype)


@_gated_fwd.register_fake
def _(x, wg, wu, wd, bg, bu, bd, act, recompute, reference_backend=False):
    M, I = x.shape[0], wg.shape[0]
    hid = (lambda: x.new_empty(0)) if recompute else (lambda: x.new_empty(M, I))
    return x.new_empty(M, wd.shape[0]), hid(), hid(), hid()


@torch.library.custom_op("tritformer::gated_ffn_bwd", mutates_args=())
def _gated_bwd(dy: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
               wd: torch.Tensor, bg: Optional[torch.Tensor], bu: Optional[torch.Tensor],
               h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str, recompute: bool,
               reference_backend: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor]:
    """(dx, dwg, dwu, dwd, dbg, dbu, dbd); bias grads are fp32 column sums."""
    if reference_backend:
        return fallback.ffn_backward(dy, x, wg, bg, wd, h, g, act, recompute, w_up=wu, b_up=bu, up=u)
    M, I = x.shape[0], wg.shape[0]
    K = _kernels()
    if recompute:
        h, g, u = (x.new_empty(M, I) for _ in range(3))
        _gate_up(K, x, wg, wu, bg, bu, act, h, g, u)
    dg, du = x.new_empty(M, I), x.new_empty(M, I)
    K.gemm(dy, wd, dg, epi=K.EPI_DGATED, act=K.ACTIVATIONS[act], aux=g, aux2=u, c2=du)
    dwd = torch.empty_like(wd)
    K.gemm(dy.t(), h, dwd)
    dwg, dwu = torch.empty_like(wg), torch.empty_like(wu)
    K.gemm(dg.t(), x, dwg)
    K.gemm(du.t(), x, dwu)
    dx_g = torch.empty_like(x)
    K.gemm(dg, wg, dx_g)
    dx = torch.empty_like(x)
    K.gemm(du, wu, dx, residual=dx_g)  # dx = du wu + dg wg, the sum in the epilogue
    colsum = lambda t: t.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dwg, dwu, dwd, colsum(dg), colsum(du), colsum(dy)


@_gated_bwd.register_fake
def _(dy, x, wg, wu, wd, bg, bu, h, g, u, act, recompute, reference_backend=False):
    return (torch.empty_like(x), torch.empty_like(wg), torch.empty_like(wu), torch.empty_like(wd),
            x.new_empty(wg.shape[0]), x.new_empty(wu.shape[0]), x.new_empty(wd.shape[0]))


def _gated_setup(ctx, inputs, output):
    x, wg, wu, wd, bg, bu, bd, act, recompute, reference_backend = inputs
    _, h, g, u = output
    ctx.save_for_backward(x, wg, wu, wd, bg, bu, h, g, u)
    ctx.act, ctx.recompute, ctx.reference_backend = act, recompute, reference_backend
    ctx.has = (bg is not None, bu is not None, bd is not None)


def _gated_backward(ctx, dy, *_):
    x, wg, wu, wd, bg, bu, h, g, u = ctx.saved_tensors
    dx, dwg, dwu, dwd, dbg, dbu, dbd = torch.ops.tritformer.gated_ffn_bwd(
        dy, x, wg, wu, wd, bg, bu, h, g, u, ctx.act, ctx.recompute, ctx.reference_backend)
    db = [d if has else None for d, has in zip((dbg, dbu, dbd), ctx.has)]
    return (dx, dwg, dwu, dwd, *db, None, None, None)


_gated_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


@autocast("x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")  # as F.linear
def gated_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
              activation: str = "silu", recompute: bool = False,
              b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
              b_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused gated FFN: (act(x·w_gateᵀ) ∘ (x·w_upᵀ))·w_downᵀ: SwiGLU with "silu", GeGLU with
    "gelu" / "gelu_tanh"; Llama's MLP.

    The gate and up products come out of one kernel that reads x once (two accumulators), the
    gating in its epilogue. Weights in nn.Linear's layout: w_gate, w_up [intermediate, hidden],
    w_down [hidden_out, intermediate]. recompute=True keeps none of the three intermediate-size
    tensors (act input, up product, gated product: 3 · M · intermediate · itemsize bytes) for
    the backward and rebuilds them with the gate/up kernel. Optional biases b_gate, b_up
    [intermediate] (added in the gate/up epilogue) and b_down [hidden_out].
    """
    check_gated_ffn_inputs(x, w_gate, w_up, w_down, activation, recompute, b_gate, b_up, b_down)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    y, _, _, _ = torch.ops.tritformer.gated_ffn_fwd(x2, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                                    activation, bool(recompute),
                                                    is_torch(backend_for(x)))
    return y.reshape(*lead, w_down.shape[0])
