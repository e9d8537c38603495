"""Where the backend is chosen (issue 15, item 4): once per call, by `backend_for`, in the host
layer of each op (tritformer/ops/*.py), never inside the custom ops; and the "torch" choice (the
CPU fallback, tritformer.fallback) runs every op without launching a kernel, within the numerics
criterion. tests/test_fallback.py covers the fallback's semantics op by op.

The torch backend is forced by replacing `backend_for` in the op's module (test_decode does the
same with the older name "reference", still accepted); the kernel launchers are replaced by
failures.
"""
import pytest
import torch

import tritformer
from tritformer.kernels import attention as KA
from tritformer.kernels import decode as KD
from tritformer.kernels import ffn as KF
from tritformer.kernels import softmax as KS
from tritformer.ops import attention as ops_attention
from tritformer.ops import decode as ops_decode
from tritformer.ops import ffn as ops_ffn
from tritformer.ops import softmax as ops_softmax
from tritformer.testing import assert_checks, check_attention, check_ffn, check_gated_ffn, check_softmax

OP_MODULES = (ops_attention, ops_decode, ops_ffn, ops_softmax)


def _no_kernels(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("a kernel was launched on the torch backend")
    for mod, names in ((KA, ("attention_forward", "attention_backward")), (KD, ("decode_forward",)),
                       (KF, ("gemm",)), (KS, ("softmax_forward", "softmax_backward"))):
        for name in names:
            monkeypatch.setattr(mod, name, fail)


@pytest.fixture
def chosen(monkeypatch):
    """Counts the backend choices (calls of backend_for from the op modules) and returns the
    list; the backend itself is unchanged."""
    calls = []
    for mod in OP_MODULES:
        real = mod.backend_for
        monkeypatch.setattr(mod, "backend_for", lambda t, real=real: calls.append(1) or real(t))
    return calls


@pytest.fixture
def torch_backend(monkeypatch):
    for mod in OP_MODULES:
        monkeypatch.setattr(mod, "backend_for", lambda t: "torch")
    _no_kernels(monkeypatch)


def _ffn_args(dtype=torch.float32, grad=True):
    x = torch.randn(7, 12, dtype=dtype)
    w1, w2 = torch.randn(20, 12, dtype=dtype) / 4, torch.randn(9, 20, dtype=dtype) / 4
    b1, b2 = torch.randn(20, dtype=dtype), torch.randn(9, dtype=dtype)
    return [t.requires_grad_(grad) for t in (x, w1, b1, w2, b2)]


# ---------------------------------------------------------------------------------------------
# One choice per call, forward and backward (the custom ops and their backward never choose)
# ---------------------------------------------------------------------------------------------
def _one_call(op):
    if op == "attention":
        q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
        return tritformer.attention(q, k, v, causal=True)
    if op == "varlen":
        q, k, v = (torch.randn(5, 2, 8, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        return tritformer.varlen_attention(q, k, v, cu, cu, 3, 3)
    if op == "sdpa":
        q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
        return tritformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    if op == "mha":
        mha = tritformer.nn.MultiheadAttention(16, 2)
        x = torch.randn(5, 2, 16, requires_grad=True)
        return mha(x, x, x, need_weights=False)[0]
    if op == "softmax":
        return tritformer.softmax(torch.randn(3, 5, requires_grad=True), scale=0.5,
                                  mask=torch.randn(1, 5, requires_grad=True))
    if op == "ffn":
        x, w1, b1, w2, b2 = _ffn_args()
        return tritformer.ffn(x, w1, b1, w2, b2, residual=torch.randn(7, 9, requires_grad=True))
    if op == "gated_ffn":
        x, w1, b1, w2, b2 = _ffn_args()
        return tritformer.gated_ffn(x, w1, w1.flip(0), w2, b_up=b1)
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["attention", "varlen", "sdpa", "mha", "softmax", "ffn", "gated_ffn"])
def test_one_backend_choice_per_call(chosen, op):
    y = _one_call(op)
    assert len(chosen) == 1
    y.float().square().sum().backward()
    assert len(chosen) == 1  # the backward reuses the forward's choice


def test_decode_chooses_once(chosen):
    q, k = torch.randn(2, 2, 1, 8), torch.randn(2, 1, 6, 8)
    tritformer.decode_attention(q, k, k, torch.tensor([3, 6], dtype=torch.int32))
    assert len(chosen) == 1


# ---------------------------------------------------------------------------------------------
# The torch backend: every op runs without a kernel, within the criterion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_torch_backend_attention_softmax(torch_backend, dtype):
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=dtype) for _ in range(3))
    assert_checks(check_attention(q, k, v, causal=True))
    x = torch.randn(2, 5, 30, dtype=dtype)
    assert_checks(check_softmax(x, scale=0.5, causal=True))
    mask = torch.randn(1, 5, 30, dtype=dtype).requires_grad_()
    assert_checks(check_softmax(x, dim=1, mask=mask))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_backend_ffn(torch_backend, dtype, recompute):
    x, w1, b1, w2, b2 = _ffn_args(dtype, grad=False)
    residual = torch.randn(7, 9, dtype=dtype)
    assert_checks(check_ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=residual,
                            recompute=recompute))
    assert_checks(check_gated_ffn(x, w1, w1.flip(0), w2, activation="silu", recompute=recompute,
                                  b_gate=b1, b_down=b2))


def test_torch_backend_compiles_to_the_eager_result(torch_backend):
    # softmax / ffn keep the fallback inside their custom ops (backend.py): torch.compile
    # traces the same opaque op as on the kernel backends, so compiled == eager bitwise
    def fn(x, w1, b1, w2, b2):
        return tritformer.softmax(tritformer.ffn(x, w1, b1, w2, b2, activation="silu"), scale=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    args = _ffn_args()
    a = [t.detach().clone().requires_grad_() for t in args]
    b = [t.detach().clone().requires_grad_() for t in args]
    got, want = compiled(*a), fn(*b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    want.square().sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
