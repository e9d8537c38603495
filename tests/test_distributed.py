"""tritformer.distributed: ring and Ulysses context-parallel attention on 2 (and 4) Gloo CPU
processes, in Triton's interpreter. Each rank's output, lse and q/k/v gradients are compared
with the same rows of a single-process float64 reference over the full sequence, under the
project's numerics criterion (error <= 2x / 3x PyTorch's own same-dtype error).

The ranks are subprocesses running this file as a script (one spawn per world size runs all
its cases); a hung collective fails the test through the subprocess timeout.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from tritformer import distributed as cp
from tritformer import numerics, reference

# seconds for one spawn (all of its cases). Measured CPU time per rank: ~12 s for the 2-rank
# batch, ~8 s for the 4-rank one (imports included); wall time grows with the machine's load
TIMEOUT = 300
# the spawned runs exercise ops the kernel tests already cover, across processes, as
# tests/test_train.py's DDP run does: marked integration (pyproject.toml), so -m selects them
spawned = pytest.mark.integration

# name -> spec. N = global sequence length, B/H/D as tritformer.attention; seed: inputs
RING = dict(kind="ring", B=2, Hq=2, Hkv=2, D=16, dtype="float16", causal=False, window=None,
            softcap=None, scale=None, layout="zigzag", return_lse=False)
CASES_2 = {
    "ring-contiguous-full-lse": dict(RING, seed=0, N=32, layout="contiguous", return_lse=True),
    "ring-contiguous-causal-gqa-bf16": dict(RING, seed=1, N=32, layout="contiguous", causal=True,
                                            Hq=4, dtype="bfloat16"),
    "ring-zigzag-causal-lse": dict(RING, seed=2, N=64, causal=True, return_lse=True),
    "ring-zigzag-causal-mqa-fp32-softcap": dict(RING, seed=3, N=32, causal=True, Hq=4, Hkv=1,
                                                dtype="float32", softcap=5.0, scale=0.3),
    "ring-zigzag-causal-window": dict(RING, seed=4, N=32, causal=True, window=(6, 0)),
    "ring-zigzag-window-both-sides": dict(RING, seed=5, N=32, window=(10, 5), return_lse=True),
    "ring-contiguous-window-fp32": dict(RING, seed=6, N=32, layout="contiguous", window=(5, 3),
                                        dtype="float32"),
    # key padding travelling with the keys (random, ~40% padded: rows with no visible key give
    # 0 / lse -inf); packed documents (cu_seqlens, every document sharded like a sequence)
    "ring-zigzag-causal-kpm-gqa-lse": dict(RING, seed=12, N=32, causal=True, Hq=4, kpm=True,
                                           return_lse=True),
    "ring-zigzag-varlen-causal-lse": dict(RING, seed=13, N=64, causal=True, B=1,
                                          docs=[0, 16, 24, 48, 64], return_lse=True),
    "ring-contiguous-varlen-gqa": dict(RING, seed=14, N=32, layout="contiguous", B=1, Hq=4,
                                       docs=[0, 6, 20, 32]),
    # chunks > 1: the shards travel as pieces (3 even pieces of each 12-position zigzag run),
    # queries in blocks of a piece's runs; windows and uneven pieces: CASES_REF
    "ring-zigzag-causal-chunks3-lse": dict(RING, seed=10, N=48, causal=True, chunks=3,
                                           return_lse=True),
    "ulysses-zigzag-causal-gqa-lse": dict(RING, seed=7, kind="ulysses", N=32, causal=True, Hq=4,
                                          return_lse=True),
    "ulysses-contiguous-mqa-alibi-fp32": dict(RING, seed=8, kind="ulysses", N=32,
                                              layout="contiguous", Hkv=1, dtype="float32",
                                              alibi=True),
    "ulysses-zigzag-window-softcap-bf16": dict(RING, seed=9, kind="ulysses", N=32, window=(5, 2),
                                               softcap=4.0, dtype="bfloat16"),
    # the full key padding mask gathered in global order; whole documents per rank, so a
    # window and ALiBi combine with packed documents here
    "ulysses-zigzag-causal-kpm-gqa": dict(RING, seed=15, kind="ulysses", N=32, causal=True,
                                          Hq=4, kpm=True, return_lse=True),
    "ulysses-zigzag-varlen-window-alibi": dict(RING, seed=16, kind="ulysses", N=64, B=1, Hq=4,
                                               causal=True, window=(5, 0), alibi=True,
                                               docs=[0, 16, 24, 48, 64], return_lse=True),
    "shard-roundtrip": dict(kind="shard"),
}
CASES_4 = {  # one 4-process case (interpreter time), plus an argument error raised on all ranks
    "ring-zigzag-causal-gqa-lse": dict(RING, seed=0, B=1, N=64, causal=True, Hq=4, return_lse=True),
    # pieces of GQA k/v (Hkv 2 < Hq 4) travelling 3 hops, their dK/dV accumulators 4 (home)
    "ring-zigzag-causal-gqa-chunks2": dict(RING, seed=1, B=1, N=64, causal=True, Hq=4, chunks=2),
    # packed documents over 4 ranks (lengths 32, 8, 24: multiples of 2 * 4)
    "ring-zigzag-varlen-causal-gqa": dict(RING, seed=2, B=1, N=64, causal=True, Hq=4,
                                          docs=[0, 32, 40, 64]),
    "ulysses-heads-not-divisible": dict(kind="error"),
}
# CPU without TRITON_INTERPRET: the fused ops fall back to the fp32 reference; the ring's
# backward then differentiates each block with autograd instead of calling the fused backward
CASES_REF = {
    "ring-zigzag-causal-gqa-lse": dict(RING, seed=0, N=32, causal=True, Hq=4, dtype="float32",
                                       return_lse=True),
    "ring-contiguous-window": dict(RING, seed=1, N=32, layout="contiguous", window=(4, 2),
                                   dtype="float32", return_lse=True),
    # the memory-lean ring on torch's CPU flash kernel: square causal diagonal blocks, full
    # off-diagonal ones (the `bench --op ring` path)
    "ring-zigzag-causal-chunks4": dict(RING, seed=2, N=64, causal=True, dtype="float32",
                                       chunks=4),
    # uneven pieces (16 positions: 5, 5, 6) and a window's edge blocks, with lse
    "ring-contiguous-window-chunks3": dict(RING, seed=3, N=32, layout="contiguous",
                                           window=(5, 3), dtype="float32", chunks=3,
                                           return_lse=True),
    # key padding (pieces carry their mask) and packed documents on the fp32 reference
    "ring-zigzag-causal-kpm-chunks2": dict(RING, seed=4, N=32, causal=True, dtype="float32",
                                           kpm=True, chunks=2, return_lse=True),
    "ring-zigzag-varlen-causal": dict(RING, seed=5, N=32, B=1, causal=True, dtype="float32",
                                      docs=[0, 8, 12, 32], return_lse=True),
}


# ---------------------------------------------------------------------------------------------
# Inputs and references (parent process)
# ---------------------------------------------------------------------------------------------
def _inputs(spec, seed):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, spec["dtype"])
    B, Hq, Hkv, N, D = (spec[k] for k in ("B", "Hq", "Hkv", "N", "D"))
    t = {"q": torch.randn(B, Hq, N, D, generator=g).to(dt),
         "k": torch.randn(B, Hkv, N, D, generator=g).to(dt),
         "v": torch.randn(B, Hkv, N, D, generator=g).to(dt),
         "dout": torch.randn(B, Hq, N, D, generator=g).to(dt),
         "dlse": torch.randn(B, Hq, N, generator=g)}
    if spec.get("alibi"):
        t["alibi"] = torch.rand(Hq, generator=g) * 0.5
    if spec.get("kpm"):
        t["kpm"] = torch.rand(B, N, generator=g) < 0.4
    if spec.get("docs"):
        t["cu"] = torch.tensor(spec["docs"], dtype=torch.int32)
    return t


def _full(spec, t, dtype):
    """Single-process reference over the full sequence in `dtype`: out, lse, dq, dk, dv."""
    leaves = [t[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")]
    kw = dict(causal=spec["causal"], scale=spec["scale"], window=spec["window"],
              softcap=spec["softcap"], return_lse=True,
              alibi_slopes=t["alibi"].to(dtype) if "alibi" in t else None,
              key_padding_mask=t.get("kpm"))
    if "cu" in t:  # packed documents: each attends within itself
        cu = t["cu"].tolist()
        parts = [reference.attention(*(x[:, :, a:b] for x in leaves), **kw)
                 for a, b in zip(cu, cu[1:])]
        out, lse = torch.cat([o for o, _ in parts], 2), torch.cat([m for _, m in parts], 2)
    else:
        out, lse = reference.attention(*leaves, **kw)
    loss = (out.double() * t["dout"].double()).sum()
    if spec["return_lse"]:
        loss = loss + (lse.double() * t["dlse"].double()).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": leaves[0].grad,
            "dk": leaves[1].grad, "dv": leaves[2].grad}


def _my_shard(x, dim, rank, world, layout):
    """Independent of tritformer.distributed: the rows rank r holds."""
    N = x.shape[dim]
    if layout == "contiguous":
        n = N // world
        return x.narrow(dim, rank * n, n)
    c = N // (2 * world)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim)


def _spawn(tmp_path, cases, world, interpret=True):
    """Run `cases` on `world` Gloo processes; returns {case: [per-rank result dict]}."""
    inputs = {name: _inputs(spec, spec["seed"]) for name, spec in cases.items()
              if spec["kind"] in ("ring", "ulysses")}
    spec_path = tmp_path / f"spec{world}.pt"
    torch.save({"cases": cases, "inputs": inputs}, spec_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    store = tmp_path / f"store{world}"
    procs = [subprocess.Popen([sys.executable, __file__, str(spec_path), str(tmp_path), str(r),
                               str(world), str(store)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world}-process run did not finish in {TIMEOUT} s (hung collective?)\n"
                    + "\n".join(p.communicate()[0][-2000:] for p in procs))
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    per_rank = [torch.load(tmp_path / f"result{world}-{r}.pt", weights_only=True)
                for r in range(world)]
    return {name: [res[name] for res in per_rank] for name in cases}, inputs


def _my_positions(N, rank, world, layout, docs=None):
    """The global positions rank r holds: each document (default: one of length N) sharded as
    `_my_shard` shards a sequence, in document order."""
    docs = docs or [0, N]
    return torch.cat([_my_shard(torch.arange(a, b), 0, rank, world, layout)
                      for a, b in zip(docs, docs[1:])])


def _assemble(shards, layout, docs=None):
    """The full-sequence tensor (dim 2) from every rank's shard, by `_my_positions`."""
    world = len(shards)
    N = shards[0].shape[2] * world
    full = shards[0].new_empty(*shards[0].shape[:2], N, *shards[0].shape[3:])
    for r, s in enumerate(shards):
        full[:, :, _my_positions(N, r, world, layout, docs)] = s
    return full


def _check_case(spec, t, ranks):
    """numerics.Check list for out (lse), dq, dk, dv: every rank's shard put back in sequence
    order, against the single-process references over the full sequence (the criterion applies
    to the whole tensor, as for tritformer.attention itself)."""
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    dt = getattr(torch, spec["dtype"])
    ref, base = _full(spec, t, torch.float64), _full(spec, t, dt)
    names = ["out", "dq", "dk", "dv"] + (["lse"] if spec["return_lse"] else [])
    checks = []
    for name in names:
        for r, res in enumerate(ranks):
            assert res[name].dtype == (torch.float32 if name == "lse" else dt), (r, name)
        got = _assemble([res[name] for res in ranks], spec["layout"], spec.get("docs"))
        factor = numerics.FORWARD_FACTOR if name in ("out", "lse") else numerics.GRAD_FACTOR
        checks.append(numerics.check(name, got, ref[name], base[name], factor))
    return checks


@pytest.fixture(scope="module")
def two_ranks(run_once):  # one spawn per session, however many xdist workers draw its tests
    return run_once("cp2", lambda d: _spawn(d, CASES_2, 2))


@pytest.fixture(scope="module")
def four_ranks(run_once):
    return run_once("cp4", lambda d: _spawn(d, CASES_4, 4))


@spawned
@pytest.mark.parametrize("case", [c for c, s in CASES_2.items() if s["kind"] != "shard"])
def test_two_ranks_match_the_full_sequence(two_ranks, case):
    results, inputs = two_ranks
    numerics.assert_checks(_check_case(CASES_2[case], inputs[case], results[case]), case)


@spawned
def test_shard_unshard_roundtrip_and_gradient(two_ranks):
    results, _ = two_ranks
    for r, res in enumerate(results["shard-roundtrip"]):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
        for layout in ("zigzag", "contiguous"):
            torch.testing.assert_close(res[f"{layout}-shard"], _my_shard(x, 2, r, 2, layout),
                                       rtol=0, atol=0)
            torch.testing.assert_close(res[f"{layout}-full"], x, rtol=0, atol=0)
            # loss = sum(full * w) on each rank: each shard's gradient is the sum over ranks
            w = torch.arange(8, dtype=torch.float32)
            want = _my_shard((w * 2).expand(2, 3, 8), 2, r, 2, layout)
            torch.testing.assert_close(res[f"{layout}-grad"], want, rtol=0, atol=0)
        mine = _my_positions(12, r, 2, "zigzag", [0, 4, 12]).float()
        torch.testing.assert_close(res["docs-shard"], mine, rtol=0, atol=0)
        torch.testing.assert_close(res["docs-full"], torch.arange(12.0), rtol=0, atol=0)
        torch.testing.assert_close(res["docs-grad"], 2 * mine, rtol=0, atol=0)


@spawned
@pytest.mark.parametrize("case", [c for c, s in CASES_4.items() if s["kind"] != "error"])
def test_four_ranks_match_the_full_sequence(four_ranks, case):
    results, inputs = four_ranks
    numerics.assert_checks(_check_case(CASES_4[case], inputs[case], results[case]), case)


@spawned
def test_four_ranks_reject_indivisible_heads_without_hanging(four_ranks):
    results, _ = four_ranks
    for res in results["ulysses-heads-not-divisible"]:
        assert "ValueError" in res["error"] and "head count 2" in res["error"], res["error"]


@spawned
def test_reference_backend_ring(tmp_path):
    results, inputs = _spawn(tmp_path, CASES_REF, 2, interpret=False)
    for case, spec in CASES_REF.items():
        for res in results[case]:
            assert res.get("backend") == "torch", res  # the CPU fallback
        numerics.assert_checks(_check_case(spec, inputs[case], results[case]), case)


# ---------------------------------------------------------------------------------------------
# In-process: the block plan, and argument errors (a world of 1)
# ---------------------------------------------------------------------------------------------
def _work(rank, world, n, layout, left, right):
    """Query-key pairs each rank's kernel calls cover over the whole ring."""
    return sum((qs.stop - qs.start) * (ks.stop - ks.start)
               for src in range(world)
               for qs, ks, _, _ in cp._plan(rank, src, world, n, layout, left, right))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_plan_zigzag_causal_balances_and_skips_future_blocks(world):
    n = 16  # local length: two chunks of 8
    N = world * n
    work = [_work(r, world, n, "zigzag", None, 0) for r in range(world)]
    # every rank computes the same area: its diagonal shard, then half a shard per other rank
    assert work == [n * n + (world - 1) * n * n // 2] * world, work
    assert sum(work) < N * N * 0.5 + world * n * n  # about half the square, not all of it
    contiguous = [_work(r, world, n, "contiguous", None, 0) for r in range(world)]
    assert contiguous == [n * n * r + n * n for r in range(world)]  # skips future shards only
    # one kernel call per ring step, as in ring-flash-attention's zigzag
    for r in range(world):
        for src in range(world):
            calls = cp._plan(r, src, world, n, "zigzag", None, 0)
            assert len(calls) == 1, (r, src, calls)
            qs, ks, left_b, right_b = calls[0]
            if src == r:
                assert (qs, ks, left_b, right_b) == (slice(0, n), slice(0, n), None, 0)
            elif src < r:  # the first (earlier) key chunk, every query, unmasked
                assert (qs, ks, left_b, right_b) == (slice(0, n), slice(0, n // 2), None, None)
            else:  # the later query chunk, every key, unmasked
                assert (qs, ks, left_b, right_b) == (slice(n // 2, n), slice(0, n), None, None)


def test_plan_matches_the_global_mask():
    # every (rank, src) plan, expanded to a bool mask, is the global window restricted to the
    # rank's queries and src's keys; disjoint calls; fully-masked blocks never called
    for world, n, layout, left, right in [(2, 8, "zigzag", None, 0), (3, 6, "zigzag", 4, 1),
                                          (2, 8, "zigzag", 5, 0), (4, 4, "contiguous", 3, 2),
                                          (3, 4, "contiguous", None, 0), (2, 8, "zigzag", 9, None)]:
        N = world * n
        glob = reference.window_keep(N, N, left, right)
        pos = lambda r: torch.cat([torch.arange(g, g + m) for _, g, m in
                                   cp._shard_ranges(r, world, n, layout)])
        for r in range(world):
            for src in range(world):
                want = glob[pos(r)][:, pos(src)]
                got = torch.zeros(n, n, dtype=torch.int64)
                for qs, ks, lb, rb in cp._plan(r, src, world, n, layout, left, right):
                    nq, nk = qs.stop - qs.start, ks.stop - ks.start
                    block = reference.window_keep(nq, nk, lb, rb)
                    assert block.any(), (world, layout, r, src, qs, ks)
                    got[qs, ks] += block.long()
                assert got.max() <= 1 and torch.equal(got.bool(), want), (world, layout, r, src)


@pytest.mark.parametrize("world,n,layout,left,right,chunks", [
    (2, 16, "zigzag", None, 0, 2),      # causal: square diagonal blocks, full or skipped others
    (4, 12, "zigzag", None, 0, 3),
    (3, 10, "contiguous", None, 0, 3),  # uneven pieces (3, 3, 4)
    (2, 16, "zigzag", 5, 2, 4),         # a window: edge blocks with local bounds
    (3, 8, "contiguous", None, None, 8),  # one position per piece, no mask
])
def test_chunked_plan_covers_the_global_mask_once(world, n, layout, left, right, chunks):
    # over every ring step, the calls of a rank's query blocks against the pieces it holds
    # cover exactly the global mask restricted to its queries, each pair once
    N = world * n
    glob = reference.window_keep(N, N, left, right)
    pos = lambda r: torch.cat([torch.arange(g, g + m) for _, g, m in
                               cp._shard_ranges(r, world, n, layout)])
    for r in range(world):
        got = torch.zeros(n, N, dtype=torch.int64)
        for t in range(world * chunks):
            src, p = (r - t % world) % world, t // world
            runs = cp._piece(src, world, n, layout, chunks, p)
            kpos = torch.cat([torch.arange(g, g + m) for _, g, m, _ in runs])
            assert len(kpos) == cp._piece_len(world, n, layout, chunks, p)
            for qruns in cp._query_blocks(r, world, n, layout, chunks):
                for qs, ks, lb, rb in cp._plan_runs(qruns, [x[:3] for x in runs], left, right):
                    block = reference.window_keep(qs.stop - qs.start, ks.stop - ks.start, lb, rb)
                    assert block.any()
                    got[qs.start:qs.stop, kpos[ks]] += block.long()
        assert got.max() <= 1 and torch.equal(got.bool(), glob[pos(r)]), (r, world, layout)


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ulysses_attention(q, q, q)


def test_errors_name_the_argument(world_of_one):
    q = torch.randn(1, 2, 8, 16)
    for fn in (cp.ring_attention, cp.ulysses_attention):
        with pytest.raises(NotImplementedError, match="dropout_p"):
            fn(q, q, q, dropout_p=0.1)
        with pytest.raises(NotImplementedError, match="attn_mask"):
            fn(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
        with pytest.raises(ValueError, match="layout"):
            fn(q, q, q, layout="striped")
        with pytest.raises(ValueError, match="even"):
            fn(q[:, :, :7], q[:, :, :7], q[:, :, :7], layout="zigzag")
        with pytest.raises(ValueError, match="k and v must hold the same sequence shard"):
            fn(q, q[:, :, :4], q[:, :, :4])
        with pytest.raises(TypeError, match="causal"):
            fn(q, q, q, causal=1)
    for bad in (0, 5, 1.5, True):  # 8 positions, zigzag: runs of 4
        with pytest.raises(ValueError, match="chunks"):
            cp.ring_attention(q, q, q, chunks=bad)
        with pytest.raises(ValueError, match="window"):
            fn(q, q, q, window=(-2, 0))
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        cp.ring_attention(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        cp.ring_attention(q, q, q, key_padding_mask=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        cp.ring_attention(q, q, q, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="divisible by 2"):  # zigzag: two chunks per document
        cp.ring_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at the sequence length 8"):
        cp.ring_attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32))
    for kw in (dict(window=(2, 0)), dict(chunks=2),
               dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))):
        with pytest.raises(NotImplementedError, match="cu_seqlens"):
            cp.ring_attention(q, q, q, cu_seqlens=cu, **kw)
    with pytest.raises(NotImplementedError, match="B = 1"):
        cp.ring_attention(*(torch.randn(2, 2, 8, 16) for _ in "qkv"), cu_seqlens=cu)
    with pytest.raises(NotImplementedError, match="cu_seqlens .* key_padding_mask"):
        cp.ulysses_attention(q, q, q, cu_seqlens=cu,
                             key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by 2"):
        cp.shard_sequence(torch.randn(1, 2, 7, 16), layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        cp.unshard_sequence(q, layout="striped")


# chunks=2: two pieces of 8 whose dK/dV go straight home (no ring), query blocks of 8
@pytest.mark.parametrize("chunks,layout", [(1, "zigzag"), (2, "contiguous")])
def test_world_of_one_is_plain_attention(world_of_one, chunks, layout):
    # the degenerate ring (no communication) on the interpreter's kernels, forward and backward
    spec = dict(RING, N=16, causal=True, return_lse=True, layout=layout)
    t = _inputs(spec, 7)
    leaves = [t[n].clone().requires_grad_() for n in ("q", "k", "v")]
    out, lse = cp.ring_attention(*leaves, causal=True, return_lse=True, chunks=chunks,
                                 layout=layout)
    torch.autograd.backward([out, lse], [t["dout"], t["dlse"]])
    res = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad,
           "dv": leaves[2].grad}
    numerics.assert_checks(_check_case(spec, t, [res]))


# ---------------------------------------------------------------------------------------------
# Worker (one rank)
# ---------------------------------------------------------------------------------------------
def _run_case(spec, t, rank, world):
    if spec["kind"] == "error":
        q = torch.randn(1, 2, 8, 16)
        try:
            cp.ulysses_attention(q, q, q)
        except ValueError:
            return {"error": traceback.format_exc()}
        return {"error": "no error raised"}
    if spec["kind"] == "shard":
        res = {}
        x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
        for layout in ("zigzag", "contiguous"):
            s = cp.shard_sequence(x, dim=-1, layout=layout).clone().requires_grad_()
            full = cp.unshard_sequence(s, dim=2, layout=layout)
            (full * torch.arange(8, dtype=torch.float32)).sum().backward()
            res.update({f"{layout}-shard": s.detach(), f"{layout}-full": full.detach(),
                        f"{layout}-grad": s.grad})
        # packed documents: each of [0, 4) and [4, 12) sharded like a sequence
        cu = torch.tensor([0, 4, 12], dtype=torch.int32)
        y = torch.arange(12, dtype=torch.float32)
        s = cp.shard_sequence(y, dim=0, cu_seqlens=cu).clone().requires_grad_()
        full = cp.unshard_sequence(s, dim=0, cu_seqlens=cu)
        (full * torch.arange(12, dtype=torch.float32)).sum().backward()
        res.update({"docs-shard": s.detach(), "docs-full": full.detach(), "docs-grad": s.grad})
        return res
    layout = spec["layout"]
    cu = t.get("cu")  # global; each rank passes its own (global // world)
    leaves = [cp.shard_sequence(t[n], layout=layout, cu_seqlens=cu).detach().requires_grad_()
              for n in ("q", "k", "v")]
    fn = cp.ring_attention if spec["kind"] == "ring" else cp.ulysses_attention
    kw = dict(causal=spec["causal"], scale=spec["scale"], window=spec["window"],
              softcap=spec["softcap"], layout=layout, return_lse=True)
    if "alibi" in t:
        kw["alibi_slopes"] = t["alibi"]
    if "chunks" in spec:
        kw["chunks"] = spec["chunks"]
    if "kpm" in t:
        kw["key_padding_mask"] = cp.shard_sequence(t["kpm"], dim=1, layout=layout)
    if cu is not None:
        kw["cu_seqlens"] = cu // world
    out, lse = fn(*leaves, **kw)
    outs, grads = [out], [cp.shard_sequence(t["dout"], layout=layout, cu_seqlens=cu)]
    if spec["return_lse"]:
        outs.append(lse)
        grads.append(cp.shard_sequence(t["dlse"], layout=layout, cu_seqlens=cu))
    torch.autograd.backward(outs, grads)
    from tritformer import backend_for
    return {"out": out.detach(), "lse": lse.detach(), "dq": leaves[0].grad,
            "dk": leaves[1].grad, "dv": leaves[2].grad, "backend": backend_for(out)}


def _worker(spec_path, out_dir, rank, world, store):
    if os.environ.get("TRITON_INTERPRET") == "1":  # as tests/conftest.py
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        from tritformer import _interp_bounds, _interp_patch
        _interp_patch.apply()
        _interp_bounds.enable()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    data = torch.load(spec_path, weights_only=True)
    results = {}
    for name, spec in data["cases"].items():
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            results[name] = _run_case(spec, data["inputs"].get(name), rank, world)
        except Exception:  # reported per case; a rank stuck in a collective times out instead
            results[name] = {"error": traceback.format_exc()}
        print(f"rank {rank} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    torch.save(results, os.path.join(out_dir, f"result{world}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
