"""The `layout=` argument of `tritformer.attention`: "bhnd" ([B, H, N, D], the default) or
"bnhd" ([B, N, H, D], FlashAttention's and most projections' layout).

"bnhd" inputs are read through ``transpose(1, 2)`` views (the kernels take any strides: no
copy) and the output is handed back as the matching view, [B, Nq, Hq, D]. lse stays
[B, Hq, Nq] (FlashAttention's convention), attn_mask [B, Hq, Nq, Nk] and key_padding_mask
[B, Nk] keep their meaning.

A layout cannot be recognised from shapes in general (self-attention with N == H fits both),
but many mistakes can: when q, k, v are NOT consistent in the declared layout (batch, head dim,
k == v shape, Hq a multiple of Hkv) and ARE consistent in the other one, the error says so and
names the layout to pass. Shapes consistent in both layouts are taken as declared.
"""
from __future__ import annotations

import torch

LAYOUTS = ("bhnd", "bnhd")
_DIMS = {"bhnd": "[B, H, N, D]", "bnhd": "[B, N, H, D]"}


def _heads(layout: str, x: torch.Tensor) -> int:
    return x.shape[1] if layout == "bhnd" else x.shape[2]


def _problem(layout: str, q, k, v):
    """Why q, k, v (4-D tensors) are inconsistent read in `layout`, or None if they are not."""
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        return "batch sizes differ"
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        return "head dims differ"
    if k.shape != v.shape:
        return "k and v shapes differ"
    hq, hkv = _heads(layout, q), _heads(layout, k)
    if hkv == 0:
        return None if hq == 0 else f"k/v have 0 heads but q has {hq}"
    if hq % hkv:
        return f"q's head count ({hq}) must be a multiple of k/v's head count ({hkv})"
    return None


def check_layout(q, k, v, layout) -> None:
    """`layout` is "bhnd" or "bnhd", and the shapes are not only consistent in the other one.
    Anything else wrong with q, k, v is left to the op's own checks."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhnd' ([B, H, N, D]) or 'bnhd' ([B, N, H, D]), got {layout!r}")
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return
    other = "bnhd" if layout == "bhnd" else "bhnd"
    why = _problem(layout, q, k, v)
    if why is not None and _problem(other, q, k, v) is None:
        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in (("q", q), ("k", k), ("v", v)))
        raise ValueError(
            f"{shapes} do not fit layout={layout!r} {_DIMS[layout]} ({why}), but fit "
            f"{_DIMS[other]}: pass layout={other!r}")


def to_bhnd(q, k, v, layout):
    """Checked (check_layout) q, k, v as [B, H, N, D]: unchanged for "bhnd", transpose(1, 2)
    views for "bnhd" (4-D tensors only; anything else is passed on to the op's checks)."""
    check_layout(q, k, v, layout)
    if layout == "bhnd":
        return q, k, v
    return tuple(x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                 for x in (q, k, v))


def from_bhnd(result, layout, return_lse: bool):
    """The op's result (out, or (out, lse)) with out back in `layout`; lse stays [B, H, N]."""
    if layout == "bhnd":
        return result
    if return_lse:
        out, lse = result
        return out.transpose(1, 2), lse
    return result.transpose(1, 2)
