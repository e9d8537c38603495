"""FlashAttention's import line with tritformer's kernels: ``from tritformer.flash_attn import
flash_attn_func`` (was ``from flash_attn import flash_attn_func``). The same objects as
`tritformer.flash_attn_interface` (which also mirrors ``flash_attn.flash_attn_interface``);
what differs from FlashAttention is in that module's docstring."""
from . import flash_attn_interface
from .flash_attn_interface import (
    FlashAttnError,
    FlashAttnTypeError,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache", "FlashAttnError",
    "FlashAttnTypeError", "flash_attn_interface",
]
