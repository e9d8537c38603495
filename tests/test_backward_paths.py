"""The two backward paths (`deterministic` of tritformer.attention / varlen_attention):

- deterministic=True: the dK/dV kernel and the dQ kernel (7 GEMMs per tile pair, no atomics);
- deterministic=False: the fused kernel (FUSED_DQ in _attn_bwd_dkdv): dK/dV and, per tile pair,
  dS K atomically added into an fp32 dQ accumulator (5 GEMMs), the dQ kernel not launched;
  with a float mask's gradient, dS is written by that kernel instead of the dQ kernel.

Both against the float64 reference (error-ratio criterion) with every feature, and against each
other. Interpreter tiles: dK/dV (and fused) BLOCK_M=32 query rows, BLOCK_N=64 keys, so D=16
takes the fused dQ's [BLOCK_M, D] orientation (DQ_TRANS off) and D >= 64 its transposed
[D, BLOCK_M] one (DQ_TRANS on).
"""
import pytest
import torch

import tritformer
from tritformer.kernels.attention import launch as L
from tritformer.testing import assert_checks, check_attention, check_varlen_attention

PATHS = [pytest.param(True, id="deterministic"), pytest.param(False, id="fused")]


def _qkv(B=2, Hq=4, Hkv=2, Nq=70, Nk=83, D=32, dtype=torch.float16):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


@pytest.fixture
def paths(monkeypatch):
    """The `deterministic` of every plan_backward call made while the test runs."""
    seen = []
    plan = L.plan_backward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic", True))
        return plan(*args, **kwargs)
    monkeypatch.setattr(L, "plan_backward", spy)
    return seen


@pytest.mark.parametrize("deterministic", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [16, 64, 128])  # fused dQ: [BLOCK_M, D] at 16; [D, BLOCK_M] above
def test_paths_match_reference(deterministic, dtype, D, paths):
    # GQA 2:1 causal, ragged tiles both ways (fp32: the lse residual path)
    q, k, v = _qkv(D=D, dtype=dtype)
    assert_checks(check_attention(q, k, v, causal=True, deterministic=deterministic))
    assert paths == [deterministic]


FEATURES = {
    # float mask with its gradient: dS written by the dQ kernel, or by the fused kernel
    "float_mask_grad": lambda: dict(attn_mask=torch.randn(2, 1, 70, 83).requires_grad_()),
    "bool_mask": lambda: dict(attn_mask=torch.rand(2, 4, 70, 83) > 0.3),
    "padding_alibi_softcap": lambda: dict(
        key_padding_mask=(torch.arange(83) > 60).expand(2, 83), alibi_slopes=torch.rand(4),
        softcap=15.0),
    "window": lambda: dict(window=(20, 7)),
    "dropout": lambda: dict(dropout_p=0.2),
    "everything": lambda: dict(
        attn_mask=torch.randn(2, 4, 70, 83).requires_grad_(),
        key_padding_mask=(torch.arange(83) < 5).expand(2, 83), window=(40, 5),
        alibi_slopes=torch.rand(4), softcap=20.0, dropout_p=0.1),
}


@pytest.mark.parametrize("deterministic", PATHS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_paths_with_every_feature(deterministic, feature, dtype):
    q, k, v = _qkv(dtype=dtype)
    assert_checks(check_attention(q, k, v, causal=feature != "window",
                                  deterministic=deterministic, **FEATURES[feature]()))


@pytest.mark.parametrize("deterministic", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_varlen_paths(deterministic, dtype, paths):
    # packed sequences of 30, 1, 0 and 59 queries (40, 0, 60 keys...): the dQ accumulator is
    # indexed by each sequence's token offset
    cu_q = torch.tensor([0, 30, 31, 31, 90], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 40, 45, 100], dtype=torch.int32)
    q, k, v = (torch.randn(t, h, 32).to(dtype) for t, h in ((90, 4), (100, 2), (100, 2)))
    assert_checks(check_varlen_attention(q, k, v, cu_q, cu_k, 59, 60, causal=True,
                                         window=(25, 0), deterministic=deterministic))
    assert paths == [deterministic]


@pytest.mark.parametrize("split", [1, 2, 4])  # GQA 4:1 split over 1, 2, 4 dK/dV programs
def test_fused_path_with_gqa_split(split, monkeypatch):
    monkeypatch.setenv("TRITFORMER_GQA_SPLIT", str(split))
    q, k, v = _qkv(Hq=4, Hkv=1, Nq=50, Nk=99)
    assert_checks(check_attention(q, k, v, causal=True, deterministic=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fused_matches_deterministic(dtype):
    # the same kernel arithmetic for dK and dV (bitwise); dQ differs by the order of its fp32
    # additions (atomics) and the single rounding of the accumulator; dmask (= dS) is the dK/dV
    # kernel's P^T, bitwise the dQ kernel's P for 16-bit inputs (exact products), not for
    # fp32's 3xTF32 dots (K Q^T vs Q K^T operand splits)
    q, k, v = _qkv(dtype=dtype)
    mask = torch.randn(2, 4, 70, 83)
    do = torch.randn(2, 4, 70, 32, dtype=dtype)
    grads = []
    for det in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, mask)]
        out = tritformer.attention(*leaves[:3], attn_mask=leaves[3], causal=True,
                                   deterministic=det)
        out.backward(do)
        grads.append([x.grad for x in leaves])
    (dq0, dk0, dv0, dm0), (dq1, dk1, dv1, dm1) = grads
    assert torch.equal(dk0, dk1) and torch.equal(dv0, dv1)
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # fp32 reordering; one 16-bit ulp at most
    if dtype == torch.float32:
        torch.testing.assert_close(dm1, dm0, rtol=tol, atol=tol * dm0.abs().max().item())
    else:
        assert torch.equal(dm0, dm1)
    torch.testing.assert_close(dq1, dq0, rtol=tol, atol=tol * dq0.abs().max().item())


@pytest.mark.parametrize("nk", [20, 80])  # boundary-tile path; interior fast path
def test_fused_rows_without_finite_score(nk):
    # a key of -inf: dS = 0 meets -inf in dS K (NaN), zeroed on the host for the fused path
    q, k, v = _qkv(Nq=24, Nk=nk)
    q = q.abs() + 0.1
    k[0, 1] = float("-inf")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tritformer.attention(*leaves, deterministic=False)
    out.sum().backward()
    dq = leaves[0].grad
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[0, 2:4], torch.zeros_like(dq[0, 2:4]))  # query heads of kv head 1


@pytest.mark.parametrize("deterministic", PATHS)
@pytest.mark.parametrize("case", ["negative-scores", "negative-alibi"])
def test_keys_past_the_end_never_reach_dq(case, deterministic):
    """The ragged last key tile: its keys past n_kv load as zero and, in the dK/dV program, are
    not masked where the query tile needs no bound (their dK/dV rows are never stored). Their
    score is then 0 (+ ALiBi's bias), which exceeds the row's lse when every real score is far
    below it: P overflows to inf, and the fused kernel's dQ += dS K made inf * 0 = NaN. Nk = 83:
    a ragged key tile (64-key dK/dV tiles in the interpreter)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).to(torch.float16) for n in (70, 83, 83))
    kw = {}
    if case == "negative-scores":  # every real score about -100: lse ~ -100
        q, k = q.abs() + 3.0, -(k.abs() + 3.0)
        kw["scale"] = 0.25
    else:  # a negative slope: bias +|i - j| / 2, largest at the keys past the end
        kw["alibi_slopes"] = torch.tensor([-0.5, 0.25])
    assert_checks(check_attention(q, k, v, deterministic=deterministic, return_lse=True, **kw))


def test_deterministic_must_be_a_bool():
    q, k, v = _qkv()
    for bad in (1, None, "yes"):
        with pytest.raises(TypeError, match=r"^deterministic must be a bool"):
            tritformer.attention(q, k, v, deterministic=bad)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (70, 83))
    with pytest.raises(TypeError, match=r"^deterministic must be a bool"):
        tritformer.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                    v[0].transpose(0, 1), cu_q, cu_k, 70, 83, deterministic=0)


def _backward(**kw):
    q, k, v = (x.requires_grad_() for x in _qkv(Nq=20, Nk=20))
    tritformer.attention(q, k, v, **kw).sum().backward()


def test_default_path(paths):
    _backward()
    assert paths == [tritformer.ops.attention.DETERMINISTIC_DEFAULT]


def test_torch_deterministic_algorithms_force_the_deterministic_path(paths):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _backward(deterministic=False)
    finally:
        torch.use_deterministic_algorithms(prev)
    _backward(deterministic=False)
    assert paths == [True, False]


def test_flash_attn_drop_in_switches_the_path(paths):
    from tritformer.flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    q, k, v = (x.transpose(1, 2).requires_grad_() for x in _qkv(Nq=20, Nk=20))
    flash_attn_func(q, k, v).sum().backward()  # FlashAttention's default: False
    flash_attn_func(q, k, v, deterministic=True).sum().backward()
    cu = torch.tensor([0, 20], dtype=torch.int32)
    qv, kv, vv = (x[0].detach().requires_grad_() for x in (q, k, v))
    flash_attn_varlen_func(qv, kv, vv, cu, cu, 20, 20, deterministic=True).sum().backward()
    assert paths == [False, True, True]


def test_fused_tiles_only_where_shipped():
    # the fused kernel runs only where its table has a spill-free tile (configs.py, bwd_fused
    # rows); a "-" cell or a table / arch without the row: the deterministic kernels
    from tritformer.kernels.attention import configs_for
    assert configs_for("bwd_fused", 90, 64, 2) and configs_for("bwd_fused", 80, 64, 2)
    for arch, block_d, elem, variant in ((90, 128, 2, "plain"), (80, 128, 2, "plain"),
                                         (90, 64, 4, "plain"), (86, 64, 2, "plain"),
                                         (90, 64, 2, "varlen"), (80, 64, 2, "masked")):
        assert configs_for("bwd_fused", arch, block_d, elem, variant) == [], (arch, block_d)
    assert configs_for("bwd_fused", None, 64, 2)  # the interpreter: always the fused kernel


@pytest.mark.parametrize("arch,block_d", [(80, 64), (80, 128), (90, 64), (90, 128)])
def test_fused_tiles_by_heads(arch, block_d):
    # MHA takes configs.BWD_MHA's cell before the row it shares with GQA (sm_80: 16x128 tiles
    # that GQA 4:1 spills); GQA keeps the row (sm_80 D=128: none, so deterministic); the plan
    # of each carries exactly those candidates (pointer loads: D=96 is no TMA head dim)
    from tritformer.kernels.attention import configs as C
    mha = C.configs_for("bwd_fused", arch, block_d, 2, "plain", "mha")
    gqa = C.configs_for("bwd_fused", arch, block_d, 2, "plain", "gqa")
    assert gqa == C.configs_for("bwd_fused", arch, block_d, 2)  # the default: the shared row
    if arch == 80:
        assert mha == C.BWD_MHA[(80, block_d, "plain", "bwd_fused")] and mha != gqa
        assert all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] in (64, 128) for c in mha)
    else:
        assert mha == gqa
    assert (gqa == []) == (block_d == 128)
    D = block_d - 32  # 32 / 96: pointer loads, the same head-dim bucket
    # (kv heads, split): MHA; GQA 2:1 looping over its group; GQA split over its whole group
    # (one query head per program, as the fused path runs GQA on a GPU: MHA's kernel and tiles)
    for hkv, split in ((4, 1), (2, 1), (2, 2)):
        q, o, do = (torch.empty(1, 4, 64, D, device="meta", dtype=torch.float16) for _ in range(3))
        k, v = (torch.empty(1, hkv, 64, D, device="meta", dtype=torch.float16) for _ in range(2))
        ws = torch.empty(1, hkv * split, 64, D, device="meta", dtype=torch.float32)
        lse = torch.empty(1, 4, 64, device="meta", dtype=torch.float32)
        plans = L.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q.clone(),
                                ws, ws.clone(), L.Options(scale=0.1), arch, None, None,
                                split=split, deterministic=False)
        assert plans[1].name == "attn_bwd_fused" and not plans[1].constexprs["TMA"]
        assert plans[1].configs == (mha if hkv * split == 4 else gqa), (hkv, split)
