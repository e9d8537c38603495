"""FFN modules with the state_dict layouts of the models they replace."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_activation
from ..ops.ffn import ffn, gated_ffn


class FusedMLP(nn.Module):
    """Linear -> activation -> Linear through `tritformer.ffn` (timm's Mlp naming).

    Submodules `fc1` [hidden, in] and `fc2` [out, hidden] are plain nn.Linear layers, so a
    state_dict of an nn.Sequential/timm Mlp maps one to one; `forward(x, residual=None)`.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 activation: str = "gelu", bias: bool = True, recompute: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        out_features = out_features or in_features
        kw = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **kw)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **kw)
        self.activation, self.recompute = activation, recompute

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                   activation=self.activation, residual=residual, recompute=self.recompute)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, recompute={self.recompute}"


class FusedGatedMLP(nn.Module):
    """Llama's MLP, down_proj(act(gate_proj(x)) * up_proj(x)), through `tritformer.gated_ffn`.

    Submodules `gate_proj`, `up_proj` [intermediate, hidden] and `down_proj` [hidden,
    intermediate] are nn.Linear layers named as in Llama, so checkpoints load one to one.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 bias: bool = False, recompute: bool = False, device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)
        self.activation, self.recompute = activation, recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                         activation=self.activation, recompute=self.recompute,
                         b_gate=self.gate_proj.bias, b_up=self.up_proj.bias,
                         b_down=self.down_proj.bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, recompute={self.recompute}"
