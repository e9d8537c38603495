"""tritformer.attention against the float64 reference (error-ratio criterion), in the interpreter.

Interpreter tiles (kernels/attention.py INTERPRETER_CONFIGS): forward/dQ BLOCK_M=64, BLOCK_N=32;
dK/dV BLOCK_M=32, BLOCK_N=64. Sequence lengths below are chosen against those tiles.
"""
import pytest
import torch

import tritformer
from tritformer.kernels import attention as K
from tritformer.testing import assert_checks, check_attention

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, layout="bhnd"):
    if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D]: strided, no copy
        q = torch.randn(B, Nq, Hq, D, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Nk, Hkv, D, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Nk, Hkv, D, dtype=dtype).transpose(1, 2)
        return q, k, v
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


def test_runs_in_interpreter():
    assert tritformer.backend_for(torch.empty(1)) == "triton-interpreter"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [
    16,   # smallest MMA K
    40,   # padded to BLOCK_D=64
    59,   # odd, padded
    64,
    96,   # padded to 128
    128,
    256,  # largest
])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_dtypes(dtype, D, causal):
    # Nq=70 < Nk=83: ragged tails on both axes, two query tiles, 3 key tiles, diagonal offset 13
    q, k, v = make_qkv(1, 2, 2, 70, 83, D, dtype)
    assert_checks(check_attention(q, k, v, causal=causal))


@pytest.mark.parametrize("Nq", [1, 17, 64, 200, 257])
@pytest.mark.parametrize("Nk", [1, 17, 64, 200, 257])
@pytest.mark.parametrize("causal", [False, True])
def test_sequence_lengths(Nq, Nk, causal):
    # 1: single row/key; 17: inside one tile; 64: exact tiles; 200/257: several tiles + tail.
    # causal with Nq > Nk leaves leading query rows with no visible key (output 0, grad 0).
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 32, torch.float16)
    assert_checks(check_attention(q, k, v, causal=causal))


@pytest.mark.parametrize("Hkv", [
    8,  # MHA
    4,  # GQA, group 2
    2,  # GQA, group 4
    1,  # MQA: dK/dV programs loop over all 8 query heads
])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(Hkv, causal):
    q, k, v = make_qkv(2, 8, Hkv, 45, 70, 32, torch.float16)
    assert_checks(check_attention(q, k, v, causal=causal))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_views_are_read_in_place(dtype, monkeypatch):
    q, k, v = make_qkv(2, 4, 2, 50, 66, 48, dtype, layout="bnhd")
    seen = {}
    real = K.attention_forward

    def spy(q_, k_, v_, *args):
        seen.update(q=q_.data_ptr(), k=k_.data_ptr(), v=v_.data_ptr(), strides=q_.stride())
        return real(q_, k_, v_, *args)

    monkeypatch.setattr(K, "attention_forward", spy)
    out = tritformer.attention(q, k, v, causal=True)
    assert (seen["q"], seen["k"], seen["v"]) == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert seen["strides"] == q.stride() and out.stride() == q.stride()  # out keeps q's layout
    assert_checks(check_attention(q, k, v, causal=True))


def test_sliced_head_dim_view():
    # last-dim slice: row strides exceed D, kernel reads the view directly
    base = torch.randn(1, 3, 40, 80, dtype=torch.float16)
    q, k, v = base[..., :48], base[..., 16:64], base[..., 32:80]
    assert_checks(check_attention(q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_and_its_gradient(causal):
    from tritformer import numerics, reference
    q, k, v = make_qkv(1, 2, 1, 40, 30, 32, torch.float16)
    checks = check_attention(q, k, v, causal=causal, return_lse=True)
    assert_checks(checks)
    # gradient flowing through lse (FlashAttention's kernels ignore it; here delta absorbs it)
    w_out = torch.randn(1, 2, 40, 32)
    w_lse = torch.randn(1, 2, 40)
    grads = []
    for fn, dt in ((tritformer.attention, torch.float16), (reference.attention, torch.float64),
                   (reference.attention, torch.float16)):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves, causal=causal, return_lse=True)
        finite = torch.isfinite(lse)
        loss = (out.double() * w_out).sum() + (torch.where(finite, lse, 0).double() * w_lse).sum()
        loss.backward()
        grads.append([x.grad for x in leaves])
    for i, name in enumerate(("dq", "dk", "dv")):
        c = numerics.check(name, grads[0][i], grads[1][i], grads[2][i], numerics.GRAD_FACTOR)
        assert c.ok, str(c)


def test_empty_rows_are_zero_not_nan():
    # causal, Nq=9 > Nk=4: rows 0..4 see no key
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, 1, 9, 4, 16, torch.float32))
    out, lse = tritformer.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[0, 0, :5], torch.zeros(5, 16))
    assert torch.isneginf(lse[0, 0, :5]).all() and torch.isfinite(lse[0, 0, 5:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, :5], torch.zeros(5, 16))
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("shape", [
    (0, 2, 2, 8, 8),   # empty batch
    (1, 2, 2, 0, 8),   # no queries
    (1, 2, 2, 8, 0),   # no keys: output 0
])
def test_empty_inputs(shape):
    B, Hq, Hkv, Nq, Nk = shape
    q, k, v = (x.requires_grad_() for x in make_qkv(B, Hq, Hkv, Nq, Nk, 16, torch.float16))
    out, lse = tritformer.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, Hq, Nq)
    assert not out.isnan().any() and (out == 0).all() if Nk == 0 else True
    out.float().sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("fwd,dkdv,dq", [
    ((16, 64), (64, 16), (16, 64)),  # BLOCK_M < BLOCK_N forward: several key tiles per diagonal
    ((32, 32), (32, 32), (32, 32)),  # square tiles
])
def test_other_tile_shapes(fwd, dkdv, dq, monkeypatch):
    # the diagonal/tail bookkeeping must hold for any tile shape, not just the interpreter default
    cfg = lambda mn: K._cfg(mn[0], mn[1], 4, 1)
    monkeypatch.setitem(K.INTERPRETER_CONFIGS, "fwd", cfg(fwd))
    monkeypatch.setitem(K.INTERPRETER_CONFIGS, "bwd_dkdv", cfg(dkdv))
    monkeypatch.setitem(K.INTERPRETER_CONFIGS, "bwd_dq", cfg(dq))
    for Nq, Nk in ((75, 75), (50, 99), (99, 50)):
        q, k, v = make_qkv(1, 2, 1, Nq, Nk, 32, torch.float16)
        assert_checks(check_attention(q, k, v, causal=True))


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 4, 1, 100, 130, 64, torch.float16)  # MQA: group loop in dK/dV
    do = torch.randn(2, 4, 100, 64, dtype=torch.float16)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        tritformer.attention(*leaves, causal=True, deterministic=True).backward(do)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 2, 30, 40, 32, torch.float32)
    assert_checks(check_attention(q, k, v, scale=0.37, causal=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale,extra", [
    (0.3, {}),                                    # log2 units, raw row max: one FFMA per score
    (0.3, {"key_padding_mask": "pad"}),           # the same path with -inf masking
    (0.3, {"softcap": 5.0}),                      # log2 units, cap_out folded on the host
    (0.3, {"alibi_slopes": "slopes"}),            # log2 units, slope folded in the kernel
    (0.3, {"attn_mask": "float"}),                # log2 units, additive mask scaled per element
    (-0.3, {}),                                   # scale < 0: natural units (the raw max would
    (0.0, {}),                                    # be the row min); 0: natural units, uniform
], ids=["plain", "padding", "softcap", "alibi", "float_mask", "negative_scale", "zero_scale"])
def test_forward_score_units(dtype, scale, extra):
    # 16-bit forwards fold log2(e) into the scale (launch.plan_forward: LOG2_UNITS); fp32 and
    # scale <= 0 keep natural units. Every score path against the float64 reference, with lse.
    q, k, v = make_qkv(2, 2, 2, 70, 83, 32, dtype)
    opts = {}
    for name, what in extra.items():
        if what == "pad":
            kpm = torch.zeros(2, 83, dtype=torch.bool)
            kpm[0, 50:] = True
            opts[name] = kpm
        elif what == "slopes":
            opts[name] = torch.tensor([[0.5, 0.25], [0.125, 1.0]])
        elif what == "float":
            opts[name] = torch.randn(2, 1, 70, 83, dtype=dtype)
        else:
            opts[name] = what
    assert_checks(check_attention(q, k, v, causal=True, scale=scale, return_lse=True, **opts))


def test_lse_gradient_with_expanded_cotangent():
    # lse.sum() hands the backward a stride-0 dLse (torch.ones expanded); the kernel indexes dLse
    # densely, so the launcher must materialise it (found by opcheck: garbage gradients before)
    q, k, v = make_qkv(1, 2, 2, 20, 24, 16, torch.float32)
    grads = []
    for expanded in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = tritformer.attention(*leaves, causal=True, return_lse=True)
        dlse = torch.ones(1, 1, 1).expand(lse.shape) if expanded else torch.ones(lse.shape)
        torch.autograd.backward([out, lse], [torch.ones_like(out), dlse])
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
