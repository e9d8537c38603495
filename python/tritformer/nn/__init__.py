"""nn modules: parameters and configuration only; the math lives in the op layer."""
from .attention import FusedAttention
from .mha import MultiheadAttention
from .mlp import FusedGatedMLP, FusedMLP
from .softmax import FusedSoftmax

__all__ = ["FusedAttention", "FusedGatedMLP", "FusedMLP", "FusedSoftmax", "MultiheadAttention"]
