"""Test helpers shared by the test suite: memory-layout variants of a tensor argument.

Every tensor an op's kernels read or write must be honoured with its real strides (or normalised
to a contiguous copy before launch). `layout_variants(t)` gives views of `t` in the layouts
that break kernels which assume contiguity:

- "strided":  every dim of size > 1 has a stride twice the contiguous one (a slice `[::2]`
              of a larger buffer); the values are t's.
- "offset":   contiguous, but at storage offset 3 of a larger buffer; the values are t's.
- "expanded": stride 0 along the first dim of size > 1 (t's first slice broadcast along it);
              the values differ from t's (every slice equals the first), so compare it against
              a reference computed on the same view. Only for floating tensors (an expanded
              index tensor such as cu_seqlens is rarely valid input).

The buffers around the views are filled with NaN (floats) or a large integer, so a kernel that
reads outside the view's elements produces a visibly wrong result, not a lucky match.
"""
from __future__ import annotations

import torch

LAYOUTS = ("strided", "offset", "expanded")


def _fill_value(t: torch.Tensor):
    if t.dtype == torch.bool:
        return True
    if t.dtype.is_floating_point:
        return float("nan")
    return 2 ** 30 if t.dtype in (torch.int32, torch.int64) else 1


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with doubled strides (every dim of size > 1 sliced [::2])."""
    buf = torch.full([2 * n if n > 1 else n for n in t.shape], _fill_value(t), dtype=t.dtype,
                     device=t.device)
    view = buf[tuple(slice(None, None, 2) if n > 1 else slice(None) for n in t.shape)]
    view.copy_(t)
    return view


def offset(t: torch.Tensor, by: int = 3) -> torch.Tensor:
    """t's values in a contiguous view at storage offset `by`."""
    buf = torch.full((t.numel() + 2 * by,), _fill_value(t), dtype=t.dtype, device=t.device)
    view = buf[by:by + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def expanded(t: torch.Tensor) -> torch.Tensor | None:
    """t's first slice along its first dim of size > 1, expanded (stride 0) to t's shape; None
    when t has no such dim or is not floating point."""
    if not t.dtype.is_floating_point:
        return None
    for d, n in enumerate(t.shape):
        if n > 1:
            return t.narrow(d, 0, 1).expand(t.shape)
    return None


def layout_variants(t: torch.Tensor):
    """(layout name, view) for each of LAYOUTS that applies to t."""
    out = [("strided", strided(t)), ("offset", offset(t))]
    e = expanded(t)
    if e is not None:
        out.append(("expanded", e))
    return out
