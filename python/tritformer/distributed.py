"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

Two schemes, both on plain ``torch.distributed`` (NCCL on GPUs, Gloo on CPU):

- `ring_attention`: each rank keeps its query shard; the key/value shards travel around the
  ring (``batch_isend_irecv`` to the next rank, overlapped with the local kernel call) and the
  partial outputs are merged with their log-sum-exps in float32. The backward runs the ring
  again; each key/value shard's dK/dV accumulator travels with it and arrives home after
  ``world`` hops. Per block the fused backward is called with the *global* output and lse
  (ring-flash-attention's formulation): P = exp(S - lse) is then the block's slice of the global
  softmax, so the block's dQ/dK/dV are its exact share of the gradient. With ``chunks > 1`` the
  shards travel as ``chunks`` pieces, one after another (per rank: one piece held and one in
  flight instead of whole shards, and query blocks of a piece's size).
- `ulysses_attention`: two all-to-alls turn sequence-sharded q/k/v into head-sharded
  full-sequence tensors, one ordinary `tritformer.attention` call runs on them, and one
  all-to-all shards the output by sequence again. Needs the head count divisible by the world
  size; communication volume does not grow with the ring's ``world`` steps.

Layouts (`shard_sequence` / `unshard_sequence`): "contiguous" gives rank r the r-th of
``world`` equal pieces; "zigzag" cuts the sequence into ``2 * world`` chunks and gives rank r
chunks r and 2*world-1-r, so that under a causal mask every rank does the same work.

Positions: global query i sees global key j under causal iff j <= i, under window=(l, r) iff
i - l <= j <= i + r (self-attention, so bottom-right and top-left alignment coincide).
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Optional

import torch
import torch.distributed as dist

from . import reference
from ._checks import check_attention_inputs, check_attention_options
from .backend import backend_for
from .ops import attention as _attention_ops  # noqa: F401  (registers torch.ops.tritformer.*)

LAYOUTS = ("zigzag", "contiguous")
_KV_TAG, _DKV_TAG = 0, 1  # Gloo matches point-to-point messages by tag: keep the two rings apart


# ---------------------------------------------------------------------------------------------
# Argument checks (all before any communication or kernel launch)
# ---------------------------------------------------------------------------------------------
def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tritformer.distributed needs an initialised default process group: "
                           "call torch.distributed.init_process_group first (torchrun sets the "
                           "environment for it)")
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_unsupported(fn, dropout_p, attn_mask, key_padding_mask, alibi_slopes=None):
    if attn_mask is not None:
        raise NotImplementedError(f"{fn}: attn_mask is not supported (an arbitrary [Nq, Nk] mask "
                                  "does not shard with the sequence); use causal / window")
    if key_padding_mask is not None:
        raise NotImplementedError(f"{fn}: key_padding_mask is not supported; pack sequences "
                                  "without padding instead")
    if not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        raise NotImplementedError(f"{fn}: dropout_p must be 0 (attention dropout is not "
                                  f"supported across ranks), got {dropout_p!r}")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported (the kernel's ALiBi "
                                  "distance has no global position offset); use "
                                  "ulysses_attention, which sees the whole sequence")


def _check_qkv(fn, q, k, v, scale, window, softcap, causal, return_lse, layout):
    check_attention_inputs(q, k, v, scale)
    check_attention_options(q, k, window=window, softcap=softcap)
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    _check_layout(layout)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: k and v must hold the same sequence shard as q (local length "
                         f"{q.shape[2]}), got k of shape {tuple(k.shape)}")


# ---------------------------------------------------------------------------------------------
# Sharding helpers
# ---------------------------------------------------------------------------------------------
def _shard_ranges(rank, world, n, layout):
    """[(local start, global start, length)] of rank's pieces; n = local length."""
    if layout == "contiguous":
        return [(0, rank * n, n)]
    c = n // 2
    return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]


def _shard(x, dim, rank, world, layout):
    total = x.shape[dim]
    n = total // world
    return torch.cat([x.narrow(dim, g, length) for _, g, length in
                      _shard_ranges(rank, world, n, layout)], dim)


def _check_shardable(name, x, dim, world, layout):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
    parts = world * (2 if layout == "zigzag" else 1)
    if x.shape[dim] % parts:
        raise ValueError(f"{name}: the sequence length {x.shape[dim]} (dim {dim}) must be "
                         f"divisible by {parts} for layout={layout!r} on {world} rank(s)")


def _doc_lengths(name, cu_seqlens, total, parts):
    """The document lengths of a cumulative-lengths tensor over `total` positions, each
    divisible by `parts` (every document is sharded like a whole sequence)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor of at least 2 cumulative "
                         f"lengths, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lens) < 0:
        raise ValueError(f"{name} must start at 0, not decrease and end at the sequence length "
                         f"{total}, got {cu}")
    bad = [n for n in lens if n % parts]
    if bad:
        raise ValueError(f"{name}: every document's length must be divisible by {parts} (each "
                         f"is sharded like a whole sequence), got lengths {bad[:8]}")
    return tuple(lens)


def _positions(rank, world, layout, doc_lens, device=None):
    """Global positions of rank's local tokens: each document (global lengths doc_lens) sharded
    by the layout, the documents' shards concatenated."""
    runs, start = [], 0  # (global start, length) of each run, in local order
    for length in doc_lens:
        runs += [(start + g, m) for _, g, m in _shard_ranges(rank, world, length // world, layout)]
        start += length
    # one arange per run, not a Python int per position (Ulysses calls this every layer)
    return torch.cat([torch.arange(g, g + m, dtype=torch.long, device=device) for g, m in runs])


def shard_sequence(x: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag",
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor `x` (the same on every rank) along `dim`.

    layout "contiguous": piece r of world equal pieces; "zigzag": chunks r and 2*world-1-r of
    2*world equal chunks, concatenated. cu_seqlens (packed documents, the *global* cumulative
    lengths along dim): every document is sharded that way, the shards concatenated in document
    order; this rank's cumulative lengths are then cu_seqlens // world (`ring_attention`'s
    cu_seqlens). Differentiable (a selection of x)."""
    _check_layout(layout)
    group, rank, world = _group_info(group)
    _check_shardable("x", x, dim, world, layout)
    dim = dim % x.dim()
    if cu_seqlens is None:
        return _shard(x, dim, rank, world, layout)
    docs = _doc_lengths("cu_seqlens", cu_seqlens, x.shape[dim],
                        world * (2 if layout == "zigzag" else 1))
    return x.index_select(dim, _positions(rank, world, layout, docs, x.device))


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, world, positions):
        ctx.args = dim, group, positions
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        order = torch.argsort(torch.cat(positions)).to(x.device)  # rank-major -> global
        return torch.cat(parts, dim).index_select(dim, order)

    @staticmethod
    def backward(ctx, g):
        # every rank's gradient of the full tensor, restricted to this rank's shard, summed
        # (all_gather's adjoint is a reduce-scatter; all_to_all + sum works on Gloo too)
        dim, group, positions = ctx.args
        send = torch.stack([g.index_select(dim, p.to(g.device)) for p in positions]).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv.sum(0), None, None, None, None


def unshard_sequence(x: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag",
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full sequence from every rank's shard `x` (all-gather), in global order; cu_seqlens:
    the *global* cumulative document lengths `shard_sequence` was given.

    Differentiable: the backward sums the gradients every rank computes for this rank's shard
    (all_gather's adjoint), as torch.distributed.nn.functional.all_gather does."""
    _check_layout(layout)
    group, rank, world = _group_info(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
    dim = dim % x.dim()
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"x: a zigzag shard holds two equal chunks, its length along dim {dim} "
                         f"must be even, got {x.shape[dim]}")
    total = x.shape[dim] * world
    docs = ((total,) if cu_seqlens is None else
            _doc_lengths("cu_seqlens", cu_seqlens, total, world * (2 if layout == "zigzag" else 1)))
    positions = [_positions(r, world, layout, docs) for r in range(world)]
    return _Unshard.apply(x, dim, group, world, positions)


# ---------------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------------
def _pair(qp, kp, left, right):
    """The kernel call for query run qp against key run kp, each (local start, global start,
    length), under the global window (left, right) (None = unbounded): (q slice, k slice,
    left_b, right_b) in the kernel's bottom-right-aligned local offsets, or None when no query
    of qp sees any key of kp. A side that masks nothing in this block becomes None (no masked
    tiles)."""
    lq0, gq0, n_q = qp
    lk0, gk0, n_k = kp
    if n_q == 0 or n_k == 0:
        return None
    d = gq0 - gk0  # local query i sees local key j iff i + d - left <= j <= i + d + right
    lo = 0 if right is None else max(0, -d - right)            # first row with a key
    hi = n_q - 1 if left is None else min(n_q - 1, n_k - 1 - d + left)  # last row with a key
    if lo > hi:
        return None
    off = d - (n_k - n_q)  # the kernel's diagonal is at j = i + n_k - n_q
    left_b = None if left is None or n_q - 1 + d - left <= 0 else left - off
    right_b = None if right is None or n_k - 1 <= d + right else right + off
    return slice(lq0, lq0 + n_q), slice(lk0, lk0 + n_k), left_b, right_b


def _span(runs):
    """The local slice covering adjacent runs (local start, global start, length)."""
    return slice(runs[0][0], runs[-1][0] + runs[-1][2])


def _plan_runs(qruns, kruns, left, right):
    """Kernel calls of the query runs `qruns` against the key runs `kruns` (each a list of
    adjacent (local start, global start, length) runs in increasing global order): the
    block-pair calls, merged into one call where a merged call masks the same pairs."""
    grid = [[_pair(a, b, left, right) for b in kruns] for a in qruns]
    calls = [p for row in grid for p in row if p is not None]
    if len(calls) <= 1:
        return calls
    qall, kall = _span(qruns), _span(kruns)
    full = lambda p: p is not None and p[2] is None and p[3] is None
    if all(full(p) for row in grid for p in row):
        return [(qall, kall, None, None)]
    same = [r[1:] for r in qruns] == [r[1:] for r in kruns] and qall.start == kall.start == 0
    if same and left is None and right == 0:
        # the same positions on both sides under plain causal: local order is global order,
        # so one causal call (zigzag's second chunk sees all of the first)
        return [(qall, kall, None, 0)]
    for a, row in enumerate(grid):  # one query run sees every key fully, the others nothing
        if all(full(p) for p in row) and all(p is None for i, r in enumerate(grid) if i != a
                                             for p in r):
            return [(row[0][0], kall, None, None)]
    for b in range(len(kruns)):  # one key run seen fully by every query, the others by none
        if all(full(row[b]) for row in grid) and all(p is None for row in grid
                                                       for j, p in enumerate(row) if j != b):
            return [(qall, grid[0][b][1], None, None)]
    return calls


def _plan(rank, src, world, n, layout, left, right):
    """Kernel calls of `rank`'s queries against the key/value shard of rank `src` (whole
    shards: chunks=1)."""
    return _plan_runs(_shard_ranges(rank, world, n, layout), _shard_ranges(src, world, n, layout),
                      left, right)


def _piece(src, world, n, layout, chunks, p):
    """Piece p of `src`'s shard cut into `chunks` pieces: the p-th sub-run of each of the
    shard's runs, concatenated. Returns [(offset in the piece, global start, length, local start
    in src's shard)]; every source's piece p has the same length."""
    runs, off = [], 0
    for lo, g, m in _shard_ranges(src, world, n, layout):
        a, b = m * p // chunks, m * (p + 1) // chunks
        runs.append((off, g + a, b - a, lo + a))
        off += b - a
    return runs


def _query_blocks(rank, world, n, layout, chunks):
    """The query runs of one kernel-call group: the whole shard when chunks = 1, else each
    sub-run alone (as many rows as a key piece's sub-run: diagonal blocks stay square)."""
    runs = _shard_ranges(rank, world, n, layout)
    if chunks == 1:
        return [runs]
    return [[(lo + m * p // chunks, g + m * p // chunks, m * (p + 1) // chunks - m * p // chunks)]
            for lo, g, m in runs for p in range(chunks)]


def _gather(t, runs, chunks):
    """The contiguous piece of shard `t` (dim 2) made of `runs` (from `_piece`)."""
    if chunks == 1:
        return t.contiguous()
    return torch.cat([t.narrow(2, lo, m) for _, _, m, lo in runs], 2)


def _scatter_add(dst, piece, runs):
    for off, _, m, lo in runs:
        dst.narrow(2, lo, m).add_(piece.narrow(2, off, m))


def _own_piece(k, v, kpm, rank, world, n, layout, chunks, p):
    """[k, v] (and the key padding mask as uint8, when given) of this rank's piece p: what
    travels the ring."""
    runs = _piece(rank, world, n, layout, chunks, p)
    kv = [_gather(k, runs, chunks), _gather(v, runs, chunks)]
    if kpm is not None:  # [B, n] along dim 1; uint8 on the wire (Gloo has no bool)
        m = kpm.to(torch.uint8)
        kv.append(m.contiguous() if chunks == 1 else
                  torch.cat([m.narrow(1, lo, length) for _, _, length, lo in runs], 1))
    return kv


def _kpm(kv, ks):
    """The key padding mask of the key slice ks of the held piece (None without one)."""
    return kv[2][:, ks].bool() if len(kv) > 2 else None


def _calls(rank, src, world, n, layout, chunks, p, left, right, doc_lens, device):
    """[(q slice, k slice, left_b, right_b, _Seg or None)]: the kernel calls of this rank's
    queries against piece p of src's shard."""
    if doc_lens is not None:
        everything = slice(0, n)
        return [(everything, everything, lb, rb, seg) for seg, lb, rb in
                _varlen_calls(rank, src, world, layout, doc_lens, left, right, device)]
    kruns = [r[:3] for r in _piece(src, world, n, layout, chunks, p)]
    return [(qs, ks, lb, rb, None) for qruns in _query_blocks(rank, world, n, layout, chunks)
            for qs, ks, lb, rb in _plan_runs(qruns, kruns, left, right)]


class _Ring:
    def __init__(self, group, rank, world):
        self.group, self.world = group, world
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)

    def exchange(self, send, recv, tag):
        """Start sending the tensors `send` to the next rank and receiving the previous rank's
        into the buffers `recv`; returns the requests."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in recv]
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs):
    for r in reqs:
        r.wait()


def _merge(acc_out, acc_lse, out_b, lse_b):
    """acc <- the softmax-weighted combination of acc and a block result, in place (float32).
    Rows with lse = -inf on both sides (no visible key yet) stay 0 / -inf, without NaN."""
    new = torch.logaddexp(acc_lse, lse_b)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_acc = torch.exp(acc_lse - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    acc_out.mul_(w_acc).add_(out_b.float() * w_b)
    acc_lse.copy_(new)


def _cpu_flash(q, k, left, right, softcap) -> bool:
    """Whether a CPU block runs on torch's CPU flash kernel (O(n) memory, no [n, n] scores): no
    softcap, and either no mask or the causal diagonal of a square block (no row without a
    key). Other blocks (windows' edges, softcap) take the fp32 reference."""
    return (q.device.type == "cpu" and not softcap and left is None
            and (right is None or (right == 0 and q.shape[2] == k.shape[2])))


def _heads_like(t, q):
    """k / v with their heads repeated up to q's (GQA / MQA) for the CPU flash kernel."""
    return t if t.shape[1] == q.shape[1] else t.repeat_interleave(q.shape[1] // t.shape[1], 1)


def _heads_sum(g, t):
    """The gradient of `_heads_like(t, q)` summed back to t's heads."""
    B, H, n, D = t.shape
    return g if g.shape[1] == H else g.view(B, H, g.shape[1] // H, n, D).sum(2)


class _Seg:
    """A packed-documents block: one varlen kernel call over the whole local q and key piece,
    sequence s pairing q rows cu_q[s]:cu_q[s+1] with keys cu_k[s]:cu_k[s+1] (`_varlen_calls`)."""

    def __init__(self, q_lens, k_lens, device):
        self.q_lens, self.k_lens = q_lens, k_lens
        cum = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32,
                                        device=device)
        self.cu_q, self.cu_k = cum(q_lens), cum(k_lens)
        self.max_q, self.max_k = max(q_lens), max(k_lens)

    @staticmethod
    def kernel_args(seg):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of the fused ops for a
        block `seg` (None: a dense block)."""
        return (None, None, 0, 0) if seg is None else (seg.cu_q, seg.cu_k, seg.max_q, seg.max_k)

    def keep(self, left, right, device):
        """The dense bool mask [sum q_lens, sum k_lens] of the call (for the fp32 reference):
        each sequence's own block, under the window aligned bottom-right within it."""
        keep = torch.zeros(sum(self.q_lens), sum(self.k_lens), dtype=torch.bool, device=device)
        i = j = 0
        for nq, nk in zip(self.q_lens, self.k_lens):
            if nq and nk:
                keep[i:i + nq, j:j + nk] = reference.window_keep(nq, nk, left, right, device)
            i, j = i + nq, j + nk
        return keep


def _block_fwd(q, k, v, scale, left, right, softcap, ref, kpm=None, seg=None):
    if ref and kpm is None and seg is None and _cpu_flash(q, k, left, right, softcap):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), _heads_like(k, q).float(), _heads_like(v, q).float(), 0.0, right == 0,
            scale=scale)
    if ref:  # CPU without Triton's interpreter: the fp32 reference (as tritformer.attention)
        keep = None if seg is None else seg.keep(left, right, q.device)
        if seg is not None:
            left = right = None
        return reference._attention(q.float(), k.float(), v.float(), scale, left, right, True,
                                    attn_mask=keep, key_padding_mask=kpm, softcap=softcap)
    # (out, lse): the merge and the backward use the merged lse alone (no fp32 residual)
    cu_q, cu_k, mq, mk = _Seg.kernel_args(seg)
    return torch.ops.tritformer.attention_fwd(q, k, v, None, kpm, None, cu_q, cu_k, None, scale,
                                              left, right, softcap, 0.0, mq, mk, True)[:2]


def _block_bwd(do, q, k, v, out, lse, dlse, scale, left, right, softcap, ref, kpm=None,
               seg=None):
    """This block's share of dq, dk, dv given the global out / lse (and dlse, may be None)."""
    if not ref:
        cu_q, cu_k, mq, mk = _Seg.kernel_args(seg)
        dq, dk, dv, _ = torch.ops.tritformer.attention_bwd(
            do, q, k, v, out, lse, dlse, None, kpm, None, cu_q, cu_k, None, scale, left, right,
            softcap, 0.0, mq, mk, False, True)
        return dq, dk, dv
    if (dlse is None and kpm is None and seg is None
            and _cpu_flash(q, k, left, right, softcap)):
        # torch's CPU flash backward takes (out, lse) as the fused one does: the global ones
        # give this block's exact share of dq / dk / dv (D = rowsum(dout * out) is global)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.float(), q.float(), _heads_like(k, q).float(), _heads_like(v, q).float(),
            out.float(), lse, 0.0, right == 0, scale=scale)
        return dq, _heads_sum(dk, k), _heads_sum(dv, v)
    # reference backend: differentiate the block's (out_b, lse_b) with the merge's chain rule:
    # out = sum_b w_b out_b, w_b = exp(lse_b - lse), so dL/dout_b = w_b dout and
    # dL/dlse_b = w_b (rowsum(dout * (out_b - out)) + dlse)
    keep = None if seg is None else seg.keep(left, right, q.device)
    if seg is not None:
        left = right = None
    with torch.enable_grad():
        qb, kb, vb = (t.detach().float().requires_grad_() for t in (q, k, v))
        ob, lb = reference._attention(qb, kb, vb, scale, left, right, True, attn_mask=keep,
                                      key_padding_mask=kpm, softcap=softcap)
        finite = torch.isfinite(lse)
        w = torch.where(finite, torch.exp(lb.detach() - torch.where(finite, lse, 0.0)), 0.0)
        dof = do.float()
        g_lse = (dof * (ob.detach() - out.float())).sum(-1)
        if dlse is not None:
            g_lse = g_lse + dlse.float()
        g_lse = torch.where(w > 0, w * g_lse, 0.0)
        return torch.autograd.grad((ob, lb), (qb, kb, vb), (w.unsqueeze(-1) * dof, g_lse))


def _varlen_calls(rank, src, world, layout, doc_lens, left, right, device):
    """Kernel calls of `rank`'s packed documents against `src`'s: [(_Seg, left_b, right_b)].

    Every document is sharded like a whole sequence (its local length doc_lens[d] cut into the
    layout's runs), so which run of rank sees which run of src fully, causally or not at all is
    the same for every document; the plan of a unit document (runs of 2) gives it. Each planned
    call selects runs [i0, i1) of the queries and [a0, a1) of the keys; per document it becomes
    the sequences (before-q, -), (-, before-k), (q-runs, k-runs), (after-q, -), (-, after-k), so
    one varlen call covers every document and rows or keys outside the block see nothing."""
    n_runs = 2 if layout == "zigzag" else 1
    unit = 2
    calls = []
    for qs, ks, lb, rb in _plan_runs(_shard_ranges(rank, world, n_runs * unit, layout),
                                     _shard_ranges(src, world, n_runs * unit, layout), left, right):
        i0, i1, a0, a1 = qs.start // unit, qs.stop // unit, ks.start // unit, ks.stop // unit
        q_lens, k_lens = [], []
        for length in doc_lens:
            c = length // n_runs
            for nq, nk in ((i0 * c, 0), (0, a0 * c), ((i1 - i0) * c, (a1 - a0) * c),
                           ((n_runs - i1) * c, 0), (0, (n_runs - a1) * c)):
                if nq or nk:
                    q_lens.append(nq)
                    k_lens.append(nk)
        calls.append((_Seg(q_lens, k_lens, device), lb, rb))
    return calls


def _seq(t, s):
    return t[:, :, s]


class _RingAttention(torch.autograd.Function):
    """Ring steps t = 0 .. world * chunks - 1: at step t this rank computes with piece t // world
    of the shard of rank (rank - t % world); a piece is its home rank's own at t % world = 0,
    else received from the previous rank, which computed with it one step before. A piece thus
    travels world - 1 hops (its dK/dV accumulator one more: home), and each rank holds one piece
    plus the one in flight instead of whole shards when chunks > 1."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, group, rank, world, layout, scale, left, right, softcap,
                chunks, doc_lens):
        ref = backend_for(q) in ("reference", "torch")  # the CPU fallback (either name)
        ring = _Ring(group, rank, world)
        n = q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        steps = world * chunks
        kv = _own_piece(k, v, kpm, rank, world, n, layout, chunks, 0)
        for t in range(steps):
            s, p = t % world, t // world
            if s + 1 < world:  # the next holder's piece is in flight while this one is computed
                nxt = [torch.empty_like(x) for x in kv]
                reqs = ring.exchange(kv, nxt, _KV_TAG)
            for qs, ks, lb, rb, seg in _calls(rank, (rank - s) % world, world, n, layout, chunks,
                                              p, left, right, doc_lens, q.device):
                o_b, l_b = _block_fwd(_seq(q, qs), _seq(kv[0], ks), _seq(kv[1], ks), scale, lb,
                                      rb, softcap, ref, _kpm(kv, ks), seg)
                _merge(_seq(out, qs), lse[:, :, qs], o_b, l_b)
                del o_b, l_b
            if s + 1 < world:
                _wait(reqs)
                kv = nxt
            elif t + 1 < steps:  # this rank's next own piece starts its round
                kv = None
                kv = _own_piece(k, v, kpm, rank, world, n, layout, chunks, p + 1)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, kpm, out, lse)
        ctx.args = group, rank, world, layout, scale, left, right, softcap, ref, chunks, doc_lens
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kpm, out, lse = ctx.saved_tensors
        group, rank, world, layout, scale, left, right, softcap, ref, chunks, doc_lens = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        ring = _Ring(group, rank, world)
        n = q.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        home = None  # this shard's dK/dV (float32), filled as its pieces' accumulators return
        steps = world * chunks
        kv = _own_piece(k, v, kpm, rank, world, n, layout, chunks, 0)
        sent, sent_bufs = [], []  # the previous step's dK/dV accumulator, on its way onward

        def arrive(acc, p):  # piece p's accumulator is home after `world` hops
            nonlocal home
            if chunks == 1:
                home = acc
                return
            if home is None:
                home = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                        torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
            runs = _piece(rank, world, n, layout, chunks, p)
            _scatter_add(home[0], acc[0], runs)
            _scatter_add(home[1], acc[1], runs)

        for t in range(steps):
            s, p = t % world, t // world
            if s + 1 < world:
                nxt = [torch.empty_like(x) for x in kv]
                reqs = ring.exchange(kv, nxt, _KV_TAG)
            if t > 0 and world > 1:
                # from the previous rank: the accumulator of the piece held now (s > 0), or this
                # rank's piece p - 1 coming home (s = 0); same shape as that piece's k
                m = kv[0].shape[2] if s > 0 else _piece_len(world, n, layout, chunks, p - 1)
                acc = [_f32(k, m), _f32(v, m)]
                acc_reqs = ring.exchange([], acc, _DKV_TAG)
            dk, dv = _f32(k, kv[0].shape[2]).zero_(), _f32(v, kv[1].shape[2]).zero_()
            for qs, ks, lb, rb, seg in _calls(rank, (rank - s) % world, world, n, layout, chunks,
                                              p, left, right, doc_lens, q.device):
                dq_b, dk_b, dv_b = _block_bwd(
                    _seq(dout, qs), _seq(q, qs), _seq(kv[0], ks), _seq(kv[1], ks),
                    _seq(out, qs), lse[:, :, qs], None if dlse is None else dlse[:, :, qs],
                    scale, lb, rb, softcap, ref, _kpm(kv, ks), seg)
                _seq(dq, qs).add_(dq_b.float())
                _seq(dk, ks).add_(dk_b.float())
                _seq(dv, ks).add_(dv_b.float())
                del dq_b, dk_b, dv_b
            if t > 0 and world > 1:
                _wait(acc_reqs)
                if s > 0:  # the contributions of the ranks this piece visited before
                    dk.add_(acc[0])
                    dv.add_(acc[1])
                else:
                    arrive(acc, p - 1)
                acc = None
            _wait(sent)
            if world > 1:  # pass the accumulator on (home after the last holder, s = world - 1)
                sent_bufs = [dk, dv]
                sent = ring.exchange(sent_bufs, [], _DKV_TAG)
            else:
                arrive([dk, dv], p)
            del dk, dv
            if s + 1 < world:
                _wait(reqs)
                kv = nxt
            elif t + 1 < steps:
                kv = None
                kv = _own_piece(k, v, kpm, rank, world, n, layout, chunks, p + 1)
        if world > 1:  # the last piece's accumulator comes home
            acc = [_f32(k, _piece_len(world, n, layout, chunks, chunks - 1)),
                   _f32(v, _piece_len(world, n, layout, chunks, chunks - 1))]
            acc_reqs = ring.exchange([], acc, _DKV_TAG)
            _wait(acc_reqs)
            arrive(acc, chunks - 1)
            _wait(sent)
            del sent_bufs
        return (dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)) + (None,) * 11


def _piece_len(world, n, layout, chunks, p):
    """The length of piece p (the same for every rank's shard)."""
    return sum(r[2] for r in _piece(0, world, n, layout, chunks, p))


def _f32(t, m):
    """An uninitialised float32 buffer shaped like t with m positions along dim 2."""
    return torch.empty(t.shape[0], t.shape[1], m, t.shape[3], dtype=torch.float32,
                       device=t.device)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                   causal: bool = False, scale: Optional[float] = None,
                   window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
                   alibi_slopes: Optional[torch.Tensor] = None, return_lse: bool = False,
                   layout: str = "zigzag", chunks: int = 1,
                   key_padding_mask: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   attn_mask=None):
    """Attention over a sequence sharded across `group`'s ranks, keys/values passed round a ring.

    Args:
        q: [B, Hq, n, D], this rank's shard of the queries (`shard_sequence` with the same
            `layout`); every rank holds the same B, Hq, n, D.
        k, v: [B, Hkv, n, D], this rank's shard of the keys and values (Hq % Hkv == 0: GQA/MQA).
        group: the process group (default: the world).
        causal, scale, window, softcap: as `tritformer.attention`, in global positions (the
            whole sequence is both queries and keys, so causal is j <= i).
        return_lse: also return this rank's rows of the global lse [B, Hq, n] float32.
        layout: "zigzag" (default; balances causal work) or "contiguous".
        chunks: cut each shard into this many pieces (each of the layout's runs into `chunks`
            sub-runs) that travel the ring one at a time, and the queries into blocks of the
            same size. Per-rank memory beyond the outputs and gradients falls from about 13
            shard-sized buffers (two k/v shards, one in flight, dK/dV accumulators travelling
            and arriving, block gradients) to about 13 / chunks; the price is world * chunks
            ring steps of smaller kernel calls and messages. 1 (default): whole shards, the
            fewest and largest calls (the choice on GPUs unless memory is what runs out).
        key_padding_mask: bool [B, n], True = padding: this rank's shard of the [B, N] mask
            (`shard_sequence(mask, dim=1, layout=...)`); it travels with the keys. A row whose
            keys are all padding gives 0 (lse -inf), as `tritformer.attention`.
        cu_seqlens: packed documents (B = 1): this rank's cumulative document lengths, int32
            [num_docs + 1] from 0 to n, the same on every rank: the global ones // world, every
            document sharded like a whole sequence (`shard_sequence(x, cu_seqlens=global)`,
            ring-flash-attention's zigzag varlen convention). Attention stays within each
            document (causal within it). Not with window or chunks > 1.

    Returns out [B, Hq, n, D] in q's dtype (and lse). Gradients flow to q, k, v and through lse.

    Not supported (raise NotImplementedError): alibi_slopes, dropout_p, attn_mask. Every rank
    must call this with the same shapes and arguments.
    """
    _check_unsupported("ring_attention", dropout_p, attn_mask, None, alibi_slopes)
    _check_qkv("ring_attention", q, k, v, scale, window, softcap, causal, return_lse, layout)
    if key_padding_mask is not None:
        check_attention_options(q, k, key_padding_mask=key_padding_mask)
    group, rank, world = _group_info(group)
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"ring_attention: with layout='zigzag' each rank holds two equal chunks, "
                         f"so q's local length must be even, got {q.shape[2]} (q shape "
                         f"{tuple(q.shape)})")
    runs = 2 if layout == "zigzag" else 1
    if (isinstance(chunks, bool) or not isinstance(chunks, numbers.Integral) or chunks < 1
            or chunks > q.shape[2] // runs):
        raise ValueError(f"ring_attention: chunks must be an int in [1, {q.shape[2] // runs}] "
                         f"(each of the {runs} run(s) of a local shard of {q.shape[2]} positions "
                         f"cut into non-empty pieces), got {chunks!r}")
    doc_lens = None
    if cu_seqlens is not None:
        for what, bad in (("window", window is not None), ("chunks > 1", chunks != 1),
                          ("key_padding_mask", key_padding_mask is not None),
                          (f"a batch of {q.shape[0]} (packed documents are one row: B = 1)",
                           q.shape[0] != 1)):
            if bad:
                raise NotImplementedError(f"ring_attention: cu_seqlens (packed documents) with "
                                          f"{what} is not supported")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on q's device {q.device}, got "
                             f"{cu_seqlens.device}")
        doc_lens = _doc_lengths("cu_seqlens", cu_seqlens, q.shape[2], runs)
    left, right = reference.window_bounds(causal, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, key_padding_mask, group, rank, world, layout, scale,
                                    left, right, float(softcap) if softcap else 0.0, int(chunks),
                                    doc_lens)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Ulysses (all-to-all) attention
# ---------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with equal splits along dim 0; its adjoint is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = torch.empty_like(g, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, g.contiguous(), group=ctx.group)
        return out, None


def _seq_to_heads(x, group, world, perm):
    """[B, H, n, D] sequence shard -> [B, H/world, N, D] head shard, global order. perm: for
    each global position, its index in the rank-major sequence (rank 0's shard, rank 1's, ...),
    None when they coincide (contiguous, one sequence)."""
    B, H, n, D = x.shape
    send = x.reshape(B, world, H // world, n, D).transpose(0, 1)  # [W, B, H/W, n, D]
    recv = _AllToAll.apply(send, group)  # [W (source rank), B, H/W, n, D]
    y = recv.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * n, D)
    return y if perm is None else y.index_select(2, perm.to(y.device))


def _heads_to_seq(y, group, world, perm):
    """Inverse of `_seq_to_heads`: [B, h, N, D] (global order) -> [B, h * world, N/world, D]."""
    B, h, N, D = y.shape
    n = N // world
    if perm is not None:
        y = y.index_select(2, torch.argsort(perm).to(y.device))
    send = y.reshape(B, h, world, n, D).permute(2, 0, 1, 3, 4)  # [W (dest rank), B, h, n, D]
    recv = _AllToAll.apply(send, group)  # [W (source = head group), B, h, n, D]
    return recv.transpose(0, 1).reshape(B, h * world, n, D)


def _gather_mask(kpm, group, world, positions):
    """The full [B, N] key padding mask, global order, from every rank's [B, n] shard."""
    parts = [torch.empty_like(kpm, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, kpm.to(torch.uint8).contiguous(), group=group)
    order = torch.argsort(torch.cat(positions)).to(kpm.device)
    return torch.cat(parts, 1).index_select(1, order).bool()


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                      causal: bool = False, scale: Optional[float] = None,
                      window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
                      alibi_slopes: Optional[torch.Tensor] = None, return_lse: bool = False,
                      layout: str = "zigzag", key_padding_mask: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      attn_mask=None):
    """DeepSpeed-Ulysses attention: sequence-sharded in and out, head-sharded in between.

    Arguments as `ring_attention` (q [B, Hq, n, D] and k/v [B, Hkv, n, D] this rank's shards in
    `layout`; key_padding_mask [B, n] and cu_seqlens, this rank's, as there), plus alibi_slopes
    ([Hq] or [B, Hq], the global heads; [Hq] with cu_seqlens) as `tritformer.attention`. Each
    rank sees whole sequences (documents), so windows, softcap and ALiBi combine with packed
    documents here. Hq must be divisible by the world size. When Hkv is not, k/v heads are
    repeated up to lcm(Hkv, world) (a GQA group never straddles two ranks) before the exchange.

    Not supported (raise NotImplementedError): dropout_p, attn_mask; key_padding_mask together
    with cu_seqlens.
    """
    _check_unsupported("ulysses_attention", dropout_p, attn_mask, None)
    _check_qkv("ulysses_attention", q, k, v, scale, window, softcap, causal, return_lse, layout)
    check_attention_options(q, k, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask)
    group, rank, world = _group_info(group)
    Hq, Hkv, n = q.shape[1], k.shape[1], q.shape[2]
    if Hq % world:
        raise ValueError(f"ulysses_attention: q's head count {Hq} must be divisible by the world "
                         f"size {world} (use ring_attention otherwise)")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"ulysses_attention: with layout='zigzag' each rank holds two equal "
                         f"chunks, so q's local length must be even, got {n}")
    docs = None
    if cu_seqlens is not None:
        if key_padding_mask is not None or q.shape[0] != 1:
            raise NotImplementedError("ulysses_attention: cu_seqlens (packed documents) with "
                                      + ("key_padding_mask" if key_padding_mask is not None
                                         else f"a batch of {q.shape[0]} (B = 1)")
                                      + " is not supported")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on q's device {q.device}, got "
                             f"{cu_seqlens.device}")
        docs = tuple(m * world for m in
                     _doc_lengths("cu_seqlens", cu_seqlens, n, 2 if layout == "zigzag" else 1))
    if Hkv % world:
        rep = math.lcm(Hkv, world) // Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    positions = [_positions(r, world, layout, docs or (n * world,)) for r in range(world)]
    perm = (None if layout == "contiguous" and docs is None
            else torch.argsort(torch.cat(positions)))
    qh, kh, vh = (_seq_to_heads(t, group, world, perm) for t in (q, k, v))
    slopes = None
    if alibi_slopes is not None:
        h = Hq // world
        slopes = alibi_slopes[..., rank * h:(rank + 1) * h]
    from .ops.attention import attention, varlen_attention
    if docs is not None:  # every rank holds whole documents of its heads: one varlen call
        cu = torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32, device=q.device)
        packed = lambda t: t[0].transpose(0, 1)  # [1, h, N, D] -> [N, h, D] (a view)
        res = varlen_attention(packed(qh), packed(kh), packed(vh), cu, cu, max(docs), max(docs),
                               causal=causal, scale=scale, window=window, softcap=softcap,
                               alibi_slopes=slopes, return_lse=return_lse)
        res = ((res[0].transpose(0, 1).unsqueeze(0), res[1].unsqueeze(0)) if return_lse
               else res.transpose(0, 1).unsqueeze(0))
    else:
        kpm = (None if key_padding_mask is None
               else _gather_mask(key_padding_mask, group, world, positions))
        res = attention(qh, kh, vh, causal=causal, scale=scale, window=window, softcap=softcap,
                        alibi_slopes=slopes, key_padding_mask=kpm, return_lse=return_lse)
    if not return_lse:
        return _heads_to_seq(res, group, world, perm)
    out, lse = res
    return (_heads_to_seq(out, group, world, perm),
            _heads_to_seq(lse.unsqueeze(-1), group, world, perm).squeeze(-1))


__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "unshard_sequence"]
