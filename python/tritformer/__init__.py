"""tritformer: Triton kernels for transformer layers, as drop-in PyTorch autograd functions."""
from . import nn, numerics, reference
from .backend import backend_for
from .ops.attention import attention, varlen_attention
from .ops.decode import decode_attention
from .ops.ffn import ffn, gated_ffn
from .ops.sdpa import scaled_dot_product_attention
from .ops.softmax import softmax
from .patching import patch

__version__ = "0.1.0"
__all__ = ["attention", "varlen_attention", "decode_attention", "scaled_dot_product_attention",
           "softmax", "ffn", "gated_ffn", "backend_for", "nn", "reference", "numerics", "patch",
           "__version__"]
