"""Which implementation runs for a tensor.

- "triton": CUDA tensors, compiled Triton kernels.
- "triton-interpreter": the same kernels in Triton's interpreter, on CPU tensors. Chosen when
  TRITON_INTERPRET=1 was set before the kernels were first used (the variable is read when the
  kernel module is imported, i.e. at the first attention call). Set it before triton itself is
  imported (before `import tritformer`): Triton's library functions (tl.zeros ...) decorated
  without it fail when a kernel helper calls them.
- "reference": CPU tensors otherwise (or no usable Triton): the pure-PyTorch reference in fp32.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernel_mode() -> str | None:
    """'compiled', 'interpreted', or None when Triton cannot be imported."""
    try:
        from tritformer.kernels import attention as K
    except ImportError:
        return None
    return "interpreted" if K.is_interpreted(K._attn_fwd) else "compiled"


def backend_for(t: torch.Tensor) -> str:
    """The backend the fused ops use for tensors like `t`: "triton", "triton-interpreter" or "reference"."""
    mode = _kernel_mode()
    if mode == "interpreted":
        return "triton-interpreter"
    if mode == "compiled" and t.device.type == "cuda":
        return "triton"
    return "reference"
