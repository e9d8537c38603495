"""tritformer.decode_attention (flash-decoding over a KV cache) against the float64 reference
(error-ratio criterion), in the interpreter.

Interpreter tiles (kernels/decode.py INTERPRETER_CONFIGS): split kernel BLOCK_N=16, query tile
GROUP * Nq padded to 16..64 rows; combine SPLIT_TILE=2. Caches are Nmax=50 (3 full tiles and a
2-key tail) with lengths chosen against those tiles. The default num_splits of these small
shapes is one split per tile (the heuristic aims at 264 programs).
"""
import pytest
import torch

import tritformer
from tritformer import numerics, reference
from tritformer.kernels import decode as K
from tritformer.testing import assert_checks, check_decode_attention

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
N_MAX = 50
# 0: empty cache (every row 0 / -inf); 50 = Nmax: whole cache, 2-key ragged tail tile;
# 31 and 17 end one key before / after a tile edge, where the last whole tile (keys all rows
# see) meets the masked ones: Nq=1 sees keys < 31 (15 in the second tile), Nq=3's first query
# keys <= 14 of 17; 16: exactly one tile
LENS = [0, 50, 31, 17, 16]


def make_cache(B, Hq, Hkv, Nq, D, dtype, lens=LENS, layout="bhnd", garbage=float("nan")):
    """q [B, Hq, Nq, D], caches [B, Hkv, N_MAX, D] whose entries past lens[b] hold `garbage`,
    and cache_seqlens int32 [B]."""
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D]: strided, no copy
        k = torch.randn(B, N_MAX, Hkv, D, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, N_MAX, Hkv, D, dtype=dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, N_MAX, D, dtype=dtype)
        v = torch.randn(B, Hkv, N_MAX, D, dtype=dtype)
    seqlens = torch.tensor(lens[:B], dtype=torch.int32)
    for b, n in enumerate(seqlens.tolist()):
        k[b, :, n:] = garbage
        v[b, :, n:] = garbage
    return q, k, v, seqlens


def check_decode(q, k, v, seqlens, **kw):
    """out and lse of the kernel vs reference.decode_attention in float64 (truth) and in q's
    dtype (PyTorch's own error)."""
    out, lse = tritformer.decode_attention(q, k, v, seqlens, return_lse=True, **kw)
    kw.pop("num_splits", None)
    d64 = [x.double() for x in (q, k, v)]
    ref, ref_lse = reference.decode_attention(*d64, seqlens, return_lse=True, **kw)
    base, base_lse = reference.decode_attention(q, k, v, seqlens, return_lse=True, **kw)
    checks = [numerics.check("out", out, ref, base), numerics.check("lse", lse, ref_lse, base_lse)]
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    return out, lse


def test_runs_in_interpreter():
    assert tritformer.backend_for(torch.empty(1)) == "triton-interpreter"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [
    (2, 2),  # MHA: GROUP=1, the 16-row tile holds Nq rows
    (8, 2),  # GQA 4:1, 2 KV heads: 4 heads x Nq rows packed in one tile per KV head
    (3, 1),  # MQA, odd group: every query head in one tile
])
@pytest.mark.parametrize("Nq", [
    1,  # one new token: every valid key visible, only the ragged tail tile is masked
    3,  # 3 new tokens: the causal diagonal crosses the last tile (length 16: a whole-tile
        # split becomes a diagonal tile)
])
def test_dtypes_heads_and_queries(dtype, Hq, Hkv, Nq):
    # lengths 0 / 50 / 31 / 17 / 16 in one launch, NaN past each length, default num_splits
    q, k, v, seqlens = make_cache(5, Hq, Hkv, Nq, 32, dtype)
    out, lse = check_decode(q, k, v, seqlens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out).all()


# fp32 with D=1 was a strict xfail: 3xTF32 dots keep ~2^-22 relative per product where
# PyTorch's is exact, and at D=1 a score is one product. fp32 D <= 16 now computes its dots in
# exact fp32 FMA (kernels/attention.py: _dot_precision). Measured over 40 seeds of this
# shape (make_cache, lens [37, 50]): ratio > 2 in 6/40 with 3xTF32, 2/40 with FMA, where
# PyTorch against itself with its keys permuted exceeds 2 in 3/40 (the max over 8 scalars is a
# noisy statistic). This seed passes.


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [
    1,    # smallest: padded to BLOCK_D=16
    40,   # odd, padded to 64
    128,
    256,  # largest
])
def test_head_dims(dtype, D):
    q, k, v, seqlens = make_cache(2, 4, 2, 1, D, dtype, lens=[37, 50])
    check_decode(q, k, v, seqlens)


# fp32 16-row tiles past BLOCK_D 64 compute exact score products over D in 32-wide slices
# (kernels/decode.py, QK_CHUNK; tests/test_fuzz.py, test_fp32_decode_sequential_pv): every key
# path at D = 100 (a ragged last slice): interior and boundary tiles, split and single, a paged
# cache with left padding, window, ALiBi and softcap, and keys of -inf (the NaN rule of the
# small products' sum, applied once all slices are in: the row gives 0 and lse -inf)
def test_fp32_sliced_exact_scores_every_path():
    B, Hq, Hkv, Nq, D, page = 3, 4, 2, 2, 100, 16
    q, k, v, seqlens = make_cache(B, Hq, Hkv, Nq, D, torch.float32, lens=[50, 45, 20])
    plan = K.plan_decode(q, k, v, seqlens, torch.empty_like(q), torch.empty(B, Hq, Nq), None,
                         None, D ** -0.5, 1, None)[0]
    assert plan.constexprs["BLOCK_D"] == 128 and plan.constexprs["QK_CHUNK"] == 32
    for splits in (None, 1):
        check_decode(q, k, v, seqlens, num_splits=splits)
    # paged, left padding (keys before its end are NaN: never read), window, ALiBi, softcap
    pad = torch.tensor([3, 0, 18], dtype=torch.int32)
    for b, n in enumerate(pad.tolist()):
        k[b, :, :n] = v[b, :, :n] = float("nan")
    pages = -(-N_MAX // page)
    kp = torch.full((B * pages, Hkv, page, D), float("nan"))
    vp = torch.full_like(kp, float("nan"))
    for b in range(B):
        for p in range(pages):
            n = min(page, N_MAX - p * page)
            kp[b * pages + p, :, :n] = k[b, :, p * page:p * page + n]
            vp[b * pages + p, :, :n] = v[b, :, p * page:p * page + n]
    table = torch.arange(B * pages, dtype=torch.int32).flip(0).view(B, pages)
    kp, vp = kp.flip(0), vp.flip(0)  # row b's blocks in reverse pool order
    opts = dict(block_table=table, cache_leftpad=pad, window=(12, 0),
                alibi_slopes=torch.rand(Hq) * 0.5 + 0.1, softcap=3.0)
    for splits in (None, 1):
        assert_checks(check_decode_attention(q, kp, vp, seqlens, num_splits=splits, **opts),
                      "fp32 D=100 paged, every option")
    # a row whose keys are all -inf against positive queries: scores -inf, never NaN
    q, k, v, seqlens = make_cache(B, Hq, Hkv, Nq, D, torch.float32, lens=[50, 45, 20])
    q = q.abs() + 0.1
    k[1] = float("-inf")
    out, lse = tritformer.decode_attention(q, k, v, seqlens, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("num_splits,Nq", [
    (2, 1),  # keys per split: length 50: 32 + 18; 31: 16 + 15; 17: 16 + 1
    (3, 3),  # 50: 32 + 18 + an empty split; 31: 16 + 15 + empty; 17: 16 + 1 + empty (the
             # causal diagonal crosses the first tile: query 0 sees keys <= 14)
    (4, 1),  # = tiles of the full cache: one tile per split
    (9, 3),  # more splits than tiles: 5 empty (lse -inf); combine loop of 5 SPLIT_TILE steps
])
def test_num_splits_agree(num_splits, Nq):
    # against the single split (the split kernel writes out/lse directly, no combine)
    q, k, v, seqlens = make_cache(4, 2, 1, Nq, 32, torch.float32)
    out, lse = check_decode(q, k, v, seqlens, num_splits=num_splits)
    out_ref, lse_ref = check_decode(q, k, v, seqlens, num_splits=1)
    # only the order of the fp32 merges differs
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-6, atol=1e-6)


def test_garbage_past_the_lengths_is_never_read():
    # NaN, inf and huge values past each length: bit-identical results (the kernel masks the
    # loads; a NaN read would poison the output, a finite one would change the softmax)
    args = dict(B=4, Hq=2, Hkv=1, Nq=3, D=24, dtype=torch.float16)
    outs = []
    for garbage in (float("nan"), float("inf"), 6e4):
        torch.manual_seed(1)
        q, k, v, seqlens = make_cache(**args, garbage=garbage)
        outs.append(tritformer.decode_attention(q, k, v, seqlens, num_splits=2, return_lse=True))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_full_cache_without_seqlens():
    # cache_seqlens=None: all Nmax keys valid (the HAS_SEQLENS=False path)
    q, k, v, _ = make_cache(2, 4, 1, 2, 32, torch.float16, lens=[N_MAX, N_MAX])
    out = check_decode(q, k, v, None)[0]
    full = torch.full((2,), N_MAX, dtype=torch.int32)
    assert torch.equal(out, tritformer.decode_attention(q, k, v, full))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_cache_is_read_in_place(dtype, monkeypatch):
    # [B, N, H, D] storage (q and both caches) viewed as [B, H, N, D]: no copy, out keeps q's layout
    q, k, v, seqlens = make_cache(3, 4, 2, 1, 48, dtype, layout="bnhd")
    q = torch.randn(3, 1, 4, 48, dtype=dtype).transpose(1, 2)
    seen = {}
    real = K.decode_forward

    def spy(q_, k_, v_, *args, **kwargs):
        seen.update(q=q_.data_ptr(), k=k_.data_ptr(), v=v_.data_ptr(), strides=k_.stride())
        return real(q_, k_, v_, *args, **kwargs)

    monkeypatch.setattr(K, "decode_forward", spy)
    out = check_decode(q, k, v, seqlens)[0]
    assert (seen["q"], seen["k"], seen["v"]) == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert seen["strides"] == k.stride() and out.stride() == q.stride()


@pytest.mark.parametrize("Hkv,Nq", [
    (2, 1),  # MHA, one new token
    (1, 4),  # MQA with 4 new tokens: the causal diagonal across a 16-row tile
])
def test_matches_attention_on_the_valid_prefix(Hkv, Nq):
    # one length for the whole batch: decode == attention(q, k[:, :, :L], v[:, :, :L], causal)
    L = 37
    q, k, v, seqlens = make_cache(2, 2, Hkv, Nq, 32, torch.float32, lens=[L, L])
    out, lse = tritformer.decode_attention(q, k, v, seqlens, return_lse=True)
    ref, ref_lse = tritformer.attention(q, k[:, :, :L], v[:, :, :L], causal=True, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


def test_rows_without_keys():
    # Nq=3 with lengths 0, 1, 2: query i sees j <= len - 3 + i, so (len 1) queries 0-1 and
    # (len 2) query 0 see nothing: 0 and lse -inf, never NaN; the others are exact copies of v
    q, k, v, seqlens = make_cache(3, 2, 1, 3, 16, torch.float32, lens=[0, 1, 2])
    out, lse = check_decode(q, k, v, seqlens, num_splits=2)
    empty = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    assert torch.isneginf(lse[empty.unsqueeze(1).expand_as(lse)]).all()
    assert (out[empty.unsqueeze(1).expand(3, 2, 3)] == 0).all()
    # one visible key: out = v, up to 3xTF32's product (fp32, D <= 64), which keeps ~2^-22 of
    # each value: the small term v - tf32(v) enters the MMA truncated to tf32
    torch.testing.assert_close(out[1, :, 2], v[1, 0, 0].expand(2, 16), rtol=2 ** -21, atol=0)


def test_several_row_blocks(monkeypatch):
    # GQA 4:1 with Nq=5: 20 rows; with the tile capped at 16 rows, two row blocks per KV head
    monkeypatch.setattr(K, "INTERPRETER_MAX_BLOCK_M", 16)
    q, k, v, seqlens = make_cache(2, 4, 1, 5, 32, torch.float16, lens=[50, 37])
    for num_splits in (1, 2):  # both stores: straight to out, and to the workspace
        check_decode(q, k, v, seqlens, num_splits=num_splits)


def test_custom_scale():
    q, k, v, seqlens = make_cache(2, 4, 2, 2, 32, torch.float32, lens=[37, 50])
    check_decode(q, k, v, seqlens, scale=0.37)


@pytest.mark.parametrize("shape", [
    (0, 4, 2, 1, N_MAX),  # empty batch
    (2, 4, 2, 0, N_MAX),  # no queries
    (2, 4, 2, 1, 0),      # a cache with no positions: every row 0, lse -inf
])
def test_empty_inputs(shape):
    B, Hq, Hkv, Nq, n_max = shape
    q = torch.randn(B, Hq, Nq, 16)
    k = v = torch.randn(B, Hkv, n_max, 16)
    out, lse = tritformer.decode_attention(q, k, v, torch.zeros(B, dtype=torch.int32),
                                           return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, Hq, Nq)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_reference_backend(monkeypatch):
    # CPU without the interpreter: the reference in fp32, same semantics (NaN garbage ignored)
    from tritformer.ops import decode as ops_decode
    monkeypatch.setattr(ops_decode, "backend_for", lambda t: "reference")
    monkeypatch.setattr(K, "decode_forward", None)  # the kernels must not be called
    q, k, v, seqlens = make_cache(4, 4, 2, 3, 32, torch.float16)
    check_decode(q, k, v, seqlens)


# ---------------------------------------------------------------------------------------------
# num_splits heuristic (host arithmetic, no kernel)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_programs,n_tiles,expected", [
    (8, 64, 32),     # 264 / 8 = 33 wanted -> 2 tiles per split -> 32 splits, none empty
    (8, 3, 3),       # capped by the tiles: one per split
    (1, 1024, 128),  # capped at MAX_SPLITS (8 tiles each)
    (1, 1000, 125),  # 128 splits of 8 tiles would leave 3 empty: 125
    (256, 64, 1),    # the batch alone fills >= 80% of 2 x 132 programs
    (200, 64, 2),    # below 80%: 2 splits
    (8, 1, 1),       # a single tile is not split
    (4, 64, 64),     # 66 wanted, 64 tiles
])
def test_num_splits_heuristic(n_programs, n_tiles, expected):
    assert K.num_splits_heuristic(n_programs, n_tiles) == expected


def test_num_splits_heuristic_never_leaves_an_empty_split():
    for n_programs in range(1, 300, 7):
        for n_tiles in range(1, 300, 5):
            s = K.num_splits_heuristic(n_programs, n_tiles)
            per = -(-n_tiles // s)
            assert 1 <= s <= min(n_tiles, K.MAX_SPLITS) and (s - 1) * per < n_tiles


# ---------------------------------------------------------------------------------------------
# Errors and torch.compile
# ---------------------------------------------------------------------------------------------
def _args():
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=torch.tensor([3, 20], dtype=torch.int32))


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, r"^q must have 4 dimensions"),
    (lambda a: a.update(q=a["q"].double()), TypeError, r"^q must be float16"),
    (lambda a: a.update(k_cache=[1.0]), TypeError, r"^k_cache must be a torch.Tensor"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, r"^k_cache must have q's dtype"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :10]), ValueError, r"^v_cache must have k_cache's shape"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, r"^k_cache must have q's batch size"),
    (lambda a: a.update(v_cache=a["v_cache"][..., :8]), ValueError, r"^v_cache must have q's head dim"),
    (lambda a: a.update(q=torch.randn(2, 3, 1, 16)), ValueError, r"multiple of k_cache/v_cache's head count"),
    (lambda a: a.update(q=torch.randn(2, 4, 1, 300), k_cache=torch.randn(2, 2, 20, 300),
                        v_cache=torch.randn(2, 2, 20, 300)), ValueError, r"^head dim D of q must be in 1..256"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, r"^cache_seqlens must be int32"),
    (lambda a: a.update(cache_seqlens=[3, 20]), TypeError, r"^cache_seqlens must be a torch.Tensor"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, r"^cache_seqlens must have shape \[B\]"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3, 21], dtype=torch.int32)), ValueError, r"^cache_seqlens values must be in \[0, Nmax=20\].*got 21"),
    (lambda a: a.update(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError, r"^cache_seqlens values .* got -1"),
    (lambda a: a.update(num_splits=0), ValueError, r"^num_splits must be >= 1"),
    (lambda a: a.update(num_splits=2.0), TypeError, r"^num_splits must be an int"),
    (lambda a: a.update(scale=float("nan")), ValueError, r"^scale must be finite"),
    (lambda a: a.update(scale="0.1"), TypeError, r"^scale must be a float"),
    (lambda a: a.update(return_lse=1), TypeError, r"^return_lse must be a bool"),
])
def test_bad_arguments_name_themselves(change, exc, match, monkeypatch):
    monkeypatch.setattr(K, "decode_forward", None)  # errors must come before any launch
    args = _args()
    change(args)
    with pytest.raises(exc, match=match):
        tritformer.decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)


def test_requires_grad_is_refused():
    a = _args()
    a["q"].requires_grad_()
    with pytest.raises(RuntimeError, match=r"inference-only.*tritformer\.attention for training"):
        tritformer.decode_attention(**a)
    with torch.no_grad():  # generation runs without grad: accepted
        out = tritformer.decode_attention(**a)
    assert not out.requires_grad


def test_opcheck():
    q, k, v, seqlens = make_cache(2, 4, 2, 2, 16, torch.float32, lens=[20, 50], garbage=0.0)
    # (..., scale, num_splits, window_left, window_right (0: causal), alibi_slopes, softcap,
    # block_table, cache_leftpad, cache_batch_idx); tests/test_decode_features.py checks the
    # schema with every option set
    torch.library.opcheck(torch.ops.tritformer.decode_attention.default,
                          (q, k, v, seqlens, 0.25, 2, None, 0, None, None, None, None, None))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(x, wq, k_cache, v_cache, seqlens):  # project one token, attend to the cache
        q = (x @ wq).view(x.shape[0], 1, 4, 16).transpose(1, 2)  # (B, H, 1, D), strided view
        return tritformer.decode_attention(q, k_cache, v_cache, seqlens).transpose(1, 2).flatten(1)

    compiled = torch.compile(step, fullgraph=True)  # a graph break would raise here
    x, wq = torch.randn(2, 1, 32), torch.randn(32, 64)
    _, k, v, seqlens = make_cache(2, 4, 2, 1, 16, torch.float32, lens=[20, 50])
    torch.testing.assert_close(compiled(x, wq, k, v, seqlens), step(x, wq, k, v, seqlens),
                               rtol=0, atol=1e-6)
