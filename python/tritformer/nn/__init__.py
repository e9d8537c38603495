"""nn modules: parameters and configuration only; the math lives in the op layer."""
from .attention import FusedAttention

__all__ = ["FusedAttention"]
