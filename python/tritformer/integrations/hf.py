"""Hugging Face transformers integration: ``attn_implementation="tritformer"``.

Usage::

    from transformers import AutoModelForCausalLM
    from tritformer.integrations import hf

    hf.register()  # once per process; returns "tritformer"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tritformer")
    # or, on a model already built:  model.set_attn_implementation("tritformer")
    # or, from a config:             GPT2LMHeadModel(GPT2Config(..., attn_implementation="tritformer"))

    # or one call, attention and MLPs (Liger-style):
    hf.apply_to_llama()              # before loading: Llama models default to "tritformer"
    hf.apply_to_llama(model=model)   # on a built model: tritformer.patch(model)
    tritformer.patch(model)          # any model: register + set_attn_implementation + MLPs

`register` adds two entries named "tritformer": `attention_forward` to transformers'
``AttentionInterface`` (the function every attention layer calls) and `mask` to its
``AttentionMaskInterface`` (the function ``create_causal_mask`` & co. call to build the mask that
the layer then receives). Both are needed: a name without a mask function gets no mask at all
(transformers then assumes a backend that needs none, and padding would be ignored).

What runs on the fused kernel (`tritformer.attention`): the attention of models whose layers
dispatch through ``ALL_ATTENTION_FUNCTIONS.get_interface`` (tested: GPT-2, Llama, Mistral,
Qwen2, Gemma, Gemma-2; the same contract as transformers' SDPA function), in float16 /
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
- the same bool tensor, where it is exactly bottom-right causal AND key padding (a padded batch
  through ``create_causal_mask`` on a dynamic cache or none: ``causal_mask_function`` itself,
  no packed sequences, no binding window), carries the key padding [B, Nk] as its attribute
  ``_tritformer_key_padding``, and `attention_forward` runs the kernel's ``causal=True`` with
  ``key_padding_mask`` instead of the dense mask: the same attention, on the key-padding path
  (plain's big tiles where they were compiled with it, no [B, Nq, Nk] mask reads; see
  docs/masked-performance.md). A slice or copy of the mask drops the attribute and takes the
  dense path. Eager mode only: under torch.compile the dense mask is passed.
- Rows with no visible key (left-padding query positions: their own key is padding) output 0,
  as torch 2.13's SDPA on CPU does; eager's finite float mask gives them a uniform average of
  all values instead. These outputs are meaningless in every implementation and never reach a
  real token (no real query attends to a padding key), so only real tokens' logits compare.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

try:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    from transformers.utils.import_utils import is_torchdynamo_exporting, is_tracing
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tritformer.integrations.hf needs Hugging Face transformers >= 5.4: "
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
def _bottom_right_aligned(padding_mask: Optional[torch.Tensor], q_length: int, kv_length: int,
                          q_offset, kv_offset, local_size: Optional[int]) -> bool:
    """Whether the causal mask is the kernel's bottom-right causal=True up to key padding: the
    queries are the last q_length of the kv_length key positions, no binding local window, and
    the answer may be read on the host (not exporting or tracing)."""
    if is_torchdynamo_exporting() or (padding_mask is not None and is_tracing(padding_mask)):
        return False  # exported graphs would hard-code the answer
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False  # StaticCache: its buffer holds empty slots after the last query
    if local_size is not None and kv_length >= local_size:
        return False  # the sliding window / chunk may cut keys off: keep it in the mask
    return q_offset + q_length == kv_offset + kv_length


def _is_plain_bottom_right_causal(padding_mask: Optional[torch.Tensor], q_length: int,
                                  kv_length: int, q_offset, kv_offset,
                                  local_size: Optional[int]) -> bool:
    """Whether the mask is exactly the kernel's causal=True: bottom-right aligned
    (`_bottom_right_aligned`) and no padding among the keys."""
    if not _bottom_right_aligned(padding_mask, q_length, kv_length, q_offset, kv_offset,
                                 local_size):
        return False
    if padding_mask is not None:
        keys = padding_mask[:, kv_offset:kv_offset + kv_length]  # [B, past + Nq] -> [B, Nk]
        if keys.shape[-1] < kv_length or not bool(keys.all()):
            return False  # padding (or a mask shorter than the keys: sdpa_mask pads it with 0)
    return True


# The attribute by which `mask` hands `attention_forward` the key padding of a causal mask
KEY_PADDING_ATTR = "_tritformer_key_padding"


def _causal_key_padding(padding_mask: Optional[torch.Tensor], q_length: int, kv_length: int,
                        q_offset, kv_offset, local_size: Optional[int],
                        mask_function) -> Optional[torch.Tensor]:
    """The key padding [B, Nk] (True = padding) when the mask is exactly the kernel's
    bottom-right causal AND key padding (create_causal_mask's plain case: causal_mask_function
    itself, not a packed-sequence or overlay composition; `_bottom_right_aligned`; a 2-D
    padding mask covering the keys), else None. Eager mode only (not while torch.compile
    traces: the attribute would not reach the compiled attention)."""
    if (padding_mask is None or padding_mask.dim() != 2 or mask_function is not causal_mask_function
            or torch.compiler.is_compiling()):
        return None
    if not _bottom_right_aligned(padding_mask, q_length, kv_length, q_offset, kv_offset,
                                 local_size):
        return None
    keys = padding_mask[:, kv_offset:kv_offset + kv_length]
    if keys.shape[-1] != kv_length:
        return None
    return ~keys.to(torch.bool)


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
    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, local_size=local_size,
                      allow_is_causal_skip=False,
                      allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                      device=device)
    kpm = _causal_key_padding(attention_mask, q_length, kv_length, q_offset, kv_offset,
                              local_size, mask_function)
    if isinstance(dense, torch.Tensor) and kpm is not None:
        setattr(dense, KEY_PADDING_ATTR, kpm.to(dense.device))
    return dense


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


def _key_padding_of(attention_mask: Optional[torch.Tensor], query: torch.Tensor,
                    key: torch.Tensor) -> Optional[torch.Tensor]:
    """The key padding [B, Nk] that `mask` attached to a causal mask, if this is that mask as
    built (a [B, 1, Nq, Nk] bool tensor; a slice or copy of it has no attribute) and it fits
    these query / key shapes; else None (the mask is then passed as attn_mask)."""
    if attention_mask is None or torch.compiler.is_compiling():
        return None
    kpm = getattr(attention_mask, KEY_PADDING_ATTR, None)
    B, n_q, n_k = query.shape[0], query.shape[2], key.shape[2]
    if (kpm is None or attention_mask.dtype != torch.bool
            or tuple(attention_mask.shape) != (B, 1, n_q, n_k) or tuple(kpm.shape) != (B, n_k)):
        return None
    return kpm


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

    kpm = _key_padding_of(attention_mask, query, key)
    if kpm is not None:  # causal AND key padding: the kernel's key-padding path (module docstring)
        causal, attention_mask = True, None
    out = _ops.attention(query, key, value, causal=causal, scale=scaling,
                         attn_mask=attention_mask, key_padding_mask=kpm, dropout_p=dropout_p,
                         window=window, softcap=softcap or None)  # [B, Hq, Nq, D]
    return out.transpose(1, 2).contiguous(), None  # [B, Nq, Hq, D]


def _registered(interface, fn) -> bool:
    return interface().get(NAME) is fn  # a fresh instance reads the global mapping only


def register() -> str:
    """Register "tritformer" with transformers' ``AttentionInterface`` (`attention_forward`)
    and ``AttentionMaskInterface`` (`mask`). Idempotent (registers only what is not registered
    yet); returns the name to pass as ``attn_implementation``."""
    if not _registered(AttentionInterface, attention_forward):
        AttentionInterface.register(NAME, attention_forward)
    if not _registered(AttentionMaskInterface, mask):
        AttentionMaskInterface.register(NAME, mask)
    return NAME


# ---------------------------------------------------------------------------------------------
# Switching a model (tritformer.patch) and per-family entry points (apply_to_<family>)
# ---------------------------------------------------------------------------------------------
def _unservable(model: torch.nn.Module) -> Optional[str]:
    """Why the kernel could serve none of `model`'s attention calls (None = it can serve them):
    read from the attention layers' ``head_dim`` and ``sinks`` attributes."""
    for name, m in model.named_modules():
        if "sinks" in m._parameters:
            return (f"{name or type(m).__name__} has attention sinks (s_aux), which the kernel "
                    "does not compute (attention_forward would raise)")
        d = getattr(m, "head_dim", None)
        if type(d) is int and d > MAX_HEAD_DIM and "Attention" in type(m).__name__:
            return (f"head dim {d} of {name or type(m).__name__} > {MAX_HEAD_DIM}, the kernel's "
                    "limit (every call would fall back to SDPA)")
    return None


def use_tritformer_attention(model) -> tuple[Optional[str], Optional[str]]:
    """Register "tritformer" and switch the ``PreTrainedModel`` `model` (and its sub-models) to
    it with ``model.set_attn_implementation``. Returns (previous attn_implementation, None), or
    (previous, reason) when the model was left as is. What `tritformer.patch` calls."""
    old = model.config._attn_implementation
    if old == NAME:
        return old, None
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return old, (f"{type(model).__name__}'s attention layers do not dispatch through "
                     "transformers' AttentionInterface (set_attn_implementation cannot switch them)")
    reason = _unservable(model)
    if reason is not None:
        return old, reason
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError) as e:
        return old, f"set_attn_implementation({NAME!r}) failed: {e}"
    if model.config._attn_implementation != NAME:
        return old, (f"set_attn_implementation({NAME!r}) left attn_implementation="
                     f"{model.config._attn_implementation!r}")
    return old, None


# family -> (modeling module, its PreTrainedModel base class, its MLP class, MLP kind)
FAMILIES = {
    "llama": ("llama", "LlamaPreTrainedModel", "LlamaMLP", "gated"),
    "mistral": ("mistral", "MistralPreTrainedModel", "MistralMLP", "gated"),
    "qwen2": ("qwen2", "Qwen2PreTrainedModel", "Qwen2MLP", "gated"),
    "gemma": ("gemma", "GemmaPreTrainedModel", "GemmaMLP", "gated"),
    "gemma2": ("gemma2", "Gemma2PreTrainedModel", "Gemma2MLP", "gated"),
    "gpt2": ("gpt2", "GPT2PreTrainedModel", "GPT2MLP", "conv1d"),
}

_MISSING = object()
# (class, attribute) -> (family, the class's own value before, or _MISSING)
_class_patches: dict[tuple[type, str], tuple[str, object]] = {}


def _set_class_attr(family: str, cls: type, attr: str, value) -> None:
    _class_patches.setdefault((cls, attr), (family, cls.__dict__.get(attr, _MISSING)))
    setattr(cls, attr, value)


def revert(family: Optional[str] = None) -> None:
    """Undo the class-level patches of ``apply_to_<family>()`` (all families by default):
    models created afterwards default to transformers' attention again and the MLP classes
    get their own forward back (also in models already created, whose MLPs use the class's
    forward). A model switched to "tritformer" keeps it: ``set_attn_implementation("sdpa")``."""
    if family is not None:
        _family(family)  # validates the name
    for (cls, attr), (fam, before) in list(_class_patches.items()):
        if family is not None and fam != family:
            continue
        if before is _MISSING:
            delattr(cls, attr)
        else:
            setattr(cls, attr, before)
        del _class_patches[(cls, attr)]


def _family(family: str) -> tuple[type, type, str]:
    """(PreTrainedModel class, MLP class, MLP kind) of `family` in the installed transformers."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    mod, base, mlp, kind = FAMILIES[family]
    try:
        module = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    except ImportError as e:
        raise ImportError(f"this transformers has no {family} models "
                          f"(transformers.models.{mod}): {e}") from e
    missing = [n for n in (base, mlp) if not hasattr(module, n)]
    if missing:
        raise ImportError(f"transformers.models.{mod}.modeling_{mod} has no {', '.join(missing)}")
    return getattr(module, base), getattr(module, mlp), kind


def _default_to_tritformer(original):
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if requested_attention is None:  # no attn_implementation given: ours, not "sdpa"
            requested_attention = NAME
        return original(self, requested_attention, *args, **kwargs)
    get_correct_attn_implementation._tritformer_original = original
    return get_correct_attn_implementation


def apply_to(family: str, model=None, attention: bool = True, mlp: bool = True):
    """Put a transformers model family on tritformer, Liger-style (``apply_to_llama`` & co.
    call this).

    With ``model=None``, patches classes, so that models created afterwards (``from_pretrained``
    included) use tritformer; call it before loading. attention: registers "tritformer" and
    makes it the family's default attn_implementation (the family's PreTrainedModel class gets
    a ``get_correct_attn_implementation`` that maps "no choice" to "tritformer" instead of
    "sdpa"; an explicit ``attn_implementation=...`` is still honoured). mlp: the family's MLP
    class gets a fused forward (`tritformer.patching.class_mlp_forward`: LlamaMLP-style gated
    MLPs on `tritformer.gated_ffn`, GPT2MLP on `tritformer.ffn`), which runs the class's own
    forward where the fused op cannot take the call; this also covers MLPs of models already
    created. Both are undone by `revert`. Idempotent.

    With a model (an instance of the family's PreTrainedModel): ``tritformer.patch(model,
    attention=attention, mlp=mlp)``, in place; classes are left alone.

    Returns a `tritformer.patching.PatchReport` of what was patched (class-level entries are
    named by the class)."""
    from tritformer.patching import PatchReport, Skip, Swap, class_mlp_forward, patch
    base, mlp_cls, kind = _family(family)
    if model is not None:
        if not isinstance(model, base):
            raise TypeError(f"model must be a {family} model (an instance of {base.__name__}), "
                            f"got {type(model).__name__}")
        return patch(model, attention=attention, mlp=mlp)
    report = PatchReport()
    if attention:
        register()
        current = base.__dict__.get("get_correct_attn_implementation")
        if not hasattr(current, "_tritformer_original"):
            original = getattr(base, "get_correct_attn_implementation", None)
            if original is None:
                report.skipped.append(Skip(base.__qualname__, "default attn_implementation",
                                           "this transformers has no get_correct_attn_implementation"))
            else:
                _set_class_attr(family, base, "get_correct_attn_implementation",
                                _default_to_tritformer(original))
                report.swapped.append(Swap(f"{base.__module__}.{base.__qualname__}",
                                           "default attn_implementation 'sdpa'",
                                           f"default attn_implementation {NAME!r}",
                                           "models created from now on; explicit choices honoured"))
    if mlp and not hasattr(mlp_cls.forward, "_tritformer_original"):
        op = "tritformer.gated_ffn" if kind == "gated" else "tritformer.ffn"
        if kind == "gated":
            from tritformer.patching import _original_forward, _same_code
            if not _same_code(mlp_cls.forward, _original_forward(_family("llama")[1])):
                report.skipped.append(Skip(f"{mlp_cls.__module__}.{mlp_cls.__qualname__}.forward",
                                           mlp_cls.__name__, "its forward is not LlamaMLP's gated MLP"))
                return report
        _set_class_attr(family, mlp_cls, "forward", class_mlp_forward(mlp_cls, kind))
        report.swapped.append(Swap(f"{mlp_cls.__module__}.{mlp_cls.__qualname__}.forward",
                                   f"{mlp_cls.__name__}.forward", op,
                                   "fused where the op takes the call, else the original forward"))
    return report


def apply_to_llama(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for Llama (LlamaPreTrainedModel, LlamaMLP)."""
    return apply_to("llama", model, attention, mlp)


def apply_to_mistral(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for Mistral (MistralPreTrainedModel, MistralMLP)."""
    return apply_to("mistral", model, attention, mlp)


def apply_to_qwen2(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for Qwen2 (Qwen2PreTrainedModel, Qwen2MLP)."""
    return apply_to("qwen2", model, attention, mlp)


def apply_to_gemma(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for Gemma (GemmaPreTrainedModel, GemmaMLP)."""
    return apply_to("gemma", model, attention, mlp)


def apply_to_gemma2(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for Gemma-2 (Gemma2PreTrainedModel, Gemma2MLP)."""
    return apply_to("gemma2", model, attention, mlp)


def apply_to_gpt2(model=None, attention: bool = True, mlp: bool = True):
    """`apply_to` for GPT-2 (GPT2PreTrainedModel, GPT2MLP)."""
    return apply_to("gpt2", model, attention, mlp)


__all__ = ["NAME", "register", "attention_forward", "mask", "use_tritformer_attention",
           "FAMILIES", "apply_to", "apply_to_llama", "apply_to_mistral", "apply_to_qwen2",
           "apply_to_gemma", "apply_to_gemma2", "apply_to_gpt2", "revert"]
