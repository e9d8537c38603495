"""tritformer.kvcache_append (issue #19 part 3): new keys / values appended into a contiguous or
paged KV cache in one kernel launch, keys and queries rotated (rotary embedding) on the way.

- Written values equal, bit for bit, the torch semantics they replace: the rotation of
  flash_attn_interface.apply_rotary (FlashAttention's formula, float32, one rounding) and the
  cache writes of flash_attn_with_kvcache, built here by an independent per-token loop. Every
  position that is not written (the rest of each row, blocks no row uses) keeps its bits.
- The torch backend (CPU without the interpreter) gives the same bits.
- Strided views everywhere: FlashAttention's [B, N, H, D] tensors as .transpose(1, 2) views,
  a cache_seqlens column of a 2-D tensor, a column-major / sliced block table, strided cos/sin.
- Every bad argument raises before anything is written; unchecked indices (what torch.compile
  lets through) make the kernel drop the write, never touch memory outside the cache.
- Runs with tests/conftest.py's interpreter bounds checker on (asserted below).
"""
import pytest
import torch

import tritformer
from tritformer.flash_attn_interface import apply_rotary as fa_apply_rotary
from tritformer.kernels import _launch
from tritformer.kernels import kvcache as KV
from tritformer.ops import kvcache as ops

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
I32 = torch.int32


def bits(x):
    """The raw bits (NaN payloads and signed zeros compared too)."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def heads(B, H, N, D, dtype, fa_layout):
    """[B, H, N, D] random: contiguous, or the .transpose(1, 2) view of a [B, N, H, D] tensor."""
    if fa_layout:
        return torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
    return torch.randn(B, H, N, D).to(dtype)


def column(values, dtype=I32):
    """A non-contiguous int32 [B] view: column 0 of a [B, 3] tensor (junk in the others)."""
    t = torch.full((len(values), 3), -999, dtype=dtype)
    t[:, 0] = torch.tensor(values, dtype=dtype)
    return t[:, 0]


def rot(x, cos, sin, pos, interleaved):
    """flash_attn_interface.apply_rotary (the contract, [B, S, H, D]) on head-major x."""
    return fa_apply_rotary(x.transpose(1, 2), cos, sin, pos, interleaved).transpose(1, 2)


def expected(kc, vc, k, v, lens, cos, sin, interleaved, table, bidx):
    """The caches after the append, one token at a time (independent of the op's code)."""
    kc, vc = kc.clone(), vc.clone()
    B, _, n_new, _ = k.shape
    pos = torch.tensor(lens, dtype=torch.long)[:, None] + torch.arange(n_new)
    k_new = rot(k, cos, sin, pos, interleaved) if cos is not None else k
    for b in range(B):
        for t in range(n_new):
            p = lens[b] + t
            if table is not None:
                page = kc.shape[2]
                row, slot = int(table[b, p // page]), p % page
            else:
                row, slot = (b if bidx is None else int(bidx[b])), p
            kc[row, :, slot] = k_new[b, :, t]
            vc[row, :, slot] = v[b, :, t]
    return kc, vc


def test_the_bounds_checker_is_on():
    from triton.runtime import interpreter as I
    assert getattr(I.InterpreterBuilder, "_tritformer_bounds", False)
    assert tritformer.backend_for(torch.empty(0)) == "triton-interpreter"
    assert tritformer.kvcache_append is ops.kvcache_append


# ---------------------------------------------------------------------------------------------
# Values: kernel == torch semantics, bit for bit
# ---------------------------------------------------------------------------------------------
# (name, dict): cache = "contig" | "batch_idx" | "paged16" | "paged32"; rotary = None | "neox" |
# "gptj" with rd its dims; fa = FlashAttention [B, N, H, D] views for k, v, q and the cache.
# B = 3, Hkv = 2, Hq = 4 everywhere; the interpreter's tile is 8 rows, so Hkv * Nnew = 10 and
# Hq * Nq = 12 rows take two programs each (a ragged second tile).
CASES = [
    # a decode step: one token, rotary_dim = D, NeoX halves, contiguous head-major
    ("decode-neox-full", dict(cache="contig", dtype=F16, D=64, rd=64, rotary="neox", n_new=1,
                              n_q=1, qpos="causal", lens=[0, 17, 31], n_max=32, fa=False)),
    # odd head dim 40 with rotary_dim 32 (8 pass-through dims), GPT-J pairs, FA layout, prefill
    # of 5 tokens (two tiles), causal queries
    ("odd-d-gptj-fa", dict(cache="contig", dtype=BF16, D=40, rd=32, rotary="gptj", n_new=5,
                           n_q=3, qpos="causal", lens=[3, 0, 25], n_max=30, fa=True)),
    # paged, page 16, appends crossing a page boundary (14..18, 30..34), permuted table with
    # unused blocks, FA paged layout, queries all at cache_seqlens ("start")
    ("paged16-cross-start", dict(cache="paged16", dtype=F16, D=64, rd=32, rotary="neox",
                                 n_new=5, n_q=3, qpos="start", lens=[14, 30, 0], max_blocks=3,
                                 fa=True)),
    # paged, page 32, fp32, rotary_dim = D odd-sized pairs, GPT-J, crossing 32 -> 33
    ("paged32-fp32-gptj", dict(cache="paged32", dtype=F32, D=40, rd=40, rotary="gptj", n_new=4,
                               n_q=2, qpos="causal", lens=[30, 0, 60], max_blocks=3, fa=False)),
    # cache_batch_idx permutation into a larger cache (rows 0 and 4 untouched), rotary, bf16
    ("batch-idx-rotary", dict(cache="batch_idx", dtype=BF16, D=64, rd=16, rotary="neox",
                              n_new=2, n_q=1, qpos="start", lens=[5, 0, 9], n_max=12, fa=True)),
    # no rotary: k copied as is, q returned unchanged (the same object)
    ("batch-idx-plain", dict(cache="batch_idx", dtype=F32, D=32, rd=0, rotary=None, n_new=3,
                             n_q=2, qpos="causal", lens=[1, 7, 0], n_max=10, fa=False)),
    # Nnew = 0: nothing written, q still rotated (at cache_seqlens + i)
    ("empty-append", dict(cache="paged16", dtype=F16, D=48, rd=48, rotary="gptj", n_new=0,
                          n_q=3, qpos="causal", lens=[16, 3, 0], max_blocks=2, fa=True)),
    # paged, no rotary, no q (returns None): the plain append
    ("paged-plain-no-q", dict(cache="paged32", dtype=BF16, D=24, rd=0, rotary=None, n_new=3,
                              n_q=0, qpos="causal", lens=[31, 61, 1], max_blocks=2, fa=True)),
]


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    B, Hkv, Hq, D, dt, fa = 3, 2, 4, c["D"], c["dtype"], c["fa"]
    k, v = heads(B, Hkv, c["n_new"], D, dt, fa), heads(B, Hkv, c["n_new"], D, dt, fa)
    q = heads(B, Hq, c["n_q"], D, dt, fa) if c["n_q"] else None
    table = bidx = None
    if c["cache"].startswith("paged"):
        page = int(c["cache"][5:])
        n_blocks = B * c["max_blocks"] + 3  # 3 blocks belong to no row
        perm = torch.randperm(n_blocks, generator=g)[:B * c["max_blocks"]]
        # a strided table: the transpose of a [max_blocks, B] tensor (column-major)
        table = perm.view(c["max_blocks"], B).to(I32).t()
        kc, vc = heads(n_blocks, Hkv, page, D, dt, fa), heads(n_blocks, Hkv, page, D, dt, fa)
    else:
        n_cache = B + 2 if c["cache"] == "batch_idx" else B
        kc, vc = heads(n_cache, Hkv, c["n_max"], D, dt, fa), heads(n_cache, Hkv, c["n_max"], D, dt, fa)
        if c["cache"] == "batch_idx":
            bidx = column([3, 1, 2])  # rows 0 and 4 unused
    # unused rows / blocks hold NaN garbage: must come out with the same bits
    used = set(table.flatten().tolist()) if table is not None else (
        set(bidx.tolist()) if bidx is not None else set(range(B)))
    for r in set(range(kc.shape[0])) - used:
        kc[r], vc[r] = float("nan"), float("nan")
    cos = sin = None
    if c["rotary"]:
        n_ro = max(c["lens"]) + max(c["n_new"], c["n_q"]) + 2
        angle = torch.rand(n_ro, c["rd"] // 2, generator=g) * 6.3
        # cos: strided (every other column of a wider table) in float32; sin: the tensors' dtype
        wide = torch.zeros(n_ro, c["rd"])
        wide[:, ::2] = angle.cos()
        cos, sin = wide[:, ::2], angle.sin().to(dt)
    return dict(k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=column(c["lens"]), q=q,
                rotary_cos=cos, rotary_sin=sin, rotary_interleaved=c["rotary"] == "gptj",
                q_positions=c["qpos"], block_table=table, cache_batch_idx=bidx)


def _want(c, a):
    kc, vc = expected(a["k_cache"], a["v_cache"], a["k"], a["v"], c["lens"], a["rotary_cos"],
                      a["rotary_sin"], a["rotary_interleaved"], a["block_table"],
                      a["cache_batch_idx"])
    q = a["q"]
    if q is not None and a["rotary_cos"] is not None:
        offs = torch.arange(q.shape[2]) if c["qpos"] == "causal" else torch.zeros(q.shape[2], dtype=torch.long)
        q = rot(q, a["rotary_cos"], a["rotary_sin"], torch.tensor(c["lens"])[:, None] + offs,
                a["rotary_interleaved"])
    return kc, vc, q


def _call(a):
    a = dict(a)
    return tritformer.kvcache_append(a.pop("k_cache"), a.pop("v_cache"), a.pop("k"), a.pop("v"),
                                     a.pop("cache_seqlens"), **a)


def _launches(monkeypatch):
    n = []
    real = KV.run
    monkeypatch.setattr(KV, "run", lambda launch: n.append(launch.name) or real(launch))
    return n


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_append_equals_torch(case, monkeypatch):
    a = _inputs(case)
    want_k, want_v, want_q = _want(case, a)
    lens_before = a["cache_seqlens"].clone()
    launches = _launches(monkeypatch)
    out = _call(a)
    # one launch for keys, values and queries (none when there is nothing to do)
    work = case["n_new"] or (a["q"] is not None and case["rotary"])
    assert launches == (["kvcache_append"] if work else [])
    assert same_bits(a["k_cache"], want_k) and same_bits(a["v_cache"], want_v)
    assert torch.equal(a["cache_seqlens"], lens_before)  # not modified
    if a["q"] is None:
        assert out is None
    elif case["rotary"] is None:
        assert out is a["q"]
    else:
        assert same_bits(out, want_q) and out.stride() == a["q"].stride()  # q's layout


@pytest.mark.parametrize("case", [c for _, c in CASES[1:5]], ids=[n for n, _ in CASES[1:5]])
def test_torch_backend_equals_kernel(case, monkeypatch):
    # the CPU fallback ("torch" backend): the same bits without the kernel
    monkeypatch.setattr(ops, "backend_for", lambda t: "torch")
    monkeypatch.setattr(KV, "run", lambda launch: pytest.fail("a kernel ran on the torch backend"))
    a = _inputs(case)
    want_k, want_v, want_q = _want(case, a)
    out = _call(a)
    assert same_bits(a["k_cache"], want_k) and same_bits(a["v_cache"], want_v)
    assert same_bits(out, want_q)


def test_rotary_dtypes_and_float64_table():
    # fp16 tensors with a float64 table (any float dtype): cos/sin rounded to float32 on the way
    # in, as apply_rotary's .float(); rotary_dim 2 (a single pair), D = 17
    c = dict(cache="contig", dtype=F16, D=17, rd=2, rotary="neox", n_new=2, n_q=2,
             qpos="causal", lens=[0, 4, 9], n_max=11, fa=True)
    a = _inputs(c)
    a["rotary_cos"], a["rotary_sin"] = a["rotary_cos"].double(), a["rotary_sin"].double()
    want_k, want_v, want_q = _want(c, a)
    out = _call(a)
    assert same_bits(a["k_cache"], want_k) and same_bits(a["v_cache"], want_v)
    assert same_bits(out, want_q)


def test_compiled_call_fullgraph():
    torch._dynamo.reset()
    c = dict(CASES[2][1])  # paged, rotary, FA views
    a, b = _inputs(c), _inputs(c)

    def step(kc, vc, k, v, lens, q, cos, sin, table):
        q = tritformer.kvcache_append(kc, vc, k, v, lens, q=q, rotary_cos=cos, rotary_sin=sin,
                                      q_positions="start", block_table=table)
        return q * 2

    args = lambda x: (x["k_cache"], x["v_cache"], x["k"], x["v"], x["cache_seqlens"], x["q"],
                      x["rotary_cos"], x["rotary_sin"], x["block_table"])
    got = torch.compile(step, fullgraph=True)(*args(a))
    want = step(*args(b))
    assert same_bits(got, want)
    assert same_bits(a["k_cache"], b["k_cache"]) and same_bits(a["v_cache"], b["v_cache"])


def test_opcheck():
    a = _inputs(CASES[1][1])
    torch.library.opcheck(torch.ops.tritformer.kvcache_append.default,
                          (a["k_cache"], a["v_cache"], a["k"], a["v"], a["cache_seqlens"], a["q"],
                           a["rotary_cos"], a["rotary_sin"], True, True, None, None),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Unchecked indices (torch.compile skips the content checks): the kernel drops the write
# ---------------------------------------------------------------------------------------------
def test_unchecked_indices_never_write_outside_the_cache():
    # the caches are windows of larger buffers: a stray write would land in the margins (and the
    # bounds checker would raise first). Straight to the launcher: no host check runs.
    B, H, D, page = 4, 2, 16, 8
    buf_k, buf_v = torch.zeros(10, H, page, D), torch.zeros(10, H, page, D)
    kc, vc = buf_k[2:8], buf_v[2:8]  # 6 blocks
    k, v = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)
    table = torch.tensor([[0, 1], [2, 9], [3, -1], [4, 5]], dtype=I32)  # 9, -1: no such block
    # row 0: positions 14..16 pass the capacity 16 at 16; row 1: block 9 at 8..10; row 2:
    # positions -2..0; row 3: valid
    lens = torch.tensor([14, 8, -2, 3], dtype=I32)
    cos, sin = torch.ones(4, 4), torch.zeros(4, 4)  # too short for most positions: clamped
    q = torch.randn(B, H, 2, D)
    q_out = KV.kvcache_append_forward(kc, vc, k, v, lens, q, cos, sin, False, True, table, None)
    assert buf_k[:2].eq(0).all() and buf_k[8:].eq(0).all() and buf_v[8:].eq(0).all()
    written = lambda blk, slot: kc[blk, :, slot].ne(0).any()
    assert written(1, 6) and written(1, 7) and not kc[1, :, :6].ne(0).any()  # row 0: 14, 15
    assert not written(2, 0)  # row 1 starts in block 9: dropped, block 2 untouched
    assert written(3, 0) and not kc[3, :, 1:].ne(0).any()  # row 2: position 0 only
    assert kc[4, :, 3:6].ne(0).all() and torch.equal(kc[4, :, 3:6], k[3])  # cos 1, sin 0
    assert torch.equal(q_out, q)  # identity rotation at clamped positions


# ---------------------------------------------------------------------------------------------
# Errors: raised before anything is written (no launch, caches unchanged)
# ---------------------------------------------------------------------------------------------
def _valid(paged=False):
    B, H, D = 2, 2, 16
    kw = dict(k_cache=torch.randn(B, H, 8, D), v_cache=torch.randn(B, H, 8, D),
              k=torch.randn(B, H, 2, D), v=torch.randn(B, H, 2, D),
              cache_seqlens=torch.tensor([3, 6], dtype=I32), q=torch.randn(B, 4, 3, D),
              rotary_cos=torch.ones(9, 4), rotary_sin=torch.zeros(9, 4))
    if paged:
        kw.update(k_cache=torch.randn(5, H, 4, D), v_cache=torch.randn(5, H, 4, D),
                  block_table=torch.tensor([[4, 0], [2, 1]], dtype=I32))
    return kw


def _set(**changes):
    return lambda a: a.update(changes)


ERRORS = [
    ("k_cache-type", _set(k_cache=[1.0]), TypeError, r"^k_cache must be a torch.Tensor"),
    ("k_cache-dtype", lambda a: a.update(k_cache=a["k_cache"].double()), TypeError, r"^k_cache must be float16"),
    ("k_cache-ndim", lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, r"^k_cache must have 4 dimensions"),
    ("v_cache-dtype", lambda a: a.update(v_cache=a["v_cache"].half()), TypeError, r"^v_cache must have k_cache's dtype"),
    ("v_cache-shape", lambda a: a.update(v_cache=a["v_cache"][:, :, :7]), ValueError, r"^v_cache must have k_cache's shape"),
    ("head-dim", _set(k_cache=torch.randn(2, 2, 8, 257), v_cache=torch.randn(2, 2, 8, 257)), ValueError,
     r"^head dim D of k_cache must be in 1\.\.256"),
    ("k-dtype", lambda a: a.update(k=a["k"].half()), TypeError, r"^k must have k_cache's dtype"),
    ("k-device", lambda a: a.update(k=a["k"].to("meta")), ValueError, r"^k must be on k_cache's device"),
    ("k-heads", lambda a: a.update(k=a["k"][:, :1]), ValueError, r"^k must be \[B, Hkv, Nnew, D\] with k_cache's Hkv = 2"),
    ("k-dim", lambda a: a.update(k=a["k"][..., :8]), ValueError, r"^k must be \[B, Hkv, Nnew, D\]"),
    ("v-shape", lambda a: a.update(v=a["v"][:, :, :1]), ValueError, r"^v must have k's shape"),
    ("k_cache-batch", lambda a: a.update(k=a["k"][:1], v=a["v"][:1], q=a["q"][:1],
                                         cache_seqlens=a["cache_seqlens"][:1]),
     ValueError, r"^k_cache must have k's batch size 1 \(or pass cache_batch_idx\)"),
    ("seqlens-type", _set(cache_seqlens=3), TypeError, r"^cache_seqlens must be a torch.Tensor"),
    ("seqlens-dtype", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, r"^cache_seqlens must be int32"),
    ("seqlens-shape", _set(cache_seqlens=torch.tensor([3], dtype=I32)), ValueError, r"^cache_seqlens must have shape \[B\] = \[2\]"),
    ("seqlens-capacity", _set(cache_seqlens=torch.tensor([3, 7], dtype=I32)), ValueError,
     r"^cache_seqlens\[1\] \+ Nnew = 7 \+ 2 must be in \[0, 8\] \(Nmax"),
    ("seqlens-negative", _set(cache_seqlens=torch.tensor([-1, 0], dtype=I32)), ValueError, r"^cache_seqlens\[0\] \+ Nnew = -1 \+ 2"),
    ("q-dtype", lambda a: a.update(q=a["q"].half()), TypeError, r"^q must have k_cache's dtype"),
    ("q-batch", lambda a: a.update(q=a["q"][:1]), ValueError, r"^q must be \[B, Hq, Nq, D\] with k's B = 2"),
    ("q-ndim", lambda a: a.update(q=a["q"][0]), ValueError, r"^q must have 4 dimensions"),
    ("sin-missing", _set(rotary_sin=None), ValueError, r"^rotary_cos and rotary_sin must be given together"),
    ("cos-dtype", _set(rotary_cos=torch.ones(9, 4, dtype=I32)), TypeError, r"^rotary_cos must be a float tensor"),
    ("cos-ndim", _set(rotary_cos=torch.ones(9)), ValueError, r"^rotary_cos must be 2-D"),
    ("cos-device", _set(rotary_cos=torch.ones(9, 4, device="meta")), ValueError, r"^rotary_cos must be on k_cache's device"),
    ("sin-shape", _set(rotary_sin=torch.zeros(9, 3)), ValueError, r"^rotary_sin must have rotary_cos's shape"),
    ("rotary-dim", _set(rotary_cos=torch.ones(9, 9), rotary_sin=torch.ones(9, 9)), ValueError,
     r"^rotary_cos: rotary_dim = 2 \* rotary_cos.shape\[1\] must be in 2\.\.D \(D = 16\), got 18"),
    ("rotary-dim-0", _set(rotary_cos=torch.ones(9, 0), rotary_sin=torch.ones(9, 0)), ValueError, r"rotary_dim"),
    # causal queries need positions 6 + 0..2 = up to 8 < 9; one row longer fails; "start" passes
    ("rotary-short", _set(rotary_cos=torch.ones(8, 4), rotary_sin=torch.ones(8, 4)), ValueError,
     r"^rotary_cos has 8 positions \(seqlen_ro\); positions up to 8 are needed"),
    ("interleaved-type", _set(rotary_interleaved=1), TypeError, r"^rotary_interleaved must be a bool"),
    ("q_positions", _set(q_positions="end"), ValueError, r"^q_positions must be 'causal'"),
    ("batch-idx-dtype", _set(cache_batch_idx=torch.tensor([0, 1])), TypeError, r"^cache_batch_idx must be int32"),
    ("batch-idx-shape", _set(cache_batch_idx=torch.tensor([[0, 1]], dtype=I32)), ValueError, r"^cache_batch_idx must have shape \[B\]"),
    ("batch-idx-range", _set(cache_batch_idx=torch.tensor([0, 2], dtype=I32)), ValueError,
     r"^cache_batch_idx entries must be in \[0, B_cache=2\) \(k_cache.shape\[0\]\), got 2"),
]
PAGED_ERRORS = [
    ("paged-with-batch-idx", _set(cache_batch_idx=torch.tensor([0, 1], dtype=I32)), ValueError,
     r"^cache_batch_idx cannot be used with block_table"),
    ("table-dtype", lambda a: a.update(block_table=a["block_table"].long()), TypeError, r"^block_table must be int32"),
    ("table-shape", lambda a: a.update(block_table=a["block_table"][:1]), ValueError, r"^block_table must have shape \[B, max_blocks\]"),
    ("table-range", _set(block_table=torch.tensor([[4, 5], [2, 1]], dtype=I32)), ValueError,
     r"^block_table entries must be in \[0, num_blocks=5\) \(k_cache.shape\[0\]\), got 5"),
    ("table-negative", _set(block_table=torch.tensor([[4, 0], [-1, 1]], dtype=I32)), ValueError, r"got -1$"),
    # two blocks of 4: capacity 8
    ("paged-capacity", _set(cache_seqlens=torch.tensor([7, 0], dtype=I32)), ValueError,
     r"^cache_seqlens\[0\] \+ Nnew = 7 \+ 2 must be in \[0, 8\] \(the paged capacity: block_table has 2 blocks of 4"),
    ("page-size-0", _set(k_cache=torch.randn(5, 2, 0, 16), v_cache=torch.randn(5, 2, 0, 16)), ValueError,
     r"^k_cache: page_block_size \(dim 2 of the paged cache\) must be >= 1"),
]


@pytest.mark.parametrize("paged,change,exc,match",
                         [(False, *e[1:]) for e in ERRORS] + [(True, *e[1:]) for e in PAGED_ERRORS],
                         ids=[e[0] for e in ERRORS + PAGED_ERRORS])
def test_errors_leave_the_cache_untouched(paged, change, exc, match, monkeypatch):
    monkeypatch.setattr(KV, "run", lambda launch: pytest.fail("a kernel ran for invalid input"))
    a = _valid(paged)
    change(a)
    before = [t.clone() for t in (a["k_cache"], a["v_cache"]) if isinstance(t, torch.Tensor)]
    with pytest.raises(exc, match=match):
        _call(a)
    after = [t for t in (a["k_cache"], a["v_cache"]) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_rotary_table_need_follows_q_positions():
    # the same 8-row table: causal queries need position 8, "start" ones only 6 + Nnew - 1 = 7
    a = _valid()
    a.update(rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4), q_positions="start")
    assert _call(a) is not None
    b = _valid()
    b.update(rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4), q=None)
    assert _call(b) is None  # keys alone need up to 7


def test_inference_only():
    a = _valid()
    a["k"].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        _call(a)
    with torch.no_grad():
        _call(a)


# ---------------------------------------------------------------------------------------------
# Launch grid: one axis for any batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [None, 80, 90])
def test_grid_is_flat(arch):
    m = lambda *s, dtype=F16: torch.empty(*s, device="meta", dtype=dtype)
    B, H = 200_000, 8  # B * Hkv past 65,535 several times
    k = m(B, H, 4, 128)
    (launch,) = KV.plan_append(m(B, H, 64, 128), m(B, H, 64, 128), k, k, m(B, dtype=I32),
                               m(B, 32, 4, 128), m(B, 32, 4, 128), m(64, 64), m(64, 64), False,
                               True, None, None, arch)
    rows = launch.configs[0].kwargs["BLOCK_R"]
    (n,) = launch.grid(launch.configs[0].kwargs)
    assert n == B * (-(-H * 4 // rows) + -(-32 * 4 // rows)) <= _launch.MAX_GRID[0]
