"""Module form of the fused softmax (config only, no parameters)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.softmax import softmax


class FusedSoftmax(nn.Module):
    """softmax(scale · x + mask) along `dim` via `tritformer.softmax` (Megatron's fused scaled
    masked softmax); `forward(x, mask=None)`."""

    def __init__(self, dim: int = -1, scale: float = 1.0, causal: bool = False):
        super().__init__()
        self.dim, self.scale, self.causal = dim, scale, causal

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return softmax(x, self.dim, scale=self.scale, mask=mask, causal=self.causal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal}"
