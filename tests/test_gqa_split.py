"""GQA backward parallelism (kernels/attention/launch.py: gqa_split): the dK/dV grid split over
each kv head's query-head group, partial sums in an fp32 workspace reduced in a fixed order.

The split is chosen from the GPU's SM count, so on CPU it is forced with TRITFORMER_GQA_SPLIT:
every split must meet the criterion, and dQ (its own kernel, untouched) must not move a bit.
"""
import pytest
import torch

import tritformer
from tritformer.kernels import attention as KA
from tritformer.kernels.attention import launch as L
from tritformer.numerics import assert_checks
from tritformer.testing import check_attention, check_varlen_attention

MiB = 2 ** 20


@pytest.mark.parametrize("programs, group, sms, part, budget, want", [
    (300, 8, 132, MiB, 256 * MiB, 1),   # the unsplit grid already fills 2 waves: no split
    (64, 8, 132, MiB, 256 * MiB, 8),    # 64 x 8 = 512 >= 264: the whole group (smallest that fills)
    (100, 8, 132, MiB, 256 * MiB, 4),   # 100 x 4 = 400 >= 264 first at 4
    (100, 6, 132, MiB, 256 * MiB, 3),   # divisors of 6 only: 2 (200), 3 (300 >= 264)
    (10, 8, 132, 100 * MiB, 256 * MiB, 2),  # the workspace budget stops at 2 parts (200 MiB)
    (10, 1, 132, MiB, 256 * MiB, 1),    # MHA: nothing to split
    (10, 8, None, MiB, 256 * MiB, 1),   # off CUDA (interpreter, CPU): no split
])
def test_split_choice(programs, group, sms, part, budget, want):
    assert L.gqa_split(programs, group, sms, part, budget) == want


def test_split_grid_and_workspace_plan():
    # the dK/dV grid grows by the split; the kernel gets GROUP_SPLIT and the workspace strides
    meta = lambda *s, dtype=torch.float16: torch.empty(*s, device="meta", dtype=dtype)
    B, Hq, Hkv, N, D = 2, 8, 2, 256, 64
    q, o, do = (meta(B, Hq, N, D) for _ in range(3))
    k, v = (meta(B, Hkv, N, D) for _ in range(2))
    ws = meta(B, Hkv * 4, N, D, dtype=torch.float32)
    lse = meta(B, Hq, N, dtype=torch.float32)
    opts = KA.Options(scale=0.125, right=0)
    for split, dk in ((1, k), (4, ws)):
        _, dkdv, _ = KA.plan_backward(do, q, k, v, o, lse, None, lse, q, dk, dk, opts, 90,
                                      split=split)
        assert dkdv.args["GROUP_SPLIT"] == split and dkdv.args["stride_dkh"] == dk.stride(1)
        for cfg in dkdv.configs:
            assert dkdv.grid(cfg.kwargs) == ((N // cfg.kwargs["BLOCK_N"]) * B * Hkv * split,)


def test_forced_split_must_divide_the_group(monkeypatch):
    monkeypatch.setenv("TRITFORMER_GQA_SPLIT", "3")
    q = torch.randn(1, 4, 16, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, 16, 16, requires_grad=True) for _ in range(2))
    with pytest.raises(ValueError, match="TRITFORMER_GQA_SPLIT=3 must divide the GQA group size 4"):
        tritformer.attention(q, k, v).sum().backward()


def _grads(monkeypatch, split, q, k, v, **kw):
    monkeypatch.setenv("TRITFORMER_GQA_SPLIT", str(split))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(0)
    out = tritformer.attention(*leaves, **kw)
    out.backward(torch.ones_like(out))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("split, dtype, kw", [
    (4, torch.float16, dict(causal=True)),   # one query head per program; plain table, ragged N
    (4, torch.float32, dict(causal=False)),  # fp32 (with the lse residual in the backward)
    (2, torch.float16, dict(causal=True, dropout_p=0.25, alibi_slopes=torch.rand(8),
                            key_padding_mask=torch.arange(40) % 7 == 3)),  # 2 heads; masked table
    # the fused kernel (deterministic=False) over the whole group, as it runs on a GPU
    # (_gqa_split_for's fused choice): GROUP_PART = 1, one query head per program
    (4, torch.float16, dict(causal=True, deterministic=False)),
])
def test_split_matches_the_criterion_and_leaves_dq_alone(monkeypatch, split, dtype, kw):
    g = torch.Generator().manual_seed(split)
    q = torch.randn(2, 8, 33, 16, generator=g).to(dtype)   # Hq = 8, Hkv = 2: group 4
    k, v = (torch.randn(2, 2, 40, 16, generator=g).to(dtype) for _ in range(2))
    kpm = kw.get("key_padding_mask")
    if kpm is not None:
        kw = {**kw, "key_padding_mask": kpm.expand(2, 40)}
    monkeypatch.setenv("TRITFORMER_GQA_SPLIT", str(split))
    assert_checks(check_attention(q, k, v, **kw), (split, dtype))
    dq1, dk1, dv1 = _grads(monkeypatch, 1, q, k, v, **kw)
    dqs, dks, dvs = _grads(monkeypatch, split, q, k, v, **kw)
    if kw.get("deterministic", True):
        assert torch.equal(dq1, dqs)  # the dQ kernel does not see the split
    else:  # dQ's atomics are added by other programs, in another order
        torch.testing.assert_close(dqs, dq1, rtol=1e-5 if dtype == torch.float32 else 2e-3,
                                   atol=1e-5 if dtype == torch.float32 else 2e-3)
    # dK/dV: the same terms, summed in another order (fp32 partials, one rounding at the end)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dks, dk1, **tol)
    torch.testing.assert_close(dvs, dv1, **tol)


def test_split_varlen(monkeypatch):
    # packed sequences: the workspace is [1, Hkv * split, total, D] like the [1, Hkv, T, D] view
    monkeypatch.setenv("TRITFORMER_GQA_SPLIT", "2")
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 5, 37, 50], dtype=torch.int32)
    q = torch.randn(50, 4, 16, generator=g)
    k, v = (torch.randn(50, 2, 16, generator=g) for _ in range(2))
    assert_checks(check_varlen_attention(q, k, v, cu, cu, 32, 32, causal=True, return_lse=True))


def _cuda_stand_ins(monkeypatch, sm_count):
    """The CUDA branch of the split choice without a GPU: no forced split, not interpreted, a
    device of `sm_count` SMs; returns fake(*shape), a fp16 CUDA tensor stand-in."""
    import types
    monkeypatch.delenv("TRITFORMER_GQA_SPLIT", raising=False)
    monkeypatch.setattr(L, "is_interpreted", lambda fn: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(multi_processor_count=sm_count))
    cuda = types.SimpleNamespace(type="cuda")
    return lambda *shape: types.SimpleNamespace(shape=shape, device=cuda, nbytes=2 * shape[0]
                                                * shape[1] * shape[2] * shape[3],
                                                element_size=lambda: 2)


def test_split_for_a_cuda_launch(monkeypatch):
    # the CUDA branch of the choice, on stand-ins (no GPU here): SM count from the device, the
    # unsplit grid from the widest BLOCK_N of the table, the workspace shaped like k
    fake = _cuda_stand_ins(monkeypatch, 132)
    # varlen: [1, H, T, D] views, 8 sequences of up to 128 keys; Llama-3-70B-like heads (8:1)
    q, k = fake(1, 64, 2048, 128), fake(1, 8, 2048, 128)
    opts = KA.Options(scale=0.1, right=0, cu_seqlens_q=torch.zeros(9), cu_seqlens_k=torch.zeros(9),
                      max_seqlen_q=128, max_seqlen_k=128, seqlens_checked=True)
    block_n = max(c.kwargs["BLOCK_N"] for c in KA.configs_for("bwd_dkdv", 90, 128, 2, "varlen"))
    programs = (128 // block_n) * 8 * 8
    part = 2 * 4 * 1 * 8 * 2048 * 128  # the workspace per split part: k's shape, fp32, dK + dV
    want = L.gqa_split(programs, 8, 132, part, L.GQA_SPLIT_BUDGET + q.nbytes)
    # 128 programs: split 4 fills 2 waves (a workspace sized by the 8 sequences instead of
    # k's one packed batch would stop at 2 on the budget)
    assert want == 4 and L._gqa_split_for(q, k, opts, 90, 8, 128) == want


def test_fused_split_takes_the_whole_group_within_the_budget(monkeypatch):
    # the fused kernel's choice (CUDA stubbed): the whole group while its workspace fits the
    # budget, so the kernel loses its head loop (GROUP_PART = 1) and takes MHA's tiles; past the
    # budget, gqa_split's choice by parallelism as for the deterministic kernels
    fake = _cuda_stand_ins(monkeypatch, 108)
    opts = KA.Options(scale=0.125, right=0)
    # 16 sequences x 2 kv heads x 1024 keys: 16 * 2 * 8 = 256 programs >= 2 waves, no split for
    # the deterministic kernels; workspace for the whole group 4 * 2*4*16*2*1024*64 = 64 MiB
    q, k = fake(16, 8, 1024, 64), fake(16, 2, 1024, 64)
    assert L._gqa_split_for(q, k, opts, 80, 16, 1024) == 1
    assert L._gqa_split_for(q, k, opts, 80, 16, 1024, fused=True) == 4
    # 8x the keys: 512 MiB of workspace is over the 256 MiB budget (+ q's 16 MiB)
    q, k = fake(16, 8, 8192, 64), fake(16, 2, 8192, 64)
    assert L._gqa_split_for(q, k, opts, 80, 16, 8192, fused=True) == L._gqa_split_for(
        q, k, opts, 80, 16, 8192) == 1
    # MHA: nothing to split
    q, k = fake(16, 8, 1024, 64), fake(16, 8, 1024, 64)
    assert L._gqa_split_for(q, k, opts, 80, 16, 1024, fused=True) == 1


@pytest.mark.parametrize("split, part", [(1, 4), (2, 2), (4, 1)])
def test_group_part_is_passed_for_the_jit_to_specialise(split, part):
    # GROUP_PART = GROUP // GROUP_SPLIT, a runtime int the JIT specialises when it is 1: the head
    # loop then compiles away (tritformer.inspect's AOT compiles specialise it the same way)
    meta = lambda *s, dtype=torch.float16: torch.empty(*s, device="meta", dtype=dtype)
    q, o, do = (meta(1, 8, 128, 64) for _ in range(3))
    k, v = (meta(1, 2, 128, 64) for _ in range(2))
    ws = meta(1, 2 * split, 128, 64, dtype=torch.float32)
    lse = meta(1, 8, 128, dtype=torch.float32)
    for det in (True, False):
        plans = KA.plan_backward(do, q, k, v, o, lse, None, lse, q, ws, ws, KA.Options(scale=0.1),
                                 80, split=split, deterministic=det)
        assert plans[1].args["GROUP_SPLIT"] == split and plans[1].args["GROUP_PART"] == part
        assert "GROUP_PART" in plans[1].tune_key
