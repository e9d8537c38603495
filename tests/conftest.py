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


@pytest.fixture(scope="session")
def run_once(tmp_path_factory):
    """run_once(name, produce) -> produce(directory), computed once per test session.

    Under pytest-xdist every worker builds its own module- and session-scoped fixtures, so an
    expensive multi-process run (the Gloo context-parallel spawns, the 4-rank FSDP training)
    would run once per worker that draws one of its tests. The first worker to ask computes it
    in a directory shared by the session's workers, under a file lock, and saves the result
    (tensors, dicts, lists, strings: torch.save, read back with weights_only=True); the others
    wait for the lock and load it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    # xdist: each worker's basetemp is <session temp>/popen-gwN, so the parent is the session's
    root = tmp_path_factory.getbasetemp() if worker is None else tmp_path_factory.getbasetemp().parent

    def get(name, produce):
        from filelock import FileLock  # a dependency of torch
        path = root / f"run_once-{name}.pt"
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                return torch.load(path, weights_only=True)
            work = root / f"run_once-{name}"
            work.mkdir(exist_ok=True)
            result = produce(work)
            torch.save(result, path)
            return result
    return get
