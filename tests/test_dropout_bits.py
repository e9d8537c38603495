"""The attention kernels' dropout keep bits (kernels/attention/_common.py::_dropout_keep): one
Philox4x32-7 draw per 8 keys of an lse row (16-bit halves), the same bit for (seed, lse row, key) whatever
the tile shape and orientation (forward / dQ tiles are [rows, keys], dK/dV's [keys, rows]),
pinned against an independent model of the scheme so that a change of it (or of Triton's
Philox) cannot pass unnoticed."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from tritformer.kernels import attention as K
from tritformer.kernels.attention._common import _dropout_keep

M32 = 0xFFFFFFFF


ROUNDS = 7  # the kernels' Philox4x32 rounds (_common.DROPOUT_ROUNDS)


def _philox4x32(c, k, rounds=ROUNDS):
    """Philox4x32 with `rounds` rounds (Salmon et al. 2011), as Triton's tl.philox computes it."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(rounds):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & M32, p2 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def model_keep(seed, p, row, key):
    """The documented scheme: key j of lse row r is the 16-bit half j % 2 (0: low) of output
    (j // 8) % 4 of the Philox4x32-7 draw with counter (4 (j // 32) + (j % 8) // 2,
    r & 0xffffffff, r >> 32, 0) and key (seed & 0xffffffff, seed >> 32); kept iff that half
    >= min(round(fp32(p) * 2^16), 65535)."""
    g = 4 * (key // 32) + (key % 8) // 2
    out = _philox4x32((g, row & M32, row >> 32, 0), (seed & M32, seed >> 32))[(key // 8) % 4]
    half = (out >> 16) if key % 2 else (out & 0xFFFF)
    return half >= min(int(np.float32(p) * np.float32(2 ** 16) + np.float32(0.5)), 65535)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    # 192 x 512 bits: the drop rate within 5 standard deviations of p (the threshold rounds p
    # to 2^-16, far inside that), and each of a draw's 8 slots (key j mod 32's word and half)
    # too: a slot that read the wrong bits of the word (a stuck half, a shifted threshold)
    # would sit far off p. Independence of neighbours: pairs of adjacent keys (one word, two
    # halves) are both dropped at rate p^2.
    n_rows, n_cols = 192, 512
    drop = ~K.dropout_keep_mask(20261207, p, n_rows, n_cols, "cpu")
    n = drop.numel()
    assert abs(drop.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    slots = drop.view(n_rows, n_cols // 32, 32).float().mean((0, 1))
    assert (slots - p).abs().max().item() < 5 * (p * (1 - p) / (n / 32)) ** 0.5
    both = (drop[:, 0::2] & drop[:, 1::2]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n / 2)) ** 0.5


@triton.jit
def _bits_kernel(Out, row0, n_rows, n_cols, dropout_p, seed,
                 BR: tl.constexpr, BC: tl.constexpr, TRANS: tl.constexpr):
    """Out[r, c] = the keep bit of lse row row0 + r, key c, drawn by [BR, BC] tiles, or by
    transposed [BC, BR] tiles (the dK/dV kernel's orientation) when TRANS."""
    n_col_tiles = tl.cdiv(n_cols, BC)
    r = (tl.program_id(0) // n_col_tiles) * BR + tl.arange(0, BR)
    c = (tl.program_id(0) % n_col_tiles) * BC + tl.arange(0, BC)
    if TRANS:
        keep = _dropout_keep(seed, row0 + r[None, :].to(tl.int64), c[:, None], n_cols, dropout_p)
        tl.store(Out + r[None, :].to(tl.int64) * n_cols + c[:, None], keep,
                 mask=(r[None, :] < n_rows) & (c[:, None] < n_cols))
    else:
        keep = _dropout_keep(seed, row0 + r[:, None].to(tl.int64), c[None, :], n_cols, dropout_p)
        tl.store(Out + r[:, None].to(tl.int64) * n_cols + c[None, :], keep,
                 mask=(r[:, None] < n_rows) & (c[None, :] < n_cols))


def bits(seed, p, row0, n_rows, n_cols, br, bc, trans):
    out = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    grid = (triton.cdiv(n_rows, br) * triton.cdiv(n_cols, bc),)
    _bits_kernel[grid](out, row0, n_rows, n_cols, p, seed, BR=br, BC=bc, TRANS=trans)
    return out


@pytest.mark.parametrize("seed,p", [(1234567, 0.3), (2 ** 31 - 2, 0.1), (2 ** 40 + 77, 0.85)])
def test_mask_kernel_matches_the_documented_philox_scheme(seed, p):
    # dropout_keep_mask is what the reference and the tests use to reproduce the kernels' mask;
    # seed 2^40 + 77 has a high key word, n_cols = 70 a ragged last group of keys
    n_rows, n_cols = 37, 70
    mask = K.dropout_keep_mask(seed, p, n_rows, n_cols, "cpu")
    ref = torch.tensor([[model_keep(seed, p, r, j) for j in range(n_cols)] for r in range(n_rows)])
    assert torch.equal(mask, ref)


def test_rows_past_2_to_the_32_use_the_high_counter_word():
    # lse rows are B * Hq * Nq: the row's high 32 bits are the third counter word, so rows
    # 2^32 apart get different bits (a 32-bit counter would repeat them)
    seed, p, n_rows, n_cols = 99, 0.5, 8, 32
    row0 = 2 ** 32 + 5
    got = bits(seed, p, row0, n_rows, n_cols, 16, 16, False)
    ref = torch.tensor([[model_keep(seed, p, row0 + r, j) for j in range(n_cols)]
                        for r in range(n_rows)])
    assert torch.equal(got, ref)
    assert not torch.equal(got, bits(seed, p, 5, n_rows, n_cols, 16, 16, False))


# bc 16: a tile holds half of a draw's 32-key chunk (either half); 32, 64, 128: whole chunks
@pytest.mark.parametrize("br,bc,trans", [(16, 16, False), (64, 32, False), (32, 128, False),
                                          (16, 64, True), (64, 16, True), (32, 32, True)],
                         ids=lambda v: str(v))
def test_bits_independent_of_tile_shape_and_orientation(br, bc, trans):
    # the forward and dQ kernels draw [BLOCK_M, BLOCK_N] tiles, dK/dV [BLOCK_N, BLOCK_M]: every
    # tile shape and both orientations must give the mask kernel's bits (which the reference
    # uses), rows offset as a head's rows are (row0 = 3 * 41)
    seed, p, row0, n_rows, n_cols = 4321, 0.4, 123, 41, 83
    want = K.dropout_keep_mask(seed, p, row0 + n_rows, n_cols, "cpu")[row0:]
    assert torch.equal(bits(seed, p, row0, n_rows, n_cols, br, bc, trans), want)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("extra,variant", [
    ({}, "dropout"), ({"right": 0}, "dropout"), ({"right": 5}, "dropout"),
    # with another switch: the masked table (those kernels were not measured on big tiles)
    ({"left": 8}, "masked"), ({"softcap": 30.0}, "masked"),
    ({"alibi_slopes": _meta(2, 4, dtype=torch.float32)}, "masked"),
    ({"key_padding_mask": _meta(2, 64, dtype=torch.bool)}, "masked"),
    ({"attn_mask": _meta(2, 4, 64, 64, dtype=torch.bool)}, "masked"),
    ({"cu_seqlens_q": _meta(3, dtype=torch.int32), "cu_seqlens_k": _meta(3, dtype=torch.int32),
      "max_seqlen_q": 64, "max_seqlen_k": 64}, "masked"),
], ids=lambda v: v if isinstance(v, str) else "+".join(v) or "alone")
def test_dropout_alone_takes_its_own_table(extra, variant):
    from tritformer.kernels.attention.options import _variant
    assert _variant(K.Options(scale=0.1, dropout_p=0.1, **extra)) == variant


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_dropout_plans_use_the_dropout_table(head_dim):
    # sm_90 16-bit: the dropout table's big tiles (64+ query rows in the forward and dQ: a
    # warpgroup MMA's M), not the masked table's 32-row ones
    from tritformer.kernels.attention import configs as C
    q, lse = _meta(2, 4, 256, head_dim), _meta(2, 4, 256, dtype=torch.float32)
    opts = K.Options(scale=0.1, right=0, dropout_p=0.1)
    fwd = K.plan_forward(q, q, q, q, lse, opts, 90)[0]
    bwd = {p.name: p for p in K.plan_backward(q, q, q, q, q, lse, None, torch.empty_like(lse),
                                              q.clone(), q.clone(), q.clone(), opts, 90)}
    for launch, kernel in ((fwd, "fwd"), (bwd["attn_bwd_dkdv"], "bwd_dkdv"),
                           (bwd["attn_bwd_dq"], "bwd_dq")):
        assert launch.configs == C.configs_for(kernel, 90, head_dim, 2, "dropout"), kernel
        assert launch.constexprs["DROPOUT"]
    for launch in (fwd, bwd["attn_bwd_dq"]):
        assert min(c.kwargs["BLOCK_M"] for c in launch.configs) >= 64, launch.configs
