"""pytest-benchmark tests over the harness of `python -m tritformer bench` (tritformer.bench).

    pytest benchmarks/ --benchmark-only            # measure (GPU: compiled kernels)
    pytest benchmarks/ --benchmark-disable         # smoke: each body runs once (CI)

On a machine without CUDA the kernels run in Triton's interpreter: the times are interpreter
times and say nothing about GPU speed.
"""
import os

import torch

if not torch.cuda.is_available():
    # before triton is first imported (`import tritformer` imports it through torch._dynamo):
    # the interpreter only takes over @triton.jit functions created after the variable is set,
    # Triton's own tl.zeros included; set later, `pytest benchmarks/` alone failed with "Cannot
    # call @triton.jit'd outside of the scope of a kernel" (tests/conftest.py sets it first too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritformer import bench  # noqa: E402

DEVICE = bench.setup_device()  # before anything imports the kernels: TRITON_INTERPRET on CPU
