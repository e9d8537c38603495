"""tritformer.flash_attn (FlashAttention 2.x's API) and attention(..., layout=).

- Each FlashAttention-layout call equals the native op on transposed / sliced views, bitwise
  (out, lse, gradients): the wrapper adds no arithmetic.
- Each function against the float64 reference with the error-ratio criterion
  (tritformer.numerics), including FlashAttention's window rules.
- flash_attn_with_kvcache: append + rotary equal doing both in torch first and calling
  decode_attention; paged / batch-indexed caches equal the contiguous cache; leftpad, window,
  ALiBi and non-causal calls against the reference.
- Errors: S_dmask with dropout, dtypes, shapes, kvcache arguments (raised before any launch or
  cache write).
"""
import math

import pytest
import torch

import tritformer
from tritformer import numerics, reference
from tritformer.flash_attn import (
    FlashAttnError,
    FlashAttnTypeError,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from tritformer.kernels import attention as KA
from tritformer.kernels import decode as KD
from tritformer.testing import _attention_grad_checks

F16 = torch.float16


def bnhd(*shape, dtype=F16, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Bitwise: FlashAttention layout == native op on views
# ---------------------------------------------------------------------------------------------
OPTIONS = [
    ({}, {}),
    ({"causal": True}, {"causal": True}),
    ({"window_size": (5, 2)}, {"window": (5, 2)}),
    ({"causal": True, "window_size": (6, 3)}, {"causal": True, "window": (6, -1)}),  # causal: right = 0
    ({"window_size": torch.tensor([5, 2])}, {"window": (5, 2)}),  # as FA's tests pass it
    ({"softcap": 4.0, "softmax_scale": 0.3}, {"softcap": 4.0, "scale": 0.3}),
    ({"softcap": -1.0}, {}),                                   # softcap <= 0 is off, as FA
    ({"alibi_slopes": "b"}, {"alibi_slopes": "b"}),
    ({"dropout_p": 0.2}, {"dropout_p": 0.2}),                  # same seed, same in-kernel bits
]
IDS = ["plain", "causal", "window", "causal-window", "window-tensor", "softcap", "softcap-off", "alibi", "dropout"]


def _slopes(fa, nat, B, H):
    if fa.get("alibi_slopes") == "b":
        s = torch.rand(B, H)
        fa, nat = dict(fa, alibi_slopes=s), dict(nat, alibi_slopes=s)
    return fa, nat


def _native(q, k, v, nat, seed=0):
    torch.manual_seed(seed)
    return tritformer.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                return_lse=True, **nat)


@pytest.mark.parametrize("fa,nat", OPTIONS, ids=IDS)
def test_flash_attn_func_is_the_native_op_on_views(fa, nat):
    B, Nq, Nk, Hq, Hkv, D = 2, 21, 34, 4, 2, 16
    fa, nat = _slopes(fa, nat, B, Hq)
    q, k, v = bnhd(B, Nq, Hq, D), bnhd(B, Nk, Hkv, D), bnhd(B, Nk, Hkv, D)
    a, b = leaves(q, k, v), leaves(q, k, v)
    probs = "dropout_p" not in fa  # (S_dmask with dropout raises: test_errors)
    torch.manual_seed(0)
    res = flash_attn_func(*a, return_attn_probs=probs, **fa)
    out, lse, s_dmask = res if probs else (res, None, None)
    ref, ref_lse = _native(*b, nat)
    assert out.shape == (B, Nq, Hq, D) and out.dtype == F16
    assert torch.equal(out, ref.transpose(1, 2))
    if lse is not None:
        assert torch.equal(lse, ref_lse) and lse.shape == (B, Hq, Nq)
        assert s_dmask.shape == (0,) and s_dmask.dtype == F16  # FA's S_dmask without dropout
    g = torch.randn_like(out)
    out.backward(g)
    ref.transpose(1, 2).backward(g)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_functions_are_the_native_op_on_slices(causal):
    B, N, H, D = 2, 19, 2, 16
    qkv = bnhd(B, N, 3, H, D)
    (a,), (b,) = leaves(qkv), leaves(qkv)
    out, lse, _ = flash_attn_qkvpacked_func(a, causal=causal, return_attn_probs=True)
    ref, ref_lse = _native(*b.unbind(2), {"causal": causal})
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    g = torch.randn_like(out)
    out.backward(g)
    ref.transpose(1, 2).backward(g)
    assert torch.equal(a.grad, b.grad)

    q, kv = bnhd(B, 7, 4, D), bnhd(B, N, 2, H, D)
    (qa, kva), (qb, kvb) = leaves(q, kv), leaves(q, kv)
    out = flash_attn_kvpacked_func(qa, kva, causal=causal)
    ref, _ = _native(qb, *kvb.unbind(2), {"causal": causal})
    assert torch.equal(out, ref.transpose(1, 2))
    g = torch.randn_like(out)
    out.backward(g)
    ref.transpose(1, 2).backward(g)
    assert torch.equal(qa.grad, qb.grad) and torch.equal(kva.grad, kvb.grad)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_functions_are_varlen_attention(causal):
    lens_q, lens_k, H, D = [5, 0, 23], [9, 3, 23], 2, 16
    cq, ck = cu(lens_q), cu(lens_k)
    kw = dict(causal=causal, window_size=(7, 4))  # both < max_seqlen_k: passed through
    q, k, v = bnhd(sum(lens_q), 4, D), bnhd(sum(lens_k), H, D), bnhd(sum(lens_k), H, D)
    a, b = leaves(q, k, v), leaves(q, k, v)
    out, lse, _ = flash_attn_varlen_func(*a, cq, ck, 23, 23, return_attn_probs=True, **kw)
    ref, ref_lse = tritformer.varlen_attention(*b, cq, ck, 23, 23, causal=causal,
                                               window=(7, 4), return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and lse.shape == (4, sum(lens_q))
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)

    kv = torch.stack([k, v], 1)
    out = flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 23, 23, **kw)
    assert torch.equal(out, ref)
    qkv = bnhd(sum(lens_k), 3, H, D)
    out = flash_attn_varlen_qkvpacked_func(qkv, ck, 23, causal=causal)
    ref = tritformer.varlen_attention(*qkv.unbind(1), ck, ck, 23, 23, causal=causal)
    assert torch.equal(out, ref)


def test_strided_inputs_are_read_in_place():
    # FlashAttention copies a non-contiguous last dim; the kernels read any strides
    q = bnhd(2, 9, 2, 32)[..., ::2]
    k, v = bnhd(2, 11, 2, 32)[..., ::2], bnhd(2, 11, 2, 32)[..., ::2]
    assert q.stride(-1) != 1
    assert torch.equal(flash_attn_func(q, k, v, causal=True),
                       flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


# ---------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------
def fa_mask(Nq, Nk, left, right):
    """FlashAttention's kernel rule (mask.h): key j visible to query i iff
    max(0, i + Nk - Nq - left) <= j < min(Nk, i + 1 + Nk - Nq + right); -1 = unbounded."""
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    ok = torch.ones(Nq, Nk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i + Nk - Nq - left
    if right >= 0:
        ok &= j < torch.clamp(i + 1 + Nk - Nq + right, max=Nk)
    return ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [
    dict(Nq=30, Nk=20, window_size=(3, -1)),       # right = -1 with left set: FA bounds it at Nk
    dict(Nq=12, Nk=40, window_size=(50, 60)),      # sides >= Nk: unbounded
    dict(Nq=12, Nk=40, causal=True, window_size=(9, 5), alibi=True, softcap=8.0),
], ids=["left-only", "wide", "causal-window-alibi-softcap"])
def test_flash_attn_func_against_reference(dtype, case):
    case = dict(case)
    Nq, Nk = case.pop("Nq"), case.pop("Nk")
    B, Hq, Hkv, D = 2, 4, 2, 24
    slopes = torch.rand(Hq) if case.pop("alibi", False) else None
    q, k, v = bnhd(B, Nq, Hq, D, dtype=dtype), bnhd(B, Nk, Hkv, D, dtype=dtype), bnhd(B, Nk, Hkv, D, dtype=dtype)
    win = case.get("window_size")
    left, right = (int(w) for w in win)
    left, right = (-1 if left >= Nk else left), (-1 if right >= Nk else right)
    if case.get("causal"):
        right = 0
    if left >= 0 and right < 0:  # set_params_fprop: the open right side becomes seqlen_k
        right = Nk
    mask = fa_mask(Nq, Nk, left, right)
    (ok, ref_in, base_in) = leaves(q, k, v), leaves(*(x.double() for x in (q, k, v))), leaves(q, k, v)
    out, lse, _ = flash_attn_func(*ok, return_attn_probs=True, alibi_slopes=slopes, **case)
    t = lambda x: x.transpose(1, 2)
    kw = dict(attn_mask=mask, softcap=case.get("softcap"), return_lse=True)
    ref, ref_lse = reference.attention(*map(t, ref_in), alibi_slopes=None if slopes is None else slopes.double(), **kw)
    base, base_lse = reference.attention(*map(t, base_in), alibi_slopes=None if slopes is None else slopes.to(dtype), **kw)
    checks = [numerics.check("out", out, t(ref), t(base)), numerics.check("lse", lse, ref_lse, base_lse)]
    checks += _attention_grad_checks(out, t(ref), t(base), ok, ref_in, base_in, None)
    numerics.assert_checks(checks, case)


def test_varlen_left_only_window_is_bounded_at_max_seqlen_k():
    # FlashAttention's kernel: right = -1 with left >= 0 becomes right = max_seqlen_k
    lens_q, lens_k, H, D = [30, 4], [10, 8], 2, 16
    q, k, v = bnhd(34, H, D), bnhd(18, H, D), bnhd(18, H, D)
    out = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 30, 10, window_size=(2, -1))
    for s, (a, b, c, d) in enumerate([(0, 30, 0, 10), (30, 34, 10, 18)]):
        nq, nk = b - a, d - c
        mask = fa_mask(nq, nk, 2, -1) & (torch.arange(nk)[None] < torch.arange(nq)[:, None] + 1 + nk - nq + 10)
        t = lambda x: x.transpose(0, 1)[None]
        ref = reference.attention(t(q[a:b].double()), t(k[c:d].double()), t(v[c:d].double()), attn_mask=mask)
        base = reference.attention(t(q[a:b]), t(k[c:d]), t(v[c:d]), attn_mask=mask)
        numerics.assert_close(f"seq {s}", t(out[a:b]), ref, base)


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------------------------
def rotate(x, cos, sin, pos, interleaved):
    """FlashAttention's apply_rotary_emb_torch (x * cos + rotate_half(x) * sin on the first
    rotary_dim dims) in float32 at positions pos [B, S]: written independently of the
    module's apply_rotary."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].float(), sin[pos].float()
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
    else:
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    xr = x[..., :rd].float()
    if interleaved:
        half = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
    else:
        half = torch.cat([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
    return torch.cat([(xr * c[:, :, None] + half * s[:, :, None]).to(x.dtype), x[..., rd:]], -1)


def cache(B, N, H, D, dtype=F16):
    return torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, N, H, D, dtype=dtype)


@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_append_and_rotary_equal_torch_then_decode(interleaved):
    B, Nq, Hq, Hkv, D, N = 2, 3, 4, 2, 32, 40
    kc, vc = cache(B, N, Hkv, D)
    q, k, v = bnhd(B, Nq, Hq, D), bnhd(B, Nq, Hkv, D), bnhd(B, Nq, Hkv, D)
    seqlens = torch.tensor([5, 30], dtype=torch.int32)
    angle = torch.rand(N, 8) * 2 * math.pi  # rotary_dim 16 of D = 32
    cos, sin = angle.cos().to(F16), angle.sin().to(F16)
    pos = seqlens.long()[:, None] + torch.arange(Nq)
    want_k, want_v = kc.clone(), vc.clone()
    k_ro = rotate(k, cos, sin, pos, interleaved)
    for b in range(B):
        s = int(seqlens[b])
        want_k[b, s:s + Nq], want_v[b, s:s + Nq] = k_ro[b], v[b]
    q_ro = rotate(q, cos, sin, pos, interleaved)
    ref, ref_lse = tritformer.decode_attention(q_ro.transpose(1, 2), want_k.transpose(1, 2),
                                               want_v.transpose(1, 2), seqlens + Nq,
                                               return_lse=True)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=seqlens, causal=True,
                                       rotary_interleaved=interleaved, return_softmax_lse=True)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # the caches, updated in place
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    assert out.shape == (B, Nq, Hq, D) and lse.shape == (B, Hq, Nq)


def test_kvcache_noncausal_rotary_puts_all_queries_at_cache_seqlens():
    B, Nq, H, D, N = 2, 3, 2, 16, 24
    kc, vc = cache(B, N, H, D)
    q, k, v = bnhd(B, Nq, H, D), bnhd(B, 2, H, D), bnhd(B, 2, H, D)
    seqlens = torch.tensor([4, 11], dtype=torch.int32)
    angle = torch.rand(N, 8)
    cos, sin = angle.cos().to(F16), angle.sin().to(F16)
    ref_k, ref_v = kc.clone(), vc.clone()
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, seqlens)  # causal=False
    pos = seqlens.long()[:, None] + torch.zeros(Nq, dtype=torch.long)
    q_ro = rotate(q, cos, sin, pos, True)
    kpos = seqlens.long()[:, None] + torch.arange(2)
    k_ro = rotate(k, cos, sin, kpos, True)
    for b in range(B):
        s = int(seqlens[b])
        ref_k[b, s:s + 2], ref_v[b, s:s + 2] = k_ro[b], v[b]
        L = s + 2
        t = lambda x: x[b:b + 1, :L].transpose(1, 2)
        tq = q_ro[b:b + 1].transpose(1, 2)
        r64 = reference.attention(tq.double(), t(ref_k).double(), t(ref_v).double())
        r16 = reference.attention(tq, t(ref_k), t(ref_v))
        numerics.assert_close(f"row {b}", out[b:b + 1].transpose(1, 2), r64, r16)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("case", [
    dict(causal=False),
    dict(causal=True, window_size=(4, 0)),
    dict(causal=True, alibi=True, softcap=5.0),
    dict(causal=False, window_size=(3, 2), leftpad=True),
    dict(causal=True, leftpad=True, alibi=True),
], ids=["noncausal", "window", "alibi-softcap", "window-leftpad", "causal-leftpad-alibi"])
def test_kvcache_options_against_reference(case):
    """Row b attends to cache[b, leftpad[b]:seqlens[b]] (FlashAttention's leftpad: the keys
    start there, masks aligned bottom-right to them): the varlen path, reading the cache in
    place."""
    B, Nq, Hq, Hkv, D, N = 3, 4, 4, 2, 16, 30
    kc, vc = cache(B, N, Hkv, D)
    q = bnhd(B, Nq, Hq, D)
    seqlens = torch.tensor([17, 30, 2], dtype=torch.int32)
    leftpad = torch.tensor([3, 0, 1], dtype=torch.int32) if case.get("leftpad") else None
    slopes = torch.rand(B, Hq) if case.get("alibi") else None
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                       causal=case["causal"], window_size=case.get("window_size", (-1, -1)),
                                       alibi_slopes=slopes, softcap=case.get("softcap", 0.0),
                                       return_softmax_lse=True)
    for b in range(B):
        lo, hi = (int(leftpad[b]) if leftpad is not None else 0), int(seqlens[b])
        t = lambda x: x[b:b + 1, lo:hi].transpose(1, 2)
        tq = q[b:b + 1].transpose(1, 2)
        kw = dict(causal=case["causal"], window=case.get("window_size"), softcap=case.get("softcap"),
                  return_lse=True)
        r64, l64 = reference.attention(tq.double(), t(kc).double(), t(vc).double(),
                                       alibi_slopes=None if slopes is None else slopes[b].double(), **kw)
        r16, l16 = reference.attention(tq, t(kc), t(vc), alibi_slopes=None if slopes is None else slopes[b].half(), **kw)
        numerics.assert_checks([numerics.check("out", out[b:b + 1].transpose(1, 2), r64, r16),
                                numerics.check("lse", lse[b:b + 1], l64, l16, eps_dtype=F16)], (case, b))


def test_kvcache_paged_and_batch_idx_equal_the_contiguous_cache():
    B, Nq, Hq, Hkv, D, page, nblk = 2, 2, 4, 2, 16, 8, 4   # 4 blocks of 8 per row: Nmax 32
    kc, vc = cache(B, page * nblk, Hkv, D)
    q, k, v = bnhd(B, Nq, Hq, D), bnhd(B, Nq, Hkv, D), bnhd(B, Nq, Hkv, D)
    seqlens = torch.tensor([9, 23], dtype=torch.int32)
    # paged: 3 * B * nblk blocks, row b's blocks scattered by a permutation
    table = torch.randperm(3 * B * nblk, dtype=torch.int32)[:B * nblk].view(B, nblk)
    kp, vp = cache(3 * B * nblk, page, Hkv, D)
    kp[table.long()] = kc.view(B, nblk, page, Hkv, D)
    vp[table.long()] = vc.view(B, nblk, page, Hkv, D)
    # batch index: rows 3 and 0 of a 4-row cache
    idx = torch.tensor([3, 0], dtype=torch.int32)
    kb, vb = cache(4, page * nblk, Hkv, D)
    kb[idx.long()], vb[idx.long()] = kc, vc
    kw = dict(cache_seqlens=seqlens, causal=True)
    ref = flash_attn_with_kvcache(q, kc, vc, k, v, **kw)
    paged = flash_attn_with_kvcache(q, kp, vp, k, v, block_table=table, **kw)
    batched = flash_attn_with_kvcache(q, kb, vb, k, v, cache_batch_idx=idx, **kw)
    assert torch.equal(paged, ref) and torch.equal(batched, ref)
    # the appended keys landed in the pages / indexed rows
    assert torch.equal(kp[table.long()].flatten(1, 2), kc) and torch.equal(vp[table.long()].flatten(1, 2), vc)
    assert torch.equal(kb[idx.long()], kc) and torch.equal(vb[idx.long()], vc)
    # an int cache_seqlens is every row's length; num_splits 1 (no split) stays in the criterion
    same = torch.tensor([12, 12], dtype=torch.int32)
    assert torch.equal(flash_attn_with_kvcache(q, kc, vc, cache_seqlens=12, causal=True),
                       flash_attn_with_kvcache(q, kc, vc, cache_seqlens=same, causal=True))
    one = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=same, causal=True, num_splits=1)
    tq, t = q.transpose(1, 2), (lambda x: x[:, :12].transpose(1, 2))
    numerics.assert_close("num_splits=1", one.transpose(1, 2),
                          reference.attention(tq.double(), t(kc).double(), t(vc).double(), causal=True),
                          reference.attention(tq, t(kc), t(vc), causal=True))


def test_varlen_paged_equals_packed():
    lens, H, D, page = [13, 6], 2, 16, 4
    q, k, v = bnhd(sum(lens), H, D), bnhd(sum(lens), H, D), bnhd(sum(lens), H, D)
    table = torch.tensor([[5, 0, 7, 2], [1, 6, 3, 4]], dtype=torch.int32)
    kp, vp = torch.zeros(8, page, H, D, dtype=F16), torch.zeros(8, page, H, D, dtype=F16)
    for s, (a, n) in enumerate(zip([0, 13], lens)):
        for t in range(n):
            kp[table[s, t // page], t % page] = k[a + t]
            vp[table[s, t // page], t % page] = v[a + t]
    c = cu(lens)
    ref = flash_attn_varlen_func(q, k, v, c, c, 13, 13, causal=True)
    # no gradient needed: the forward kernel reads the pages through the table
    assert torch.equal(flash_attn_varlen_func(q, kp, vp, c, c, 13, 13, causal=True, block_table=table), ref)
    # a gradient needed (the paged kernel is inference-only): the keys gathered in torch first,
    # gradients flowing back into the pages they came from
    kp.requires_grad_(True)
    out = flash_attn_varlen_func(q, kp, vp, c, c, 13, 13, causal=True, block_table=table)
    assert torch.equal(out.detach(), ref)
    out.float().sum().backward()
    k.requires_grad_(True)
    flash_attn_varlen_func(q, k, v, c, c, 13, 13, causal=True).float().sum().backward()
    for s_, (a, n) in enumerate(zip([0, 13], lens)):
        for t in range(n):
            assert torch.equal(kp.grad[table[s_, t // page], t % page], k.grad[a + t])


# ---------------------------------------------------------------------------------------------
# Errors: before any launch or cache write
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("a kernel was launched for invalid input")
    monkeypatch.setattr(KA, "attention_forward", fail)
    monkeypatch.setattr(KD, "decode_forward", fail)


Q, K = bnhd(1, 8, 2, 16), bnhd(1, 8, 2, 16)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: flash_attn_func(Q, K, K, dropout_p=0.1, return_attn_probs=True), NotImplementedError,
     r"return_attn_probs=True with dropout_p > 0: FlashAttention returns S_dmask"),
    (lambda: flash_attn_varlen_qkvpacked_func(torch.stack([Q[0]] * 3, 1), cu([8]), 8, dropout_p=0.1,
                                              return_attn_probs=True), NotImplementedError, r"S_dmask"),
    (lambda: flash_attn_func(Q.double(), K.double(), K.double()), FlashAttnTypeError,
     r"^q: FlashAttention only support fp16 and bf16 data type \(tritformer also accepts float32\), got float64"),
    (lambda: flash_attn_func(Q, K.float(), K), FlashAttnTypeError, r"^query and key must have the same dtype"),
    (lambda: flash_attn_func(Q, K, K.bfloat16()), FlashAttnTypeError, r"^query and value must have the same dtype"),
    (lambda: flash_attn_func(bnhd(1, 8, 3, 16), K, K), FlashAttnError,
     r"^Number of heads in key/value must divide number of heads in query: q has 3, k has 2"),
    (lambda: flash_attn_func(*[bnhd(1, 4, 1, 264)] * 3), FlashAttnError,
     r"^q: FlashAttention forward only supports head dimension at most 256"),
    (lambda: flash_attn_func(Q[0], K, K), FlashAttnError, r"^q must have 4 dimensions \[B, Nq, Hq, D\]"),
    (lambda: flash_attn_qkvpacked_func(bnhd(1, 8, 2, 2, 16)), FlashAttnError, r"^qkv must be \[B, N, 3, H, D\]"),
    (lambda: flash_attn_func(Q, K, K, window_size=(2.5, 0)), FlashAttnTypeError, r"^window_size must hold ints"),
    (lambda: flash_attn_func(Q, K, K, deterministic=1), TypeError, r"^deterministic must be a bool"),
    (lambda: flash_attn_varlen_func(Q[0], K[0], K[0], cu([8]).long(), cu([8]), 8, 8), TypeError,
     r"^cu_seqlens_q must be int32"),
], ids=["s_dmask", "s_dmask-varlen", "float64", "key-dtype", "value-dtype", "heads", "head-dim",
        "ndim", "packed-shape", "window-type", "deterministic", "cu_seqlens"])
def test_errors(no_launch, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_flash_attn_errors_are_runtime_errors_too():
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        flash_attn_func(Q.double(), K.double(), K.double())
    with pytest.raises(RuntimeError, match="S_dmask"):
        flash_attn_func(Q, K, K, dropout_p=0.5, return_attn_probs=True)


def _kv_args():
    kc, vc = cache(2, 16, 2, 16)
    return dict(q=bnhd(2, 1, 2, 16), k_cache=kc, v_cache=vc, k=bnhd(2, 1, 2, 16), v=bnhd(2, 1, 2, 16),
                cache_seqlens=torch.tensor([3, 15], dtype=torch.int32))


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(v=None), r"^k, v: If key is supplied, value must also be passed in"),
    (lambda a: a.update(cache_seqlens=None), r"^cache_seqlens: If key is supplied, seqlens_k must also be passed in"),
    (lambda a: a.update(k=None, v=None, rotary_cos=torch.ones(16, 4), rotary_sin=torch.ones(16, 4)),
     r"^rotary_cos: If rotary cos/sin are provided, new key / value"),
    (lambda a: a.update(rotary_cos=torch.ones(16, 4)), r"If rotary cos is provided, rotary sin must also"),
    (lambda a: a.update(rotary_cos=torch.ones(16, 9), rotary_sin=torch.ones(16, 9)), r"rotary_dim must be <= headdim"),
    (lambda a: a.update(rotary_cos=torch.ones(15, 4), rotary_sin=torch.ones(15, 4)), r"^rotary_cos has 15 positions"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)),
     r"^cache_seqlens: cache_seqlens\[1\] \+ Nnew = 16 \+ 1 must be in \[0, 16\]"),
    (lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int32), k_cache=cache(1, 8, 2, 16)[0],
                        v_cache=cache(1, 8, 2, 16)[1], cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)),
     r"^cache_seqlens: cache_seqlens\[1\] \+ Nnew = 8 \+ 1 must be in \[0, 8\] \(the paged "
     r"capacity: block_table has 1 blocks"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3, 15])), r"^cache_seqlens must have dtype int32"),
    (lambda a: a.update(cache_leftpad=torch.tensor([5, 0], dtype=torch.int32)), r"^cache_leftpad\[0\] = 5 must be in \[0, 4\]"),
    (lambda a: a.update(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)),
     r"^cache_batch_idx entries must be in \[0, B_cache=2\), got 2"),
    (lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
     r"Paged KVcache does not support cache_batch_idx"),
    (lambda a: a.update(block_table=torch.zeros(2, 1)), r"^block_table must have dtype torch.int32"),
    (lambda a: a.update(k=a["k"].float()), r"^k: FlashAttention only support|^k: Key must have the same dtype"),
    (lambda a: a.update(num_splits=-1), r"^num_splits must be >= 0"),
], ids=["v-missing", "seqlens-missing", "rotary-without-k", "sin-missing", "rotary-dim", "rotary-short",
        "overflow", "paged-overflow", "seqlens-dtype", "leftpad", "batch-idx", "paged-batch-idx", "block-table-dtype",
        "k-dtype", "num-splits"])
def test_kvcache_errors_leave_the_cache_untouched(no_launch, change, match):
    a = _kv_args()
    change(a)
    before = a["k_cache"].clone(), a["v_cache"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(**a)
    assert torch.equal(a["k_cache"], before[0]) and torch.equal(a["v_cache"], before[1])


# ---------------------------------------------------------------------------------------------
# tritformer.attention(..., layout=)
# ---------------------------------------------------------------------------------------------
def test_layout_bnhd_is_the_bhnd_op_on_views():
    q, k, v = bnhd(2, 13, 4, 16), bnhd(2, 20, 2, 16), bnhd(2, 20, 2, 16)
    a, b = leaves(q, k, v), leaves(q, k, v)
    out, lse = tritformer.attention(*a, causal=True, return_lse=True, layout="bnhd")
    ref, ref_lse = tritformer.attention(*(x.transpose(1, 2) for x in b), causal=True, return_lse=True)
    assert out.shape == (2, 13, 4, 16) and lse.shape == (2, 4, 13)
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    g = torch.randn_like(out)
    out.backward(g)
    ref.transpose(1, 2).backward(g)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)
    assert torch.equal(tritformer.attention(q, k, v, layout="bnhd"),
                       tritformer.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("declared,shapes,suggest", [
    ("bhnd", ((2, 13, 4, 16), (2, 20, 2, 16)), "bnhd"),    # [B, N, H, D]: 13 heads vs 20 in bhnd
    ("bnhd", ((2, 4, 13, 16), (2, 2, 20, 16)), "bhnd"),    # [B, H, N, D] declared as bnhd
])
def test_layout_mismatch_names_the_other_layout(no_launch, declared, shapes, suggest):
    q, kv = bnhd(*shapes[0]), bnhd(*shapes[1])
    with pytest.raises(ValueError, match=rf"do not fit layout='{declared}'.*pass layout='{suggest}'"):
        tritformer.attention(q, kv, kv, layout=declared)


def test_layout_argument_and_ambiguous_shapes(no_launch):
    with pytest.raises(ValueError, match=r"^layout must be 'bhnd' .* or 'bnhd' .*, got 'nhd'"):
        tritformer.attention(Q, K, K, layout="nhd")
    # wrong in both layouts: the op's own message
    with pytest.raises(ValueError, match=r"^k must have q's head dim"):
        tritformer.attention(bnhd(1, 2, 8, 16), bnhd(1, 2, 8, 8), bnhd(1, 2, 8, 8), layout="bnhd")


def test_private_varlen_forward_paged_seqused():
    # FlashAttention's private _flash_attn_varlen_forward (its test_flash_attn.py calls it):
    # paged k/v with seqused_k, one query per sequence; num_splits 0 = default, > 1 refused
    from tritformer.flash_attn_interface import _flash_attn_varlen_forward
    H, Hkv, D, page = 4, 2, 32, 16
    lens = [20, 37]
    kp, vp = torch.randn(8, page, Hkv, D, dtype=F16), torch.randn(8, page, Hkv, D, dtype=F16)
    table = torch.tensor([[3, 0, 6, 1], [7, 2, 5, 4]], dtype=torch.int32)
    q = torch.randn(2, H, D, dtype=F16)
    cu_q = torch.arange(3, dtype=torch.int32)
    used = torch.tensor(lens, dtype=torch.int32)
    cu_k = torch.tensor([0, 64, 128], dtype=torch.int32)  # allocated 64 keys each, lens used
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=64,
              dropout_p=0.0, softmax_scale=None, causal=False, window_size_left=-1,
              window_size_right=0, block_table=table, seqused_k=used)
    out, lse, s_dmask, rng = _flash_attn_varlen_forward(q, kp, vp, **kw)
    assert torch.equal(out, _flash_attn_varlen_forward(q, kp, vp, **kw, num_splits=0)[0])
    assert lse.shape == (H, 2) and s_dmask.numel() == 0 and rng.dtype == torch.int64
    for s, n in enumerate(lens):  # sequence s: its first n keys, gathered by hand
        pos = torch.arange(n)
        ks = kp[table[s, pos // page].long(), pos % page].transpose(0, 1)[None]
        vs = vp[table[s, pos // page].long(), pos % page].transpose(0, 1)[None]
        qs = q[s][None, :, None]
        numerics.assert_close(f"seq {s}", out[s][None, :, None],
                              reference.attention(qs.double(), ks.double(), vs.double()),
                              reference.attention(qs, ks, vs))
    with pytest.raises(RuntimeError, match="num_splits > 1 is not supported"):
        _flash_attn_varlen_forward(q, kp, vp, **kw, num_splits=2)
