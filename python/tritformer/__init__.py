"""tritformer: Triton kernels for transformer layers, as drop-in PyTorch autograd functions."""
from . import nn, numerics, reference
from .backend import backend_for
from .ops.attention import attention

__version__ = "0.1.0"
__all__ = ["attention", "backend_for", "nn", "reference", "numerics", "__version__"]
