"""decode_attention's serving features in the split-KV kernel (issue #19 part 3): paged caches
(block_table), cache_leftpad, cache_batch_idx, window / ALiBi / softcap, and non-causal Nq > 1,
against the float64 reference (which gathers the paged cache in torch), in the interpreter.

Interpreter tiles: BLOCK_N = 16 keys (kernels/decode.py INTERPRETER_CONFIGS), so the lengths
below cross tile edges: the kernel's three key ranges are the left range (left padding or the
window's left edge, masked), the whole tiles every row sees (no mask) and the right range (the
causal diagonal / window's right edge and the ragged tail, masked). The default num_splits of
these shapes is one split per tile; num_splits=1 runs the single-split store instead of the
combine kernel.
"""
import pytest
import torch

import tritformer
from tritformer import reference
from tritformer.kernels import decode as KD
from tritformer.ops import decode as ops_decode
from tritformer.testing import assert_checks, check_decode_attention

B, HQ, HKV, D = 3, 4, 2, 24  # GQA 2:1; D = 24 pads to a 32-wide tile (the head-dim mask)


def _cache(n_max, dtype, lens, garbage=float("nan")):
    k = torch.randn(B, HKV, n_max, D, dtype=dtype)
    v = torch.randn(B, HKV, n_max, D, dtype=dtype)
    for b, n in enumerate(lens):
        k[b, :, n:] = garbage
        v[b, :, n:] = garbage
    return k, v, torch.tensor(lens, dtype=torch.int32)


def _paged(k, v, page, extra_blocks=3):
    """The caches [B, Hkv, Nmax, D] as pages [num_blocks, Hkv, page, D] in a permuted order,
    with NaN in every block no row uses, and the block table [B, Nmax / page] int32."""
    n_blocks = k.shape[2] // page
    total = B * n_blocks + extra_blocks
    perm = torch.randperm(total)[:B * n_blocks].view(B, n_blocks)
    kp = torch.full((total, HKV, page, D), float("nan"), dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    for b in range(B):
        for n in range(n_blocks):
            kp[perm[b, n]] = k[b, :, n * page:(n + 1) * page]
            vp[perm[b, n]] = v[b, :, n * page:(n + 1) * page]
    return kp, vp, perm.to(torch.int32)


# page 16 = one interpreter tile per page, 32 = two tiles per page, 8 = two pages per tile
# (any page size works, FlashAttention's 16-multiples included); lengths end mid-page / mid-tile
@pytest.mark.parametrize("page, num_splits", [(16, None), (32, 1), (8, None)])
@pytest.mark.parametrize("n_q", [1, 3])
def test_paged_equals_contiguous(page, n_q, num_splits):
    # the same keys in the same tiles and splits: bitwise the contiguous call (which
    # tests/test_decode.py checks against float64; the paged reference: test_paged_fa_layout_view)
    dtype = torch.float16
    k, v, lens = _cache(64, dtype, [64, 37, 3])
    q = torch.randn(B, HQ, n_q, D, dtype=dtype)
    kp, vp, table = _paged(k, v, page)
    out, lse = tritformer.decode_attention(q, kp, vp, lens, block_table=table,
                                           num_splits=num_splits, return_lse=True)
    ref, ref_lse = tritformer.decode_attention(q, k, v, lens, num_splits=num_splits,
                                               return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_paged_fa_layout_view(dtype):
    # FlashAttention's / vLLM's page storage [num_blocks, page, Hkv, D], read through its
    # transpose(1, 2) view, and a block table that is a strided view (every other column)
    k, v, lens = _cache(48, dtype, [48, 20, 0])
    kp, vp, table = _paged(k, v, 16)
    kp_fa, vp_fa = kp.transpose(1, 2).contiguous(), vp.transpose(1, 2).contiguous()
    wide = torch.zeros(B, 2 * table.shape[1], dtype=torch.int32)
    wide[:, ::2] = table
    q = torch.randn(B, 1, HQ, D, dtype=dtype).transpose(1, 2)
    out = tritformer.decode_attention(q, kp_fa.transpose(1, 2), vp_fa.transpose(1, 2), lens,
                                      block_table=wide[:, ::2])
    assert torch.equal(out, tritformer.decode_attention(q, kp, vp, lens, block_table=table))
    assert_checks(check_decode_attention(q, kp_fa.transpose(1, 2), vp_fa.transpose(1, 2), lens,
                                         block_table=wide[:, ::2]), "paged FA layout")


# left padding inside the first tile (5), past a tile edge (17), equal to the length (an
# empty row: 0 and lse -inf); with Nq = 3 causal rows and with a window
@pytest.mark.parametrize("dtype, n_q, paged", [(torch.float16, 1, False), (torch.float16, 3, True),
                                               (torch.float32, 3, False), (torch.float32, 1, True)])
def test_leftpad(dtype, n_q, paged):
    lens, pads = [50, 40, 9], [5, 17, 9]
    k, v, seqlens = _cache(64, dtype, lens)
    for b, p in enumerate(pads):  # keys before the padding end are garbage, never read
        k[b, :, :p] = float("nan")
        v[b, :, :p] = float("nan")
    q = torch.randn(B, HQ, n_q, D, dtype=dtype)
    opts = {"cache_leftpad": torch.tensor(pads, dtype=torch.int32)}
    if paged:
        k, v, opts["block_table"] = _paged(k, v, 16)
    assert_checks(check_decode_attention(q, k, v, seqlens, **opts), "leftpad")
    out = tritformer.decode_attention(q, k, v, seqlens, **opts)
    assert out[2].abs().max() == 0  # the row whose padding covers all its keys


def test_batch_idx():
    # rows read cache rows [4, 0, 2] of a 5-row cache; a strided index view (copied dense)
    dtype = torch.bfloat16
    k = torch.randn(5, HKV, 50, D, dtype=dtype)
    v = torch.randn(5, HKV, 50, D, dtype=dtype)
    idx = torch.tensor([[4, 9], [0, 9], [2, 9]], dtype=torch.int32)[:, 0]
    lens = torch.tensor([50, 33, 16], dtype=torch.int32)
    q = torch.randn(B, HQ, 2, D, dtype=dtype)
    out = tritformer.decode_attention(q, k, v, lens, cache_batch_idx=idx)
    gathered = tritformer.decode_attention(q, k[idx.long()], v[idx.long()], lens)
    assert torch.equal(out, gathered)
    assert_checks(check_decode_attention(q, k, v, lens, cache_batch_idx=idx), "batch idx")


# each case names the kernel path it adds: WIN_LEFT (left range + all_lo), WIN_RIGHT with
# right > 0 (Nq > 1: the diagonal shifted), non-causal Nq > 1 (no right bound: only the ragged
# tail is masked), HAS_ALIBI per row (rows of a tile are different query heads), [B, Hq] slopes,
# SOFTCAP, and everything at once with paging and left padding
CASES = {
    "window-left": dict(window=(10, -1)),
    "window-left-causal": dict(window=(10, 0)),
    "window-both": dict(causal=False, window=(7, 2)),
    "non-causal": dict(causal=False),
    "alibi": dict(alibi=(HQ,)),
    "alibi-per-batch-noncausal": dict(causal=False, alibi=(B, HQ)),
    "softcap": dict(softcap=2.0),
    "all": dict(window=(12, 0), alibi=(HQ,), softcap=3.0, leftpad=True, paged=True),
}


@pytest.mark.parametrize("case, dtype", [(c, torch.float16) for c in CASES]
                         + [("softcap", torch.float32), ("all", torch.float32)])
@pytest.mark.parametrize("n_q", [1, 4])
def test_masks_and_scores(case, n_q, dtype):
    c = dict(CASES[case])
    k, v, lens = _cache(64, dtype, [64, 45, 20])
    q = torch.randn(B, HQ, n_q, D, dtype=dtype)
    opts = {key: c[key] for key in ("causal", "window", "softcap") if key in c}
    if "alibi" in c:
        opts["alibi_slopes"] = torch.rand(c["alibi"]) * 0.5 + 0.1
    if c.get("leftpad"):
        opts["cache_leftpad"] = torch.tensor([3, 0, 18], dtype=torch.int32)
    if c.get("paged"):
        k, v, opts["block_table"] = _paged(k, v, 16)
    for splits in (None, 1):
        assert_checks(check_decode_attention(q, k, v, lens, num_splits=splits, **opts), case)


def test_window_equals_attention():
    # a window in decode is attention's window on the row's keys (bottom-right aligned)
    dtype = torch.float32
    k, v, lens = _cache(48, dtype, [48, 48, 48])
    q = torch.randn(B, HQ, 4, D, dtype=dtype)
    out = tritformer.decode_attention(q, k, v, lens, causal=False, window=(9, 1))
    ref = reference.attention(q.double(), k.double(), v.double(), window=(9, 1))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_index_tensors_never_read_outside_under_clamp():
    # what torch.compile would pass unchecked: the kernel clamps lengths, padding, batch
    # indices and block ids (the interpreter's bounds checker, conftest, sees every access)
    dtype = torch.float16
    k, v, lens = _cache(32, dtype, [32, 32, 32])
    kp, vp, table = _paged(k, v, 16)
    q = torch.randn(B, HQ, 1, D, dtype=dtype)
    bad = dict(block_table=table * 0 + 10 ** 6, cache_leftpad=torch.full((B,), -7, dtype=torch.int32))
    out, _ = KD.decode_forward(q, kp, vp, torch.full((B,), 10 ** 6, dtype=torch.int32),
                               D ** -0.5, **bad)
    assert out.shape == q.shape  # values: any; the checker raises on an access outside
    k2 = torch.randn(2, HKV, 32, D, dtype=dtype)
    idx = torch.tensor([-1, 5, 1], dtype=torch.int32)  # clamped to rows 0, 1, 1
    out, _ = KD.decode_forward(q, k2, k2, lens, D ** -0.5, cache_batch_idx=idx)
    ref, _ = KD.decode_forward(q, k2[[0, 1, 1]], k2[[0, 1, 1]], lens, D ** -0.5)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad, match", [
    (dict(block_table=torch.zeros(B, 2, dtype=torch.int64)), "block_table must be int32"),
    (dict(block_table=torch.zeros(B + 1, 2, dtype=torch.int32)), r"block_table must have shape"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3], [4, 99]], dtype=torch.int32)),
     r"block_table\[2, 1\] = 99 must be a block"),
    (dict(cache_leftpad=torch.tensor([0, 41, 0], dtype=torch.int32)), r"cache_leftpad\[1\] = 41"),
    (dict(cache_batch_idx=torch.tensor([0, 3, 1], dtype=torch.int32)), r"cache_batch_idx\[1\] = 3"),
    (dict(cache_batch_idx=torch.tensor([0, 1, 2]), ), "cache_batch_idx must be int32"),
    (dict(cache_batch_idx=torch.tensor([0, 1, 2], dtype=torch.int32),
          block_table=torch.zeros(B, 2, dtype=torch.int32)), "cannot be combined"),
    (dict(window=(1, 2, 3)), "window must be"),
    (dict(alibi_slopes=torch.ones(HQ + 1)), "alibi_slopes must have shape"),
    (dict(softcap=-1.0), "softcap"),
])
def test_errors(bad, match):
    k, v, lens = _cache(32, torch.float16, [32, 40 if "cache_leftpad" in bad else 20, 9])
    lens[1] = 20 if "cache_leftpad" not in bad else 40
    if "block_table" in bad:
        k = v = torch.zeros(6, HKV, 16, D, dtype=torch.float16)
        lens = torch.tensor([32, 32, 20], dtype=torch.int32)
    if "cache_leftpad" in bad:
        k = v = torch.zeros(B, HKV, 48, D, dtype=torch.float16)
    q = torch.randn(B, HQ, 1, D, dtype=torch.float16)
    with pytest.raises((ValueError, TypeError), match=match):
        tritformer.decode_attention(q, k, v, lens, **bad)


def test_unused_block_table_entries_not_checked():
    # serving engines pad block tables: entries past a row's length are never read
    k, v, lens = _cache(32, torch.float16, [32, 16, 0])
    kp, vp, table = _paged(k, v, 16)
    table[1, 1] = -1
    table[2, :] = 10 ** 6
    q = torch.randn(B, HQ, 1, D, dtype=torch.float16)
    assert_checks(check_decode_attention(q, kp, vp, lens, block_table=table.clamp(0, kp.shape[0] - 1)),
                  "padded table (reference)")
    tritformer.decode_attention(q, kp, vp, lens, block_table=table)


def test_torch_backend(monkeypatch):
    # the "torch" backend (CPU without the interpreter) takes every option through the same
    # reference.decode_inputs gather + SDPA, no kernel
    monkeypatch.setattr(ops_decode, "backend_for", lambda t: "torch")
    monkeypatch.setattr(KD, "decode_forward", lambda *a, **kw: pytest.fail("kernel launched"))
    k, v, lens = _cache(64, torch.float32, [64, 45, 20])
    kp, vp, table = _paged(k, v, 16)
    q = torch.randn(B, HQ, 3, D)
    opts = dict(block_table=table, cache_leftpad=torch.tensor([3, 0, 18], dtype=torch.int32),
                window=(12, 0), alibi_slopes=torch.rand(HQ), softcap=3.0)
    assert_checks(check_decode_attention(q, kp, vp, lens, **opts), "torch backend")


def test_opcheck_every_option():
    # the custom op's schema, fake and registrations with every optional tensor and scalar set
    k, v, lens = _cache(32, torch.float32, [32, 20, 5])
    kp, vp, table = _paged(k.nan_to_num(), v.nan_to_num(), 16)
    q = torch.randn(B, HQ, 2, D)
    torch.library.opcheck(torch.ops.tritformer.decode_attention.default,
                          (q, kp, vp, lens, 0.3, 2, 8, 1, torch.rand(B, HQ), 2.5, table,
                           torch.tensor([1, 0, 2], dtype=torch.int32), None))


def test_compile_fullgraph_paged():
    torch._dynamo.reset()
    k, v, lens = _cache(32, torch.float32, [32, 20, 5])
    kp, vp, table = _paged(k.nan_to_num(), v.nan_to_num(), 16)
    q = torch.randn(B, HQ, 1, D)

    def step(q, kp, vp, lens, table):
        return tritformer.decode_attention(q, kp, vp, lens, block_table=table, softcap=4.0)

    compiled = torch.compile(step, fullgraph=True)  # a graph break would raise here
    torch.testing.assert_close(compiled(q, kp, vp, lens, table), step(q, kp, vp, lens, table),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# decode_attention(k_new=, v_new=, rotary_*): append (tritformer.kvcache_append) then attend
# ---------------------------------------------------------------------------------------------
def _rotary(n, rotary_dim, dtype=torch.float32):
    angles = torch.arange(n)[:, None] * (1.0 / 10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim))
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("paged, causal, interleaved", [
    (False, True, False),   # contiguous cache, q rotated per row (causal positions)
    (True, False, True),    # paged, non-causal Nq > 1: q rotated at the row's start, GPT-J pairs
])
def test_append_then_attend(paged, causal, interleaved):
    dtype = torch.float16
    k, v, lens = _cache(64, dtype, [40, 17, 0], garbage=0.0)
    opts = {}
    if paged:
        k, v, opts["block_table"] = _paged(k, v, 16)
    q = torch.randn(B, HQ, 3, D, dtype=dtype)
    k_new = torch.randn(B, HKV, 3, D, dtype=dtype)
    v_new = torch.randn(B, HKV, 3, D, dtype=dtype)
    cos, sin = _rotary(64, 16)
    rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    k2, v2 = k.clone(), v.clone()
    out = tritformer.decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new, causal=causal,
                                      **rot, **opts)
    # the same two steps by hand: bitwise
    q_rot = tritformer.kvcache_append(k2, v2, k_new, v_new, lens, q=q, **rot,
                                      q_positions="causal" if causal else "start", **opts)
    same = dict(rtol=0, atol=0, equal_nan=True)  # unused pages hold NaN
    torch.testing.assert_close(k, k2, **same)
    torch.testing.assert_close(v, v2, **same)
    ref = tritformer.decode_attention(q_rot, k2, v2, lens + 3, causal=causal, **opts)
    assert torch.equal(out, ref)
    assert_checks(check_decode_attention(q_rot, k2, v2, lens + 3, causal=causal, **opts), "append")


def test_append_refused_before_any_write():
    k, v, lens = _cache(32, torch.float16, [30, 10, 0], garbage=0.0)
    k0 = k.clone()
    q = torch.randn(B, HQ, 1, D, dtype=torch.float16)
    new = torch.randn(B, HKV, 3, D, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        tritformer.decode_attention(q, k, v, lens, k_new=new)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        tritformer.decode_attention(q, k, v, k_new=new, v_new=new)
    # a decode-side error (bad slopes) and an append-side one (30 + 3 > 32): nothing written
    with pytest.raises(ValueError, match="alibi_slopes"):
        tritformer.decode_attention(q, k, v, lens * 0, k_new=new, v_new=new,
                                    alibi_slopes=torch.ones(HQ + 1))
    with pytest.raises(ValueError):
        tritformer.decode_attention(q, k, v, lens, k_new=new, v_new=new)
    assert torch.equal(k, k0)


def test_flash_attn_with_kvcache_is_the_native_call():
    # FA's layout [B, N, H, D] (pages [num_blocks, page, Hkv, D]) on the same storage as
    # the native call's transposed views: bitwise equal outputs and caches
    from tritformer.flash_attn import flash_attn_with_kvcache
    dtype = torch.bfloat16
    k, v, lens = _cache(64, dtype, [40, 17, 5], garbage=0.0)
    kp, vp, table = _paged(k, v, 16)
    kp_fa, vp_fa = kp.transpose(1, 2).contiguous(), vp.transpose(1, 2).contiguous()
    q = torch.randn(B, 2, HQ, D, dtype=dtype)
    k_new, v_new = torch.randn(B, 2, HKV, D, dtype=dtype), torch.randn(B, 2, HKV, D, dtype=dtype)
    cos, sin = _rotary(64, 24)
    slopes = torch.rand(HQ)
    kw = dict(rotary_cos=cos, rotary_sin=sin, block_table=table, alibi_slopes=slopes,
              window_size=(20, 0), softcap=5.0, cache_leftpad=torch.tensor([2, 0, 1], dtype=torch.int32))
    out_fa = flash_attn_with_kvcache(q, kp_fa, vp_fa, k_new, v_new, cache_seqlens=lens,
                                     rotary_interleaved=False, **kw)
    kw["window"] = kw.pop("window_size")
    out = tritformer.decode_attention(q.transpose(1, 2), kp, vp, lens, k_new=k_new.transpose(1, 2),
                                      v_new=v_new.transpose(1, 2), **kw)
    assert torch.equal(out_fa, out.transpose(1, 2))
    same = dict(rtol=0, atol=0, equal_nan=True)  # unused pages hold NaN
    torch.testing.assert_close(kp_fa.transpose(1, 2), kp, **same)
    torch.testing.assert_close(vp_fa.transpose(1, 2), vp, **same)
