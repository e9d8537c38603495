"""Which implementation runs for a tensor.

- "triton": CUDA tensors, compiled Triton kernels.
- "triton-interpreter": the same kernels in Triton's interpreter, on CPU tensors. Chosen when
  TRITON_INTERPRET=1 was set before the kernels were first used (the variable is read when the
  kernel module is imported, i.e. at the first attention call). Set it before triton itself is
  imported (before `import tritformer`): Triton's library functions (tl.zeros ...) decorated
  without it fail when a kernel helper calls them.
- "reference": CPU tensors otherwise (or no usable Triton): the pure-PyTorch reference in fp32.

Where the choice is made: once per call, by `backend_for` on the first tensor argument, in the
host layer of every op (tritformer/ops/*.py), after the argument checks (tritformer._checks)
and before any custom op: `attention` and `scaled_dot_product_attention` (through their shared
driver `ops.attention._attention`), `varlen_attention`, `decode_attention`, `softmax`, `ffn`,
`gated_ffn`. The torch.library custom ops never call it. What the "reference" choice then runs:

- attention / varlen / decode: `tritformer.reference` in float32 under plain autograd, instead
  of the custom ops (their reference is the test oracle itself).
- softmax / ffn / gated_ffn: the same custom ops with ``reference_backend=True`` (their last
  argument): float32 PyTorch inside the op, with the hand-written backward that mirrors the
  kernels' (gradients from the saved, rounded activations; `reference.ffn_backward`). Kept
  inside the ops so that torch.compile traces the same opaque op on every backend (compiled
  and eager results stay bitwise equal, as before); plain autograd through the reference would
  hand the math to inductor, which fuses it differently (other rounding than eager).
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
