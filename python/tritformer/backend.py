"""Which implementation runs for a tensor.

- "triton": CUDA tensors, compiled Triton kernels.
- "triton-interpreter": the same kernels in Triton's interpreter, on CPU tensors. Chosen when
  TRITON_INTERPRET=1 was set before the kernels were first used (the variable is read when the
  kernel module is imported, i.e. at the first attention call). Set it before triton itself is
  imported (before `import tritformer`): Triton's library functions (tl.zeros ...) decorated
  without it fail when a kernel helper calls them.
- "torch": CPU tensors otherwise (or no usable Triton): the CPU production fallback,
  `tritformer.fallback`: PyTorch's fastest equivalent of each op (torch's own SDPA for
  attention, float32 torch ops for softmax / FFN), with the kernels' semantics.

"reference" is no longer returned: `tritformer.reference` is the naive float64-capable oracle
of the tests and nothing else. The ops still accept it from a replaced `backend_for` (older
tests force the CPU path that way) and treat it as "torch" (`is_torch`).

Where the choice is made: once per call, by `backend_for` on the first tensor argument, in the
host layer of every op (tritformer/ops/*.py), after the argument checks (tritformer._checks)
and before any custom op: `attention` and `scaled_dot_product_attention` (through their shared
driver `ops.attention._attention`), `varlen_attention`, `decode_attention`, `softmax`, `ffn`,
`gated_ffn`. The torch.library custom ops never call it. What the "torch" choice then runs:

- attention / varlen / decode: `tritformer.fallback` under plain autograd, instead of the
  custom ops: torch's `scaled_dot_product_attention` (on CPU its flash kernel, O(N) memory)
  with the masks, ALiBi, GQA and empty-row rule folded in; softcap and dropout (which SDPA
  cannot express) through the plain matmul path in float32. See that module's docstring.
- softmax / ffn / gated_ffn: the same custom ops with ``reference_backend=True`` (their last
  argument): float32 PyTorch inside the op, with the hand-written backward that mirrors the
  kernels' (gradients from the saved, rounded activations; `reference.ffn_backward`); these
  are already torch's own ops (matmuls, softmax), as fast as the unfused PyTorch modules. Kept
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
    """The backend the fused ops use for tensors like `t`: "triton", "triton-interpreter" or
    "torch" (the CPU fallback, `tritformer.fallback`)."""
    mode = _kernel_mode()
    if mode == "interpreted":
        return "triton-interpreter"
    if mode == "compiled" and t.device.type == "cuda":
        return "triton"
    return "torch"


def is_torch(backend: str) -> bool:
    """Whether `backend` (a `backend_for` result) runs the PyTorch fallback instead of kernels
    ("reference", the name before the fallback existed, counts as "torch")."""
    return backend in ("torch", "reference")


def describe(t: torch.Tensor) -> str:
    """One line naming the backend for tensors like `t`, for the CLI's start-up message."""
    b = backend_for(t)
    if b == "torch":
        return ("torch (CPU fallback: PyTorch's SDPA and ops; set TRITON_INTERPRET=1 before the "
                "start to run the Triton kernels in the interpreter)")
    if b == "triton-interpreter":
        return "triton-interpreter (the Triton kernels in Triton's interpreter, slow)"
    return "triton (compiled Triton kernels)"


def model_backend_line(device, attn_backend: str = "tritformer", mlp_backend: str = "tritformer") -> str:
    """The start-up line of `train` / `generate`: what actually runs a GPT's attention and MLP on
    `device` (the fused ops' backend where the model uses them)."""
    fused = describe(torch.empty(0, device=device))
    attn = {"tritformer": "tritformer ops", "sdpa": "torch's SDPA",
            "naive": "the naive reference (tritformer.reference)"}.get(attn_backend, attn_backend)
    mlp = {"tritformer": "tritformer ops", "torch": "torch modules"}.get(mlp_backend, mlp_backend)
    line = f"backend: attention {attn} (--attn-backend {attn_backend}), MLP {mlp} (--mlp-backend {mlp_backend})"
    if "tritformer" in (attn_backend, mlp_backend):
        line += f"; tritformer ops on {torch.device(device).type}: {fused}"
    return line
