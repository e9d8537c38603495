"""FlashAttention 2.x's Python API on tritformer's kernels.

A user of flash-attn changes one import line::

    from tritformer.flash_attn import flash_attn_func          # was: from flash_attn import ...

`flash_attn_func`, `flash_attn_qkvpacked_func`, `flash_attn_kvpacked_func`,
`flash_attn_varlen_func`, `flash_attn_varlen_qkvpacked_func`, `flash_attn_varlen_kvpacked_func`
and `flash_attn_with_kvcache` take FlashAttention 2.x's arguments, defaults, layouts
([B, N, H, D]; packed [B, N, 3, H, D] / [B, N, 2, H, D]; varlen [total, H, D]) and return
conventions (out, and with ``return_attn_probs`` / ``return_softmax_lse`` the lse,
[B, H, N] or [H, total] float32). q, k, v reach `tritformer.attention` /
`tritformer.varlen_attention` / `tritformer.decode_attention` as views (``transpose(1, 2)``,
packed slices): no copies, the same kernels.

FlashAttention's own argument handling is reproduced where it decides results:
``window_size`` -1 (any negative) = unbounded, a side >= seqlen_k (varlen: max_seqlen_k)
becomes unbounded, ``causal`` sets the right side to 0, and a window bounded on the left only
gets right = seqlen_k (FlashAttention's kernel does; it matters only when seqlen_q >
seqlen_k + 1); ``softcap`` <= 0 is off; seqlen_q == 1 without ALiBi runs non-causal (the same
mask).

What differs from FlashAttention (README, "Coming from FlashAttention"):

- ``return_attn_probs=True`` returns (out, softmax_lse, S_dmask). FlashAttention fills S_dmask
  only when dropout_p > 0 (its own tests read the dropout pattern from it) and returns an
  empty tensor otherwise; here S_dmask is that same empty tensor when dropout_p == 0, and
  dropout_p > 0 with return_attn_probs=True raises NotImplementedError: tritformer's kernels
  never materialise the probabilities, and their dropout bits (an in-kernel Philox stream
  seeded from torch's generator) are not FlashAttention's.
- Dropout keep bits differ from FlashAttention's draw for draw (same p, same expectation).
- float32 inputs are accepted (FlashAttention refuses them: "FlashAttention only support fp16
  and bf16 data type"); float16 / bfloat16 as FlashAttention. Other dtypes raise with that
  message.
- FlashAttention copies inputs whose last dim is not contiguous (``maybe_contiguous``) and
  asserts it for k_cache / v_cache; tritformer's kernels read any strides, so nothing is copied
  or refused. Head dims that are not multiples of 8 are not padded (the kernels pad on chip).
  softcap together with dropout, ALiBi slopes in any float dtype, paged blocks of any size and
  rotary dims that are not multiples of 16 work here (FlashAttention refuses them).
- The softmax_lse returned by the dense / varlen functions carries a gradient (FlashAttention's
  does not). ``deterministic`` selects the backward as FlashAttention's does: False (its
  default) the fused kernel that accumulates dQ with fp32 atomics, True the separate dK/dV and
  dQ kernels (bitwise repeatable); ``torch.use_deterministic_algorithms(True)`` forces True.
- `flash_attn_with_kvcache` is two launches: appending k / v (written into k_cache / v_cache
  in place at cache_seqlens, as FlashAttention) with the rotary embedding of k and q is one
  kernel (`tritformer.kvcache_append`), then the split-KV decode kernel
  (`tritformer.decode_attention`) reads the caches in place: paged through block_table, rows
  through cache_batch_idx, from cache_leftpad on, with causal / window / ALiBi / softcap and any
  Nq. FlashAttention fuses the append into its attention kernel.

Errors: argument errors raise before anything runs (no launch, no cache write), naming the
argument; where FlashAttention raises RuntimeError the error here is a `FlashAttnError`
(RuntimeError and ValueError) or `FlashAttnTypeError` (RuntimeError and TypeError), with
FlashAttention's wording.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from ._checks import (MAX_HEAD_DIM, SUPPORTED_DTYPES, _dtype_name, check_flag, check_integer,
                      check_real)
from .ops.attention import attention, varlen_attention
from .ops.decode import decode_attention
from .ops.kvcache import apply_rotary as _apply_rotary_bhnd
from .ops.kvcache import kvcache_append

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache", "FlashAttnError",
    "FlashAttnTypeError",
]


class FlashAttnError(RuntimeError, ValueError):
    """A bad argument where FlashAttention raises RuntimeError: caught by ``except
    RuntimeError`` (as FlashAttention's) and by ``except ValueError`` (as tritformer's)."""


class FlashAttnTypeError(RuntimeError, TypeError):
    """A bad dtype / type where FlashAttention raises RuntimeError; also a TypeError."""


# ---------------------------------------------------------------------------------------------
# Checks (FlashAttention's wording, the argument named)
# ---------------------------------------------------------------------------------------------
def _tensor(name, x, ndim, layout):
    if not isinstance(x, torch.Tensor):
        raise FlashAttnTypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise FlashAttnError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise FlashAttnTypeError(
            f"{name}: FlashAttention only support fp16 and bf16 data type (tritformer also "
            f"accepts float32), got {_dtype_name(x.dtype)}")


def _same(name, x, q, what):
    if x.dtype != q.dtype:
        raise FlashAttnTypeError(f"query and {what} must have the same dtype: q is "
                                 f"{_dtype_name(q.dtype)}, {name} is {_dtype_name(x.dtype)}")
    if x.device != q.device:
        raise FlashAttnError(f"{name} must be on q's device {q.device}, got {x.device}")


def _head_dim(q, d_dim):
    D = q.shape[d_dim]
    if D > MAX_HEAD_DIM:
        raise FlashAttnError(f"q: FlashAttention forward only supports head dimension at most "
                             f"{MAX_HEAD_DIM}, got {D}")
    if D < 1:
        raise FlashAttnError(f"q: head dimension must be at least 1, got {D}")


def _heads(hq, hkv, kname):
    if hkv == 0 or hq % hkv:
        raise FlashAttnError(f"Number of heads in key/value must divide number of heads in query: "
                             f"q has {hq}, {kname} has {hkv}")


def _check_qkv(q, k, v, names=("q", "k", "v"), dense=True):
    """q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] (dense) or q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    qn, kn, vn = names
    if dense:
        lq, lkv, ndim = "[B, Nq, Hq, D]", "[B, Nk, Hkv, D]", 4
    else:
        lq, lkv, ndim = "[total_q, Hq, D]", "[total_k, Hkv, D]", 3
    _tensor(qn, q, ndim, lq)
    _tensor(kn, k, ndim, lkv)
    _tensor(vn, v, ndim, lkv)
    _same(kn, k, q, "key")
    _same(vn, v, q, "value")
    _head_dim(q, -1)
    for name, x in ((kn, k), (vn, v)):
        if dense and x.shape[0] != q.shape[0]:
            raise FlashAttnError(f"{name} must have q's batch size {q.shape[0]}, got shape {tuple(x.shape)}")
        if x.shape[-1] != q.shape[-1]:
            raise FlashAttnError(f"{name} must have q's head dim {q.shape[-1]}, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise FlashAttnError(f"{vn} must have {kn}'s shape {lkv} = {tuple(k.shape)}, got {tuple(v.shape)}")
    _heads(q.shape[-2], k.shape[-2], kn)


def _check_packed(name, x, ndim, n, layout):
    """qkv / kv: the packed dim (ndim - 3) holds n tensors."""
    _tensor(name, x, ndim, layout)
    if x.shape[ndim - 3] != n:
        raise FlashAttnError(f"{name} must be {layout} (dim {ndim - 3} of size {n}), got shape {tuple(x.shape)}")


def _int(name, w):
    """A window side: a Python / NumPy int or a 0-d integer tensor (FlashAttention's tests
    pass torch.randint results)."""
    if isinstance(w, torch.Tensor) and w.dim() == 0 and not w.dtype.is_floating_point \
            and w.dtype != torch.bool and not w.dtype.is_complex:
        return int(w)
    if isinstance(w, bool) or not isinstance(w, numbers.Integral):
        raise FlashAttnTypeError(f"{name} must hold ints (-1 = unbounded), got {type(w).__name__}")
    return int(w)


def _window(window_size, causal, seqlen_q, seqlen_k, alibi_slopes):
    """FlashAttention's window handling -> (causal, window for tritformer or None)."""
    pair = isinstance(window_size, (tuple, list)) or (
        isinstance(window_size, torch.Tensor) and window_size.dim() == 1)  # FA's tests: randint(.., (2,))
    if not pair or len(window_size) != 2:
        raise FlashAttnTypeError(f"window_size must be a (left, right) pair, -1 = unbounded; got {window_size!r}")
    check_flag("causal", causal)
    left, right = (_int("window_size", w) for w in window_size)
    left, right = max(left, -1), max(right, -1)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if seqlen_q == 1 and alibi_slopes is None:  # the same mask: FlashAttention drops causal
        causal = False
    if causal:
        right = 0
    if left >= 0 and right < 0:  # FlashAttention's kernel bounds this side at seqlen_k
        right = seqlen_k
    return causal, (None if left < 0 and right < 0 else (left, right))


def _softcap(softcap):
    check_real("softcap", softcap)
    return softcap if softcap > 0 else None


def _common(dropout_p, deterministic, return_attn_probs):
    check_real("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    check_flag("deterministic", deterministic)
    check_flag("return_attn_probs", return_attn_probs)
    if return_attn_probs and dropout_p > 0:
        raise NotImplementedError(
            "return_attn_probs=True with dropout_p > 0: FlashAttention returns S_dmask, the "
            "probabilities with its dropout pattern (for testing). tritformer's kernels never "
            "materialise the probabilities and draw other dropout bits, so there is no S_dmask "
            "to return. Use return_attn_probs=False (softmax_lse: tritformer.attention(..., "
            "return_lse=True)); the keep bits are tritformer.kernels.attention.dropout_keep_mask.")


def _with_probs(result, q, return_attn_probs):
    """FlashAttention's return: out, or (out, softmax_lse, S_dmask) with S_dmask the empty
    tensor FlashAttention returns when dropout_p == 0."""
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------
def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, return_attn_probs):
    """q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] views, checked."""
    _common(dropout_p, deterministic, return_attn_probs)
    causal, window = _window(window_size, causal, q.shape[1], k.shape[1], alibi_slopes)
    res = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                    scale=softmax_scale, return_lse=return_attn_probs, dropout_p=dropout_p,
                    window=window, alibi_slopes=alibi_slopes, softcap=_softcap(softcap),
                    deterministic=deterministic)
    res = (res[0].transpose(1, 2), res[1]) if return_attn_probs else res.transpose(1, 2)
    return _with_probs(res, q, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """FlashAttention's ``flash_attn_func``: q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] (Hq a
    multiple of Hkv: MQA / GQA). Causal is bottom-right aligned; ``window_size`` (left, right):
    query i sees keys i + Nk - Nq - left .. i + Nk - Nq + right (-1 = unbounded);
    ``alibi_slopes`` [Hq] or [B, Hq] adds -slope * |i + Nk - Nq - j|; ``softcap`` > 0 caps the
    scores. Returns out [B, Nq, Hq, D]; with ``return_attn_probs`` (out, softmax_lse
    [B, Hq, Nq] float32, S_dmask). Runs `tritformer.attention` on transposed views. Module
    docstring: what differs."""
    _check_qkv(q, k, v)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """FlashAttention's ``flash_attn_qkvpacked_func``: qkv [B, N, 3, H, D]; q, k, v are its
    slices (views; their gradients land in qkv.grad). Otherwise as `flash_attn_func`."""
    _check_packed("qkv", qkv, 5, 3, "[B, N, 3, H, D]")
    q, k, v = qkv.unbind(2)
    _check_qkv(q, k, v, ("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"))
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """FlashAttention's ``flash_attn_kvpacked_func``: q [B, Nq, Hq, D], kv [B, Nk, 2, Hkv, D]
    (k, v its slices: views). Otherwise as `flash_attn_func`."""
    _check_packed("kv", kv, 5, 2, "[B, Nk, 2, Hkv, D]")
    k, v = kv.unbind(2)
    _check_qkv(q, k, v, ("q", "kv[:, :, 0]", "kv[:, :, 1]"))
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------------------------
def _paged_varlen_kv(k, v, block_table, cu_seqlens_k, max_seqlen_k, gather=True):
    """Paged k/v [num_blocks, page, Hkv, D] + block_table [num_seqs, max_blocks], checked with
    FlashAttention's wording; gather: the packed [total_k, Hkv, D] keys of each sequence
    (cu_seqlens_k lengths), gathered in torch (else k, v as they are)."""
    _tensor("k", k, 4, "[num_blocks, page_block_size, Hkv, D] (paged, block_table given)")
    _tensor("v", v, 4, "[num_blocks, page_block_size, Hkv, D] (paged, block_table given)")
    if k.shape != v.shape:
        raise FlashAttnError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1:
        raise FlashAttnError("cu_seqlens_k must be a 1-D int32 tensor [num_seqs + 1]")
    n_seq = cu_seqlens_k.shape[0] - 1
    page = k.shape[1]
    if cu_seqlens_k.dtype != torch.int32:
        raise FlashAttnTypeError(f"cu_seqlens_k must have dtype int32, got {_dtype_name(cu_seqlens_k.dtype)}")
    _block_table(block_table, n_seq, k, page)
    c = cu_seqlens_k.tolist()
    if not c or c[0] != 0 or any(b < a for a, b in zip(c, c[1:])):
        raise FlashAttnError(f"cu_seqlens_k must start at 0 and be non-decreasing, got {c}")
    total = c[-1]
    tok = torch.arange(total, device=k.device)
    seq = torch.searchsorted(cu_seqlens_k[1:].long(), tok, right=True)
    pos = tok - cu_seqlens_k.long()[seq]
    if total and int(pos.max()) >= block_table.shape[1] * page:
        raise FlashAttnError(f"block_table has {block_table.shape[1]} blocks of {page} keys per "
                             f"sequence, fewer than a sequence of cu_seqlens_k needs")
    if not gather:
        return k, v
    rows = block_table.long()[seq, pos // page] * page + pos % page
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    return flat(k).index_select(0, rows), flat(v).index_select(0, rows)


def _block_table(block_table, batch, cache, page):
    if not isinstance(block_table, torch.Tensor):
        raise FlashAttnTypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise FlashAttnTypeError(f"block_table must have dtype torch.int32, got {_dtype_name(block_table.dtype)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise FlashAttnError(f"block_table must be [batch_size, max_num_blocks_per_seq] with "
                             f"batch_size {batch}, got shape {tuple(block_table.shape)}")
    if block_table.device != cache.device:
        raise FlashAttnError(f"block_table must be on the cache's device {cache.device}, got {block_table.device}")
    if page < 1:
        raise FlashAttnError(f"page_block_size (dim 1 of the paged cache) must be >= 1, got {page}")
    if block_table.numel():
        lo, hi = (int(x) for x in torch.aminmax(block_table))
        if lo < 0 or hi >= cache.shape[0]:
            raise FlashAttnError(f"block_table entries must be block indices in [0, num_blocks="
                                 f"{cache.shape[0]}), got {lo if lo < 0 else hi}")


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs, block_table=None):
    _common(dropout_p, deterministic, return_attn_probs)
    check_integer("max_seqlen_q", max_seqlen_q, lo=0)
    check_integer("max_seqlen_k", max_seqlen_k, lo=0)
    causal, window = _window(window_size, causal, max_seqlen_q, max_seqlen_k, alibi_slopes)
    res = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=causal, scale=softmax_scale, dropout_p=dropout_p,
                           window=window, alibi_slopes=alibi_slopes, softcap=_softcap(softcap),
                           return_lse=return_attn_probs, block_table=block_table,
                           deterministic=deterministic)
    return _with_probs(res, q, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """FlashAttention's ``flash_attn_varlen_func``: q [total_q, Hq, D], k/v [total_k, Hkv, D],
    int32 cu_seqlens [num_seqs + 1]; each sequence attends within itself, masks aligned
    bottom-right per sequence; alibi_slopes [Hq] or [num_seqs, Hq]. Returns out
    [total_q, Hq, D]; with ``return_attn_probs`` (out, softmax_lse [Hq, total_q], S_dmask).
    With ``block_table`` [num_seqs, max_blocks] (int32), k/v are paged caches
    [num_blocks, page_block_size, Hkv, D] and sequence s reads its cu_seqlens_k length from
    its blocks: read through the table inside the forward kernel (varlen_attention's
    block_table), or, when a gradient is needed (the paged kernel is inference-only, as
    FlashAttention's), gathered in torch first. Runs `tritformer.varlen_attention`."""
    paged = None
    if block_table is not None:
        _tensor("q", q, 3, "[total_q, Hq, D]")
        grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v))
        k, v = _paged_varlen_kv(k, v, block_table, cu_seqlens_k, max_seqlen_k, gather=grad)
        paged = None if grad else block_table
    flat = (lambda x: x.flatten(0, 1)) if paged is not None else (lambda x: x)
    _check_qkv(q, flat(k), flat(v), dense=False)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, block_table=paged)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """FlashAttention's ``flash_attn_varlen_qkvpacked_func``: qkv [total, 3, H, D] (q, k, v
    its slices: views), one cu_seqlens / max_seqlen for queries and keys."""
    _check_packed("qkv", qkv, 4, 3, "[total, 3, H, D]")
    q, k, v = qkv.unbind(1)
    _check_qkv(q, k, v, ("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"), dense=False)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """FlashAttention's ``flash_attn_varlen_kvpacked_func``: q [total_q, Hq, D], kv
    [total_k, 2, Hkv, D] (k, v its slices: views)."""
    _check_packed("kv", kv, 4, 2, "[total_k, 2, Hkv, D]")
    k, v = kv.unbind(1)
    _check_qkv(q, k, v, ("q", "kv[:, 0]", "kv[:, 1]"), dense=False)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
def apply_rotary(x, cos, sin, positions, interleaved):
    """x [B, S, H, D] with its first rotary_dim = 2 * cos.shape[1] dims rotated by
    cos/sin[positions[b, s]] (positions [B, S] long), computed in float32 and rounded to x's
    dtype (as FlashAttention's rotary kernel). interleaved: pairs (0, 1), (2, 3), ... (GPT-J);
    else (0, rd/2), (1, rd/2 + 1), ... (GPT-NeoX)."""
    return _apply_rotary_bhnd(x.transpose(1, 2), cos, sin, positions, interleaved).transpose(1, 2)


def _int32_vector(name, x, batch, device):
    if not isinstance(x, torch.Tensor):
        raise FlashAttnTypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise FlashAttnTypeError(f"{name} must have dtype int32, got {_dtype_name(x.dtype)}")
    if tuple(x.shape) != (batch,):
        raise FlashAttnError(f"{name} must have shape [batch_size] = [{batch}], got {tuple(x.shape)}")
    if x.device != device:
        raise FlashAttnError(f"{name} must be on q's device {device}, got {x.device}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """FlashAttention's ``flash_attn_with_kvcache`` (inference: no gradient).

    q [B, Nq, Hq, D]; k_cache / v_cache [B_cache, Nmax, Hkv, D], or with ``block_table``
    [B, max_blocks] int32 paged caches [num_blocks, page_block_size, Hkv, D]. cache_seqlens
    (int or int32 [B]): keys already in each row's cache (None: all Nmax).

    - k, v [B, Nnew, Hkv, D]: written into the caches IN PLACE at positions cache_seqlens[b] ..
      cache_seqlens[b] + Nnew - 1 (rotated first when rotary_cos/sin are given), then attended
      to: row b sees cache_seqlens[b] + Nnew keys.
    - rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2] (need k, v): k rotated at its
      positions; q at cache_seqlens[b] + i when causal or local, else all of q at
      cache_seqlens[b]; ``rotary_interleaved`` pairs (0, 1), (2, 3) .. else (0, rd/2) ..
    - cache_batch_idx [B] int32: row b uses cache row cache_batch_idx[b].
    - cache_leftpad [B] int32: row b's keys start at cache_leftpad[b] (rotary positions stay
      absolute cache positions, as FlashAttention's).
    - causal / window_size / alibi_slopes / softcap: aligned bottom-right to each row's keys.
    - num_splits: 0 = heuristic, 1 = no split, n = n splits (decode kernel only).

    Returns out [B, Nq, Hq, D] (and softmax_lse [B, Hq, Nq] with ``return_softmax_lse``).
    The k/v append and rotary run in one kernel launch before the decode kernel, which reads
    paged / batch-indexed / left-padded caches in place (module docstring); every argument is
    checked before the caches are written.
    """
    paged = block_table is not None
    cache_layout = "[num_blocks, page_block_size, Hkv, D]" if paged else "[B_cache, Nmax, Hkv, D]"
    _tensor("q", q, 4, "[B, Nq, Hq, D]")
    _tensor("k_cache", k_cache, 4, cache_layout)
    _tensor("v_cache", v_cache, 4, cache_layout)
    _same("k_cache", k_cache, q, "key")
    _same("v_cache", v_cache, q, "value")
    _head_dim(q, 3)
    B, Nq, Hq, D = q.shape
    if k_cache.shape[3] != D:
        raise FlashAttnError(f"k_cache must have q's head dim {D}, got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise FlashAttnError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    Hkv = k_cache.shape[2]
    _heads(Hq, Hkv, "k_cache")
    dev = q.device
    if paged:
        if cache_batch_idx is not None:
            raise FlashAttnError("cache_batch_idx: Paged KVcache does not support cache_batch_idx "
                                 "(block_table already maps each batch row to its blocks)")
        page = k_cache.shape[1]
        _block_table(block_table, B, k_cache, page)
        n_max = block_table.shape[1] * page
    else:
        n_max = k_cache.shape[1]
        if cache_batch_idx is None:
            if k_cache.shape[0] != B:
                raise FlashAttnError(f"k_cache must have q's batch size {B} (or pass cache_batch_idx), "
                                     f"got shape {tuple(k_cache.shape)}")
        else:
            _int32_vector("cache_batch_idx", cache_batch_idx, B, dev)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        check_integer("cache_seqlens", cache_seqlens, lo=0)
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=dev)
    if cache_seqlens is not None:
        _int32_vector("cache_seqlens", cache_seqlens, B, dev)
    if cache_leftpad is not None:
        _int32_vector("cache_leftpad", cache_leftpad, B, dev)
    n_new = 0
    if (k is None) != (v is None):
        raise FlashAttnError("k, v: If key is supplied, value must also be passed in")
    if k is not None:
        if cache_seqlens is None:
            raise FlashAttnError("cache_seqlens: If key is supplied, seqlens_k must also be passed in")
        _tensor("k", k, 4, "[B, Nnew, Hkv, D]")
        _tensor("v", v, 4, "[B, Nnew, Hkv, D]")
        if k.dtype != q.dtype:
            raise FlashAttnTypeError("k: Key must have the same dtype as query "
                                     f"({_dtype_name(q.dtype)}), got {_dtype_name(k.dtype)}")
        if v.dtype != q.dtype:
            raise FlashAttnTypeError("v: Value must have the same dtype as query "
                                     f"({_dtype_name(q.dtype)}), got {_dtype_name(v.dtype)}")
        for name, x in (("k", k), ("v", v)):
            if x.device != dev:
                raise FlashAttnError(f"{name} must be on q's device {dev}, got {x.device}")
            if x.shape[0] != B or x.shape[2] != Hkv or x.shape[3] != D:
                raise FlashAttnError(f"{name} must be [B, Nnew, Hkv, D] = [{B}, Nnew, {Hkv}, {D}], "
                                     f"got {tuple(x.shape)}")
        if v.shape != k.shape:
            raise FlashAttnError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if Nq > n_max:
            raise FlashAttnError("q: If key is supplied, it must have seqlen <= the seqlen of the "
                                 f"KV cache ({Nq} > {n_max})")
        n_new = k.shape[1]
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise FlashAttnError("rotary_cos, rotary_sin: If rotary cos is provided, rotary sin must also be provided")
        if k is None:
            raise FlashAttnError("rotary_cos: If rotary cos/sin are provided, new key / value to be "
                                 "appended to KV cache must also be provided")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
                raise FlashAttnError(f"{name} must be a float tensor [seqlen_ro, rotary_dim / 2]")
            if x.device != dev:
                raise FlashAttnError(f"{name} must be on q's device {dev}, got {x.device}")
        if rotary_sin.shape != rotary_cos.shape:
            raise FlashAttnError("rotary_sin must have rotary_cos's shape "
                                 f"{tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > D:
            raise FlashAttnError(f"rotary_cos: rotary_dim must be <= headdim ({2 * rotary_cos.shape[1]} > {D})")
    check_real("softmax_scale", softmax_scale, allow_none=True)
    check_flag("rotary_interleaved", rotary_interleaved)
    check_flag("return_softmax_lse", return_softmax_lse)
    check_integer("num_splits", num_splits, lo=0)
    softcap = _softcap(softcap)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
            raise FlashAttnTypeError("alibi_slopes must be a float tensor [Hq] or [B, Hq]")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise FlashAttnError(f"alibi_slopes must have shape [Hq] = [{Hq}] or [B, Hq] = [{B}, "
                                 f"{Hq}], got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != dev:
            raise FlashAttnError(f"alibi_slopes must be on q's device {dev}, got {alibi_slopes.device}")
    causal, window = _window(window_size, causal, Nq, n_max, alibi_slopes)
    left, right = (-1, -1) if window is None else window
    is_causal = left < 0 and right == 0  # FlashAttention's params.is_causal / Is_local
    is_local = (left >= 0 or right >= 0) and not is_causal

    # contents (one host sync), still before anything is written
    seqlens = cache_seqlens.tolist() if cache_seqlens is not None else [n_max] * B
    for b, s in enumerate(seqlens):
        if s < 0 or s + n_new > n_max:
            what = f"cache_seqlens[{b}] + Nnew = {s} + {n_new}" if n_new else f"cache_seqlens[{b}] = {s}"
            cap = (f"the paged capacity: block_table has {block_table.shape[1]} blocks of {page} "
                   f"keys per row" if paged else "the cache length")
            raise FlashAttnError(f"cache_seqlens: {what} must be in [0, {n_max}] ({cap})")
    totals = [s + n_new for s in seqlens]
    lefts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * B
    for b, (lp, t) in enumerate(zip(lefts, totals)):
        if not 0 <= lp <= t:
            raise FlashAttnError(f"cache_leftpad[{b}] = {lp} must be in [0, {t}] (the row's keys)")
    if cache_batch_idx is not None and B:
        lo, hi = (int(x) for x in torch.aminmax(cache_batch_idx))
        if lo < 0 or hi >= k_cache.shape[0]:
            raise FlashAttnError("cache_batch_idx entries must be in [0, "
                                 f"B_cache={k_cache.shape[0]}), got {lo if lo < 0 else hi}")
    if rotary and B:
        need = max(s + max(n_new, Nq if (is_causal or is_local) else 1) for s in seqlens)
        if need > rotary_cos.shape[0]:
            raise FlashAttnError(f"rotary_cos has {rotary_cos.shape[0]} positions (seqlen_ro); "
                                 f"positions up to {need - 1} are needed")

    # the append + rotary launch (tritformer.kvcache_append), then the split-KV decode kernel
    # reading the caches in place: paged through the block table, rows through
    # cache_batch_idx, from cache_leftpad on; FA's [.., N, H, D] tensors as head-major views
    hm = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        if k is not None:
            q_rot = kvcache_append(hm(k_cache), hm(v_cache), hm(k), hm(v), cache_seqlens, q=hm(q),
                                   rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                   rotary_interleaved=rotary_interleaved,
                                   q_positions="causal" if (is_causal or is_local) else "start",
                                   block_table=block_table, cache_batch_idx=cache_batch_idx)
            q = q_rot.transpose(1, 2)
        lens = None
        if cache_seqlens is not None:
            lens = cache_seqlens + n_new if n_new else cache_seqlens
        out, lse = decode_attention(hm(q), hm(k_cache), hm(v_cache), lens, scale=softmax_scale,
                                    num_splits=num_splits or None, return_lse=True,
                                    causal=causal, window=window, alibi_slopes=alibi_slopes,
                                    softcap=softcap, block_table=block_table,
                                    cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


# ---------------------------------------------------------------------------------------------
# FlashAttention's private varlen forward (its own tests and some serving code call it)
# ---------------------------------------------------------------------------------------------
def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False, num_splits=0):
    """``flash_attn.flash_attn_interface._flash_attn_varlen_forward``: the forward only,
    returning (out, softmax_lse [Hq, total_q], S_dmask, rng_state). block_table: paged k/v
    [num_blocks, page, Hkv, D] read in the kernel; seqused_k: keys used per sequence. Not
    here: leftpad_k (NotImplementedError), num_splits > 1 (FlashAttention's varlen refuses it
    too, with this message). S_dmask is the empty tensor (return_softmax with dropout raises as
    flash_attn_varlen_func's); rng_state is a zero int64 pair (the dropout seed is drawn from
    torch's generator, not returned)."""
    check_integer("num_splits", num_splits, lo=0)
    if num_splits > 1:
        raise FlashAttnError("num_splits > 1 is not supported for varlen attention (tritformer: "
                             "the varlen kernel does not split the keys)")
    if leftpad_k is not None:
        raise NotImplementedError("leftpad_k: not supported by tritformer's varlen kernel "
                                  "(flash_attn_with_kvcache takes cache_leftpad)")
    _common(dropout_p, False, return_softmax)
    if block_table is None:
        _check_qkv(q, k, v, dense=False)
    else:
        _tensor("q", q, 3, "[total_q, Hq, D]")
        _paged_varlen_kv(k, v, block_table, cu_seqlens_k, max_seqlen_k, gather=False)
        _check_qkv(q, k.flatten(0, 1), v.flatten(0, 1), dense=False)
    check_integer("max_seqlen_q", max_seqlen_q, lo=0)
    check_integer("max_seqlen_k", max_seqlen_k, lo=0)
    causal, window = _window((window_size_left, window_size_right), causal, max_seqlen_q,
                             max_seqlen_k, alibi_slopes)
    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal=causal, scale=softmax_scale, dropout_p=dropout_p,
                                window=window, alibi_slopes=alibi_slopes,
                                softcap=_softcap(softcap), block_table=block_table,
                                seqused_k=seqused_k, return_lse=True)
    s_dmask = torch.empty((0,), dtype=q.dtype, device=q.device)
    return out, lse, s_dmask, torch.zeros(2, dtype=torch.int64, device=q.device)
