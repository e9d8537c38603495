"""tritformer.scaled_dot_product_attention against torch's own F.scaled_dot_product_attention.

The project's criterion (tritformer.numerics): error vs torch's SDPA in float64 at most 2x (outputs)
/ 3x (gradients) torch's own same-dtype error. Every case also asserts which path served it
(the fused `_attention` or the fallback to torch's builtin op), so a case cannot silently test the
fallback against itself. Shapes stay inside one or two interpreter tiles (BLOCK_M=64, BLOCK_N=32).
"""
import contextlib
import inspect

import warnings

import pytest
import torch
import torch.nn.functional as F

import tritformer.ops.sdpa as sdpa_mod
from tritformer import numerics
from tritformer.ops.sdpa import scaled_dot_product_attention as sdpa
from tritformer.testing import check_sdpa

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's op, whatever F holds


@pytest.fixture
def paths(monkeypatch):
    """Counts calls of the fused core and of the torch fallback inside tritformer's sdpa."""
    calls = {"fused": 0, "torch": 0}
    fused, fallback = sdpa_mod._attention, sdpa_mod._torch_sdpa

    def spy_fused(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    def spy_torch(*a, **k):
        calls["torch"] += 1
        return fallback(*a, **k)

    monkeypatch.setattr(sdpa_mod, "_attention", spy_fused)
    monkeypatch.setattr(sdpa_mod, "_torch_sdpa", spy_torch)
    return calls


def rnd(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def check_against_torch(q, k, v, attn_mask=None, grads=True, **kw):
    """tritformer sdpa vs torch's SDPA (tritformer.testing.check_sdpa), asserted."""
    bad = [str(c) for c in check_sdpa(q, k, v, attn_mask, grads=grads, **kw) if not c.ok]
    assert not bad, "\n".join(bad)


def test_signature_matches_torch():
    # torch's builtin has no inspectable signature; its documented one, scale/enable_gqa keyword-only
    params = inspect.signature(sdpa).parameters
    assert list(params) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                            "scale", "enable_gqa"]
    assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
    q = rnd(1, 1, 3, 8, dtype=torch.float32)
    with pytest.raises(TypeError):
        sdpa(q, q, q, None, 0.0, False, 0.5)  # scale is keyword-only in torch too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_no_mask(dtype, paths):
    # fused, MHA, L < S with ragged tile tails
    check_against_torch(rnd(2, 2, 20, 16, dtype=dtype), rnd(2, 2, 37, 16, dtype=dtype),
                        rnd(2, 2, 37, 16, dtype=dtype))
    assert paths == {"fused": 1, "torch": 0}


def test_scale(paths):
    # fused, explicit scale (keyword-only)
    check_against_torch(rnd(1, 2, 17, 24), rnd(1, 2, 23, 24), rnd(1, 2, 23, 24), scale=0.3)
    assert paths["fused"] == 1


def test_bool_mask(paths):
    # fused, bool mask [L, S] broadcast over batch and heads; one row fully masked -> 0 (torch too)
    mask = torch.rand(19, 33) > 0.3
    mask[4] = False
    check_against_torch(rnd(2, 2, 19, 16), rnd(2, 2, 33, 16), rnd(2, 2, 33, 16), mask)
    assert paths == {"fused": 1, "torch": 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_float_mask_gets_gradient(dtype, paths):
    # fused, additive float mask [B, 1, L, S] (broadcast over heads) requiring grad: dmask summed
    # over the broadcast head dim by autograd
    mask = (torch.randn(2, 1, 21, 30) * 2).to(dtype).requires_grad_()
    check_against_torch(rnd(2, 2, 21, 16, dtype=dtype), rnd(2, 2, 30, 16, dtype=dtype),
                        rnd(2, 2, 30, 16, dtype=dtype), mask)
    assert paths == {"fused": 1, "torch": 0}


def test_float32_mask_with_half_inputs(paths):
    # fused: torch accepts a float32 additive mask with fp16 q/k/v; its gradient stays float32
    mask = torch.randn(13, 22).requires_grad_()
    check_against_torch(rnd(1, 2, 13, 16), rnd(1, 2, 22, 16), rnd(1, 2, 22, 16), mask)
    assert paths["fused"] == 1


@pytest.mark.parametrize("L, S", [
    (18, 35),  # L < S: top-left, query i sees keys 0..i only (not the bottom-right KV-cache rule)
    (35, 18),  # L > S: queries i >= S see every key
    (24, 24),
])
def test_is_causal_top_left(L, S, paths):
    check_against_torch(rnd(1, 2, L, 16), rnd(1, 2, S, 16), rnd(1, 2, S, 16), is_causal=True)
    assert paths == {"fused": 1, "torch": 0}


def test_is_causal_is_top_left_exactly():
    # one-hot values read the probabilities off: q = k = 0 gives uniform weights over the
    # visible keys, so row i must be 1/(i+1) on keys 0..i (L=3 < S=5), independent of S
    q, k, v = torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 5, 8), torch.eye(5, 8).reshape(1, 1, 5, 8)
    out = sdpa(q, k, v, is_causal=True)[0, 0, :, :5]
    want = torch.tensor([[1, 0, 0, 0, 0], [.5, .5, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0]])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)  # fp32, exact up to rounding


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_is_causal_with_mask(mask_kind, paths):
    # fused: causal window and attn_mask together (AND), as torch 2.13 CPU combines them for 4-D
    # inputs with a 2-D mask; the bool mask also empties row 0 (kept by causal only on key 0)
    L, S = 22, 30
    if mask_kind == "bool":
        mask = torch.rand(L, S) > 0.4
        mask[0, 0] = False
    else:
        # (no grad on the mask: torch's math path, taken for a mask requiring grad, refuses
        # is_causal with a mask, so torch could not be the reference)
        mask = torch.randn(L, S).to(torch.float16)
    check_against_torch(rnd(2, 2, L, 16), rnd(2, 2, S, 16), rnd(2, 2, S, 16), mask, is_causal=True)
    assert paths == {"fused": 1, "torch": 0}


# is_causal with attn_mask: torch 2.13 accepts the pair on its fused CPU path (4-D inputs, no
# dropout, no mask grad) and raises on its math path (3-D inputs, dropout, sdpa_kernel(MATH), ...).
# The drop-in raises exactly where torch does, with torch's message and a RuntimeError.
@pytest.mark.parametrize("case", ["3-D", "4-D dropout", "4-D mask grad", "4-D sdpa_kernel(MATH)",
                                  "4-D float64 sdpa_kernel(MATH)"])
def test_is_causal_with_mask_raises_where_torch_does(case, paths):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shape = (3, 9, 16) if case == "3-D" else (2, 3, 9, 16)
    dt = torch.float64 if "float64" in case else torch.float32
    q, k, v = (torch.randn(shape, dtype=dt) for _ in range(3))
    mask = torch.randn(9, 9, dtype=dt, requires_grad=case == "4-D mask grad")
    p = 0.2 if "dropout" in case else 0.0
    ctx = sdpa_kernel([SDPBackend.MATH]) if "MATH" in case else contextlib.nullcontext()
    msg = "Explicit attn_mask should not be set when is_causal=True"
    with ctx:
        with pytest.raises(RuntimeError, match=msg):  # torch's own behaviour for these inputs
            TORCH_SDPA(q, k, v, mask, p, True)
        with pytest.raises(RuntimeError, match=msg):
            sdpa(q, k, v, mask, p, True)
    assert paths == {"fused": 0, "torch": 0}  # before any kernel


@pytest.mark.parametrize("Hq, Hkv, gqa", [
    (4, 2, True),   # GQA, group 2: fused with Hkv = 2
    (4, 1, True),   # MQA via enable_gqa
    (4, 1, False),  # head dim 1 broadcast (torch broadcasts it): fused as MQA, no copy
])
def test_grouped_heads(Hq, Hkv, gqa, paths):
    check_against_torch(rnd(1, Hq, 15, 16), rnd(1, Hkv, 26, 16), rnd(1, Hkv, 26, 16),
                        enable_gqa=gqa)
    assert paths == {"fused": 1, "torch": 0}


def test_gqa_key_value_heads_differ_falls_back(paths):
    # enable_gqa with 2 key heads but 1 value head: torch accepts; the kernel needs one Hkv
    check_against_torch(rnd(1, 4, 10, 16), rnd(1, 2, 12, 16), rnd(1, 1, 12, 16), enable_gqa=True)
    assert paths == {"fused": 0, "torch": 1}


@pytest.mark.parametrize("shapes, mask_shape", [
    (((3, 14, 16), (3, 20, 16), (3, 20, 16)), (3, 14, 20)),   # 3-D [H, L, E], per-head mask
    (((14, 16), (20, 16), (20, 16)), (14, 20)),               # 2-D [L, E]
    (((2, 2, 2, 9, 16), (1, 2, 2, 11, 16), (2, 1, 2, 11, 16)), (2, 1, 1, 9, 11)),  # 5-D, broadcast batch
    (((2, 3, 9, 16), (11, 16), (11, 16)), None),              # 2-D key/value broadcast over [B, H]
])
def test_other_ranks_and_broadcasting(shapes, mask_shape, paths):
    q, k, v = (rnd(*s) for s in shapes)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.25
    check_against_torch(q, k, v, mask)
    assert paths == {"fused": 1, "torch": 0}


@pytest.mark.parametrize("case", [
    "float64",       # not a kernel dtype
    "Ev != E",       # value head dim differs
    "E > 256",       # beyond the kernel's head dims
    "E = 0",
    "dropout_p = 1",  # torch zeroes everything
])
def test_fallback_equals_torch(case, paths):
    dt = torch.float32
    kw, mask = {}, torch.rand(6, 9) > 0.3
    q, k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
        kw["is_causal"] = True  # 4-D + 2-D mask: torch combines them on CPU
    elif case == "Ev != E":
        v = torch.randn(2, 2, 9, 7, dtype=dt)
    elif case == "E > 256":
        q, k, v = torch.randn(1, 1, 6, 300), torch.randn(1, 1, 9, 300), torch.randn(1, 1, 9, 300)
    elif case == "E = 0":
        q, k = q[..., :0], k[..., :0]
    else:
        kw["dropout_p"] = 1.0
    out = sdpa(q, k, v, mask, **kw)
    want = F.scaled_dot_product_attention(q, k, v, mask, **kw)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert torch.equal(out, want)  # the same op on the same inputs: bit for bit
    assert paths == {"fused": 0, "torch": 1}


def test_fallback_gradients_float64():
    # the fallback is torch's autograd graph: gradients equal torch's too
    ins = [torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    twin = [x.detach().clone().requires_grad_() for x in ins]
    sdpa(*ins, is_causal=True).sum().backward()
    F.scaled_dot_product_attention(*twin, is_causal=True).sum().backward()
    for a, b in zip(ins, twin):
        assert torch.equal(a.grad, b.grad)


def test_drop_in_assignment(monkeypatch):
    # assigned in place of F's function, torch's MHA (need_weights=False) calls it; its float64
    # fallback reaches torch's builtin (no recursion through F)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    want, _ = mha(x, x, x, need_weights=False)
    seen = []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(1) or sdpa(*a, **k))
    got, _ = mha(x, x, x, need_weights=False)
    assert seen and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Dropout: different RNG from torch, so statistics and determinism instead of equality
# ---------------------------------------------------------------------------------------------
def test_dropout_deterministic_per_seed(paths):
    q, k, v = rnd(1, 2, 16, 16), rnd(1, 2, 24, 16), rnd(1, 2, 24, 16)
    torch.manual_seed(1)
    a = sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(1)
    b = sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(2)
    c = sdpa(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert paths == {"fused": 3, "torch": 0}


def test_dropout_statistics_and_backward_mask():
    # q = k = 0: uniform weights 1/S; v = I reads the (dropped) weights off: each entry is 0
    # (probability p) or 1/(S(1-p)). dv = Aᵀ dO must use the same mask as the forward.
    p, L, S = 0.3, 32, 32
    q, k = torch.zeros(1, 2, L, 32), torch.zeros(1, 2, S, 32)
    v = torch.eye(S, 32).expand(1, 2, S, 32).clone().requires_grad_()
    torch.manual_seed(3)
    a = sdpa(q, k, v, dropout_p=p)  # [1, 2, L, S]: the dropped probabilities
    kept = a != 0
    frac_dropped = 1 - kept.float().mean().item()
    assert abs(frac_dropped - p) < 0.05, frac_dropped  # 2048 draws: sd 0.01
    torch.testing.assert_close(a[kept], torch.full_like(a[kept], 1 / (S * (1 - p))),
                               atol=1e-6, rtol=1e-5)  # fp32 rescale 1/(1-p)
    do = torch.randn_like(a)
    a.backward(do)
    torch.testing.assert_close(v.grad, a.detach().transpose(-2, -1) @ do, atol=1e-5, rtol=1e-5)


def test_dropout_applied_in_eval_too():
    # the functional has no training flag: dropout_p > 0 always drops (as torch's)
    q = torch.zeros(1, 1, 8, 8)
    v = torch.eye(8).reshape(1, 1, 8, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        a = sdpa(q, q, v, dropout_p=0.5)
    assert (a == 0).any()


# ---------------------------------------------------------------------------------------------
# Bad input: named, before any kernel
# ---------------------------------------------------------------------------------------------
def _t(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


Q, K, V = _t(1, 4, 3, 8), _t(1, 4, 5, 8), _t(1, 4, 5, 8)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (([1.0], K, V), {}, TypeError, "query must be a torch.Tensor"),
    ((Q.long(), K, V), {}, TypeError, "query must be a floating-point"),
    ((_t(8), _t(8), _t(8)), {}, ValueError, "query must have at least 2 dimensions"),
    ((Q, K.half(), V), {}, TypeError, "key must have query's dtype"),
    ((Q, _t(1, 4, 5, 6), V), {}, ValueError, "key's last dim"),
    ((Q, K, _t(1, 4, 6, 8)), {}, ValueError, "value must have key's sequence length"),
    ((Q, _t(1, 2, 5, 8), _t(1, 2, 5, 8)), {}, ValueError, "enable_gqa"),
    ((_t(2, 4, 3, 8), _t(3, 4, 5, 8), _t(3, 4, 5, 8)), {}, ValueError, "must broadcast"),
    ((_t(1, 3, 3, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8)), {"enable_gqa": True}, ValueError, "multiple of key's head count"),
    ((_t(3, 8), _t(5, 8), _t(5, 8)), {"enable_gqa": True}, ValueError, "enable_gqa=True needs"),
    ((Q, K, V, torch.zeros(3, 5, dtype=torch.long)), {}, TypeError, "attn_mask must be bool"),
    ((Q, K, V, torch.zeros(3, 5, dtype=torch.float64)), {}, TypeError, "attn_mask must be bool"),
    ((Q, K, V, torch.zeros(3, 4, dtype=torch.bool)), {}, ValueError, "attn_mask of shape"),
    ((Q, K, V, torch.zeros(5, dtype=torch.bool)), {}, ValueError, "attn_mask of shape"),
    ((Q, K, V, torch.zeros(2, 4, 3, 5, dtype=torch.bool)), {}, ValueError, "attn_mask of shape"),
    ((Q, K, V, [[True]]), {}, TypeError, "attn_mask must be a torch.Tensor"),
    ((Q, K, V), {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ((Q, K, V), {"dropout_p": 1.5}, ValueError, "dropout_p"),
    ((Q, K, V), {"dropout_p": "0.1"}, TypeError, "dropout_p"),
    ((Q, K, V), {"is_causal": 1}, TypeError, "is_causal"),
    ((Q, K, V), {"enable_gqa": None}, TypeError, "enable_gqa"),
    ((Q, K, V), {"scale": "a"}, TypeError, "scale"),
    ((Q, K, V), {"scale": float("nan")}, ValueError, "scale"),
])
def test_bad_input(args, kwargs, exc, match, paths):
    with pytest.raises(exc, match=match):
        sdpa(*args, **kwargs)
    assert paths == {"fused": 0, "torch": 0}


# ---------------------------------------------------------------------------------------------
# torch.nn.attention.bias.CausalBias (torch's way to ask for bottom-right causal), dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, L, S", [
    ("upper_left", 13, 29), ("upper_left", 29, 13),
    ("lower_right", 13, 29), ("lower_right", 29, 13),  # L > S: rows 0..L-S-1 see no key -> 0
])
def test_causal_bias(variant, L, S, paths):
    # the bias has no storage: it must be served as its causal mode, not read as a tensor; equal
    # to torch's SDPA with the materialized bool mask, outputs and gradients, on the fused path
    from torch.nn.attention import bias as attn_bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-right L > S warns (NaN rows on CUDA kernels)
        b = getattr(attn_bias, f"causal_{variant}")(L, S)
    want_mask = b._materialize()
    ins = [rnd(1, 2, n, 16, dtype=torch.float32).requires_grad_() for n in (L, S, S)]
    ref = [x.detach().double().requires_grad_() for x in ins]
    base = [x.detach().clone().requires_grad_() for x in ins]
    out = sdpa(*ins, b)
    assert paths == {"fused": 1, "torch": 0}
    want, got_base = TORCH_SDPA(*ref, want_mask), TORCH_SDPA(*base, want_mask)
    numerics.assert_close("out", out, want, got_base)
    do = torch.randn_like(out)
    for t, d in ((out, do), (want, do.double()), (got_base, do)):
        t.backward(d)
    for name, a, r, bb in zip("qkv", ins, ref, base):
        numerics.assert_close(f"d{name}", a.grad, r.grad, bb.grad, numerics.GRAD_FACTOR)


def test_causal_bias_lower_right_is_bottom_right_exactly():
    # one-hot values read the weights off (q = k = 0): L=3, S=5, query i sees keys 0..i+2
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 5, 8), torch.eye(5, 8).reshape(1, 1, 5, 8)
    out = sdpa(q, k, v, causal_lower_right(3, 5))[0, 0, :, :5]
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0], [.25, .25, .25, .25, 0], [.2, .2, .2, .2, .2]])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_causal_bias_fallback_and_errors(paths):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 9, 8, dtype=torch.float64)
    b = causal_lower_right(5, 9)
    # float64: torch's op with the materialized mask, bit for bit
    assert torch.equal(sdpa(q, k, k, b), TORCH_SDPA(q, k, k, b._materialize()))
    assert paths == {"fused": 0, "torch": 1}
    # torch's error, and its type, for a CausalBias with is_causal=True
    for bias in (b, causal_upper_left(5, 9)):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            sdpa(q.float(), k.float(), k.float(), bias, is_causal=True)
    # sizes that are not [L, S]: materialized, as torch does, so the mask shape check names it
    with pytest.raises(RuntimeError, match="attn_mask of shape"):
        sdpa(q.float(), k.float(), k.float(), causal_lower_right(4, 9))


def test_causal_bias_through_assigned_F(monkeypatch, paths):
    # assigned to F, torch code that passes a CausalBias reaches the kernel's bottom-right mode
    from torch.nn.attention.bias import causal_lower_right
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    q, k = rnd(1, 2, 6, 16, dtype=torch.float32), rnd(1, 2, 11, 16, dtype=torch.float32)
    b = causal_lower_right(6, 11)
    out = F.scaled_dot_product_attention(q, k, k, attn_mask=b)
    assert paths == {"fused": 1, "torch": 0}
    numerics.assert_close("out", out, TORCH_SDPA(q.double(), k.double(), k.double(), b._materialize()),
                          TORCH_SDPA(q, k, k, b._materialize()))


def test_torch_function_dispatch(paths):
    # as torch's builtin, a TorchFunctionMode (and a tensor subclass) sees the call, with this
    # function as `func`
    from torch.overrides import TorchFunctionMode
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is sdpa:
                seen.append((len(args), sorted(kwargs or {})))
                return "intercepted"
            return func(*args, **(kwargs or {}))

    q = rnd(1, 1, 4, 8, dtype=torch.float32)
    with Spy():
        assert sdpa(q, q, q, None, 0.0, True, scale=0.5) == "intercepted"
    assert seen == [(6, ["enable_gqa", "scale"])]
    assert paths == {"fused": 0, "torch": 0}


# ---------------------------------------------------------------------------------------------
# Errors catchable as torch's (RuntimeError), naming the argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    ((_t(1, 4, 8, 16), _t(1, 4, 8, 16).half(), _t(1, 4, 8, 16).half()), "key must have query's dtype"),
    ((_t(4).half(), _t(1, 4).half(), _t(1, 4).half()), "query must have at least 2 dimensions"),
    ((_t(1, 4, 3, 8).long(), K, V), "query must be a floating-point"),
    ((Q, _t(1, 4, 5, 6), V), "key's last dim"),
    ((Q, _t(1, 2, 5, 8), _t(1, 2, 5, 8)), "head counts"),
    ((Q, K, V, torch.zeros(3, 5, dtype=torch.long)), "attn_mask must be bool"),
    ((Q, K, V, torch.zeros(3, 4, dtype=torch.bool)), "attn_mask of shape"),
])
def test_errors_are_runtime_errors_where_torch_raises_runtime_error(args, match, paths):
    with pytest.raises(RuntimeError):  # torch's type for these inputs
        TORCH_SDPA(*args)
    with pytest.raises(RuntimeError, match=match):
        sdpa(*args)
    assert paths == {"fused": 0, "torch": 0}


# ---------------------------------------------------------------------------------------------
# TorchScript after the README's assignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["MultiheadAttention", "TransformerEncoderLayer"])
def test_torchscript_after_assignment(module, monkeypatch):
    # F.multi_head_attention_forward calls whatever F.scaled_dot_product_attention holds; scripted
    # code cannot run this function and calls torch's aten op in its place
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    if module == "MultiheadAttention":
        m = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
        x = torch.randn(2, 5, 16)
        run = lambda mod: mod(x, x, x, need_weights=False)[0]
    else:
        m = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
        x = torch.randn(2, 5, 16)
        run = lambda mod: mod(x)
    scripted = torch.jit.script(m)
    got = run(scripted)  # grad enabled: the slow path, through scaled_dot_product_attention
    monkeypatch.undo()
    assert torch.equal(got, run(m))  # torch's own op: bit for bit


def test_dropout_p_out_of_range_is_a_runtime_error_as_torch():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError):  # torch's own error type
        torch._C._nn.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(RuntimeError, match="dropout_p"):
        sdpa(q, q, q, dropout_p=1.5)
