"""Tests run the real Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before the kernel module is imported (the @triton.jit decorator
reads it), so it is set here, before anything imports tritformer's kernels.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset

import pytest
import torch

from tritformer import _interp_bounds, _interp_patch

_interp_patch.apply()  # bf16 dot/cast and GPU-like dots in the interpreter; see the module docstring
# every kernel load/store (where its mask is on) must stay inside the launch's tensor arguments;
# the interpreter itself never checks (see tritformer/_interp_bounds.py)
_interp_bounds.enable()

# every test means the interpreted kernels: a Triton import failure must not silently turn the
# fused ops into the pure-PyTorch reference backend (tests that count op calls would still pass)
from tritformer import backend_for

assert backend_for(torch.empty(0)) == "triton-interpreter", backend_for(torch.empty(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
