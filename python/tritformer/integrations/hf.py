"""Hugging Face transformers integration: ``attn_implementation="tritformer"``.

Usage::

    from transformers import AutoModelForCausalLM
    from tritformer.integrations import hf

    hf.register()  # once per process; returns "tritformer"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tritformer")
    # or, on a model already built:  model.set_attn_implementation("tritformer")
    # or, from a config:             GPT2LMHeadModel(GPT2Config(..., attn_implementation="tritformer"))

`register` adds two entries named "tritformer": `attention_forward` to transformers'
``AttentionInterface`` (the function every attention layer calls) and `mask` to its
``AttentionMaskInterface`` (the function ``create_causal_mask`` & co. call to build the mask that
the layer then receives). Both are needed: a name without a mask function gets no mask at all
(transformers then assumes a backend that needs none, and padding would be ignored).

What runs on the fused kernel (`tritformer.attention`): the attention of models whose layers
dispatch through ``ALL_ATTENTION_FUNCTIONS.get_interface`` (tested: GPT-2 and Llama; the same
contract as transformers' SDPA function serves Mistral, Qwen, Gemma & co.), in float16 /
bfloat16 / float32 with one head dim <= 256 for q, k and v: multi-head, grouped-query and
multi-query attention natively (k/v are not repeated), causal or not, padding / packed-sequence
/ custom masks, KV caches (dynamic and static), ``sliding_window``, ``softcap`` (Gemma-2) and
attention dropout in training (the kernel's own dropout mask, not the one eager would draw).

What does not: float64 (e.g. ``model.double()``), head dims > 256 or differing between q, k and
v, key/value head counts that do not divide the query heads, query and key batch sizes that
differ, dropout >= 1, and T5-style ``position_bias``: these fall back to transformers' own
``sdpa_attention_forward`` (to a small float32-softmax math path when ``softcap`` is set, which
SDPA refuses), with one warning per reason and process. Attention sinks (gpt-oss's ``s_aux``)
raise, as no fallback computes them. ``output_attentions=True`` warns (as SDPA does) and returns
no weights: use "eager" for attention weights.

Mask convention (what `mask` returns and `attention_forward` expects):
- ``None``: plain causal attention (for a causal layer) with the queries being the LAST Nq of the
  Nk key positions, i.e. the causal mask aligned bottom-right (FlashAttention's convention, the
  kernel's ``causal=True``). `mask` returns None only when that holds: no padding in the key
  range, q_offset + Nq == kv_offset + Nk (dynamic caches: prefill, decoding, chunked prefill),
  and a sliding window / chunk that cannot bind (Nk < local size). This differs from SDPA's
  mask, whose None can also mean top-left alignment (a StaticCache prefill, where keys past the
  prompt are empty slots): for that case ours returns an explicit mask.
- a bool tensor [B, 1, Nq, Nk], True = attend (``sdpa_mask``'s output): passed as ``attn_mask``.
  It is complete, as for SDPA and eager: ``is_causal`` and ``sliding_window`` are not applied
  on top (Gemma-3's bidirectional image tokens and StaticCache layouts rely on that).
- Rows with no visible key (left-padding query positions: their own key is padding) output 0,
  as torch 2.13's SDPA on CPU does; eager's finite float mask gives them a uniform average of
  all values instead. These outputs are meaningless in every implementation and never reach a
  real token (no real query attends to a padding key), so only real tokens' logits compare.
"""
from __future__ import annotations

import warnings
from typing import Optional

try:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    from transformers.utils.import_utils import is_torchdynamo_exporting, is_tracing
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tritformer.integrations.hf needs Hugging Face transformers >= 4.56: "
        "pip install transformers (or pip install tritformer[hf])") from e

import torch

import tritformer.ops.attention as _ops
from tritformer._checks import MAX_HEAD_DIM, SUPPORTED_DTYPES

NAME = "tritformer"

_warned: set[str] = set()  # fallback reasons already reported in this process


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Mask function (AttentionMaskInterface)
# ---------------------------------------------------------------------------------------------
def _is_plain_bottom_right_causal(padding_mask: Optional[torch.Tensor], q_length: int,
                                  kv_length: int, q_offset, kv_offset,
                                  local_size: Optional[int]) -> bool:
    """Whether the mask is exactly the kernel's causal=True: no padding among the keys, the
    queries are the last q_length of the kv_length key positions, no binding local window."""
    if is_torchdynamo_exporting() or (padding_mask is not None and is_tracing(padding_mask)):
        return False  # exported graphs would hard-code the answer
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False  # StaticCache: its buffer holds empty slots after the last query
    if local_size is not None and kv_length >= local_size:
        return False  # the sliding window / chunk may cut keys off: keep it in the mask
    if q_offset + q_length != kv_offset + kv_length:
        return False
    if padding_mask is not None:
        keys = padding_mask[:, kv_offset:kv_offset + kv_length]  # [B, past + Nq] -> [B, Nk]
        if keys.shape[-1] < kv_length or not bool(keys.all()):
            return False  # padding (or a mask shorter than the keys: sdpa_mask pads it with 0)
    return True


def mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
         mask_function=causal_mask_function, attention_mask: Optional[torch.Tensor] = None,
         local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
         allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
         device="cpu", **kwargs) -> Optional[torch.Tensor]:
    """The "tritformer" entry of ``AttentionMaskInterface``: ``sdpa_mask``'s bool mask
    [B, 1, Nq, Nk] (True = attend), or None where `attention_forward` can use the kernel's
    bottom-right ``causal`` instead (see the module docstring).

    attention_mask: the 2-D padding mask [B, past + Nq] (True/1 = token). q_offset / kv_offset:
    the absolute positions of the first query / key. local_size: the sliding window or chunk
    size of the layer, if any. Other arguments as ``transformers.masking_utils.sdpa_mask``.
    """
    if allow_is_causal_skip and _is_plain_bottom_right_causal(
            attention_mask, q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                     device=device)


# ---------------------------------------------------------------------------------------------
# Attention function (AttentionInterface)
# ---------------------------------------------------------------------------------------------
def _unsupported(query, key, value, attention_mask, dropout_p, kwargs) -> Optional[str]:
    """Why the fused kernel cannot serve this call (None = it can)."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {str(query.dtype).replace('torch.', '')} (the kernel takes float16, bfloat16, float32)"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return f"query/key/value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    d = query.shape[-1]
    if not (key.shape[-1] == value.shape[-1] == d and 1 <= d <= MAX_HEAD_DIM):
        return (f"head dims q {d}, k {key.shape[-1]}, v {value.shape[-1]} (the kernel takes one "
                f"head dim <= {MAX_HEAD_DIM})")
    hq, hk = query.shape[1], key.shape[1]
    if hk == 0 or hq % hk != 0 or value.shape[1] != hk:
        return f"{hq} query heads over {hk} key / {value.shape[1]} value heads"
    if query.shape[0] != key.shape[0]:
        return f"query batch {query.shape[0]} != key batch {key.shape[0]}"
    if dropout_p >= 1.0:
        return f"dropout {dropout_p}"
    if kwargs.get("position_bias") is not None:
        return "position_bias (T5-style relative attention bias)"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return f"attention_mask of type {type(attention_mask).__name__}"
    return None


def _window(sliding_window: Optional[int], causal: bool) -> Optional[tuple[int, int]]:
    """transformers' sliding_window as the kernel's (left, right) window, in masking_utils'
    conventions: causal key j visible iff i - sw < j <= i, bidirectional iff |i - j| <= sw."""
    if sliding_window is None:
        return None
    sw = int(sliding_window)
    return (sw - 1, 0) if causal else (sw, sw)


def _band_mask(n_q: int, n_k: int, causal: bool, window, device) -> Optional[torch.Tensor]:
    """The kernel's bottom-right causal / window as an explicit bool [Nq, Nk] (True = attend),
    for the fallback (torch's is_causal is top-left); None when nothing is masked."""
    if not (window is not None or (causal and n_q > 1 and n_q != n_k)):
        return None
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)  # query i's aligned key index
    j = torch.arange(n_k, device=device)[None, :]
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (j >= i - window[0]) & (j <= i + window[1])
    return keep


def _math_attention(query, key, value, attention_mask, dropout_p, scaling, softcap):
    """Eager-style attention with softcap (which transformers' SDPA path refuses)."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # [B, Hq, Nq, Nk]
    scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # float32 softmax for half types; float64 stays float64 (eager's fixed float32 would not)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = probs.to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, Nq, Hq, D]


def _fallback(module, query, key, value, attention_mask, dropout_p, scaling, causal, window,
              softcap, kwargs):
    """transformers' SDPA (or `_math_attention` with softcap) with our mask convention: the
    bottom-right causal / window made explicit where SDPA's top-left is_causal would differ."""
    n_q, n_k = query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = _band_mask(n_q, n_k, causal, window, query.device)
        if attention_mask is not None:
            causal = False
    if softcap:
        if attention_mask is None and causal and n_q > 1:  # here n_q == n_k: top-left is fine
            attention_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
        return _math_attention(query, key, value, attention_mask, dropout_p, scaling, softcap), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout_p,
                                  scaling=scaling, is_causal=causal, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The "tritformer" entry of ``AttentionInterface`` (same contract as transformers'
    ``sdpa_attention_forward``).

    Args:
        module: the calling attention layer; read for ``is_causal`` (default True) and
            ``training`` (dropout applies only in training, as in eager).
        query: [B, Hq, Nq, D]. key / value: [B, Hkv, Nk, D], Hq a multiple of Hkv (GQA/MQA read
            natively, no ``repeat_kv``). Any strides.
        attention_mask: None, or a mask broadcastable to [B, Hq, Nq, Nk]: bool (True = attend,
            from `mask`) or additive float (eager-style, e.g. a user's 4-D mask). An explicit
            mask is complete: is_causal and sliding_window are then not applied on top.
        dropout: attention dropout probability. scaling: multiplier of q kᵀ (default
            1/sqrt(D)). is_causal: overrides ``module.is_causal``; with no mask, causal is
            aligned bottom-right (the queries are the last Nq key positions).
        kwargs: ``sliding_window`` (int: key j visible to query i iff i - sw < j <= i; applied
            when there is no explicit mask), ``softcap`` (Gemma-2's logit cap), and the model's
            other keyword arguments (ignored, as SDPA does).

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None).
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='tritformer' does not support attention sinks "
                         "(s_aux); use 'eager' for this model")
    if kwargs.get("output_attentions", False):
        _warn_once("attn_implementation='tritformer' does not return attention weights "
                   "(output_attentions=True); set attn_implementation='eager' for them")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    dropout_p = float(dropout) if getattr(module, "training", True) else 0.0
    softcap = kwargs.get("softcap")
    window = _window(kwargs.get("sliding_window"), causal) if attention_mask is None else None
    if attention_mask is not None:
        causal = False  # the mask is complete (SDPA's and eager's meaning)

    reason = _unsupported(query, key, value, attention_mask, dropout_p, kwargs)
    if reason is not None:
        _warn_once(f"attn_implementation='tritformer': {reason} is not supported by the fused "
                   "kernel; falling back to transformers' sdpa_attention_forward")
        return _fallback(module, query, key, value, attention_mask, dropout_p, scaling, causal,
                         window, softcap, kwargs)

    out = _ops.attention(query, key, value, causal=causal, scale=scaling,
                         attn_mask=attention_mask, dropout_p=dropout_p, window=window,
                         softcap=softcap or None)  # [B, Hq, Nq, D]
    return out.transpose(1, 2).contiguous(), None  # [B, Nq, Hq, D]


def register() -> str:
    """Register "tritformer" with transformers' ``AttentionInterface`` (`attention_forward`)
    and ``AttentionMaskInterface`` (`mask`). Idempotent; returns the name to pass as
    ``attn_implementation``."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)
    return NAME


__all__ = ["NAME", "register", "attention_forward", "mask"]
