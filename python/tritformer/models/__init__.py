"""Reference models built on the fused kernels."""
from .gpt import GPT, ContextParallel, GPTConfig, KVCache

__all__ = ["GPT", "ContextParallel", "GPTConfig", "KVCache"]
