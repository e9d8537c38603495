"""`tritformer.patch(model)`: put a model's attention and MLPs on the fused ops, in place.

What is swapped, and how (every module swap keeps the module's Parameter objects, so an
optimizer built before the patch keeps updating the weights the patched model uses, and every
state_dict key):

- A transformers ``PreTrainedModel`` (the model, or the outermost ones it holds): its attention
  is switched to ``attn_implementation="tritformer"`` (`tritformer.integrations.hf`: register,
  then ``set_attn_implementation``; sub-models follow). Skipped, with the reason, when its
  attention layers do not dispatch through ``AttentionInterface``, a head dim exceeds the
  kernel's limit or the layers have attention sinks. Imported only for such a model.
- ``torch.nn.MultiheadAttention`` (exact type) -> ``tritformer.nn.MultiheadAttention``, by an
  in-place class change (as ``torch.nn.utils.parametrize`` does). Ours is a subclass that adds
  no state (no ``__init__``; ``test_patch`` checks the attribute sets agree), so this equals
  building one with the same constructor arguments and loading the old state_dict, minus the
  copy: the same object keeps its Parameters, buffers, hooks, training flag, device and dtype,
  and a module shared by several parents is swapped once for all of them.
- ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])`` with act GELU (erf or tanh),
  ReLU or SiLU -> `FusedSequentialMLP`, an ``nn.Sequential`` subclass (class change as above:
  the same children, keys ``0.weight``, ``2.weight``, ...).
- transformers' ``GPT2MLP`` -> `FusedConv1DMLP` (``Conv1D`` weights are [in, out]: passed to
  `tritformer.ffn` as transposed views, no copies) and ``LlamaMLP`` -> `FusedLlamaMLP`
  (`tritformer.gated_ffn`). Also any class whose ``forward`` is a verbatim copy of theirs (the
  "Copied from" / modular MLPs of Mistral, Qwen2, Gemma, ...: same bytecode on the same child
  types computes the same thing). These are new module objects holding the original children
  (same Parameters, same keys and key order); the public plain attributes (``config``, ...) are
  carried over. A module with hooks or an instance-level ``forward`` (accelerate's offloading)
  is skipped: replacing it would drop them. transformers is never imported here: its classes
  are looked up in ``sys.modules`` (a model holding them has imported them).
- The feed-forward of ``nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (linear1,
  activation, dropout, linear2, called inline by the layer's ``_ff_block``): the layer's
  ``_ff_block`` is overridden on the instance by one calling `tritformer.ffn` (relu, gelu and
  silu; the residual add and norm stay in the layer's forward).

Dropout between the two linears (the layers' ``dropout``, default p = 0.1, or a Dropout inside
the Sequential) cannot be fused. It is checked at every call, not at patch time: while it is
inactive (p = 0 or eval mode) the fused op runs, while it is active the original modules run
unfused. The report notes it. Dropout after the MLP is applied to the fused output as before.

Every fused forward falls back to the original modules when the op cannot take the call:
float64 (or other non-kernel dtypes), nested tensors, parameters in another dtype or device
than the input. Under autocast the input, weights and biases are cast to the autocast dtype
first, as autocast does for the linears.

torch's fast path. In eval mode without autograd (no_grad, or no parameter requiring grad),
``nn.TransformerEncoderLayer.forward`` runs ``torch._transformer_encoder_layer_fwd`` on the
layer's weights and never calls ``self_attn`` or ``_ff_block``; it does not check
``self_attn``'s type (torch 2.13). Of its documented conditions, the one a patch can set per
layer is "no forward hooks or pre-hooks on the layer or its submodules", so each patched encoder
layer gets the no-op forward pre-hook `_fast_path_off` (not the global
``torch.backends.mha.set_fastpath_enabled(False)``, which would change unpatched models too).
``nn.TransformerEncoder`` also converts padded inputs to nested tensors on that path; it gets
``use_nested_tensor = False`` (the attribute torch reads for it), so our kernels take the padding
as a key_padding_mask instead. One visible difference: torch's nested path returns 0 at padded
positions, the patched model the computed values there (what torch returns in training mode or
with grad enabled); unpadded positions agree.
"""
from __future__ import annotations

import functools
import sys
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import SUPPORTED_DTYPES
from .nn.mha import MultiheadAttention
from .ops import ffn as _ffn_ops  # called through the module, so tests can spy on the ops
from .reference import ACTIVATIONS  # tritformer.ffn's


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
class Swap(NamedTuple):
    name: str  # qualified name in the model ("" = the model itself)
    old: str
    new: str
    note: str = ""


class Skip(NamedTuple):
    name: str
    what: str    # what was recognised
    reason: str  # why it was left alone


class PatchReport:
    """What `patch` did: ``swapped`` (`Swap` entries; ``len(report)`` and iteration are over
    these), ``skipped`` (recognised but left as is, with the reason) and ``adjusted`` ((name,
    change) pairs: torch fast paths turned off so the swapped modules run)."""

    def __init__(self):
        self.swapped: list[Swap] = []
        self.skipped: list[Skip] = []
        self.adjusted: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.swapped)

    def __iter__(self) -> Iterator[Swap]:
        return iter(self.swapped)

    def __repr__(self) -> str:
        return (f"PatchReport(swapped={len(self.swapped)}, skipped={len(self.skipped)}, "
                f"adjusted={len(self.adjusted)})")

    def __str__(self) -> str:
        def table(rows):
            rows = [(r[0] or "(model)", *r[1:]) for r in rows]
            width = max(len(r[0]) for r in rows)
            return [f"  {r[0]:<{width}}  " + "  ".join(x for x in r[1:] if x) for r in rows]

        lines = [f"tritformer.patch: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        if self.swapped:
            lines += ["swapped:"] + table([(s.name, f"{s.old} -> {s.new}",
                                            f"({s.note})" if s.note else "") for s in self.swapped])
        if self.adjusted:
            lines += ["adjusted:"] + table(self.adjusted)
        if self.skipped:
            lines += ["skipped:"] + table([(s.name, f"{s.what}: {s.reason}") for s in self.skipped])
        return "\n".join(lines)


def _type_name(cls: type) -> str:
    for pkg, mod in (("torch.nn", nn), ("tritformer.nn", sys.modules.get("tritformer.nn"))):
        if mod is not None and getattr(mod, cls.__name__, None) is cls:
            return f"{pkg}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# Shared pieces of the fused forwards
# ---------------------------------------------------------------------------------------------
def _hf(module: str, name: str) -> Optional[type]:
    """transformers' class `name` if its module is imported (never imports transformers)."""
    return getattr(sys.modules.get(f"transformers.{module}"), name, None)


_HF_ACTIVATIONS = (  # transformers.activations classes -> tritformer.ffn activation
    ("GELUActivation", "gelu"),         # F.gelu or its erf formula
    ("NewGELUActivation", "gelu_tanh"),  # GPT-2's gelu_new: the tanh formula
    ("GELUTanh", "gelu_tanh"),
    ("PytorchGELUTanh", "gelu_tanh"),
    ("FastGELUActivation", "gelu_tanh"),  # tanh formula, sqrt(2/pi) rounded to 0.7978845608 (3e-12 rel.)
    ("SiLUActivation", "silu"),
)


def _activation_name(act) -> Optional[str]:
    """tritformer.ffn's name for an activation module or function, None if it has none."""
    if type(act) is nn.ReLU or act is F.relu or act is torch.relu:
        return "relu"
    if type(act) is nn.SiLU or act is F.silu:
        return "silu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if act is F.gelu:
        return "gelu"
    for cls_name, name in _HF_ACTIVATIONS:
        cls = _hf("activations", cls_name)
        if cls is not None and type(act) is cls:
            return name
    return None


def _describe(act) -> str:
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))


def _unsupported(act) -> str:
    return f"activation {_describe(act)} is not one of tritformer.ffn's ({', '.join(ACTIVATIONS)})"


def _dropout_active(d) -> bool:
    return d is not None and d.training and d.p > 0


def _inputs(x: Tensor, *params: Optional[Tensor]) -> Optional[tuple]:
    """(x, *params) ready for the fused op (cast to the autocast dtype under autocast), or None
    when the op cannot take them: the caller runs the original modules."""
    if not isinstance(x, Tensor) or x.is_nested or x.dim() == 0:
        return None
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        params = tuple(None if p is None else p.to(dt) for p in params)
    if x.dtype not in SUPPORTED_DTYPES:
        return None
    if any(p is not None and (p.dtype != x.dtype or p.device != x.device) for p in params):
        return None
    return (x, *params)


def _ffn(x, act, w1, b1, w2, b2):
    """tritformer.ffn on (x, w1, b1, w2, b2) ([out, in] weights), None if it cannot run."""
    args = _inputs(x, w1, b1, w2, b2)
    if args is None:
        return None
    return _ffn_ops.ffn(*args, activation=act)


def _dropout_note(d) -> str:
    if d is None or (type(d) is nn.Dropout and d.p == 0):
        return ""
    return f"fused while the Dropout(p={d.p}) between the linears is inactive (eval); unfused in training"


# ---------------------------------------------------------------------------------------------
# nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])
# ---------------------------------------------------------------------------------------------
def _sequential_mlp(seq: nn.Sequential):
    """(lin1, act, mid_dropout, lin2, tail_dropout) if `seq` has the MLP layout (act: any
    activation module of torch or transformers; whether tritformer.ffn has it is checked by
    the callers), else None."""
    mods = list(seq._modules.values())
    tail = None
    if len(mods) in (4, 5) and type(mods[-1]) is nn.Dropout and isinstance(mods[-2], nn.Linear):
        tail, mods = mods[-1], mods[:-1]
    mid = None
    if len(mods) == 4 and type(mods[2]) is nn.Dropout:
        mid, mods = mods[2], mods[:2] + mods[3:]
    if len(mods) != 3 or not (isinstance(mods[0], nn.Linear) and isinstance(mods[2], nn.Linear)):
        return None
    if type(mods[1]).__module__ not in ("torch.nn.modules.activation", "transformers.activations"):
        return None  # (Linear, LayerNorm, Linear) and the like: not an MLP
    lin1, act, lin2 = mods
    return lin1, act, mid, lin2, tail


class FusedSequentialMLP(nn.Sequential):
    """An ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])`` whose forward runs
    `tritformer.ffn`; the same children (so the same state_dict keys and Parameters). `patch`
    turns a recognised ``nn.Sequential`` into one in place. The layout is re-read at every call:
    edited into something else, it runs as a plain ``nn.Sequential``."""

    def forward(self, input: Tensor) -> Tensor:
        parts = _sequential_mlp(self)
        if parts is not None:
            lin1, act, mid, lin2, tail = parts
            name = _activation_name(act)
            if name is not None and not _dropout_active(mid):
                y = _ffn(input, name, lin1.weight, lin1.bias, lin2.weight, lin2.bias)
                if y is not None:
                    return tail(y) if tail is not None else y
        return super().forward(input)


# ---------------------------------------------------------------------------------------------
# transformers' GPT2MLP and LlamaMLP
# ---------------------------------------------------------------------------------------------
class _Rehoused(nn.Module):
    """A new module holding `old`'s children (same objects, order, keys) and public attributes."""

    def __init__(self, old: nn.Module):
        super().__init__()
        for key, child in old._modules.items():
            self.add_module(key, child)
        for key, value in vars(old).items():
            if not key.startswith("_") and key not in self.__dict__:
                setattr(self, key, value)
        self.training = old.training


def _conv1d_mlp(m: nn.Module, x: Tensor) -> Optional[Tensor]:
    """GPT2MLP's ``c_proj(act(c_fc(x)))`` (before its dropout) through `tritformer.ffn`, None
    if it cannot run. Conv1D weights are [in, out]: passed as transposed views of nn.Linear's."""
    name = _activation_name(m.act)
    if name is None:
        return None
    fc, proj = m.c_fc, m.c_proj
    return _ffn(x, name, fc.weight.t(), fc.bias, proj.weight.t(), proj.bias)


def _gated_mlp(m: nn.Module, x: Tensor) -> Optional[Tensor]:
    """LlamaMLP's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` through
    `tritformer.gated_ffn`, None if it cannot run."""
    name = _activation_name(m.act_fn)
    if name is None:
        return None
    g, u, d = m.gate_proj, m.up_proj, m.down_proj
    args = _inputs(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias)
    if args is None:
        return None
    x_, wg, wu, wd, bg, bu, bd = args
    return _ffn_ops.gated_ffn(x_, wg, wu, wd, activation=name, b_gate=bg, b_up=bu, b_down=bd)


class FusedConv1DMLP(_Rehoused):
    """transformers' GPT2MLP (``c_fc``, ``c_proj``: Conv1D, weight [in, out]; ``act``;
    ``dropout`` after c_proj) through `tritformer.ffn`; made by `patch` from a GPT2MLP."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        y = _conv1d_mlp(self, hidden_states)
        if y is None:
            y = self.c_proj(self.act(self.c_fc(hidden_states)))
        return self.dropout(y)

    def extra_repr(self) -> str:
        return f"activation={_activation_name(self.act)!r}"


class FusedLlamaMLP(_Rehoused):
    """transformers' LlamaMLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, through
    `tritformer.gated_ffn`; made by `patch` from a LlamaMLP (or a verbatim copy of one)."""

    def forward(self, x: Tensor) -> Tensor:
        y = _gated_mlp(self, x)
        if y is None:
            y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return y

    def extra_repr(self) -> str:
        return f"activation={_activation_name(self.act_fn)!r}"


def _same_code(f, g) -> bool:
    f, g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (f is not None and g is not None and f.co_code == g.co_code
            and f.co_consts == g.co_consts and f.co_names == g.co_names
            and f.co_varnames == g.co_varnames)


# (transformers module, class, replacement, {child: required type(s)}, activation child)
def _hf_mlps():
    conv1d = _hf("pytorch_utils", "Conv1D")
    return (
        ("models.gpt2.modeling_gpt2", "GPT2MLP", FusedConv1DMLP,
         {"c_fc": conv1d, "c_proj": conv1d, "dropout": nn.Dropout}, "act"),
        ("models.llama.modeling_llama", "LlamaMLP", FusedLlamaMLP,
         {"gate_proj": nn.Linear, "up_proj": nn.Linear, "down_proj": nn.Linear}, "act_fn"),
    )


def _match_hf_mlp(m: nn.Module):
    """For a GPT2MLP / LlamaMLP (or a verbatim copy): (replacement class, description, "") if
    its children have the expected types and activation, else (None, description, reason).
    None for anything else."""
    if _class_fused(type(m)):
        return None  # its class runs the fused forward already (hf.apply_to_<family>)
    for module, cls_name, repl, children, act_key in _hf_mlps():
        cls = _hf(module, cls_name)
        if cls is None:
            continue
        if type(m) is cls:
            what = cls_name
        elif _same_code(type(m).forward, _original_forward(cls)):
            what = f"{type(m).__name__} (same forward as {cls_name})"
        else:
            continue
        want = set(children) | {act_key}
        if set(m._modules) != want or m._parameters or m._buffers:
            return None, what, f"children {sorted(m._modules)}, expected {sorted(want)} and no own parameters"
        for key, t in children.items():
            if type(m._modules[key]) is not t:
                return None, what, f"{key} is {type(m._modules[key]).__name__}, not {getattr(t, '__name__', t)}"
        if _activation_name(m._modules[act_key]) is None:
            return None, what, _unsupported(m._modules[act_key])
        return repl, what, ""
    return None


def _original_forward(cls: type):
    """cls.forward as transformers defined it (before `class_mlp_forward` replaced it)."""
    return getattr(cls.forward, "_tritformer_original", cls.forward)


def _class_fused(cls: type) -> bool:
    return hasattr(getattr(cls, "forward", None), "_tritformer_original")


def _children_ok(m: nn.Module, children: dict) -> bool:
    mods = m._modules
    return all(type(mods.get(key)) is t for key, t in children.items())


def class_mlp_forward(cls: type, kind: str):
    """A ``forward`` for transformers' MLP class `cls` (kind "gated": LlamaMLP's forward, or a
    verbatim copy; "conv1d": GPT2MLP's) that runs `tritformer.gated_ffn` / `tritformer.ffn`,
    and `cls`'s own forward whenever the fused op cannot take the call: children of other types
    (e.g. quantized linears), an activation tritformer.ffn lacks, or the inputs `_inputs`
    refuses. Set on the class by ``tritformer.integrations.hf.apply_to_<family>()``; the
    original is kept as ``forward._tritformer_original`` (`hf.revert` restores it)."""
    original = _original_forward(cls)
    if kind == "gated":
        children = {"gate_proj": nn.Linear, "up_proj": nn.Linear, "down_proj": nn.Linear}

        def forward(self, x):
            y = _gated_mlp(self, x) if _children_ok(self, children) else None
            return original(self, x) if y is None else y
    elif kind == "conv1d":
        conv1d = _hf("pytorch_utils", "Conv1D")
        children = {"c_fc": conv1d, "c_proj": conv1d, "dropout": nn.Dropout}

        def forward(self, hidden_states):
            y = _conv1d_mlp(self, hidden_states) if _children_ok(self, children) else None
            return original(self, hidden_states) if y is None else self.dropout(y)
    else:
        raise ValueError(f"kind must be 'gated' or 'conv1d', got {kind!r}")
    forward._tritformer_original = original
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    forward.__doc__ = f"{cls.__name__}.forward through tritformer (tritformer.patching.class_mlp_forward)."
    return forward


def _hooks(m: nn.Module) -> list[str]:
    return [k for k, v in vars(m).items() if k.endswith("_hooks") and v]


# ---------------------------------------------------------------------------------------------
# Transformer{Encoder,Decoder}Layer feed-forward and torch's fast path
# ---------------------------------------------------------------------------------------------
def _fused_ff_block(layer: nn.Module, tail: str, x: Tensor) -> Tensor:
    """The layer's ``_ff_block`` (``tail(linear2(dropout(activation(linear1(x)))))``, tail =
    dropout2 / dropout3) through `tritformer.ffn`; bound to the layer with functools.partial
    (picklable, deep-copied with the layer)."""
    name = _activation_name(layer.activation)
    if name is not None and not _dropout_active(layer.dropout):
        l1, l2 = layer.linear1, layer.linear2
        y = _ffn(x, name, l1.weight, l1.bias, l2.weight, l2.bias)
        if y is not None:
            return getattr(layer, tail)(y)
    return type(layer)._ff_block(layer, x)  # the class's (checked by patch to be torch's)


def _ff_block_patched(layer: nn.Module) -> bool:
    f = vars(layer).get("_ff_block")
    return isinstance(f, functools.partial) and f.func is _fused_ff_block


def _layer_ffn(layer: nn.Module):
    """(tail dropout name, None) when the layer's feed-forward can be fused, else (None, reason)."""
    enc = isinstance(layer, nn.TransformerEncoderLayer)
    base = nn.TransformerEncoderLayer if enc else nn.TransformerDecoderLayer
    if "_ff_block" in vars(layer):
        return None, "_ff_block is overridden on the instance"
    if type(layer)._ff_block is not base._ff_block:
        return None, f"{type(layer).__name__} overrides _ff_block"
    for key in ("linear1", "linear2"):
        if type(getattr(layer, key)) is not nn.Linear:
            return None, f"{key} is {type(getattr(layer, key)).__name__}, not nn.Linear"
    if type(layer.dropout) is not nn.Dropout:
        return None, f"dropout is {type(layer.dropout).__name__}, not nn.Dropout"
    if _activation_name(layer.activation) is None:
        return None, _unsupported(layer.activation)
    return ("dropout2" if enc else "dropout3"), None


def _fast_path_off(module: nn.Module, args) -> None:
    """No-op forward pre-hook. A hook on the layer makes ``nn.TransformerEncoderLayer.forward``
    skip torch's fast path (``torch._transformer_encoder_layer_fwd``, which reads the weights
    directly and would bypass the swapped attention and feed-forward)."""
    return None


# ---------------------------------------------------------------------------------------------
# transformers' attention: attn_implementation="tritformer"
# ---------------------------------------------------------------------------------------------
def _patch_hf_attention(model: nn.Module, report: PatchReport) -> None:
    """Switch every outermost transformers ``PreTrainedModel`` in `model` (the model itself,
    or ones held by a plain module) to attn_implementation="tritformer"; its sub-models follow
    (``set_attn_implementation`` recurses). Recorded as swapped, or skipped with the reason."""
    pretrained = _hf("modeling_utils", "PreTrainedModel")
    if pretrained is None:
        return
    handled: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, pretrained) or id(m) in handled:
            continue
        handled.update(id(sub) for sub in m.modules() if isinstance(sub, pretrained))
        what = f"{type(m).__name__} attention"
        try:
            from .integrations import hf
        except ImportError as e:  # transformers too old for the integration
            report.skipped.append(Skip(name, what, str(e).split(":")[0]))
            continue
        old, reason = hf.use_tritformer_attention(m)
        if reason is not None:
            report.skipped.append(Skip(name, what, reason))
        elif old != hf.NAME:
            report.swapped.append(Swap(name, f"attn_implementation={old!r}",
                                       f"attn_implementation={hf.NAME!r}",
                                       "attention layers call tritformer.integrations.hf."
                                       "attention_forward through AttentionInterface"))


# ---------------------------------------------------------------------------------------------
# patch
# ---------------------------------------------------------------------------------------------
def patch(model: nn.Module, *, attention: bool = True, mlp: bool = True) -> PatchReport:
    """Swap `model`'s attention and MLP modules for tritformer's fused ones, in place.

    attention: a transformers ``PreTrainedModel`` (`model`, or the outermost ones it holds)
        is switched to ``attn_implementation="tritformer"`` (registered first; reported as
        swapped, or skipped with the reason); and every ``torch.nn.MultiheadAttention``
        (exact type; so also inside
        ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` / ``nn.Transformer``) becomes a
        ``tritformer.nn.MultiheadAttention`` (in-place class change: same object, Parameters,
        hooks, training mode). Its fused forward needs ``need_weights=False`` (as the
        transformer layers call it); with torch's default ``need_weights=True`` it runs torch's.
    mlp: ``nn.Sequential(Linear, GELU/ReLU/SiLU, [Dropout], Linear, [Dropout])``, transformers'
        ``GPT2MLP`` / ``LlamaMLP`` (and verbatim copies), and the feed-forward of
        ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` run on `tritformer.ffn` /
        `tritformer.gated_ffn`, keeping the Parameter objects and state_dict keys.

    The module docstring of ``tritformer.patching`` gives the details: dropout between the
    linears (fused while inactive), the fallbacks, and torch's encoder fast path (turned off on
    patched layers so the fused modules run). Idempotent: a second call swaps nothing (and
    does not register again). MLPs whose class ``hf.apply_to_<family>()`` already fused are
    left as they are.

    Returns a `PatchReport`: what was swapped (qualified name, old type, new type, note), what
    was recognised but skipped and why, and the fast paths turned off; ``print(report)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    if attention:
        _patch_hf_attention(model, report)
    replace: dict[int, nn.Module] = {}  # id(old module) -> its replacement
    for name, m in list(model.named_modules()):  # each module once (first path if shared)
        if attention and isinstance(m, nn.MultiheadAttention) and not isinstance(m, MultiheadAttention):
            _patch_mha(name, m, report)
        elif mlp and isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            _patch_layer_ffn(name, m, report)
        elif mlp and type(m) is nn.Sequential:
            _patch_sequential_mlp(name, m, report)
        elif mlp:
            _patch_hf_mlp(name, m, report, replace)
    _replace_children(model, replace)
    _fast_paths_off(model, report)
    return report


# ---------------------------------------------------------------------------------------------
# patch, one function per target family
# ---------------------------------------------------------------------------------------------
def _patch_mha(name: str, m: nn.MultiheadAttention, report: PatchReport) -> None:
    """torch.nn.MultiheadAttention (exact type) -> tritformer.nn.MultiheadAttention, in place."""
    what = _type_name(type(m))
    if type(m) is not nn.MultiheadAttention:
        report.skipped.append(Skip(name, what, "a subclass of torch.nn.MultiheadAttention "
                                               "(its forward may differ)"))
    elif "forward" in vars(m):
        report.skipped.append(Skip(name, what, "forward is overridden on the instance"))
    else:
        m.__class__ = MultiheadAttention
        report.swapped.append(Swap(name, what, _type_name(MultiheadAttention),
                                   "fused when called with need_weights=False"))


def _patch_layer_ffn(name: str, m: nn.Module, report: PatchReport) -> None:
    """The feed-forward of an nn.TransformerEncoderLayer / DecoderLayer: its ``_ff_block``
    overridden on the instance by `_fused_ff_block`."""
    if _ff_block_patched(m):
        return
    t = type(m)
    tail, reason = _layer_ffn(m)
    if reason:
        report.skipped.append(Skip(name, f"{t.__name__} feed-forward", reason))
        return
    m._ff_block = functools.partial(_fused_ff_block, m, tail)
    act = _activation_name(m.activation)
    report.swapped.append(Swap(f"{name}._ff_block" if name else "_ff_block",
                               f"{t.__name__}._ff_block", f"tritformer.ffn[{act}]",
                               _dropout_note(m.dropout)))


def _patch_sequential_mlp(name: str, m: nn.Sequential, report: PatchReport) -> None:
    """nn.Sequential(Linear, act, [Dropout], Linear, [Dropout]) -> FusedSequentialMLP, in place."""
    parts = _sequential_mlp(m)
    if parts is None:
        return
    lin1, act, mid, lin2, _ = parts
    what = "nn.Sequential MLP"
    if type(lin1) is not nn.Linear or type(lin2) is not nn.Linear:
        report.skipped.append(Skip(name, what, f"linears are {type(lin1).__name__}, "
                                               f"{type(lin2).__name__}, not nn.Linear"))
    elif lin1.out_features != lin2.in_features:
        report.skipped.append(Skip(name, what, f"linear shapes do not chain "
                                               f"({lin1.out_features} -> {lin2.in_features})"))
    elif _activation_name(act) is None:
        report.skipped.append(Skip(name, what, _unsupported(act)))
    elif "forward" in vars(m):
        report.skipped.append(Skip(name, what, "forward is overridden on the instance"))
    else:
        m.__class__ = FusedSequentialMLP  # in place: same object, children, hooks
        report.swapped.append(Swap(name, "torch.nn.Sequential",
                                   f"tritformer.patching.FusedSequentialMLP[{_activation_name(act)}]",
                                   _dropout_note(mid)))


def _patch_hf_mlp(name: str, m: nn.Module, report: PatchReport, replace: dict) -> None:
    """transformers' GPT2MLP / LlamaMLP (or a verbatim copy): a FusedConv1DMLP / FusedLlamaMLP
    holding its children, recorded in `replace` (id(m) -> new module) for
    `_replace_children`."""
    found = _match_hf_mlp(m)
    if found is None:
        return
    repl, what, reason = found
    if not reason and not name:
        reason = "the model itself: patch replaces submodules; patch a module holding it"
    elif not reason and _hooks(m):
        reason = f"hooks registered on it ({', '.join(_hooks(m))}) would be lost"
    elif not reason and "forward" in vars(m):
        reason = "forward is overridden on the instance (e.g. accelerate's hooks)"
    if reason:
        report.skipped.append(Skip(name, what, reason))
        return
    new = repl(m)
    replace[id(m)] = new
    act = _activation_name(new.act if repl is FusedConv1DMLP else new.act_fn)
    report.swapped.append(Swap(name, what, f"{_type_name(repl)}[{act}]"))


def _replace_children(model: nn.Module, replace: dict) -> None:
    """Every parent edge to a replaced module (one shared by several parents is replaced in
    all)."""
    if not replace:
        return
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replace:
                parent._modules[key] = replace[id(child)]


def _fast_paths_off(model: nn.Module, report: PatchReport) -> None:
    """torch's encoder fast path would bypass what was swapped in an encoder layer: a no-op
    forward pre-hook on each such layer, and no nested-tensor conversion in their encoder."""
    touched = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and (
                isinstance(m.self_attn, MultiheadAttention) or _ff_block_patched(m)):
            touched.add(id(m))
            if not any(h is _fast_path_off for h in m._forward_pre_hooks.values()):
                m.register_forward_pre_hook(_fast_path_off)
                report.adjusted.append((name, "fast path (torch._transformer_encoder_layer_fwd) "
                                              "off: no-op forward pre-hook"))
    for name, m in model.named_modules():
        if (isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)
                and any(id(layer) in touched for layer in m.layers)):
            m.use_nested_tensor = False
            report.adjusted.append((name, "use_nested_tensor = False (nested-tensor fast path off)"))
