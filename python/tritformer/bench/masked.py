"""`--op masked` runs two sweeps, with rows op=masked_padding and op=masked_dense:
- masked_padding: a padded batch, key_padding_mask [B, N] (True = pad), each batch row's valid
  length drawn uniformly from [N/2, N] (~25% padding). naive = reference.attention with the
  mask; sdpa = torch SDPA with the equivalent bool attn_mask [B, 1, N, N] (True = attend; the
  causal mask folded in), built inside the timed call as a user would; flash_attn = unpad,
  flash_attn_varlen_func, pad back (what flash_attn's bert_padding does); flex = a mask_mod over
  the same mask. max_error is taken over the valid query rows (padded rows are don't-care in a
  padded batch, and flash_attn's unpadded path leaves them 0).
- masked_dense: a dense bool attn_mask [B, 1, N, N] (a document mask: each row packs documents
  of random lengths, a token attends within its document), broadcast over heads. The fused
  kernel reads it tile by tile; naive materialises the scores. flash_attn takes no dense mask.
  Both also run a forward peak-memory sweep (B = 1, H = 1, causal) over longer sequences.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .attention import (_FLEX, _MODE_FACTOR, AttentionSweep, _cu_seqlens, _qkv, _reference64,
                        attention_providers, interpreter_tiles)
from .core import (DTYPES, Provider, _active_providers, _cuda_only, _leaf_modes, _timed_rows,
                   peak_bytes)


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
def masked_visible_pairs(batch: int, heads: int, n_q: int, n_k: int, causal: bool,
                         attn_mask: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None) -> int:
    """Visible (query, key) pairs summed over batch and heads (module docstring, P_masked):
    causal bottom-right, bool attn_mask (True = attend, broadcastable to [B, H, Nq, Nk]),
    key_padding_mask [B, Nk] (True = pad)."""
    if attn_mask is None:  # O(B * Nk): a key j is seen by the queries i >= j - (Nk - Nq)
        seen = torch.full((n_k,), n_q, dtype=torch.int64)
        if causal:
            j = torch.arange(n_k, dtype=torch.int64)
            seen = (n_q - (j - (n_k - n_q))).clamp(0, n_q)
        if key_padding_mask is None:
            return int(seen.sum()) * batch * heads
        valid = (~key_padding_mask).to("cpu", torch.int64)
        return int((valid * seen).sum()) * heads
    if attn_mask.dtype != torch.bool:
        raise TypeError("visible pairs are defined for bool masks")
    keep = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if causal:
        from .. import reference
        keep = keep & reference.causal_mask(n_q, n_k, keep.device)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :].to(keep.device)
    shape = torch.broadcast_shapes(keep.shape, (batch, heads, n_q, n_k))
    repeat = 1
    for have, want in zip(keep.shape, shape):
        repeat *= want // have  # a broadcast dimension repeats the pairs counted
    return int(keep.sum()) * repeat


def masked_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool,
                 mode: str, attn_mask=None, key_padding_mask=None) -> float:
    pairs = masked_visible_pairs(batch, heads, n_q, n_k, causal, attn_mask, key_padding_mask)
    return 4.0 * pairs * head_dim * _MODE_FACTOR[mode]


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MaskCase:
    """The masks of one masked sweep point. lengths: valid keys (= valid queries) per batch row
    of a padded batch (right padding), None for the dense mask."""
    attn_mask: Optional[torch.Tensor] = None         # bool [B, 1, N, N], True = attend
    key_padding_mask: Optional[torch.Tensor] = None  # bool [B, N], True = pad
    lengths: Optional[torch.Tensor] = None           # int [B]


def padded_lengths(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Valid lengths of a padded batch: uniform in [N/2, N] (~25% padding on average)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(max(1, n // 2), n + 1, (batch,), generator=gen)


def document_mask(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Bool [B, 1, N, N], True = attend: each row packs documents of lengths drawn from
    [N/8, N/2]; a token attends to the tokens of its own document."""
    gen = torch.Generator().manual_seed(seed)
    doc = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        pos, d = 0, 0
        while pos < n:
            length = int(torch.randint(max(1, n // 8), max(2, n // 2) + 1, (1,), generator=gen))
            doc[b, pos:pos + length] = d
            pos, d = pos + length, d + 1
    return (doc[:, :, None] == doc[:, None, :])[:, None]


def mask_case(variant: str, batch: int, n: int, device: str, seed: int = 0) -> MaskCase:
    if variant == "padding":
        lengths = padded_lengths(batch, n, seed)
        kpm = torch.arange(n)[None, :] >= lengths[:, None]
        return MaskCase(key_padding_mask=kpm.to(device), lengths=lengths.to(device))
    return MaskCase(attn_mask=document_mask(batch, n, seed).to(device))


# ---------------------------------------------------------------------------------------------
# Providers: fn(q, k, v, causal, case: MaskCase) -> out [B, H, N, D]
# ---------------------------------------------------------------------------------------------
def _sdpa_keep(case: MaskCase, causal: bool, n_q: int, n_k: int, device) -> Optional[torch.Tensor]:
    """One bool attn_mask for torch SDPA (True = attend): causal, attn_mask and key padding."""
    keep = case.attn_mask
    if case.key_padding_mask is not None:
        kp = ~case.key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if causal:  # bottom-right; Nq == Nk in the sweeps, where it equals SDPA's top-left
        from .. import reference
        c = reference.causal_mask(n_q, n_k, device)
        keep = c if keep is None else keep & c
    return keep


def _masked_naive(q, k, v, causal, case):
    from .. import reference
    return reference.attention(q, k, v, causal=causal, attn_mask=case.attn_mask,
                               key_padding_mask=case.key_padding_mask)


def _masked_tritformer(q, k, v, causal, case):
    from ..ops.attention import attention
    return attention(q, k, v, causal=causal, attn_mask=case.attn_mask,
                     key_padding_mask=case.key_padding_mask)


def _masked_sdpa(q, k, v, causal, case):
    keep = _sdpa_keep(case, causal, q.shape[2], k.shape[2], q.device)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])


def _masked_flash_attn(q, k, v, causal, case):
    """A padded batch through flash_attn: unpad the valid tokens, flash_attn_varlen_func, pad
    back with zeros (flash_attn.bert_padding's approach; right padding, Nq == Nk)."""
    from flash_attn import flash_attn_varlen_func
    B, H, N, D = q.shape
    idx = (~case.key_padding_mask).reshape(-1).nonzero().squeeze(1)
    cu = _cu_seqlens(case.lengths)
    max_len = int(case.lengths.max())
    unpad = lambda t: t.transpose(1, 2).reshape(B * N, t.shape[1], D).index_select(0, idx)
    out = flash_attn_varlen_func(unpad(q), unpad(k), unpad(v), cu, cu, max_len, max_len,
                                 causal=causal)
    return out.new_zeros(B * N, H, D).index_copy(0, idx, out).view(B, N, H, D).transpose(1, 2)


def _masked_flex(q, k, v, causal, case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    B, _, n_q, _ = q.shape
    n_k = k.shape[2]
    am, kpm, off = case.attn_mask, case.key_padding_mask, n_k - n_q

    def mask_mod(b, h, i, j):
        keep = (j <= i + off) if causal else (j >= 0)
        if am is not None:
            keep = keep & am[b, 0, i, j]
        if kpm is not None:
            keep = keep & ~kpm[b, j]
        return keep
    block_mask = create_block_mask(mask_mod, B, None, n_q, n_k, device=q.device)
    return _FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def masked_providers(variant: str) -> dict[str, Provider]:
    """Providers of the masked sweeps: fn(q, k, v, causal, case: MaskCase) -> out [B, H, N, D]."""
    base = attention_providers()
    flash_why = _cuda_only("flash_attn", "flash_attn")
    if variant == "dense":
        flash_why = lambda d, t: "flash_attn takes no dense attn_mask"
    return {
        "naive": dataclasses.replace(base["naive"], fn=_masked_naive),
        "sdpa": dataclasses.replace(base["sdpa"], fn=_masked_sdpa),
        "tritformer": dataclasses.replace(base["tritformer"], fn=_masked_tritformer),
        "flash_attn": Provider("flash_attn", _masked_flash_attn, flash_why,
                               lambda d: "flash_attn (unpad + varlen)"),
        "flex": dataclasses.replace(base["flex"], fn=_masked_flex),
    }


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------
def masked_max_error(p: Provider, q, k, v, causal, case: MaskCase) -> float:
    """Max |out - float64 reference|, over the valid query rows of a padded batch."""
    with torch.no_grad():
        out = p.fn(q, k, v, causal, case)
    diff = (out.double() - _reference64(q, k, v, causal, case.attn_mask,
                                        case.key_padding_mask)).abs()
    if case.key_padding_mask is not None:
        diff = diff.masked_fill(case.key_padding_mask[:, None, :, None], 0.0)
    return float(diff.max())


def masked_sweep(device: str, quick: bool) -> AttentionSweep:
    if device == "cuda":
        if quick:
            return AttentionSweep((1024, 4096), 16384, (64,), 2048, "bf16",
                                  memory_seqlens=(1024, 4096, 16384))
        return AttentionSweep((512, 1024, 2048, 4096, 8192), 16384, (64, 128), 2048, "bf16",
                              memory_seqlens=(1024, 2048, 4096, 8192, 16384))
    # CPU: interpreter times (a masked tile iteration costs tens of ms, backward ~5x forward):
    # tiny shapes, and in --quick one head and the causal case only (~25 s for both variants)
    if quick:
        return AttentionSweep((64, 128), 256, (64,), 64, "fp32", causal=(True,),
                              memory_seqlens=(512, 1024, 2048), reps=1)
    return AttentionSweep((64, 128, 256), 256, (64,), 128, "fp32",
                          memory_seqlens=(1024, 2048, 4096, 8192), reps=3)


def bench_masked(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                 progress: Callable[[str], None], skipped: dict) -> None:
    """Masked attention sweeps (module docstring): rows op=masked_padding and op=masked_dense."""
    sweep = masked_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    for variant in ("padding", "dense"):
        op = f"masked_{variant}"
        active = _active_providers(masked_providers(variant), providers, device, dtype, skipped, op)
        for d in sweep.head_dims:
            heads = max(1, sweep.model_dim // d)
            for n in sweep.seqlens:
                batch = max(1, sweep.tokens // n)
                case = mask_case(variant, batch, n, device, seed=n)
                for causal in sweep.causal:
                    fl = masked_flops(batch, heads, n, n, d, causal, "fwd", case.attn_mask,
                                      case.key_padding_mask)
                    for p in active:
                        progress(f"{op} {p.name} D={d} N={n} causal={causal}")
                        q, k, v = _qkv(batch, heads, n, d, dtype, device, grad=True)
                        err = masked_max_error(p, q, k, v, causal, case)
                        fns = _leaf_modes(lambda: p.fn(q, k, v, causal, case), [q, k, v],
                                          sweep.modes)
                        _timed_rows(op, p.name, p.backend(device), device, fns, "seqlen", n,
                                    dict(batch=batch, heads=heads, head_dim=d, causal=causal),
                                    sweep.dtype, emit, sweep.reps,
                                    flops={m: fl * f for m, f in _MODE_FACTOR.items()},
                                    max_error=err)
        # forward peak memory against sequence length: one sequence, one head, causal
        d = sweep.head_dims[0]
        with interpreter_tiles():
            for n in sweep.memory_seqlens:
                case = mask_case(variant, 1, n, device, seed=n)
                for p in active:
                    progress(f"{op} memory {p.name} N={n}")
                    q, k, v = _qkv(1, 1, n, d, dtype, device, grad=False)
                    with torch.no_grad():
                        value = peak_bytes(lambda: p.fn(q, k, v, True, case), device)
                    emit(dict(op=op, provider=p.name, backend=p.backend(device), mode="fwd",
                              metric="peak_memory", unit="bytes", x_name="seqlen", x_value=n,
                              value=value, p20=None, p80=None, batch=1, heads=1, head_dim=d,
                              causal=True, dtype=sweep.dtype))


def masked_cases(device: str, quick: bool, providers: list[str]) -> int:
    """The progress steps of bench_masked (one per variant, provider and sweep point)."""
    sweep = masked_sweep(device, quick)
    points = len(sweep.head_dims) * len(sweep.seqlens) * len(sweep.causal) + len(sweep.memory_seqlens)
    return sum(points * len(_active_providers(masked_providers(v), providers, device,
                                              DTYPES[sweep.dtype], {}, f"masked_{v}"))
               for v in ("padding", "dense"))


bench_masked.cases = masked_cases
