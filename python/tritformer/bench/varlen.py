"""`--op varlen`: packed sequences (q/k/v [total, H, D], int32 cu_seqlens); x = the longest
sequence (max_seqlen), the other lengths drawn uniformly from [max/4, max] until the total
reaches the tokens of the attention sweep (batch * seqlen); the batch column = number of
sequences. naive = reference.varlen_attention (a per-sequence loop); sdpa = what users do
without varlen: pad to [num_seqs, H, max_seqlen, D], a bool key-padding (+ causal) mask, SDPA,
unpad (the padding copies are inside the timed call); tritformer = varlen_attention; flash_attn
= flash_attn_varlen_func; flex = a document mask_mod over the packed tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .attention import (_FLEX, _MODE_FACTOR, AttentionSweep, _cu_seqlens, _reference64,
                        attention_providers, visible_pairs)
from .core import DTYPES, Provider, _active_providers, _cuda_only, _leaf_modes, _timed_rows


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
def varlen_visible_pairs(seqlens_q, seqlens_k, causal: bool) -> int:
    """Visible pairs of one head over packed sequences (causal: bottom-right per sequence)."""
    return sum(visible_pairs(int(nq), int(nk), causal) for nq, nk in zip(seqlens_q, seqlens_k))


def varlen_flops(seqlens_q, seqlens_k, heads: int, head_dim: int, causal: bool,
                 mode: str) -> float:
    fwd = 4.0 * heads * varlen_visible_pairs(seqlens_q, seqlens_k, causal) * head_dim
    return fwd * _MODE_FACTOR[mode]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Packing:
    """Packed sequences: lengths, int32 cu_seqlens, and the token -> padded-batch indices (the
    per-batch bookkeeping a data loader computes once) for the padded SDPA path."""
    seqlens_q: list
    seqlens_k: list
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    pad_index_q: torch.Tensor  # packed token t -> s * max_seqlen_q + (t - cu_seqlens_q[s])
    pad_index_k: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens_q)


def varlen_lengths(tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """One sequence of max_len, the others uniform in [max_len/4, max_len], until the total
    reaches `tokens` (the last one cut to fit), in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(max_len, tokens)]
    while sum(lengths) < tokens:
        n = int(torch.randint(max(1, max_len // 4), max_len + 1, (1,), generator=gen))
        lengths.append(min(n, tokens - sum(lengths)))
    order = torch.randperm(len(lengths), generator=gen).tolist()
    return [lengths[i] for i in order]


def packing(seqlens_q: list, seqlens_k: list, device: str) -> Packing:
    def index(lengths, n_max):
        return torch.cat([s * n_max + torch.arange(n) for s, n in enumerate(lengths)]
                         ).to(device)
    lq, lk = torch.tensor(seqlens_q), torch.tensor(seqlens_k)
    return Packing(list(seqlens_q), list(seqlens_k), _cu_seqlens(lq).to(device),
                   _cu_seqlens(lk).to(device), max(seqlens_q), max(seqlens_k),
                   index(seqlens_q, max(seqlens_q)), index(seqlens_k, max(seqlens_k)))


def _packed_qkv(pk: Packing, heads, d, dtype, device, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, heads, d, generator=gen, dtype=torch.float32)
            .to(device, dtype).requires_grad_(grad)
            for total in (sum(pk.seqlens_q), sum(pk.seqlens_k), sum(pk.seqlens_k))]


# ---------------------------------------------------------------------------------------------
# Providers: fn(q, k, v, causal, pk: Packing) -> out [total_q, H, D]
# ---------------------------------------------------------------------------------------------
def _varlen_naive(q, k, v, causal, pk):
    from .. import reference
    return reference.varlen_attention(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, causal=causal)


def _varlen_tritformer(q, k, v, causal, pk):
    from ..ops.attention import varlen_attention
    return varlen_attention(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, pk.max_seqlen_q,
                            pk.max_seqlen_k, causal=causal)


def _varlen_sdpa(q, k, v, causal, pk):
    """Without varlen: pad to [S, H, max_seqlen, D], mask keys past each length (and causal,
    bottom-right within each sequence), SDPA, gather the valid rows back."""
    S, nq, nk = pk.num_seqs, pk.max_seqlen_q, pk.max_seqlen_k

    def pad(t, index, n):
        return (t.new_zeros(S * n, *t.shape[1:]).index_copy(0, index, t)
                .view(S, n, *t.shape[1:]).transpose(1, 2))
    lq = torch.tensor(pk.seqlens_q, device=q.device)
    lk = torch.tensor(pk.seqlens_k, device=q.device)
    j = torch.arange(nk, device=q.device)
    keep = (j[None, :] < lk[:, None])[:, None, None, :]  # [S, 1, 1, Nk]
    if causal:
        i = torch.arange(nq, device=q.device)
        keep = keep & (j[None, None, :] <= i[None, :, None] + (lk - lq)[:, None, None])[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        pad(q, pk.pad_index_q, nq), pad(k, pk.pad_index_k, nk), pad(v, pk.pad_index_k, nk),
        attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(S * nq, *q.shape[1:]).index_select(0, pk.pad_index_q)


def _varlen_flash_attn(q, k, v, causal, pk):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, pk.max_seqlen_q,
                                  pk.max_seqlen_k, causal=causal)


def _varlen_flex(q, k, v, causal, pk):
    """Packed tokens as one [1, H, T, D] sequence with a document mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    dev = q.device
    lq = torch.tensor(pk.seqlens_q, device=dev)
    lk = torch.tensor(pk.seqlens_k, device=dev)
    doc_q = torch.repeat_interleave(torch.arange(pk.num_seqs, device=dev), lq)
    doc_k = torch.repeat_interleave(torch.arange(pk.num_seqs, device=dev), lk)
    pos_q = torch.arange(q.shape[0], device=dev) - pk.cu_seqlens_q.long()[doc_q]
    pos_k = torch.arange(k.shape[0], device=dev) - pk.cu_seqlens_k.long()[doc_k]
    off = lk - lq

    def mask_mod(b, h, i, j):
        keep = doc_q[i] == doc_k[j]
        if causal:
            keep = keep & (pos_k[j] <= pos_q[i] + off[doc_q[i]])
        return keep
    block_mask = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=dev)
    view = lambda t: t.transpose(0, 1)[None]
    out = _FLEX["fn"](view(q), view(k), view(v), block_mask=block_mask,
                      enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def varlen_providers() -> dict[str, Provider]:
    """Providers of the varlen sweep: fn(q, k, v, causal, pk: Packing) -> out [total_q, H, D]."""
    base = attention_providers()
    return {
        "naive": dataclasses.replace(base["naive"], fn=_varlen_naive),
        "sdpa": dataclasses.replace(base["sdpa"], fn=_varlen_sdpa),
        "tritformer": dataclasses.replace(base["tritformer"], fn=_varlen_tritformer),
        "flash_attn": Provider("flash_attn", _varlen_flash_attn,
                               _cuda_only("flash_attn", "flash_attn"),
                               lambda d: "flash_attn (varlen)"),
        "flex": dataclasses.replace(base["flex"], fn=_varlen_flex),
    }


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------
def varlen_max_error(p: Provider, q, k, v, causal, pk: Packing) -> float:
    with torch.no_grad():
        out = p.fn(q, k, v, causal, pk).double()
    err = 0.0
    cq, ck = pk.cu_seqlens_q.tolist(), pk.cu_seqlens_k.tolist()
    for s in range(pk.num_seqs):  # per sequence: the float64 scores of one at a time
        view = lambda t, c: t[c[s]:c[s + 1]].transpose(0, 1)[None]
        if cq[s + 1] == cq[s]:
            continue
        ref = _reference64(view(q, cq), view(k, ck), view(v, ck), causal)
        err = max(err, float((view(out, cq) - ref).abs().max()))
    return err


def varlen_sweep(device: str, quick: bool) -> AttentionSweep:
    """seqlens: the longest packed sequence; tokens: the packed total."""
    if device == "cuda":
        if quick:
            return AttentionSweep((1024, 4096), 16384, (64,), 2048, "bf16")
        return AttentionSweep((512, 1024, 2048, 4096, 8192), 16384, (64, 128), 2048, "bf16")
    if quick:  # as masked: one head, causal only
        return AttentionSweep((64, 128), 192, (64,), 64, "fp32", causal=(True,), reps=1)
    return AttentionSweep((64, 128, 256), 512, (64,), 128, "fp32", reps=3)


def bench_varlen(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                 progress: Callable[[str], None], skipped: dict) -> None:
    """Packed variable-length sequences (module docstring); x = max_seqlen, batch = sequences."""
    sweep = varlen_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    active = _active_providers(varlen_providers(), providers, device, dtype, skipped, "varlen")
    for d in sweep.head_dims:
        heads = max(1, sweep.model_dim // d)
        for n in sweep.seqlens:
            lengths = varlen_lengths(sweep.tokens, n, seed=n)
            pk = packing(lengths, lengths, device)
            for causal in sweep.causal:
                fl = varlen_flops(lengths, lengths, heads, d, causal, "fwd")
                for p in active:
                    progress(f"varlen {p.name} D={d} max_seqlen={n} causal={causal}")
                    q, k, v = _packed_qkv(pk, heads, d, dtype, device, grad=True)
                    err = varlen_max_error(p, q, k, v, causal, pk)
                    fns = _leaf_modes(lambda: p.fn(q, k, v, causal, pk), [q, k, v], sweep.modes)
                    _timed_rows("varlen", p.name, p.backend(device), device, fns, "max_seqlen",
                                n, dict(batch=pk.num_seqs, heads=heads, head_dim=d,
                                        causal=causal),
                                sweep.dtype, emit, sweep.reps,
                                flops={m: fl * f for m, f in _MODE_FACTOR.items()},
                                max_error=err)


def varlen_cases(device: str, quick: bool, providers: list[str]) -> int:
    """The progress steps of bench_varlen (one per provider and sweep point)."""
    sweep = varlen_sweep(device, quick)
    n = len(_active_providers(varlen_providers(), providers, device, DTYPES[sweep.dtype], {},
                              "varlen"))
    return n * len(sweep.head_dims) * len(sweep.seqlens) * len(sweep.causal)


bench_varlen.cases = varlen_cases
