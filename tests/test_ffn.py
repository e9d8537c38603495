"""tritformer.ffn / gated_ffn against float64 (error-ratio criterion), in the interpreter.

Interpreter GEMM tiles: 32 x 32 x 32 (kernels/ffn.py INTERPRETER_CONFIG); sizes below are
chosen against them (tails on M, N and K; several K steps).
"""
import pytest
import torch

import tritformer

from tritformer.numerics import assert_checks
from tritformer.testing import check_ffn, check_gated_ffn

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
    torch.library.opcheck(torch.ops.tritformer.ffn_fwd.default, (x, w1, b1, w2, b2, None, "gelu", False))
    torch.library.opcheck(torch.ops.tritformer.ffn_fwd.default, (x, w1, None, w2, None, None, "silu", True))
    wg, wu, wd = (torch.randn(*s, requires_grad=True) for s in ((24, 16), (24, 16), (8, 24)))
    torch.library.opcheck(torch.ops.tritformer.gated_ffn_fwd.default,
                          (x, wg, wu, wd, None, None, None, "silu", False))
    bg, bu, bd = (torch.randn(n, requires_grad=True) for n in (24, 24, 8))
    torch.library.opcheck(torch.ops.tritformer.gated_ffn_fwd.default, (x, wg, wu, wd, bg, bu, bd, "gelu", True))
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


# ---------------------------------------------------------------------------------------------
# Issue 14: every tensor argument honoured with its strides; no gradient aliasing; empty sizes;
# grids within CUDA's launch limits
# ---------------------------------------------------------------------------------------------
def _layout(t, layout):
    """t's values (for "expanded": t's first slice broadcast) in a non-contiguous layout, inside
    a NaN-filled buffer so that reading past the view shows up in the result."""
    if layout == "strided":  # every dim of size > 1 at twice its contiguous stride
        buf = torch.full([2 * n if n > 1 else n for n in t.shape], float("nan"), dtype=t.dtype)
        view = buf[tuple(slice(None, None, 2) if n > 1 else slice(None) for n in t.shape)]
    elif layout == "offset":  # contiguous at storage offset 1 (big[1:])
        buf = torch.full((t.numel() + 2,), float("nan"), dtype=t.dtype)
        view = buf[1:1 + t.numel()].view(t.shape)
    else:  # "expanded": stride 0 along every leading dim (a bias: one element broadcast)
        assert layout == "expanded"
        src = t.reshape(-1)[:1] if t.dim() == 1 else t[(0,) * (t.dim() - 1)]
        return src.clone().expand(t.shape)
    view.copy_(t)
    return view


LAYOUTS = ["strided", "offset", "expanded"]
# M = 2*5 = 10 rows, in 24, hidden 40 (two column tiles, tail), out 20: small, every epilogue
FFN_ARGS = dict(x=(2, 5, 24), w1=(40, 24), b1=(40,), w2=(20, 40), b2=(20,), residual=(2, 5, 20))
GATED_ARGS = dict(x=(2, 5, 24), w_gate=(40, 24), w_up=(40, 24), w_down=(20, 40), b_gate=(40,),
                  b_up=(40,), b_down=(20,))


def _args(shapes, dtype):
    return {k: (torch.randn(s) * (0.3 if k.startswith("w") else 1.0)).to(dtype)
            for k, s in shapes.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(FFN_ARGS))
def test_ffn_argument_layouts(name, layout):
    # x/w*: GEMM operands (weights through their transposed views); b1/b2: the bias epilogue
    # (Bias + n read it as contiguous); residual: the residual epilogue. Forward and every grad.
    args = _args(FFN_ARGS, torch.float32)
    args[name] = _layout(args[name], layout)
    assert_checks(check_ffn(**args, activation="gelu"), (name, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GATED_ARGS))
def test_gated_ffn_argument_layouts(name, layout):
    # b_gate/b_up: the dual-accumulator epilogue's two biases; b_down: the bias epilogue
    args = _args(GATED_ARGS, torch.float32)
    args[name] = _layout(args[name], layout)
    assert_checks(check_gated_ffn(**args, activation="silu"), (name, layout))


def _bitwise(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _same(got, want, sums, what):
    """Kernel outputs bitwise; the bias grads (`sums`: PyTorch column sums, whose summation order
    follows the layout) to fp32 rounding."""
    for i, (g, w) in enumerate(zip(got, want)):
        if i in sums:
            torch.testing.assert_close(g, w, msg=lambda m: f"{what} output {i}: {m}")
        else:
            assert torch.equal(g, w), (what, i, (g - w).abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["dy", "h", "pre"])
def test_ffn_backward_saved_tensor_layouts(name, layout):
    # the backward op's own inputs: grad_output dy (GEMM operand of dpre and dw2, column sum of
    # db2), the saved activation h (GEMM operand of dw2) and pre-activation (the dact epilogue's
    # aux). Same values, contiguous: the same kernels in the same order, so bitwise equal.
    x, w1, b1, w2, _ = (_args(dict(FFN_ARGS, residual=(20,)), torch.float32)[k]
                        for k in ("x", "w1", "b1", "w2", "residual"))
    x = x.reshape(10, 24)
    _, h, pre = torch.ops.tritformer.ffn_fwd(x, w1, b1, w2, None, None, "gelu", False)
    t = dict(dy=torch.randn(10, 20), h=h, pre=pre)
    t[name] = _layout(t[name], layout)
    want = torch.ops.tritformer.ffn_bwd(t["dy"].contiguous(), x, w1, b1, w2, t["h"].contiguous(),
                                        t["pre"].contiguous(), "gelu", False)
    got = torch.ops.tritformer.ffn_bwd(t["dy"], x, w1, b1, w2, t["h"], t["pre"], "gelu", False)
    _same(got, want, sums=(2, 4), what=(name, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["dy", "h", "g", "u"])
def test_gated_ffn_backward_saved_tensor_layouts(name, layout):
    # dy: dgated GEMM operand, dwd operand, db_down column sum; h: dwd operand; g, u: the dgated
    # epilogue's two aux tensors (one of them alone in another layout: they need not share strides)
    a = _args(GATED_ARGS, torch.float32)
    x = a["x"].reshape(10, 24)
    wg, wu, wd, bg, bu = a["w_gate"], a["w_up"], a["w_down"], a["b_gate"], a["b_up"]
    _, h, g, u = torch.ops.tritformer.gated_ffn_fwd(x, wg, wu, wd, bg, bu, None, "silu", False)
    t = dict(dy=torch.randn(10, 20), h=h, g=g, u=u)
    t[name] = _layout(t[name], layout)
    c = {k: v.contiguous() for k, v in t.items()}
    want = torch.ops.tritformer.gated_ffn_bwd(c["dy"], x, wg, wu, wd, bg, bu, c["h"], c["g"], c["u"],
                                              "silu", False)
    got = torch.ops.tritformer.gated_ffn_bwd(t["dy"], x, wg, wu, wd, bg, bu, t["h"], t["g"], t["u"],
                                             "silu", False)
    _same(got, want, sums=(4, 5, 6), what=(name, layout))


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("recompute", [False, True])
def test_no_gradient_aliases_grad_output(recompute):
    # r.grad was grad_output itself (a view of it): zero_grad(set_to_none=False) or
    # clip_grad_norm_ on the residual then rewrote the caller's tensor
    a = _args(FFN_ARGS, torch.float32)
    leaves = {k: v.requires_grad_() for k, v in a.items()}
    y = tritformer.ffn(**leaves, recompute=recompute)
    dy = torch.randn(y.shape)
    keep = dy.clone()
    y.backward(dy)
    for k, v in leaves.items():
        assert _storage(v.grad) != _storage(dy), k
        assert _storage(v.grad) != _storage(v), k
    leaves["residual"].grad.zero_()
    assert torch.equal(dy, keep)

    g = _args(GATED_ARGS, torch.float32)
    leaves = {k: v.requires_grad_() for k, v in g.items()}
    y = tritformer.gated_ffn(**leaves, recompute=recompute)
    dy = torch.randn(y.shape)
    y.backward(dy)
    for k, v in leaves.items():
        assert _storage(v.grad) != _storage(dy), k


def test_backward_ops_return_no_input():
    # the backward ops themselves: no output shares storage with an input (custom-op contract)
    a = _args(FFN_ARGS, torch.float32)
    x, w1, b1, w2 = a["x"].reshape(10, 24), a["w1"], a["b1"], a["w2"]
    _, h, pre = torch.ops.tritformer.ffn_fwd(x, w1, b1, w2, None, None, "gelu", False)
    dy = torch.randn(10, 20)
    ins = (dy, x, w1, b1, w2, h, pre)
    for out in torch.ops.tritformer.ffn_bwd(dy, x, w1, b1, w2, h, pre, "gelu", False):
        assert all(_storage(out) != _storage(i) for i in ins)


@pytest.mark.parametrize("shape", [
    (6, 0, 5, 4),   # in_features 0: F.linear gives the bias; y = act(b1) w2ᵀ + b2
    (6, 4, 0, 5),   # hidden 0: y = b2 (+ residual); K = 0 in the second GEMM
    (6, 4, 5, 0),   # out_features 0: empty output, dpre from an empty product
    (0, 4, 5, 3),   # no rows: empty outputs, weight grads zero
])
def test_empty_dimensions_match_torch(shape, monkeypatch):
    from tritformer.kernels import ffn as K
    M, d_in, H, N = shape
    grids = []
    real_run = K.run

    def run(launch):
        grid = launch.grid(launch.configs[0].kwargs)
        grids.append(grid)
        assert all(g > 0 for g in grid), (launch.name, grid)
        real_run(launch)
    monkeypatch.setattr(K, "run", run)
    x = torch.randn(2, M // 2, d_in)
    w1, b1, w2, b2 = weights(d_in, H, N, torch.float32)
    res = torch.randn(2, M // 2, N)
    assert_checks(check_ffn(x, w1, b1, w2, b2, activation="gelu", residual=res), shape)
    assert_checks(check_ffn(x, w1, None, w2, None, activation="silu", recompute=True), shape)
    wg, wu = torch.randn(H, d_in), torch.randn(H, d_in)
    assert_checks(check_gated_ffn(x, wg, wu, w2, b_gate=b1, b_up=torch.randn(H), b_down=b2), shape)
    assert_checks(check_gated_ffn(x, wg, wu, w2, recompute=True), shape)


def test_grids_within_cuda_limits():
    # plans from meta tensors (nothing allocated) for shapes whose tile count passes 2^31 - 1
    from tritformer.kernels import ffn as K
    e = lambda *s: torch.empty(*s, device="meta", dtype=torch.float16)
    for M, K_, N in [(2 ** 36, 64, 2 ** 16), (2 ** 20, 64, 2 ** 33), (3, 64, 2 ** 40),
                     (2 ** 40, 64, 3)]:
        a, b, c = e(M, K_), e(N, K_).t(), e(M, N)
        plans = (K.plan_gemm(a, b, c, bias=e(N), residual=c, pre=c, act=K.ACT_GELU)
                 + K.plan_gemm(a, b, c, epi=K.EPI_DACT, act=K.ACT_GELU, aux=c)
                 + K.plan_gemm(a, b, c, epi=K.EPI_GATED, act=K.ACT_SILU, b2=b, pre=c, pre2=c)
                 + K.plan_gemm(a, b, c, epi=K.EPI_DGATED, act=K.ACT_SILU, aux=c, aux2=c, c2=c))
        for arch in (80, 90):
            plans += K.plan_gemm(a, b, c, arch=arch) + K.plan_gemm(a, b, c, epi=K.EPI_GATED,
                                                                   b2=b, arch=arch)
        for p in plans:
            for cfg in p.configs:
                grid = p.grid(cfg.kwargs)
                assert 1 <= len(grid) <= 3 and all(g >= 1 for g in grid), (p.name, grid)
                limits = (2 ** 31 - 1, 65535, 65535)
                assert all(g <= lim for g, lim in zip(grid, limits)), (p.name, (M, N), grid)
                # every tile covered: one program per tile, or the programs loop over them
                tiles = -(-M // cfg.kwargs["BLOCK_M"]) * -(-N // cfg.kwargs["BLOCK_N"])
                assert grid == (tiles,) or p.constexprs["TILE_LOOP"], (p.name, (M, N), grid)


def test_programs_loop_over_tiles(monkeypatch):
    # the capped grid: fewer programs than tiles, each program loops over several tiles (the
    # path huge M x N takes on a GPU); here 3 programs for up to 3 x 2 tiles per GEMM. Same tiles,
    # same order within each: bitwise the results of one program per tile.
    from tritformer.kernels import ffn as K
    x, res = torch.randn(70, 40), torch.randn(70, 33)
    w1, b1, w2, b2 = weights(40, 50, 33, torch.float32)
    wg, wu = torch.randn(50, 40) * 0.2, torch.randn(50, 40) * 0.2

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, b1, w2, b2, res, wg, wu)]
        xl, w1l, b1l, w2l, b2l, rl, wgl, wul = leaves
        y = tritformer.ffn(xl, w1l, b1l, w2l, b2l, activation="gelu_tanh", residual=rl)
        yg = tritformer.gated_ffn(xl, wgl, wul, w2l, b_gate=b1l)
        (y.square().sum() + yg.square().sum()).backward()
        return [y, yg] + [t.grad for t in leaves]

    want = run()
    monkeypatch.setattr(K, "MAX_PROGRAMS", 3)
    launched = []
    real_run = K.run
    monkeypatch.setattr(K, "run", lambda p: launched.append(p.grid(p.configs[0].kwargs)) or real_run(p))
    got = run()
    assert launched and all(g == (3,) for g in launched), launched
    assert _bitwise(got, want)
    assert_checks(check_ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=res))


# fp32 act' near its zero: gelu' = Phi(z) + z phi(z) vanishes at z = -0.752, silu' at -1.278,
# gelu_tanh' at -0.752; the fp32 formulas cancel there (gelu' at -0.5368: 0.2957 - 0.1854 erred
# ~2 ulp of the result, the deep fuzz's dx 12.7x PyTorch's error, tests/test_fuzz.py). The
# kernel evaluates act' in fp64 for fp32 outputs and rounds once (kernels/ffn.py, ew_ty), so
# the inputs below, built so that every other factor is exactly 1, give dx = act'(z) within
# half an ulp. `ulp` here is of the fp32 reference; 0.5 + 1e-3 for fp64's own rounding.
_DACT_ZEROS = {"gelu": -0.7518, "gelu_tanh": -0.7518, "silu": -1.2785}


@pytest.mark.parametrize("gated", [False, True], ids=["dact", "dgated"])  # EPI_DACT / EPI_DGATED
@pytest.mark.parametrize("act", list(_DACT_ZEROS))
def test_fp32_activation_derivative_rounded_once(act, gated):
    z = torch.linspace(-0.5, 0.5, 97, dtype=torch.float64) + _DACT_ZEROS[act]
    z = z.float()
    ref = torch.func.vmap(torch.func.grad(
        lambda t: torch.nn.functional.gelu(t, approximate="tanh") if act == "gelu_tanh"
        else getattr(torch.nn.functional, act)(t)))(z.double())
    one = torch.ones(1, 1)
    if gated:  # x = (z, 1), g = z, u = 1: dx[:, 0] = dg = 1 * 1 * act'(z), du's column apart
        x = torch.stack([z, torch.ones_like(z)], 1).requires_grad_()
        y = tritformer.gated_ffn(x, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), one,
                                 activation=act)
    else:  # pre = z, dh = 1: dx = act'(z)
        x = z[:, None].clone().requires_grad_()
        y = tritformer.ffn(x, one, None, one, None, activation=act)
    y.sum().backward()
    dx = x.grad[:, 0].double()
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(ref.abs().float())))
    err = ((dx - ref).abs() / ulp.double())
    assert err.max() <= 0.501, (act, err.max().item(), z[err.argmax()].item())
