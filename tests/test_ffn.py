"""tritformer.ffn / gated_ffn against float64 (error-ratio criterion), in the interpreter.

Interpreter GEMM tiles: 32 x 32 x 32 (kernels/ffn.py INTERPRETER_CONFIG); sizes below are
chosen against them (tails on M, N and K; several K steps).
"""
import pytest
import torch

import tritformer

from tritformer.numerics import assert_checks
from tritformer.validate import check_ffn, check_gated_ffn

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]


def weights(d_in, hidden, d_out, dtype, bias=True):
    w1 = torch.randn(hidden, d_in) / d_in ** 0.5
    w2 = torch.randn(d_out, hidden) / hidden ** 0.5
    b1, b2 = (torch.randn(hidden) * 0.5, torch.randn(d_out) * 0.5) if bias else (None, None)
    return [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_ffn_activations_and_dtypes(dtype, act):
    # M = 2*37 = 74 (3 row tiles, tail), K = 40 (2 K steps, tail), hidden 70, out 33
    x = torch.randn(2, 37, 40).to(dtype)
    assert_checks(check_ffn(x, *weights(40, 70, 33, dtype), activation=act))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])  # SwiGLU, GeGLU (erf and tanh)
def test_gated_ffn(dtype, act):
    x = torch.randn(3, 25, 40).to(dtype)
    wg, wu = (torch.randn(50, 40).div(40 ** 0.5).to(dtype) for _ in range(2))
    wd = torch.randn(45, 50).div(50 ** 0.5).to(dtype)
    assert_checks(check_gated_ffn(x, wg, wu, wd, activation=act))


@pytest.mark.parametrize("biases", [
    ("b_gate", "b_up", "b_down"),  # all three: both biases in the dual-accumulator epilogue
    ("b_up",),                     # one of the pair: the launcher passes zeros for the other
])
def test_gated_ffn_biases(biases):
    x = torch.randn(2, 21, 40, dtype=torch.float16)
    wg, wu = (torch.randn(50, 40).div(40 ** 0.5).half() for _ in range(2))
    wd = torch.randn(45, 50).div(50 ** 0.5).half()
    sizes = {"b_gate": 50, "b_up": 50, "b_down": 45}
    b = {k: torch.randn(sizes[k]).half() for k in biases}
    assert_checks(check_gated_ffn(x, wg, wu, wd, activation="silu", **b))


@pytest.mark.parametrize("shape", [
    (1, 17),    # M = 1: one row
    (5, 1),     # K = 1: in_features smaller than any tile
    (64, 64),   # exact tiles
])
def test_odd_sizes(shape):
    M, d_in = shape
    x = torch.randn(M, d_in, dtype=torch.float16)
    assert_checks(check_ffn(x, *weights(d_in, 19, 7, torch.float16), activation="gelu"))


def test_residual_and_no_bias():
    x = torch.randn(4, 9, 24, dtype=torch.float16)
    res = torch.randn(4, 9, 24, dtype=torch.float16)
    assert_checks(check_ffn(x, *weights(24, 48, 24, torch.float16), residual=res))
    assert_checks(check_ffn(x, *weights(24, 48, 24, torch.float16, bias=False), activation="relu"))


def test_recompute_gives_the_same_results():
    x = torch.randn(3, 20, 32, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in weights(32, 40, 16, torch.float32))
    xg = torch.randn(3, 20, 32, requires_grad=True)
    wg, wu, wd = (torch.randn(*s, requires_grad=True) for s in ((40, 32), (40, 32), (16, 40)))
    runs = []
    for recompute in (False, True):
        y = tritformer.ffn(x, w1, b1, w2, b2, recompute=recompute)
        yg = tritformer.gated_ffn(xg, wg, wu, wd, recompute=recompute)
        leaves = (x, w1, b1, w2, b2, xg, wg, wu, wd)
        grads = torch.autograd.grad((y.square().sum() + yg.square().sum()), leaves)
        runs.append((y, yg, grads))
    (y0, g0, d0), (y1, g1, d1) = runs
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(d0, d1))  # same kernels, same order: bitwise


def test_recompute_saves_the_hidden_activations():
    # what autograd keeps between forward and backward: recompute drops pre and h (2*M*H*4 B)
    from torch.autograd.graph import saved_tensors_hooks
    x = torch.randn(64, 32, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in weights(32, 128, 32, torch.float32))
    saved = {}
    for recompute in (False, True):
        sizes = []
        with saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            tritformer.ffn(x, w1, b1, w2, b2, recompute=recompute)
        saved[recompute] = sum(sizes)
    assert saved[False] - saved[True] == 2 * 64 * 128 * 4


def test_modules_match_torch_layers():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.GELU(), torch.nn.Linear(64, 24))
    mlp = tritformer.nn.FusedMLP(24, 64, activation="gelu")
    mlp.load_state_dict({"fc1.weight": seq[0].weight, "fc1.bias": seq[0].bias,
                         "fc2.weight": seq[2].weight, "fc2.bias": seq[2].bias})
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(mlp(x), seq(x), rtol=1e-5, atol=1e-5)

    class LlamaMLP(torch.nn.Module):  # transformers' LlamaMLP, written out
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(24, 40, bias=False)
            self.up_proj = torch.nn.Linear(24, 40, bias=False)
            self.down_proj = torch.nn.Linear(40, 24, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    gated_b = tritformer.nn.FusedGatedMLP(24, 40, bias=True)  # biased gated MLP: nn.Linear layers
    torch.testing.assert_close(
        gated_b(x), gated_b.down_proj(torch.nn.functional.silu(gated_b.gate_proj(x)) * gated_b.up_proj(x)),
        rtol=1e-5, atol=1e-5)

    llama = LlamaMLP()
    gated = tritformer.nn.FusedGatedMLP(24, 40)
    gated.load_state_dict(llama.state_dict())  # same names, one to one
    torch.testing.assert_close(gated(x), llama(x), rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    x = torch.randn(6, 16, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in weights(16, 24, 8, torch.float32))
    torch.library.opcheck(torch.ops.tritformer.ffn_fwd.default, (x, w1, b1, w2, b2, None, 1, False))
    torch.library.opcheck(torch.ops.tritformer.ffn_fwd.default, (x, w1, None, w2, None, None, 4, True))
    wg, wu, wd = (torch.randn(*s, requires_grad=True) for s in ((24, 16), (24, 16), (8, 24)))
    torch.library.opcheck(torch.ops.tritformer.gated_ffn_fwd.default,
                          (x, wg, wu, wd, None, None, None, 4, False))
    bg, bu, bd = (torch.randn(n, requires_grad=True) for n in (24, 24, 8))
    torch.library.opcheck(torch.ops.tritformer.gated_ffn_fwd.default, (x, wg, wu, wd, bg, bu, bd, 1, True))
    torch._dynamo.reset()
    mlp = tritformer.nn.FusedGatedMLP(16, 24)
    ref = tritformer.nn.FusedGatedMLP(16, 24)
    ref.load_state_dict(mlp.state_dict())
    xs = torch.randn(2, 5, 16)
    out = torch.compile(mlp, fullgraph=True)(xs)
    torch.testing.assert_close(out, ref(xs))
    out.square().sum().backward()
    ref(xs).square().sum().backward()
    torch.testing.assert_close(mlp.gate_proj.weight.grad, ref.gate_proj.weight.grad)


@pytest.mark.parametrize("call,err,match", [
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1[:, :-1], b1, w2, b2), ValueError, "w1 must be"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1, b1, w2[:, :-1], b2), ValueError, "w2 must be"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1, b1[:-1], w2, b2), ValueError, "b1 must have shape"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1, b1, w2, b2, activation="tanh"), ValueError, "'gelu', 'gelu_tanh', 'relu', 'silu'"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x.int(), w1, b1, w2, b2), TypeError, "x must be float16"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1.double(), b1, w2, b2), TypeError, "w1 must have x's dtype"),
    (lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1, b1, w2, b2, residual=x[..., :3]), ValueError, "residual must have"),
    (lambda x, w1, b1, w2, b2: tritformer.gated_ffn(x, w1, w1[:3], w2), ValueError, "w_up must have"),
])
def test_bad_input(call, err, match):
    x = torch.randn(2, 8)
    w1, b1, w2, b2 = weights(8, 12, 8, torch.float32)
    with pytest.raises(err, match=match):
        call(x, w1, b1, w2, b2)
