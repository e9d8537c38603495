"""Module form of the fused attention op (config only, no parameters)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.attention import attention


class FusedAttention(nn.Module):
    """softmax(q kᵀ · scale + causal mask) v over [B, H, N, D] tensors, via `tritformer.attention`.

    Args:
        causal: bottom-right aligned causal mask (see `tritformer.attention`).
        scale: softmax scale; None means 1/sqrt(D).
    """

    def __init__(self, causal: bool = False, scale: Optional[float] = None):
        super().__init__()
        self.causal = causal
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, causal=self.causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}"
