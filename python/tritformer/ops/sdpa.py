"""`scaled_dot_product_attention`: a drop-in for `torch.nn.functional.scaled_dot_product_attention`.

Same signature and semantics as torch 2.13's function (so it can be assigned in its place),
errors included: served by the fused kernel (`tritformer.ops.attention._attention`) where it can
be, and by torch's own implementation otherwise. `_dense` is the shared core that
`tritformer.nn.MultiheadAttention` also uses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn.attention import SDPBackend
from torch.overrides import handle_torch_function, has_torch_function

from .._autocast import autocast
from .._checks import (MAX_HEAD_DIM, SUPPORTED_DTYPES, SDPAError, SDPATypeError,  # noqa: F401 (public here)
                       check_sdpa_inputs)
from .attention import _attention

try:  # torch.nn.attention.bias: torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover
    CausalBias = CausalVariant = None

# The builtin op that torch.nn.functional.scaled_dot_product_attention is bound to. Captured as
# the builtin (not through F) so that the fallback still reaches torch's own implementation when
# a user has assigned this module's function to F.scaled_dot_product_attention.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


# torch's own message (and a RuntimeError, as torch's) when its math path gets both
_CAUSAL_AND_MASK = "Explicit attn_mask should not be set when is_causal=True"
_SDPA_MATH = SDPBackend.MATH.value


def _fusable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether the fused kernel serves these (already validated) tensors."""
    return (q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.device == q.device and v.device == q.device
            and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and 1 <= q.shape[-1] <= MAX_HEAD_DIM
            and dropout_p < 1.0  # p = 1 zeroes everything (torch's dropout); the kernel scales by 1/(1-p)
            and not (q.is_nested or k.is_nested or v.is_nested))


def _causal_keep(n_q: int, n_k: int, device, bottom_right: bool = False) -> torch.Tensor:
    """Bool [L, S], True = attend. Top-left (torch's is_causal, CausalVariant.UPPER_LEFT): key j
    visible to query i iff j <= i. Bottom-right (CausalVariant.LOWER_RIGHT, `attention`'s
    causal): iff j <= i + S - L."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q if bottom_right else 0)


def _merge_masks(attn_mask, key_padding_mask, causal: bool, n_q: int, n_k: int, device,
                 bottom_right: bool = False):
    """One SDPA attn_mask (bool True = attend, or float additive) for torch's op: the causal
    mask (top-left, or bottom-right) and the key padding folded into attn_mask."""
    keep = None
    if causal:
        keep = _causal_keep(n_q, n_k, device, bottom_right)
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if keep is None:
        return attn_mask
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def _dense(q, k, v, *, scale=None, attn_mask=None, key_padding_mask=None, causal=False,
           dropout_p=0.0, bottom_right=False):
    """Attention on [B, Hq, L, E] / [B, Hkv, S, E] / [B, Hkv, S, Ev] (Hq % Hkv == 0).

    attn_mask: bool (True = attend) or float additive, broadcastable to [B, Hq, L, S], at most
    4-D. key_padding_mask: bool [B, S], True = padding. causal: torch's top-left is_causal, or
    with bottom_right the bottom-right variant (torch's CausalVariant.LOWER_RIGHT).
    Fused when `_fusable`, else torch's own SDPA (masks merged into one, GQA expanded) in the
    inputs' dtype.
    """
    L, S = q.shape[-2], k.shape[-2]
    if _fusable(q, k, v, dropout_p):
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        # _attention's offsets are bottom-right: right = 0 is j <= i + S - L; top-left causal
        # (j <= i) is right = L - S
        right = (0 if bottom_right else L - S) if causal else None
        return _attention(q, k, v, scale, None, right, attn_mask=attn_mask,
                          key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    mask = _merge_masks(attn_mask, key_padding_mask, causal, L, S, q.device, bottom_right)
    return _torch_sdpa(q, k, v, mask, dropout_p, False, scale=scale,
                       enable_gqa=q.shape[-3] != k.shape[-3])


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------
def _to_4d(t: torch.Tensor, lead: tuple, heads: Optional[int], keep_heads: bool) -> torch.Tensor:
    """[*lead_t, N, X] -> [B, H, N, X] for the output's leading dims `lead` (B = prod(lead[:-1]),
    H = lead[-1]); the head dim stays 1 when keep_heads and t's head dim is 1 (MQA: no copy),
    or t's own head count when `heads` is given (GQA)."""
    n, x = t.shape[-2:]
    if not lead:
        return t.reshape(1, 1, n, x)
    h = t.shape[-3] if t.dim() >= 3 else 1
    if heads is None:
        h = h if (keep_heads and h == 1) else lead[-1]
    else:
        h = heads
    t = t.expand(*lead[:-1], h, n, x)
    return t.reshape(math.prod(lead[:-1]), h, n, x)


def _mask_to_4d(mask: torch.Tensor, lead: tuple) -> torch.Tensor:
    """attn_mask broadcastable to [*lead, L, S] -> broadcastable to [B, H, L, S] (a view unless
    mask varies along several flattened batch dims)."""
    full = len(lead) + 2
    mask = mask.reshape((1,) * (full - mask.dim()) + tuple(mask.shape))
    if len(lead) <= 2:
        return mask.reshape((1,) * (2 - len(lead)) + tuple(mask.shape))
    batch = lead[:-1]
    if all(s == 1 for s in mask.shape[:len(batch)]):
        return mask.reshape(1, *mask.shape[len(batch):])
    mask = mask.expand(*batch, *mask.shape[len(batch):])
    return mask.reshape(math.prod(batch), *mask.shape[len(batch):])


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (torch 2.13 semantics).

    ``torch.nn.functional.scaled_dot_product_attention = tritformer.scaled_dot_product_attention``
    routes existing code through the fused kernel.

    Args:
        query: [..., Hq, L, E] (also [H, L, E] or [L, E]).
        key: [..., Hkv, S, E]. value: [..., Hkv, S, Ev]. Leading dims (head dim included)
            broadcast against each other as in torch. Same dtype and device as query.
        attn_mask: bool (True = attend) or float additive (float32 or query's dtype),
            broadcastable to [..., L, S]. A float mask that requires grad gets its gradient.
            Or a ``torch.nn.attention.bias.CausalBias``: ``causal_upper_left(L, S)`` runs as
            is_causal=True, ``causal_lower_right(L, S)`` as the kernel's bottom-right causal
            (key j visible to query i iff j <= i + S - L, `tritformer.attention`'s causal);
            a lower-right bias whose sizes are not (L, S) is materialized, as torch does.
        dropout_p: dropout on the attention probabilities in [0, 1]. Applied whenever > 0
            (also in eval mode, as torch's functional); pass ``p if self.training else 0.0``.
            The fused path draws its mask from an in-kernel generator seeded from torch's
            default generator, so ``torch.manual_seed`` reproduces it, but the mask differs
            from the one torch would draw.
        is_causal: causal mask aligned to the TOP-LEFT corner (torch's convention): key j is
            masked for query i when j > i; with L > S the last L - S queries see every key.
            Together with attn_mask: accepted (both apply, AND) exactly where torch 2.13 accepts
            the pair, i.e. where torch would take a fused backend (on CPU: 4-D inputs, no
            dropout, no mask grad, no `sdpa_kernel` restriction to MATH; decided by
            ``torch._fused_sdp_choice``); where torch takes its math path (3-D inputs, dropout,
            a mask requiring grad, ``sdpa_kernel(SDPBackend.MATH)``) it raises torch's
            RuntimeError "Explicit attn_mask should not be set when is_causal=True". With a
            CausalBias it raises torch's ValueError.
        scale: multiplier of q kᵀ; default 1/sqrt(E). Keyword-only, as in torch.
        enable_gqa: grouped-query attention: Hq must be a multiple of Hkv (query head h reads
            key/value head h // (Hq // Hkv)). Without it the head dims must match or broadcast.

    Rows whose every key is masked output 0 (torch 2.13's CPU behaviour).

    Where it runs: the fused kernel (`tritformer.attention`'s backend) when query/key/value
    are float16, bfloat16 or float32 with E == Ev and 1 <= E <= 256, dropout_p < 1, and (with
    enable_gqa) key and value have the same head count. Everything else falls back to torch's
    own implementation in the input dtype, with torch's results: float64 inputs, Ev != E,
    E = 0 or E > 256, dropout_p == 1 (all zeros), enable_gqa with different key/value head
    counts, nested tensors.

    Tensor subclasses and TorchFunctionModes get the call through ``__torch_function__`` first,
    as with torch's function (``func`` is this function). Under TorchScript (``torch.jit.script``
    of a module whose code calls F.scaled_dot_product_attention after the assignment) this
    function is registered as a builtin for torch's ``aten::scaled_dot_product_attention``:
    scripted code runs torch's op.

    Raises:
        Naming the offending argument, before any kernel runs: where torch raises RuntimeError
        (dtypes, ranks, shapes, mask dtype/shape) an `SDPAError` (RuntimeError and ValueError)
        or `SDPATypeError` (RuntimeError and TypeError); TypeError where torch's argument
        parser raises it (a non-tensor, a non-bool flag, a non-float dropout_p or scale).
    """
    if _is_causal_bias(attn_mask):
        return _causal_bias_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    tensors = tuple(t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor))
    if has_torch_function(tensors):
        # as torch's builtin: tensor subclasses and TorchFunctionModes see the call first (with
        # this function as `func`: the one F.scaled_dot_product_attention holds once assigned)
        return handle_torch_function(scaled_dot_product_attention, tensors, query, key, value,
                                     attn_mask, dropout_p, is_causal, scale=scale,
                                     enable_gqa=enable_gqa)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _is_causal_bias(attn_mask) -> bool:
    """A torch.nn.attention.bias.CausalBias whose dispatch is CausalBias's own (a subclass that
    overrides __torch_function__ gets the generic dispatch instead)."""
    return (CausalBias is not None and isinstance(attn_mask, CausalBias)
            and type(attn_mask).__torch_function__.__func__ is CausalBias.__torch_function__.__func__)


def _causal_bias_sdpa(query, key, value, bias, dropout_p, is_causal, scale, enable_gqa):
    """torch's CausalBias._dispatch, mapped onto the fused kernel's causal modes. The bias has no
    storage (its data is only its variant and sizes): reading it as a tensor is wrong."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")  # torch's error and type
    if bias.seq_len_q == bias.seq_len_kv or bias.variant == CausalVariant.UPPER_LEFT:
        # torch: is_causal=True, whatever the bias's sizes
        return scaled_dot_product_attention(query, key, value, None, dropout_p, True, scale=scale,
                                            enable_gqa=enable_gqa)
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(f"CausalBias.variant must be a CausalVariant type, but found: {bias.variant}")
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() >= 2
            and key.dim() >= 2 and (bias.seq_len_q, bias.seq_len_kv) == (query.shape[-2], key.shape[-2])):
        # the kernel's bottom-right causal (key j visible to query i iff j <= i + S - L)
        return _sdpa(query, key, value, None, dropout_p, True, scale, enable_gqa, bottom_right=True)
    # sizes that are not [L, S]: torch materializes the bias, so does this (and the mask check
    # raises where torch's would)
    device = query.device if isinstance(query, torch.Tensor) else None
    return scaled_dot_product_attention(query, key, value, bias._materialize(device), dropout_p,
                                        False, scale=scale, enable_gqa=enable_gqa)


def _torch_takes_math_path(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether torch's SDPA would run these inputs on its math path (the backend it picks, under
    any `torch.nn.attention.sdpa_kernel` restriction in force); a choice that fails counts as math."""
    try:
        return torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale=scale, enable_gqa=enable_gqa) == _SDPA_MATH
    except RuntimeError:
        return True


@autocast("query", "key", "value", "attn_mask")  # torch's SDPA: lower-precision list
def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, bottom_right=False):
    """The drop-in on plain tensors. bottom_right (with is_causal, attn_mask None): the causal
    mask aligned bottom-right (CausalVariant.LOWER_RIGHT)."""
    if isinstance(dropout_p, torch.Tensor) and dropout_p.numel() == 1:
        dropout_p = float(dropout_p)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    out_lead = check_sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    dropout_p = float(dropout_p)
    scale = None if scale is None else float(scale)
    if is_causal and attn_mask is not None and _torch_takes_math_path(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        raise SDPAError(f"{_CAUSAL_AND_MASK}: torch's math path, which torch takes for these inputs "
                        "(3-D, dropout, a mask that requires grad, ...), refuses attn_mask together "
                        "with is_causal; fold the causal mask into attn_mask")
    L, S = query.shape[-2], key.shape[-2]

    gqa_split = enable_gqa and key.shape[-3] != value.shape[-3]
    if gqa_split or not _fusable(query, key, value, dropout_p):
        mask = attn_mask
        if bottom_right:
            mask, is_causal = _causal_keep(L, S, query.device, bottom_right=True), False
        # (is_causal with attn_mask reaches here only where torch's own op accepts the pair)
        return _torch_sdpa(query, key, value, mask, dropout_p, is_causal, scale=scale,
                           enable_gqa=enable_gqa)

    if enable_gqa:
        q = _to_4d(query, out_lead, query.shape[-3], False)
        k = _to_4d(key, out_lead, key.shape[-3], False)
        v = _to_4d(value, out_lead, value.shape[-3], False)
    else:
        q = _to_4d(query, out_lead, None, False)
        # key/value heads: keep a broadcast head dim of 1 as MQA (no copy) if both have it
        kv_one = all(t.dim() >= 3 and t.shape[-3] == 1 for t in (key, value)) or (
            key.dim() == 2 and value.dim() == 2)
        k = _to_4d(key, out_lead, None, kv_one)
        v = _to_4d(value, out_lead, None, kv_one)
    mask = None if attn_mask is None else _mask_to_4d(attn_mask, out_lead)
    out = _dense(q, k, v, scale=scale, attn_mask=mask, causal=is_causal, dropout_p=dropout_p,
                 bottom_right=bottom_right)
    return out.reshape(*out_lead, L, value.shape[-1])


# TorchScript cannot compile this function (keyword-only arguments with defaults, Triton), and
# torch.nn.functional.multi_head_attention_forward calls whatever F.scaled_dot_product_attention
# holds. Registered as a builtin, scripted code (torch.jit.script of nn.MultiheadAttention,
# TransformerEncoderLayer, ... after the assignment) calls torch's own aten op in its place.
try:
    torch.jit._builtins._register_builtin(scaled_dot_product_attention,
                                          "aten::scaled_dot_product_attention")
except AttributeError:  # pragma: no cover - private API moved
    pass
