"""tritformer.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict.

Criterion (tritformer.numerics): error vs a float64 copy of torch's module at most 2x (outputs) /
3x (gradients) the error of torch's module in the same dtype. need_weights=False everywhere
except the delegation test (need_weights=True is torch's own forward). embed_dim 16, 2 heads
(head_dim 8), L, S <= 9: one interpreter tile per (batch, head).
"""
import copy
import warnings

import pytest
import torch

import tritformer.ops.sdpa as sdpa_mod
from tritformer import numerics
from tritformer.nn import MultiheadAttention
from tritformer.testing import _backprop

E, H = 16, 2


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused core's calls (so a case cannot pass on a fallback)."""
    calls = []
    real = sdpa_mod._attention
    monkeypatch.setattr(sdpa_mod, "_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def make(dtype=torch.float32, **kw):
    """(ours, torch in dtype, torch in float64), the same random parameters (biases nonzero)."""
    kw = {"embed_dim": E, "num_heads": H, **kw}
    ref = torch.nn.MultiheadAttention(**kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = MultiheadAttention(**kw)
    ours.load_state_dict(ref.state_dict())  # strict: identical keys and shapes
    return ours.to(dtype), copy.deepcopy(ref).to(dtype), copy.deepcopy(ref).double()


def inputs(kw, L, S, B, self_attn=False, unbatched=False):
    kd, vd = kw.get("kdim") or E, kw.get("vdim") or E

    def shape(n, e):
        if unbatched:
            return (n, e)
        return (B, n, e) if kw.get("batch_first") else (n, B, e)

    q = torch.randn(shape(L, E))
    if self_attn:
        return q, q, q
    return q, torch.randn(shape(S, kd)), torch.randn(shape(S, vd))


def compare(kw=None, *, L=6, S=9, B=2, dtype=torch.float32, self_attn=False, unbatched=False,
            masks=None, grads=False, **fwd):
    """ours vs torch's module (float64 reference, same-dtype baseline); outputs and, with grads,
    the gradients of query/key/value and of every parameter."""
    kw = kw or {}
    ours, base_mod, ref_mod = make(dtype, **kw)
    x = inputs(kw, L, S, B, self_attn, unbatched)
    masks = masks or {}

    def run(mod, d):
        xs = [t.detach().to(d, copy=True).requires_grad_(grads) for t in x]
        if self_attn:
            xs = [xs[0]] * 3
        ms = {n: (m if m.dtype == torch.bool else m.to(d)) for n, m in masks.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "mismatched mask types" deprecation
            out, w = mod(*xs, need_weights=False, **ms, **fwd)
        return out, w, xs

    out, w, xo = run(ours, dtype)
    ref, _, xr = run(ref_mod, torch.float64)
    base, _, xb = run(base_mod, dtype)
    assert w is None
    assert out.shape == base.shape and out.dtype == base.dtype
    checks = [numerics.check("out", out, ref, base, numerics.FORWARD_FACTOR)]
    if grads:
        _backprop(out, ref, base)
        trip = [(f"d{n}", a, r, b) for n, a, r, b in zip("qkv", xo, xr, xb)][:1 if self_attn else 3]
        params = [dict(m.named_parameters()) for m in (ours, ref_mod, base_mod)]
        trip += [("d" + n, params[0][n], params[1][n], params[2][n]) for n in params[0]]
        for name, a, r, b in trip:
            checks.append(numerics.check(name, a.grad, r.grad, b.grad, numerics.GRAD_FACTOR))
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# Module identity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {},                                          # packed in_proj_weight
    {"kdim": 6, "vdim": 10},                     # separate q/k/v_proj_weight
    {"add_bias_kv": True, "bias": False},        # bias_k / bias_v, no in_proj_bias
    {"add_zero_attn": True, "batch_first": True},
])
def test_state_dict_keys_and_parameters_match_torch(kw):
    ref = torch.nn.MultiheadAttention(E, H, **kw)
    ours = MultiheadAttention(E, H, **kw)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # both ways


def test_need_weights_delegates_to_torch():
    # torch's default need_weights=True: torch's own forward, bit for bit, weights included
    ours, ref, _ = make(batch_first=True)
    q, k, v = inputs({"batch_first": True}, 6, 9, 2)
    mask = torch.rand(6, 9) > 0.7
    for avg in (True, False):
        a = ours(q, k, v, attn_mask=mask, average_attn_weights=avg)
        b = ref(q, k, v, attn_mask=mask, average_attn_weights=avg)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Layouts and projections
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("self_attn", [False, True])  # True: query is key is value (one packed GEMM)
def test_layouts(batch_first, self_attn, fused_calls):
    compare({"batch_first": batch_first}, self_attn=self_attn)
    assert fused_calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, fused_calls):
    compare({"batch_first": True}, dtype=dtype, masks={"key_padding_mask": torch.rand(2, 9) > 0.7})
    assert fused_calls


def test_unbatched(fused_calls):
    # 2-D [L, E] inputs, 1-D key_padding_mask, 3-D [num_heads, L, S] attn_mask
    compare(unbatched=True, masks={"key_padding_mask": torch.rand(9) > 0.7,
                                   "attn_mask": torch.rand(H, 6, 9) > 0.7})
    assert fused_calls


def test_kdim_vdim(fused_calls):
    compare({"kdim": 6, "vdim": 10, "batch_first": True})
    assert fused_calls


def test_gradients_inputs_and_parameters(fused_calls):
    # separate projections + bias_kv + key padding + bool mask: every parameter gets a gradient
    L, S, B = 6, 9, 2
    mask = torch.rand(L, S) > 0.8
    compare({"kdim": 6, "vdim": 10, "add_bias_kv": True, "batch_first": True}, L=L, S=S, B=B,
            grads=True, masks={"key_padding_mask": torch.rand(B, S) > 0.7, "attn_mask": mask})
    assert fused_calls


def test_gradients_self_attention_float_mask(fused_calls):
    # packed projection; a float 3-D mask
    compare(self_attn=True, grads=True, L=7, masks={"attn_mask": torch.randn(2 * H, 7, 7)})
    assert fused_calls


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
L_, S_, B_ = 6, 9, 2


MASKS = {  # built inside the test, after the conftest seed
    "kpm-bool": lambda: {"key_padding_mask": torch.rand(B_, S_) > 0.6},  # kernel's key padding
    "kpm-float": lambda: {"key_padding_mask": torch.randn(B_, S_)},      # folded into the mask
    "bool-2d": lambda: {"attn_mask": torch.rand(L_, S_) > 0.6},           # True = NOT allowed
    "bool-3d": lambda: {"attn_mask": torch.rand(B_ * H, L_, S_) > 0.6},   # [B*H, L, S]
    "float-2d": lambda: {"attn_mask": torch.randn(L_, S_)},
    "float-3d": lambda: {"attn_mask": torch.randn(B_ * H, L_, S_)},
    "bool+kpm-bool": lambda: {"attn_mask": torch.rand(L_, S_) > 0.6,
                              "key_padding_mask": torch.rand(B_, S_) > 0.6},
    "float+kpm-bool": lambda: {"attn_mask": torch.randn(L_, S_),
                               "key_padding_mask": torch.rand(B_, S_) > 0.6},
    "bool+kpm-float": lambda: {"attn_mask": torch.rand(L_, S_) > 0.6,
                               "key_padding_mask": torch.randn(B_, S_)},
}


@pytest.mark.parametrize("which", list(MASKS))
def test_masks(which, fused_calls):
    compare(L=L_, S=S_, B=B_, masks=MASKS[which]())
    assert fused_calls


def test_fully_padded_sequence_gives_bias_only(fused_calls):
    # every key of batch 1 padded: its attention is 0 (torch 2.13 too), the output out_proj.bias
    kpm = torch.zeros(B_, S_, dtype=torch.bool)
    kpm[1] = True
    compare({"batch_first": True}, L=L_, S=S_, B=B_, masks={"key_padding_mask": kpm})
    assert fused_calls


@pytest.mark.parametrize("kw", [
    {"add_bias_kv": True},                       # one extra learned key/value, masks padded
    {"add_zero_attn": True},                     # one extra zero key/value, masks padded
    {"add_bias_kv": True, "add_zero_attn": True},
])
def test_extra_keys(kw, fused_calls):
    compare(kw, L=L_, S=S_, B=B_, masks={"attn_mask": torch.rand(L_, S_) > 0.6,
                                         "key_padding_mask": torch.rand(B_, S_) > 0.6})
    assert fused_calls


# ---------------------------------------------------------------------------------------------
# is_causal: torch's hint semantics
# ---------------------------------------------------------------------------------------------
def causal_mask(L, S):
    return torch.ones(L, S, dtype=torch.bool).triu(1)  # MHA's bool: True = not allowed


@pytest.mark.parametrize("L, S", [(6, 6), (5, 9), (9, 5)])
def test_is_causal(L, S, fused_calls):
    # without a key_padding_mask torch drops attn_mask and runs SDPA's top-left is_causal
    compare(L=L, S=S, masks={"attn_mask": causal_mask(L, S)}, is_causal=True)
    assert fused_calls


def test_is_causal_hint_ignores_the_mask_like_torch():
    # a mask that is not causal: torch trusts the hint (documented "incorrect execution"); ours too
    compare(L=6, S=6, masks={"attn_mask": torch.rand(6, 6) > 0.5}, is_causal=True)


def test_is_causal_with_key_padding_uses_the_mask():
    # with a key_padding_mask torch merges it into attn_mask and clears the hint: a mask that
    # is not causal shows which of the two is applied
    compare(L=6, S=6, masks={"attn_mask": torch.rand(6, 6) > 0.6,
                             "key_padding_mask": torch.rand(2, 6) > 0.7}, is_causal=True)


def test_is_causal_with_bias_kv():
    compare({"add_bias_kv": True}, L=6, S=6, masks={"attn_mask": causal_mask(6, 6)}, is_causal=True)


def test_is_causal_needs_attn_mask_like_torch():
    ours, ref, _ = make()
    q, k, v = inputs({}, 6, 6, 2)
    with pytest.raises(RuntimeError, match="Need attn_mask") as a:
        ours(q, k, v, need_weights=False, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask") as b:
        ref(q, k, v, need_weights=False, is_causal=True)
    assert str(a.value) == str(b.value)


# ---------------------------------------------------------------------------------------------
# Fallback and dropout
# ---------------------------------------------------------------------------------------------
def test_float64_falls_back_to_torch(fused_calls):
    # float64 is no kernel dtype: torch's SDPA on the same merged masks, equal to torch's module
    ours, _, ref = make()
    ours = ours.double()
    q, k, v = (t.double() for t in inputs({}, 6, 9, 2))
    m = {"attn_mask": torch.rand(6, 9) > 0.6, "key_padding_mask": torch.rand(2, 9) > 0.6}
    a, _ = ours(q, k, v, need_weights=False, **m)
    b, _ = ref(q, k, v, need_weights=False, **m)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # float64: same math, reordered
    assert not fused_calls


def test_eval_mode_has_no_dropout(fused_calls):
    # dropout=0.5 in eval: deterministic and equal to torch's eval module within the criterion
    compare({"dropout": 0.5, "batch_first": True})
    ours, _, _ = make(dropout=0.5)
    ours.eval()
    q, k, v = inputs({}, 6, 9, 2)
    torch.manual_seed(1)
    a, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(2)
    b, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(a, b)


def test_training_dropout_deterministic_given_seed(fused_calls):
    ours, _, _ = make(dropout=0.3)
    ours.train()
    q, k, v = inputs({}, 6, 9, 2)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(ours(q, k, v, need_weights=False)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    ours.eval()
    no_drop, _ = ours(q, k, v, need_weights=False)
    assert not torch.equal(outs[0], no_drop)
    assert fused_calls


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.randn(6, 2, 8),), {}, ValueError, "embed_dim=16"),
    ((torch.randn(4, 6, 2, 16),), {}, ValueError, "query must be 2-D"),
    ((torch.randn(6, 2, 16), torch.randn(9, 2, 16), torch.randn(8, 2, 16)), {}, ValueError, "does not match value"),
    ((torch.randn(6, 2, 16), torch.randn(9, 3, 16), torch.randn(9, 3, 16)), {}, ValueError, "batch size"),
    ((), {"attn_mask": torch.zeros(6, 8, dtype=torch.bool)}, ValueError, "2-D attn_mask must have shape"),
    ((), {"attn_mask": torch.zeros(2, 6, 9, dtype=torch.bool)}, ValueError, "3-D attn_mask must have shape"),
    ((), {"attn_mask": torch.zeros(6, 9, dtype=torch.long)}, TypeError, "attn_mask must be bool or floating"),
    ((), {"key_padding_mask": torch.zeros(2, 8, dtype=torch.bool)}, ValueError, "key_padding_mask must have shape"),
    ((), {"key_padding_mask": torch.zeros(9, dtype=torch.bool)}, ValueError, "key_padding_mask must be 2-D"),
])
def test_bad_input(args, kwargs, exc, match, fused_calls):
    ours, _, _ = make()
    default = (torch.randn(6, 2, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16))
    args = args + default[len(args):]
    with pytest.raises(exc, match=match):
        ours(*args, need_weights=False, **kwargs)
    assert not fused_calls
