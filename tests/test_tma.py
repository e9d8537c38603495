"""The sm_90 forward's TMA path (K / V through tensor descriptors, kernels/attention/forward.py
TMA): when the launcher takes it, its numerics in the interpreter (TRITFORMER_TMA=1 turns it on
there; the interpreter runs descriptors as bounds-checked loads and asserts TMA's 16-byte
alignment rules), and the CUDA-only allocator hook with the device call stubbed."""
import pytest
import torch

from tritformer.kernels import attention as K
from tritformer.kernels.attention import launch as L
from tritformer.testing import assert_checks, check_attention, check_varlen_attention


def _plan(q, k, arch, opts=None, v=None):
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    return L.plan_forward(q, k, k if v is None else v, o, lse, opts or K.Options(scale=0.1), arch)[0]


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("what,expect", [
    ("sm90_fp16_d128", True),
    ("sm90_bf16_d64", True),
    ("sm80", True),               # Ampere D=128: descriptors lower to cp.async, fewer registers
    ("sm80_d64", False),          # Ampere D=64: pointer loads (not measured with descriptors)
    ("sm90_fp32", False),         # fp32: 3xTF32 / FMA dots, pointer loads
    ("sm90_d96", False),          # padded head dim: the descriptor box would be [BLOCK_N, 96]
    ("sm90_d256", False),         # not compiled with descriptors
    ("sm90_odd_stride", False),   # row stride 65 elements: not 16-byte aligned
    ("sm90_masked", False),       # the masked variant's small tiles keep pointer loads
    ("sm90_off", False),          # TRITFORMER_TMA=0
])
def test_when_the_forward_takes_tma(what, expect, monkeypatch):
    dtype = (torch.float32 if "fp32" in what else torch.bfloat16 if "bf16" in what
             else torch.float16)
    D = 64 if "d64" in what else 96 if "d96" in what else 256 if "d256" in what else 128
    q, k = _meta(2, 4, 256, D, dtype=dtype), _meta(2, 4, 256, D, dtype=dtype)
    if what == "sm90_odd_stride":
        k = _meta(2, 4, 256, 65)[..., :64]
        q = _meta(2, 4, 256, 64)
    opts = K.Options(scale=0.1)
    if what == "sm90_masked":
        opts = K.Options(scale=0.1, dropout_p=0.1)
    if what == "sm90_off":
        monkeypatch.setenv("TRITFORMER_TMA", "0")
    arch = 80 if what.startswith("sm80") else 90
    launch = _plan(q, k, arch, opts)
    assert launch.constexprs["TMA"] is expect
    if expect:  # configs.TMA_FWD's tiles: sm_90 128x128 (fits only with TMA), sm_80 128x64
        tile = {"BLOCK_M": 128, "BLOCK_N": 64 if arch == 80 else 128}
        assert any(c.kwargs == tile for c in launch.configs)


def test_interpreter_takes_tma_only_when_asked(monkeypatch):
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    assert _plan(q, q, None).constexprs["TMA"] is False
    monkeypatch.setenv("TRITFORMER_TMA", "1")
    assert _plan(q, q, None).constexprs["TMA"] is True


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setenv("TRITFORMER_TMA", "1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward_numerics(tma, dtype, D, causal):
    # Nq=70, Nk=83 with the interpreter's 64x32 tiles: ragged tails on both axes, so the last
    # key tile reads past n_kv (TMA zero-fills those rows) and the diagonal tile is masked
    q = torch.randn(1, 2, 70, D, dtype=dtype)
    k, v = (torch.randn(1, 2, 83, D, dtype=dtype) for _ in range(2))
    assert_checks(check_attention(q, k, v, causal=causal, return_lse=True))


def test_tma_strided_gqa_layout(tma):
    # [B, N, H, D] storage viewed as [B, H, N, D] (the layout of a fused QKV projection): each
    # (batch, head) descriptor starts h * D elements into a row; GQA 4:2 shares the kv heads
    B, N, D = 2, 45, 64
    q = torch.randn(B, N, 4, D, dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(B, N, 2, D, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    assert L.tma_layout_ok(k) and L.tma_layout_ok(v)
    assert_checks(check_attention(q, k, v, causal=True))


def test_tma_varlen_sequences_do_not_read_their_neighbours(tma):
    # one descriptor per (sequence, kv head): the rows past a sequence's end read as zero, not
    # as the next sequence's keys (a flattened [total, D] descriptor would read them)
    lens = [37, 64, 5, 90]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, 2, 64, dtype=torch.float16)
    k, v = (torch.randn(T, 2, 64, dtype=torch.float16) for _ in range(2))
    assert_checks(check_varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True))


def test_tma_launch_sets_the_scratch_allocator(monkeypatch):
    # CUDA only: device-side descriptors need Triton's global-scratch allocator, set before each
    # TMA launch (Triton keeps it per thread); never for pointer launches or off CUDA.
    # Stubbed: triton.set_allocator and torch.empty.
    import triton
    calls = []
    monkeypatch.setattr(triton, "set_allocator", calls.append)
    tma = L.Launch("attn_fwd", L._attn_fwd, {}, {"TMA": True}, None, [], [])
    ptr = L.Launch("attn_fwd", L._attn_fwd, {}, {"TMA": False}, None, [], [])
    L._before_launch(ptr, "cuda")
    L._before_launch(tma, "cpu")
    assert calls == []
    L._before_launch(tma, "cuda")
    assert calls == [L._tma_scratch]
    made = []
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: made.append((a, kw)) or "buf")
    assert L._tma_scratch(512, 128, None) == "buf"
    assert made == [((512,), {"device": "cuda", "dtype": torch.int8})]
