"""Pure-PyTorch reference implementations: the oracle of the tests, `validate` and the benchmarks.

Naive matmul attention, materialising the [B, H, Nq, Nk] score matrix. It computes in the
inputs' dtype (so it also serves as "PyTorch's own same-dtype math" baseline); call it on
float64 inputs for the ground truth.
"""
from __future__ import annotations

import math

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool [Nq, Nk], True = attend; bottom-right aligned: key j visible to query i iff j <= i + Nk - Nq."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def window_keep(n_q: int, n_k: int, left: int | None, right: int | None, device=None) -> torch.Tensor:
    """Bool [Nq, Nk], True = attend: key j visible to query i iff
    i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right (None: that side unbounded).
    Bottom-right aligned as FlashAttention's window; causal is right = 0."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    d = i + (n_k - n_q)
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if right is not None:
        keep &= j <= d + right
    if left is not None:
        keep &= j >= d - left
    return keep


def window_bounds(causal: bool, window) -> tuple[int | None, int | None]:
    """(left, right) key offsets from the bottom-right diagonal, None = unbounded.

    window=(left, right) as FlashAttention, -1 = unbounded; causal forces right = 0 (as
    FlashAttention does when both are given)."""
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    left = None if left < 0 else left
    right = None if right < 0 else right
    if causal:
        right = 0
    return left, right


def alibi_bias(slopes: torch.Tensor, b: int, h: int, n_q: int, n_k: int) -> torch.Tensor:
    """[B, H, Nq, Nk] bias -slope * |i + Nk - Nq - j| (bottom-right aligned, FlashAttention's)."""
    i = torch.arange(n_q, device=slopes.device)[:, None]
    j = torch.arange(n_k, device=slopes.device)[None, :]
    dist = (i + (n_k - n_q) - j).abs()
    s = slopes.reshape(-1, h) if slopes.dim() == 2 else slopes.reshape(1, h)
    return -s[:, :, None, None] * dist


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False, attn_mask=None,
              key_padding_mask=None, dropout_p: float = 0.0, window=None, alibi_slopes=None,
              softcap=None, dropout_mask: torch.Tensor | None = None):
    """softmax(score(q kᵀ) + bias) v, the semantics of `tritformer.attention`.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with Hq % Hkv == 0. score = scale·qkᵀ, or
    softcap·tanh(scale·qkᵀ/softcap); bias = ALiBi + additive attn_mask; masked = causal/window
    (bottom-right aligned), bool attn_mask False, key_padding_mask True. Rows whose every key is
    masked return 0 (and lse = -inf). Dropout multiplies the probabilities by
    dropout_mask / (1 - dropout_p) (dropout_mask: bool keep, broadcastable to [B, Hq, Nq, Nk];
    drawn with torch.rand when not given). Computes in the inputs' dtype.
    """
    left, right = window_bounds(causal, window)
    return _attention(q, k, v, scale, left, right, return_lse, attn_mask, key_padding_mask,
                      dropout_p, alibi_slopes, softcap, dropout_mask)


def _attention(q, k, v, scale, left, right, return_lse=False, attn_mask=None,
               key_padding_mask=None, dropout_p=0.0, alibi_slopes=None, softcap=None,
               dropout_mask=None):
    """`attention` with the window as (left, right) offsets from the bottom-right diagonal (None
    = unbounded; any integer, e.g. right = Nq - Nk is SDPA's top-left causal)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    group = Hq // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, Hq, Nq, Nk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes.to(scores.dtype), B, Hq, Nq, Nk)
    keep = None
    if left is not None or right is not None:
        keep = window_keep(Nq, Nk, left, right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    # rows with no visible key: keep them finite so that neither softmax nor its gradient is NaN
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    lse = lse.masked_fill(empty[..., 0], float("-inf"))
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=probs.device) >= dropout_p
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, Hq, Nq, D)
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     *, causal=False, scale=None, dropout_p=0.0, window=None, alibi_slopes=None,
                     softcap=None, return_lse=False, dropout_mask=None):
    """`tritformer.varlen_attention` as a loop over the packed sequences (q [Tq, Hq, D], k/v
    [Tk, Hkv, D]). lse is [Hq, Tq]; dropout_mask, if given, is bool [Hq, Tq, max_seqlen_k]
    (query row t of head h against key j of its own sequence)."""
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
        o, l = attention(qs, ks, vs, causal=causal, scale=scale, return_lse=True,
                         dropout_p=dropout_p, window=window, alibi_slopes=slopes,
                         softcap=softcap, dropout_mask=dm)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, *q.shape[1:])
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return (out, lse) if return_lse else out


def varlen_kv_used(k, v, cu_seqlens_k, block_table=None, seqused_k=None):
    """The keys varlen_attention reads with block_table and/or seqused_k, gathered packed:
    (k [total_used, Hkv, D], v, cu_seqlens_k [num_seqs + 1] int32 of the used lengths).

    k/v: packed [total_k, Hkv, D], or with block_table [num_seqs, max_blocks] paged caches
    [num_blocks, page, Hkv, D] where key j of sequence s is k[block_table[s, j // page], j %
    page]. Sequence s uses its cu_seqlens_k length, or its first seqused_k[s] keys."""
    ck = cu_seqlens_k.tolist()
    used = [b - a for a, b in zip(ck, ck[1:])]
    if seqused_k is not None:
        used = seqused_k.tolist()
    dev = k.device
    if block_table is None:
        rows = [torch.arange(a, a + n, device=dev) for a, n in zip(ck, used)]
        flat_k, flat_v = k, v
    else:
        page, bt = k.shape[1], block_table.long()
        rows = [bt[s, torch.arange(n, device=dev) // page] * page + torch.arange(n, device=dev) % page
                for s, n in enumerate(used)]
        flat_k, flat_v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=dev)
    cu = torch.tensor([0, *torch.tensor(used, dtype=torch.long).cumsum(0).tolist()],
                      dtype=torch.int32, device=cu_seqlens_k.device)
    return flat_k.index_select(0, idx), flat_v.index_select(0, idx), cu


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0, mask: torch.Tensor | None = None,
            causal: bool = False) -> torch.Tensor:
    """softmax(scale * x + mask) along `dim`, in x's dtype (PyTorch's own same-dtype math).

    mask: bool (True = keep) or additive float, broadcastable to x. causal: key j masked for row
    i of the second-to-last dim when j > i + (C - R) (bottom-right, as `attention`). Rows with
    nothing left give 0.
    """
    z = x * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask.expand(x.shape)
        else:
            z = z + mask.to(z.dtype)
    if causal:
        c = causal_mask(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(z).all(dim=dim, keepdim=True)
    y = torch.softmax(z.masked_fill(empty, 0.0), dim=dim)
    return y.masked_fill(empty, 0.0)


# --------------------------------------------------------------------------------------------
# FFN
# --------------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def activation_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """d activation(x) / dx, written out (used where autograd cannot record, and as a check)."""
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * torch.exp(-0.5 * x * x)
    if name == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def ffn(x, w1, b1, w2, b2, *, activation: str = "gelu", residual=None, recompute: bool = False):
    """act(x w1ᵀ + b1) w2ᵀ + b2 (+ residual): the unfused PyTorch sequence, in x's dtype."""
    y = torch.nn.functional.linear(apply_activation(torch.nn.functional.linear(x, w1, b1), activation), w2, b2)
    return y if residual is None else y + residual


def gated_ffn(x, w_gate, w_up, w_down, *, activation: str = "silu", recompute: bool = False,
              b_gate=None, b_up=None, b_down=None):
    """(act(x w_gateᵀ + b_gate) ∘ (x w_upᵀ + b_up)) w_downᵀ + b_down: SwiGLU / GeGLU, unfused."""
    F = torch.nn.functional
    return F.linear(apply_activation(F.linear(x, w_gate, b_gate), activation)
                    * F.linear(x, w_up, b_up), w_down, b_down)


def ffn_backward(dy, x, w_gate, b_gate, w_down, h, pre, activation: str, recompute: bool,
                 w_up=None, b_up=None, up=None):
    """The backward of `ffn` (w_up None) and of `gated_ffn` (w_up given), written out in
    float32 as the kernels compute it: from the saved activations h and pre (gated: the gate
    product, with up = the up product), rounded to x's dtype as the kernels save them, or,
    with recompute, from the first matmul(s) redone in float32. dy, x [M, *] 2-D.

    Returns, in x's dtype: ffn (dx, dw1, db1, dw2, db2); gated_ffn (dx, dw_gate, dw_up,
    dw_down, db_gate, db_up, db_down). The bias gradients are column sums (returned whether or
    not the biases exist)."""
    gated = w_up is not None
    f = lambda t: None if t is None else t.float()
    if recompute:
        pre32 = torch.nn.functional.linear(x.float(), w_gate.float(), f(b_gate))
        up32 = torch.nn.functional.linear(x.float(), w_up.float(), f(b_up)) if gated else None
        act32 = apply_activation(pre32, activation)
        h32 = act32 * up32 if gated else act32
    else:  # the saved tensors, as the kernels use them
        pre32, h32, up32 = pre.float(), h.float(), f(up)
        act32 = apply_activation(pre32, activation) if gated else None
    dy32 = dy.float()
    dh = dy32 @ w_down.float()
    dpre = (dh * up32 if gated else dh) * activation_grad(pre32, activation)
    if gated:
        dup = dh * act32
        res = (dpre @ w_gate.float() + dup @ w_up.float(), dpre.t() @ x.float(),
               dup.t() @ x.float(), dy32.t() @ h32, dpre.sum(0), dup.sum(0), dy32.sum(0))
    else:
        res = (dpre @ w_gate.float(), dpre.t() @ x.float(), dpre.sum(0), dy32.t() @ h32,
               dy32.sum(0))
    return tuple(r.to(x.dtype) for r in res)


# --------------------------------------------------------------------------------------------
# Decoding with a KV cache
# --------------------------------------------------------------------------------------------
def decode_inputs(q, k_cache, v_cache, cache_seqlens=None, *, causal=True, window=None,
                  alibi_slopes=None, block_table=None, cache_leftpad=None,
                  cache_batch_idx=None):
    """`tritformer.decode_attention`'s keys as dense tensors and its mask: (k, v, mask).

    k, v [B, Hkv, Nmax, D]: the caches gathered in torch (block_table: paged caches
    [num_blocks, Hkv, page, D], row b's position p in block block_table[b, p // page];
    cache_batch_idx: row b reads cache row cache_batch_idx[b]), with every position outside
    [cache_leftpad[b], cache_seqlens[b]) replaced by 0 (garbage there, even NaN, cannot reach
    the result). mask: bool [B, 1, Nq, Nmax] (True = attend), or with alibi_slopes a float
    [B, Hq, Nq, Nmax] bias in q's dtype, -inf where masked. Query i sits at position
    cache_seqlens[b] - Nq + i (bottom-right alignment): causal / window / ALiBi as `attention`'s.
    No data-dependent shapes (traceable)."""
    B, Hq, Nq, _ = q.shape
    if block_table is not None:  # [B, max_blocks, Hkv, page, D] -> [B, Hkv, max_blocks * page, D]
        gather = lambda c: c[block_table.long()].transpose(1, 2).flatten(2, 3)  # noqa: E731
        k_cache, v_cache = gather(k_cache), gather(v_cache)
    elif cache_batch_idx is not None:
        k_cache = k_cache.index_select(0, cache_batch_idx.long())
        v_cache = v_cache.index_select(0, cache_batch_idx.long())
    n_max = k_cache.shape[2]
    dev = q.device
    if cache_seqlens is None:
        lens = torch.full((B,), n_max, device=dev, dtype=torch.long)
    else:
        lens = cache_seqlens.to(device=dev, dtype=torch.long)
    lp = torch.zeros_like(lens) if cache_leftpad is None else cache_leftpad.to(dev, torch.long)
    j = torch.arange(n_max, device=dev)
    valid = (j[None, :] < lens[:, None]) & (j[None, :] >= lp[:, None])  # (B, Nmax)
    zero = torch.zeros((), dtype=k_cache.dtype, device=dev)
    k = torch.where(valid[:, None, :, None], k_cache, zero)
    v = torch.where(valid[:, None, :, None], v_cache, zero)
    pos = (lens[:, None] - Nq + torch.arange(Nq, device=dev)[None, :])[:, :, None]  # (B, Nq, 1)
    left, right = window_bounds(bool(causal), window)
    keep = valid[:, None, :].expand(B, Nq, n_max)
    if right is not None:
        keep = keep & (j <= pos + right)
    if left is not None:
        keep = keep & (j >= pos - left)
    keep = keep[:, None]  # (B, 1, Nq, Nmax)
    if alibi_slopes is None:
        return k, v, keep
    slopes = alibi_slopes.reshape(-1, Hq).to(q.dtype)[:, :, None, None]  # (1 or B, Hq, 1, 1)
    bias = -slopes * (pos - j).abs()[:, None].to(q.dtype)
    return k, v, bias.masked_fill(~keep, float("-inf"))


def decode_attention(q, k_cache, v_cache, cache_seqlens=None, *, scale=None, return_lse=False,
                     causal=True, window=None, alibi_slopes=None, softcap=None, block_table=None,
                     cache_leftpad=None, cache_batch_idx=None):
    """`tritformer.decode_attention`: q [B, Hq, Nq, D] against row b's keys
    [cache_leftpad[b], cache_seqlens[b]) of k_cache/v_cache [B, Hkv, Nmax, D] (None: all Nmax;
    paged / cache_batch_idx: `decode_inputs`); causal (default): query i sees key j iff
    j <= cache_seqlens[b] - Nq + i; window / alibi_slopes / softcap as `attention`'s,
    bottom-right aligned to each row's length. No data-dependent shapes (traceable). Computes
    in the inputs' dtype."""
    k, v, mask = decode_inputs(q, k_cache, v_cache, cache_seqlens, causal=causal, window=window,
                               alibi_slopes=alibi_slopes, block_table=block_table,
                               cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx)
    return _attention(q, k, v, scale, None, None, return_lse, attn_mask=mask, softcap=softcap)
