"""varlen_attention over a paged KV cache (block_table) and with seqused_k (issue #19 part 3).

The forward kernel reads K/V through the block table itself (no gather): a paged run must give
exactly the packed run's result (same tiles, same order, same arithmetic: bitwise equal), and
both meet the float64 reference within the numerics criterion. The caches are built with
permuted tables and every slot no sequence uses (free blocks, the tail of a sequence's last
page, table entries past its last block) filled with garbage (NaN, -1), which must never reach
a result; tests/conftest.py's bounds checker fails any load outside k / v / block_table.

Interpreter tiles (kernels/attention/configs.py): 64 query rows x 32 keys. The kernel gathers
a block id per key; the page sizes place page boundaries at every tile edge (32), every other
tile (64), inside tiles (16, 8, 1) and off the tile grid (48). PAGE is a constexpr: each page
size is its own kernel.
"""
import pytest
import torch

import tritformer
from tritformer import numerics, reference
from tritformer.kernels import attention as K
from tritformer.numerics import assert_checks
from tritformer.ops import attention as ops_attention

NAN = float("nan")


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()],
                        dtype=torch.int32)


def packed(lens_q, lens_k, Hq=4, Hkv=2, D=32, dtype=torch.float16):
    q = torch.randn(sum(lens_q), Hq, D, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def paginate(k, v, cu_k, page, spare_cols=1):
    """Paged caches [num_blocks, page, Hkv, D] holding the packed keys of each sequence of
    cu_k, and the int32 table [num_seqs, max_blocks + spare_cols]: blocks scattered by a
    permutation among twice as many as needed (plus 3), free blocks and the tail of each last
    page NaN, table entries past a sequence's blocks -1 (never read: the kernel reads block
    ids only for keys below the length; a masked key's id is clamped)."""
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    n_blk = [-(-n // page) for n in lens]
    width = max(n_blk, default=0) + spare_cols
    total = 2 * sum(n_blk) + 3
    perm = torch.randperm(total).tolist()
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    kp = torch.full((total, page, *k.shape[1:]), NAN, dtype=k.dtype)
    vp = torch.full_like(kp, NAN)
    start = cu_k.tolist()
    for s, n in enumerate(lens):
        for b in range(n_blk[s]):
            blk = perm.pop()
            table[s, b] = blk
            lo, hi = b * page, min((b + 1) * page, n)
            kp[blk, :hi - lo] = k[start[s] + lo:start[s] + hi]
            vp[blk, :hi - lo] = v[start[s] + lo:start[s] + hi]
    return kp, vp, table


def run(q, k, v, cu_q, cu_k, **kw):
    lens = lambda c: int((c[1:] - c[:-1]).max()) if c.numel() > 1 else 0
    with torch.no_grad():
        return tritformer.varlen_attention(q, k, v, cu_q, cu_k, lens(cu_q), lens(cu_k),
                                           return_lse=True, **kw)


def assert_equal(got, want):
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()


# self-attention with a sequence ending mid-page and one without keys or queries; a
# cross-attention case (chunked prefill: a few new queries against a longer cache)
LENS = ([40, 0, 33, 5], [40, 0, 70, 5])
CHUNKED = ([7, 16, 1], [50, 16, 33])


@pytest.mark.parametrize("page,lens,kw", [
    (32, LENS, {}),                                 # one page per key tile
    (64, LENS, {}),                                 # two key tiles per page
    (16, LENS, {}),                                 # two pages per key tile
    (48, LENS, {}),                                 # a page boundary inside a key tile
    (8, LENS, {}),                                  # four pages per key tile
    (16, LENS, {"causal": True}),
    (32, CHUNKED, {"causal": True}),                # bottom-right: queries at the cache's end
    (64, CHUNKED, {"window": (20, 0)}),             # left edge: key tiles skipped
    (16, CHUNKED, {"window": (20, 0)}),
    (16, CHUNKED, {"alibi_slopes": "per_seq", "softcap": 5.0}),
], ids=["p32", "p64", "p16", "p48", "p8", "p16-causal", "p32-chunked-causal",
        "p64-chunked-window", "p16-chunked-window", "p16-chunked-alibi-softcap"])
def test_paged_equals_packed(page, lens, kw):
    # the kernel loads the same key values in the same tiles: out and lse bitwise equal
    q, k, v, cu_q, cu_k = packed(*lens)
    if kw.get("alibi_slopes") == "per_seq":
        kw = {**kw, "alibi_slopes": torch.rand(len(lens[0]), 4)}
    kp, vp, table = paginate(k, v, cu_k, page)
    assert_equal(run(q, kp, vp, cu_q, cu_k, block_table=table, **kw), run(q, k, v, cu_q, cu_k, **kw))


def check_against_reference(q, k, v, cu_q, cu_k, block_table=None, seqused_k=None, **kw):
    """Kernel vs the float64 reference over the keys it must read (gathered packed by
    reference.varlen_kv_used), bounded by the same reference in q's dtype: out and lse."""
    out, lse = run(q, k, v, cu_q, cu_k, block_table=block_table, seqused_k=seqused_k, **kw)
    kk, vv, cu_used = reference.varlen_kv_used(k, v, cu_k, block_table, seqused_k)
    slopes = kw.pop("alibi_slopes", None)
    ref, ref_lse = reference.varlen_attention(
        q.double(), kk.double(), vv.double(), cu_q, cu_used, return_lse=True,
        alibi_slopes=None if slopes is None else slopes.double(), **kw)
    base, base_lse = reference.varlen_attention(q, kk, vv, cu_q, cu_used, return_lse=True,
                                                alibi_slopes=slopes, **kw)
    assert_checks([numerics.check("out", out, ref, base), numerics.check("lse", lse, ref_lse, base_lse)])


@pytest.mark.parametrize("dtype,D", [
    (torch.float16, 40), (torch.bfloat16, 40),
    (torch.float32, 40),   # BLOCK_D 64: exact scores at full width (options._attn_dot_precision)
    (torch.float32, 100),  # BLOCK_D 128: exact scores in slices of D, read through each key's page
], ids=str)
def test_paged_dtypes_against_reference(dtype, D):
    # D=40 / 100: head dims padded on chip (BLOCK_D 64 / 128); GQA 4:2
    q, k, v, cu_q, cu_k = packed(*CHUNKED, D=D, dtype=dtype)
    kp, vp, table = paginate(k, v, cu_k, 16)
    check_against_reference(q, kp, vp, cu_q, cu_k, table, causal=True, alibi_slopes=torch.rand(4))


def test_mqa_page_of_one_key():
    # MQA (Hkv = 1) and the smallest page: every key in its own block
    q, k, v, cu_q, cu_k = packed([9, 20], [9, 37], Hq=3, Hkv=1, D=16)
    kp, vp, table = paginate(k, v, cu_k, 1)
    assert_equal(run(q, kp, vp, cu_q, cu_k, block_table=table, causal=True),
                 run(q, k, v, cu_q, cu_k, causal=True))


def test_paged_dropout_draws_the_packed_bits():
    # the Philox counter is (lse row, key position in the sequence): the same keep bits
    q, k, v, cu_q, cu_k = packed(*CHUNKED)
    kp, vp, table = paginate(k, v, cu_k, 16)
    torch.manual_seed(7)
    paged = run(q, kp, vp, cu_q, cu_k, block_table=table, dropout_p=0.3)
    torch.manual_seed(7)
    assert_equal(paged, run(q, k, v, cu_q, cu_k, dropout_p=0.3))


def truncate(k, v, cu_k, used):
    """The packed keys of the first used[s] keys of each sequence, and their cu_seqlens."""
    ck = cu_k.tolist()
    rows = torch.cat([torch.arange(ck[s], ck[s] + n) for s, n in enumerate(used)])
    return k[rows], v[rows], cu(used)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}], ids=["full", "causal"])
def test_seqused_k_equals_the_truncated_sequences(paged, kw):
    # sequence s uses its first seqused_k[s] keys; causal aligns to that length. Keys past it
    # hold NaN: never read. Lengths: all keys, none, a mid-page cut, one key
    q, k, v, cu_q, cu_k = packed([12, 5, 30, 3], [40, 9, 70, 20])
    used = [40, 0, 37, 1]
    kk, vv, cu_used = truncate(k, v, cu_k, used)
    want = run(q, kk, vv, cu_q, cu_used, **kw)
    for s, (a, b) in enumerate(zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        k[a + used[s]:b] = NAN
        v[a + used[s]:b] = NAN
    table = None
    if paged:
        k, v, table = paginate(k, v, cu_k, 16)
    got = run(q, k, v, cu_q, cu_k, block_table=table,
              seqused_k=torch.tensor(used, dtype=torch.int32), **kw)
    assert_equal(got, want)
    rows = slice(int(cu_q[1]), int(cu_q[2]))  # the sequence with no used key: out 0, lse -inf
    assert (got[0][rows] == 0).all() and torch.isneginf(got[1][:, rows]).all()


def test_seqused_k_against_reference():
    q, k, v, cu_q, cu_k = packed(*CHUNKED, dtype=torch.bfloat16)
    kp, vp, table = paginate(k, v, cu_k, 32)
    used = torch.tensor([45, 3, 33], dtype=torch.int32)
    check_against_reference(q, kp, vp, cu_q, cu_k, table, used, window=(16, 0), softcap=4.0)


def test_strided_index_tensors_are_read_through_their_strides():
    # block_table a column slice of a wider buffer (row stride != its width), seqused_k and
    # cu_seqlens every other element of a longer tensor: read as views, equal to contiguous
    q, k, v, cu_q, cu_k = packed(*LENS)
    kp, vp, table = paginate(k, v, cu_k, 16)
    used = torch.tensor([33, 0, 70, 2], dtype=torch.int32)
    want = run(q, kp, vp, cu_q, cu_k, block_table=table, seqused_k=used, causal=True)
    wide = torch.full((table.shape[0], 3 * table.shape[1]), -7, dtype=torch.int32)
    wide[:, 1::3] = table
    spread = lambda t: torch.stack([t, torch.full_like(t, -9)], 1).flatten()[::2]
    views = [wide[:, 1::3], spread(used), spread(cu_q), spread(cu_k)]
    assert not any(t.is_contiguous() for t in views)
    got = run(q, kp, vp, views[2], views[3], block_table=views[0], seqused_k=views[1], causal=True)
    assert_equal(got, want)


def test_strided_paged_cache():
    # a cache that is a slice of a bigger buffer (block stride != page * Hkv * D): any strides
    q, k, v, cu_q, cu_k = packed(*CHUNKED)
    kp, vp, table = paginate(k, v, cu_k, 16)
    big_k = torch.full((kp.shape[0], 16, 3, 40), NAN, dtype=kp.dtype)
    big_v = big_k.clone()
    big_k[:, :, :2, :32], big_v[:, :, :2, :32] = kp, vp
    ks, vs = big_k[:, :, :2, :32], big_v[:, :, :2, :32]
    assert not ks.is_contiguous()
    assert_equal(run(q, ks, vs, cu_q, cu_k, block_table=table), run(q, kp, vp, cu_q, cu_k, block_table=table))


def test_no_blocks_at_all():
    # every sequence without keys: an empty cache and a zero-width table; rows are 0
    q = torch.randn(10, 4, 32, dtype=torch.float16)
    empty = torch.empty(0, 16, 2, 32, dtype=torch.float16)
    cu_q, cu_k = cu([4, 6]), cu([0, 0])
    out, lse = run(q, empty, empty, cu_q, cu_k, block_table=torch.empty(2, 0, dtype=torch.int32))
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # NaN blocks read: garbage in
def test_garbage_table_stays_inside_the_cache():
    # what compiled graphs may pass (the host checks are skipped there): out-of-range and
    # negative block ids, a table shorter than the lengths, seqused_k past the length. The op
    # is called directly (no host check); the bounds checker fails any read outside k / v
    q, k, v, cu_q, cu_k = packed(*CHUNKED)
    kp, vp, _ = paginate(k, v, cu_k, 16)
    table = torch.tensor([[1, 10 ** 6, -5], [-1, 2, 3], [2 ** 31 - 1, 0, 7]], dtype=torch.int32)
    used = torch.tensor([10 ** 6, -3, 40], dtype=torch.int32)
    view = lambda t: t.transpose(0, 1).unsqueeze(0)
    paged = lambda t: t.permute(0, 2, 1, 3)
    with torch.no_grad():
        out, lse = torch.ops.tritformer.varlen_paged_fwd(
            view(q), paged(kp), paged(vp), cu_q, cu_k, table, used, None, None, None, None, 0,
            0.0, 0.0, 16, 50, False)
    assert out.shape == view(q).shape and lse.shape == (1, 4, q.shape[0])


def test_compiled_paged_call():
    # torch.compile(fullgraph=True) traces the paged path (no graph break, no host sync)
    q, k, v, cu_q, cu_k = packed(*CHUNKED)
    kp, vp, table = paginate(k, v, cu_k, 16)
    used = torch.tensor([50, 10, 33], dtype=torch.int32)
    fn = lambda q, kp, vp: tritformer.varlen_attention(q, kp, vp, cu_q, cu_k, 16, 50, causal=True,
                                                       block_table=table, seqused_k=used)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, kp, vp)
        assert torch.equal(got, fn(q, kp, vp))


def test_opcheck():
    q, k, v, cu_q, cu_k = packed([5, 9], [9, 20], D=16)
    kp, vp, table = paginate(k, v, cu_k, 8)
    used = torch.tensor([9, 11], dtype=torch.int32)
    args = (q.transpose(0, 1)[None], kp.permute(0, 2, 1, 3), vp.permute(0, 2, 1, 3), cu_q, cu_k,
            table, used, None, None, 0.25, None, 0, 0.0, 0.0, 9, 20, True)
    torch.library.opcheck(torch.ops.tritformer.varlen_paged_fwd.default, args)


def test_torch_backend_gathers_the_pages(monkeypatch):
    # the CPU fallback (no interpreter) gathers the used keys in torch: the same values as
    # the packed call, so the same result
    monkeypatch.setattr(ops_attention, "backend_for", lambda t: "torch")
    monkeypatch.setattr(K, "attention_forward", lambda *a: pytest.fail("kernel launched"))
    q, k, v, cu_q, cu_k = packed(*CHUNKED)
    used = [40, 16, 2]
    kk, vv, cu_used = truncate(k, v, cu_k, used)
    want = run(q, kk, vv, cu_q, cu_used, causal=True)
    kp, vp, table = paginate(k, v, cu_k, 16)
    assert_equal(run(q, kp, vp, cu_q, cu_k, block_table=table, causal=True,
                     seqused_k=torch.tensor(used, dtype=torch.int32)), want)


# ---------------------------------------------------------------------------------------------
# Errors: before any launch, naming the argument
# ---------------------------------------------------------------------------------------------
def _args(**over):
    q, k, v, cu_q, cu_k = packed([10, 20], [10, 40])
    kp, vp, table = paginate(k, v, cu_k, 16, spare_cols=0)  # table [2, 3]
    args = dict(q=q, k=kp, v=vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20,
                max_seqlen_k=40, block_table=table)
    args.update({name: f(args) if callable(f) else f for name, f in over.items()})
    return args


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


I32 = torch.int32


@pytest.mark.parametrize("over,exc,match", [
    (dict(block_table=lambda a: a["block_table"].long()), TypeError, "block_table must be int32"),
    (dict(block_table=lambda a: a["block_table"][0]), ValueError, r"block_table must be 2-D \[num_seqs, max_blocks\]"),
    (dict(block_table=lambda a: a["block_table"][:1]), ValueError, "num_seqs = 2"),
    (dict(block_table=lambda a: a["block_table"].to("meta")), ValueError, "block_table must be on q's device"),
    (dict(block_table=lambda a: _set(a["block_table"], (1, 2), 99)), ValueError,
     r"block_table\[1, 2\] = 99 is not a block of k/v: block indices must be in \[0, num_blocks="),
    (dict(block_table=lambda a: _set(a["block_table"], (0, 0), -1)), ValueError, r"block_table\[0, 0\] = -1"),
    (dict(block_table=lambda a: a["block_table"][:, :2]), ValueError,
     "block_table has 2 blocks of 16 keys per sequence, fewer than sequence 1's 40 keys need"),
    (dict(k=lambda a: a["k"].flatten(0, 1)), ValueError, r"k must have 4 dimensions \[num_blocks, page_block_size"),
    (dict(v=lambda a: a["v"][:-1]), ValueError, r"v must have k's shape \[num_blocks, page_block_size, Hkv, D\]"),
    (dict(k=lambda a: a["k"][:, :0], v=lambda a: a["v"][:, :0]), ValueError, "page_block_size .* must be >= 1"),
    (dict(k=lambda a: a["k"][..., :16], v=lambda a: a["v"][..., :16]), ValueError, "k must have q's head dim D=32"),
    (dict(cu_seqlens_k=torch.tensor([0, 10, 5], dtype=I32)), ValueError, "cu_seqlens_k must be non-decreasing"),
    (dict(seqused_k=torch.tensor([1, 2])), TypeError, "seqused_k must be int32"),
    (dict(seqused_k=torch.tensor([1, 2, 3], dtype=I32)), ValueError, r"seqused_k must have shape \[num_seqs\] = \[2\]"),
    (dict(seqused_k=torch.tensor([10, 41], dtype=I32)), ValueError,
     r"seqused_k\[1\] = 41 is more than sequence 1's 40 keys"),
    (dict(seqused_k=torch.tensor([-1, 4], dtype=I32)), ValueError, r"seqused_k values must be >= 0, got seqused_k\[0\] = -1"),
    (dict(q=lambda a: a["q"].requires_grad_()), RuntimeError, "with block_table is inference-only"),
    (dict(block_table=None, k=lambda a: torch.randn(50, 2, 32, dtype=torch.float16, requires_grad=True),
          v=lambda a: torch.randn(50, 2, 32, dtype=torch.float16), seqused_k=torch.tensor([3, 4], dtype=I32)),
     RuntimeError, "with seqused_k is inference-only"),
])
def test_bad_arguments(over, exc, match, monkeypatch):
    monkeypatch.setattr(K, "attention_forward", lambda *a: pytest.fail("kernel launched"))
    args = _args(**over)
    with pytest.raises(exc, match=match):
        tritformer.varlen_attention(**args)


def test_unused_table_entries_are_not_checked():
    # -1 (or anything) past the blocks a sequence uses, here also past its seqused_k: fine
    a = _args(seqused_k=torch.tensor([10, 16], dtype=I32))
    a["block_table"] = _set(a["block_table"], (1, 1), -1)  # sequence 1 uses only block 0
    with torch.no_grad():
        out = tritformer.varlen_attention(**a)
    assert torch.isfinite(out).all()
