"""Pure-PyTorch reference implementations: the oracle of the tests, `validate` and the benchmarks.

Naive matmul attention, materialising the [B, H, Nq, Nk] score matrix. It computes in the
inputs' dtype (so it also serves as "PyTorch's own same-dtype math" baseline); call it on
float64 inputs for the ground truth.
"""
from __future__ import annotations

import math

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool [Nq, Nk], True = attend; bottom-right aligned: key j visible to query i iff j <= i + Nk - Nq."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False):
    """softmax(q kᵀ · scale + mask) v, the semantics of `tritformer.attention`.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with Hq % Hkv == 0. Rows whose every key is masked
    return 0 (and lse = -inf), as the fused kernel does.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, Hq, Nq, Nk)
    empty = None
    if causal:
        keep = causal_mask(q.shape[2], k.shape[2], q.device)  # (Nq, Nk)
        scores = scores.masked_fill(~keep, float("-inf"))
        empty = ~keep.any(dim=-1, keepdim=True)  # (Nq, 1): rows with no visible key
        # keep those rows finite so that neither softmax nor its gradient produce NaN
        scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # (B, Hq, Nq)
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty[:, 0], float("-inf"))
    out = torch.matmul(probs.to(v.dtype), v)  # (B, Hq, Nq, D)
    return (out, lse) if return_lse else out


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       causal: bool = False, scale: float | None = None,
                       dlse: torch.Tensor | None = None):
    """dq, dk, dv of `attention` (and of its lse when `dlse` is given), written out by hand.

    For the CPU reference path of the custom op, whose body runs below autograd (no graph is
    recorded there). Computes in the inputs' dtype; rows with no visible key get zero gradient.
        P = softmax(S), dP = dO Vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP) + dLse)
        dQ = dS K · scale, dK = dSᵀ Q · scale, dV = Pᵀ dO   (summed over each GQA group)
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hkv, Nk, D = k.shape
    group = q.shape[1] // Hkv
    ke = k.repeat_interleave(group, dim=1) if group > 1 else k
    ve = v.repeat_interleave(group, dim=1) if group > 1 else v
    scores = torch.matmul(q * scale, ke.transpose(-2, -1))
    if causal:
        keep = causal_mask(q.shape[2], Nk, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        empty = ~keep.any(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    dp = torch.matmul(do, ve.transpose(-2, -1))
    delta = (probs * dp).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)[..., None]
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q) * scale
    dv = torch.matmul(probs.transpose(-2, -1), do)
    if group > 1:  # fold the query heads of each group back onto their kv head
        dk = dk.view(B, Hkv, group, Nk, D).sum(2)
        dv = dv.view(B, Hkv, group, Nk, D).sum(2)
    return dq, dk, dv


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0, mask: torch.Tensor | None = None,
            causal: bool = False) -> torch.Tensor:
    """softmax(scale * x + mask) along `dim`, in x's dtype (PyTorch's own same-dtype math).

    mask: bool (True = keep) or additive float, broadcastable to x. causal: key j masked for row
    i of the second-to-last dim when j > i + (C - R) (bottom-right, as `attention`). Rows with
    nothing left give 0.
    """
    z = x * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask.expand(x.shape)
        else:
            z = z + mask.to(z.dtype)
    if causal:
        c = causal_mask(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(z).all(dim=dim, keepdim=True)
    y = torch.softmax(z.masked_fill(empty, 0.0), dim=dim)
    return y.masked_fill(empty, 0.0)


# --------------------------------------------------------------------------------------------
# FFN
# --------------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def activation_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """d activation(x) / dx, written out (used where autograd cannot record, and as a check)."""
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * torch.exp(-0.5 * x * x)
    if name == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def ffn(x, w1, b1, w2, b2, *, activation: str = "gelu", residual=None, recompute: bool = False):
    """act(x w1ᵀ + b1) w2ᵀ + b2 (+ residual): the unfused PyTorch sequence, in x's dtype."""
    y = torch.nn.functional.linear(apply_activation(torch.nn.functional.linear(x, w1, b1), activation), w2, b2)
    return y if residual is None else y + residual


def gated_ffn(x, w_gate, w_up, w_down, *, activation: str = "silu", recompute: bool = False,
              b_gate=None, b_up=None, b_down=None):
    """(act(x w_gateᵀ + b_gate) ∘ (x w_upᵀ + b_up)) w_downᵀ + b_down: SwiGLU / GeGLU, unfused."""
    F = torch.nn.functional
    return F.linear(apply_activation(F.linear(x, w_gate, b_gate), activation)
                    * F.linear(x, w_up, b_up), w_down, b_down)
