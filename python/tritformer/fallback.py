"""The CPU production fallback (backend "torch"): PyTorch's fastest equivalent of each fused op.

`tritformer.backend_for` returns "torch" for CPU tensors when Triton's interpreter is off (or
Triton cannot be imported); the host layer of each op (tritformer/ops/*.py) then calls this
module instead of the kernels. `tritformer.reference` stays the naive, float64-capable oracle of
the tests; this module is what runs in production on CPU, with the kernels' semantics:

- attention: torch's own `scaled_dot_product_attention` (on CPU its flash kernel: O(N) memory
  apart from a mask, which is bool [Nq, Nk] for causal / window and broadcast otherwise) with
  the kernels' conventions folded into one mask: causal and window bottom-right aligned (SDPA's
  is_causal, top-left, only where the two coincide), key padding, ALiBi and a float attn_mask as
  one additive float mask, GQA through ``enable_gqa``. A row with no visible key gives out 0 and
  lse -inf and zero gradient (the key mask of such a row is lifted for the call, then its output
  is zeroed, so neither the forward nor the backward sees a NaN).
- lse (return_lse only): logsumexp over the scaled, biased, masked scores (an [Nq, Nk] matrix per
  head, materialised only when lse is asked for), differentiable.
- softcap and dropout: SDPA can do neither (tanh of the scores; the keep mask is drawn by the
  ops layer from a torch generator seeded like the kernels' Philox, and SDPA cannot take a given
  mask), so these calls run the plain-torch matmul path (`tritformer.reference`) in float32.
- varlen: the dense path per packed sequence; decode: the dense path over the cache prefix in use.
- softmax / ffn / gated_ffn: their custom ops with ``reference_backend=True`` (float32 torch ops
  inside the op, see tritformer/backend.py for why they stay inside the custom op).

Everything computes in float32 (float64 inputs stay float64) and returns the inputs' dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference

# torch's builtin SDPA, captured as the builtin: a user may have assigned
# tritformer.scaled_dot_product_attention to torch.nn.functional.scaled_dot_product_attention
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _masks(q, k, left, right, attn_mask, key_padding_mask, alibi_slopes, dtype):
    """(is_causal, mask) for SDPA, without the empty-row fix-up: mask None, bool (True = attend)
    or additive float in `dtype`, broadcastable to [B, Hq, Nq, Nk]."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    only_window = attn_mask is None and key_padding_mask is None and alibi_slopes is None
    if left is None and right is not None and right == Nq - Nk and only_window:
        return True, None  # SDPA's top-left causal (j <= i) is exactly this window
    keep = None
    if left is not None or right is not None:
        keep = reference.window_keep(Nq, Nk, left, right, q.device)
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            bias = attn_mask.to(dtype)
    if alibi_slopes is not None:
        ab = reference.alibi_bias(alibi_slopes.to(dtype), B, Hq, Nq, Nk)
        bias = ab if bias is None else bias + ab
    if bias is None:
        return False, keep
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return False, bias


def _empty_rows(mask) -> Optional[torch.Tensor]:
    """Bool [..., Nq, 1]: rows of `mask` with no visible key, or None when there are none."""
    if mask is None or mask.shape[-1] == 0:
        return None
    empty = (~mask.any(-1, keepdim=True) if mask.dtype == torch.bool
             else torch.isneginf(mask).all(-1, keepdim=True))
    if not torch.compiler.is_compiling() and not bool(empty.any()):
        return None
    return empty


def _lse(q, k, scale, mask, is_causal):
    """logsumexp over key j of scale * q kᵀ + bias, masked (q, k in the compute dtype, k's heads
    repeated for GQA by the caller); -inf for rows with no visible key."""
    s = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    empty = torch.isneginf(s).all(-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1)
    return lse.masked_fill(empty[..., 0], float("-inf"))


def _nonfinite_attention(q, k, v, scale, mask, is_causal):
    """(out, lse) by dense scores with the kernels' rule for rows whose scores are all -inf
    (from the mask or from the data): out 0, lse -inf, and zero gradient. Such a row's query is
    replaced by 0 before the product (its gradient is masked to 0), so no 0 * inf reaches the
    backward of the whole head; keys of -inf seen by other rows give NaN in those rows' dq, as
    in the kernels (a 0 * -inf in the dot)."""
    group = q.shape[1] // max(k.shape[1], 1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def scores(qq):
        s = torch.matmul(qq * scale, k.transpose(-2, -1))
        if is_causal:
            keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        elif mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return s
    with torch.no_grad():
        empty = torch.isneginf(scores(q)).all(-1, keepdim=True)  # [B, H, Nq, 1]
    s = scores(q.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.matmul(p, v), lse


def attention(q, k, v, scale=None, left=None, right=None, return_lse=False, attn_mask=None,
              key_padding_mask=None, dropout_p=0.0, alibi_slopes=None, softcap=None,
              dropout_mask=None):
    """`tritformer.ops.attention._attention` on the "torch" backend: same arguments as
    `tritformer.reference._attention` (window as (left, right) offsets from the bottom-right
    diagonal, None = unbounded; dropout_mask the bool keep mask when dropout_p > 0).

    Returns (out in q's dtype, lse [B, Hq, Nq] float32 or None without return_lse).
    """
    dt = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if softcap or dropout_p > 0.0:  # SDPA can do neither: the plain matmul path, in float32
        fm = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dt)
        out, lse = reference._attention(
            q.to(dt), k.to(dt), v.to(dt), scale, left, right, True, fm, key_padding_mask,
            dropout_p, None if alibi_slopes is None else alibi_slopes.to(dt), softcap, dropout_mask)
        return out.to(q.dtype), (lse.float() if return_lse else None)
    qc, kc, vc = q.to(dt), k.to(dt), v.to(dt)
    is_causal, mask = _masks(qc, kc, left, right, attn_mask, key_padding_mask, alibi_slopes, dt)
    if not torch.compiler.is_compiling() and not (bool(torch.isfinite(qc).all())
                                                  and bool(torch.isfinite(kc).all())):
        # an infinite q or k can make a row's scores all -inf from the data: SDPA's backward
        # then turns it into NaN gradients for the whole head (P = exp(-inf - -inf)). The
        # kernels' rule instead: output 0, lse -inf, zero gradient (tests/test_fallback.py).
        # Dense scores, for such inputs only (the check is O(N D); skipped under torch.compile)
        out, lse = _nonfinite_attention(qc, kc, vc, scale, mask, is_causal)
        return out.to(q.dtype), (lse.float() if return_lse else None)
    empty = None if is_causal else _empty_rows(mask)
    sdpa_mask = mask
    if empty is not None:  # lift the mask of rows without a key (their output is zeroed below)
        sdpa_mask = mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)
    gqa = qc.shape[1] != kc.shape[1]
    if kc.shape[2] == 0:  # no key at all: every row is empty
        out = qc.new_zeros(*qc.shape[:3], vc.shape[-1])
    else:
        out = _torch_sdpa(qc, kc, vc, sdpa_mask, 0.0, is_causal, scale=scale, enable_gqa=gqa)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    lse = None
    if return_lse:
        group = qc.shape[1] // max(kc.shape[1], 1)
        kr = kc.repeat_interleave(group, dim=1) if gqa else kc
        lse = _lse(qc, kr, scale, mask, is_causal).float()
    return out.to(q.dtype), lse


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, left=None, right=None,
                     return_lse=False, dropout_p=0.0, alibi_slopes=None, softcap=None,
                     dropout_mask=None, block_table=None, seqused_k=None):
    """`tritformer.varlen_attention` on the "torch" backend: `attention` per packed sequence
    (q [Tq, Hq, D], k/v [Tk, Hkv, D]; alibi_slopes [Hq] or [num_seqs, Hq]; dropout_mask bool
    [Hq, Tq, max_seqlen_k]). With block_table (k/v paged caches [num_blocks, page, Hkv, D])
    and/or seqused_k, the keys each sequence uses are first gathered packed, in torch
    (`reference.varlen_kv_used`). Returns (out [Tq, Hq, D], lse [Hq, Tq] float32 or None)."""
    if block_table is not None or seqused_k is not None:
        k, v, cu_seqlens_k = reference.varlen_kv_used(k, v, cu_seqlens_k, block_table, seqused_k)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1)[None]
        ks = k[ck[s]:ck[s + 1]].transpose(0, 1)[None]
        vs = v[ck[s]:ck[s + 1]].transpose(0, 1)[None]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[s]
        dm = None
        if dropout_mask is not None:
            dm = dropout_mask[:, cq[s]:cq[s + 1], :ck[s + 1] - ck[s]][None]
        o, lse = attention(qs, ks, vs, scale, left, right, return_lse, alibi_slopes=slopes,
                           dropout_p=dropout_p, softcap=softcap, dropout_mask=dm)
        outs.append(o[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, *q.shape[1:])
    if not return_lse:
        return out, None
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return out, lse


def decode_attention(q, k_cache, v_cache, cache_seqlens=None, scale=None, return_lse=False):
    """`tritformer.decode_attention` on the "torch" backend (reference.decode_attention's
    semantics): q [B, Hq, Nq, D] against the first cache_seqlens[b] keys; query i sees key j iff
    j <= cache_seqlens[b] - Nq + i. Reads only the cache prefix up to the longest length (eager;
    under torch.compile the whole cache, no data-dependent shape); positions past a batch's
    length are replaced by 0 before any arithmetic (garbage there, even NaN, cannot reach the
    result). Returns (out, lse float32 or None)."""
    B, _, Nq, _ = q.shape
    n = k_cache.shape[2]
    lens = None
    if cache_seqlens is not None:
        lens = cache_seqlens.to(device=q.device, dtype=torch.long)
        if not torch.compiler.is_compiling() and B > 0:
            n = min(n, int(lens.max()))
    k, v = k_cache[:, :, :n], v_cache[:, :, :n]
    j = torch.arange(n, device=q.device)
    keep = None
    if lens is not None:
        valid = (j[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, n, 1)
        if torch.compiler.is_compiling() or not bool(valid.all()):
            zero = torch.zeros((), dtype=k.dtype, device=q.device)
            k, v = torch.where(valid, k, zero), torch.where(valid, v, zero)
        limit = lens[:, None, None] - Nq
    else:
        limit = torch.full((1, 1, 1), n - Nq, device=q.device, dtype=torch.long)
    i = torch.arange(Nq, device=q.device)
    keep = (j[None, None, :] <= limit + i[None, :, None])[:, None]  # (B or 1, 1, Nq, n)
    if not torch.compiler.is_compiling() and bool(keep.all()):
        keep = None  # e.g. one new query per sequence, every cached key visible
    return attention(q, k, v, scale, None, None, return_lse, attn_mask=keep)


# --------------------------------------------------------------------------------------------
# FFN backward (inside the ffn / gated_ffn custom ops, reference_backend=True)
# --------------------------------------------------------------------------------------------
def _act_backward(grad: torch.Tensor, pre: torch.Tensor, name: str) -> torch.Tensor:
    """grad * activation'(pre) with torch's own fused backward kernels (one pass, no temporaries;
    `reference.activation_grad` writes the derivative out for the oracle)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    raise ValueError(f"activation must be one of {', '.join(reference.ACTIVATIONS)}, got {name!r}")


def ffn_backward(dy, x, w_gate, b_gate, w_down, h, pre, activation: str, recompute: bool,
                 w_up=None, b_up=None, up=None):
    """`reference.ffn_backward` (same arguments and results: the kernels' backward from the
    saved, rounded activations, or with recompute from the first matmul(s) redone) with torch's
    fused activation backward, in float32 (float64 stays float64), results in x's dtype."""
    gated = w_up is not None
    dt = _compute_dtype(x.dtype)
    c = lambda t: None if t is None else t.to(dt)
    xc = x.to(dt)
    if recompute:
        pre = torch.nn.functional.linear(xc, w_gate.to(dt), c(b_gate))
        up = torch.nn.functional.linear(xc, w_up.to(dt), c(b_up)) if gated else None
        act = reference.apply_activation(pre, activation)
        h = act * up if gated else act
    else:
        pre, h, up = pre.to(dt), h.to(dt), c(up)
        act = reference.apply_activation(pre, activation) if gated else None
    dyc = dy.to(dt)
    dh = dyc @ w_down.to(dt)
    dpre = _act_backward(dh * up if gated else dh, pre, activation)
    if gated:
        dup = dh * act
        res = (dpre @ w_gate.to(dt) + dup @ w_up.to(dt), dpre.t() @ xc, dup.t() @ xc,
               dyc.t() @ h, dpre.sum(0), dup.sum(0), dyc.sum(0))
    else:
        res = (dpre @ w_gate.to(dt), dpre.t() @ xc, dpre.sum(0), dyc.t() @ h, dyc.sum(0))
    return tuple(r.to(x.dtype) for r in res)


# --------------------------------------------------------------------------------------------
# Softmax (inside the softmax custom ops, reference_backend=True)
# --------------------------------------------------------------------------------------------
def softmax_forward(x, mask, scale: float, causal: bool, out: torch.Tensor) -> torch.Tensor:
    """softmax(scale * x + mask) over the last dim into `out` (x's dtype), computed in float32:
    `reference.softmax`'s semantics (bool mask True = keep, or additive; causal bottom-right; a
    row with nothing left gives 0) with torch's softmax kernel and no pass over rows that have a
    key (the empty-row fix-up runs only where a row's max is -inf)."""
    dt = _compute_dtype(x.dtype)
    z = x.to(dt)
    if scale != 1.0:
        z = z * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            z = z + mask.to(dt)
    if causal:
        c = reference.causal_mask(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    if z.numel() == 0:
        return out
    if z.dtype == out.dtype and out.is_contiguous() and z.is_contiguous():
        torch.ops.aten._softmax.out(z, -1, False, out=out)
        y = out
    else:
        y = torch.softmax(z, -1)
    empty = z.amax(-1, keepdim=True) == float("-inf")  # all -inf: torch gives NaN, the rule 0
    if torch.compiler.is_compiling() or bool(empty.any()):
        y = y.masked_fill(empty, 0.0)
    if y is not out:
        out.copy_(y)
    return out


def softmax_backward(dy, y, grad_scale: float, out: torch.Tensor) -> torch.Tensor:
    """grad_scale * y * (dy - rowsum(dy * y)) over the last dim into `out`, with torch's fused
    softmax backward in float32 (rows that are all 0, i.e. had no key, get 0 for finite dy)."""
    dt = _compute_dtype(y.dtype)
    if y.numel() == 0:
        return out
    dz = torch._softmax_backward_data(dy.to(dt), y.to(dt), -1, dt)
    if grad_scale != 1.0:
        dz = dz * grad_scale
    out.copy_(dz)
    return out
