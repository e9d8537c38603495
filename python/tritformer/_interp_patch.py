"""Patch for the Triton interpreter's bfloat16 gaps (Triton 3.7.1 to 3.9.x, TRITON_INTERPRET=1).

1. `tl.dot` on bf16 operands multiplies the raw 16-bit patterns (triton-lang/triton#11584).
2. fp32 -> bf16 casts truncate instead of rounding to nearest even, as GPUs do.
Applied only where kernels run interpreted (the tests and `validate` on CPU); compiled GPU kernels
are untouched. Without it, bf16 results in the interpreter are garbage.
"""
from __future__ import annotations

import numpy as np
import torch


def _bf16_bits_to_f32(data):
    return (data.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits_rtne(data):
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def apply() -> bool:
    """Patch the interpreter once; returns True when the patch is (now) in place."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 10):  # not verified beyond 3.9: the checks in tests/ will tell
        return False
    B = _interp.InterpreterBuilder
    if getattr(B, "_tritformer_bf16_patched", False):
        return True
    orig_dot, orig_cast = B.create_dot, B.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = _interp.TensorHandle(_bf16_bits_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = _interp.TensorHandle(_bf16_bits_to_f32(b.data), tl.float32)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return _interp.TensorHandle(_f32_to_bf16_bits_rtne(src.data), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    B.create_dot, B.cast_impl = create_dot, cast_impl
    B._tritformer_bf16_patched = True
    return True
