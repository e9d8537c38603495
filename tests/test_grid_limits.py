"""Launch grids within CUDA's limits for any shape the checks accept.

CUDA takes 2^31 - 1 blocks on grid axis x and 65,535 on y and z. The launchers put every program
on axis x (kernels/_launch.flat_grid) and the kernels decode (tile, head, batch) from it, so huge
batch and head counts launch. These tests build the launch plans from meta tensors (no memory,
no device) for such shapes and check every candidate config's grid on every config table; the
interpreted runs of the whole suite check that the decoding is right.
"""
import pytest
import torch

from tritformer.kernels import _launch
from tritformer.kernels import attention as KA
from tritformer.kernels import decode as KD

ARCHES = [None, 80, 90]  # the interpreter's config, the Ampere and the Hopper tables


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _assert_grids(plans):
    assert plans
    for launch in plans:
        for cfg in launch.configs:
            grid = launch.grid(cfg.kwargs)
            assert len(grid) <= 3, launch.name
            for axis, (n, limit) in enumerate(zip(grid, _launch.MAX_GRID)):
                assert 1 <= n <= limit, (launch.name, cfg, axis, n)


def _attention_plans(B, Hq, Hkv, N, D, arch, opts):
    q, o, do = (_meta(B, Hq, N, D) for _ in range(3))
    k, v = (_meta(B, Hkv, N, D) for _ in range(2))
    lse = _meta(B, Hq, N, dtype=torch.float32)
    return (KA.plan_forward(q, k, v, o, lse, opts, arch)
            + KA.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q, k, v, opts,
                               arch))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("B,Hq,Hkv,N", [
    (70_000, 8, 2, 128),   # batch past 65,535 (many short sequences)
    (2, 70_000, 70_000, 64),  # heads past 65,535
    (1, 1, 1, 2 ** 22),    # 4M-token context: 2^22 / 16 query tiles
])
def test_attention_grids(B, Hq, Hkv, N, arch):
    _assert_grids(_attention_plans(B, Hq, Hkv, N, 64, arch, KA.Options(scale=0.125, right=0)))


@pytest.mark.parametrize("arch", ARCHES)
def test_masked_attention_grids(arch):
    B, H, N = 70_000, 4, 64
    opts = KA.Options(scale=0.125, right=0, key_padding_mask=_meta(B, N, dtype=torch.bool),
                      alibi_slopes=_meta(B, H, dtype=torch.float32), dropout_p=0.1)
    _assert_grids(_attention_plans(B, H, H, N, 64, arch, opts))


@pytest.mark.parametrize("arch", ARCHES)
def test_varlen_grids(arch):
    n_seq, H, D = 100_000, 4, 64
    T = 4 * n_seq
    view = lambda h: _meta(T, h, D).transpose(0, 1)[None]
    q, k, v, o, do = (view(H) for _ in range(5))
    lse = _meta(1, H, T, dtype=torch.float32)
    cu = _meta(n_seq + 1, dtype=torch.int32)
    opts = KA.Options(scale=0.125, right=0, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                      max_seqlen_k=4)
    _assert_grids(KA.plan_forward(q, k, v, o, lse, opts, arch)
                  + KA.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q, k, v,
                                     opts, arch))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("num_splits", [1, 3])  # split kernel alone; split + combine
def test_decode_grids(arch, num_splits):
    B, Hq, Hkv, D = 70_000, 32, 8, 128  # B * Hkv = 560,000 programs per split
    q = _meta(B, Hq, 1, D)
    k = _meta(B, Hkv, 4096, D)
    lse = _meta(B, Hq, 1, dtype=torch.float32)
    parts = (_meta(B, Hq, 1, num_splits, D, dtype=torch.float32),
             _meta(B, Hq, 1, num_splits, dtype=torch.float32))
    _assert_grids(KD.plan_decode(q, k, k, _meta(B, dtype=torch.int32), q, lse, *parts, 0.1,
                                 num_splits, arch))


def test_flat_grid_refuses_more_than_cuda_takes():
    assert _launch.flat_grid(3, 5, 7) == (105,)
    with pytest.raises(ValueError, match="grid limit"):
        _launch.flat_grid(2 ** 16, 2 ** 16)
