"""nn modules: parameters and configuration only; the math lives in the op layer."""
from .attention import FusedAttention
from .softmax import FusedSoftmax

__all__ = ["FusedAttention", "FusedSoftmax"]
