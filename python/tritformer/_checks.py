"""Input validation shared by the public ops: raise before any kernel launches."""
from __future__ import annotations

import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Scalar arguments: one rule for every op.
#   real:    Python or NumPy ints and floats (numbers.Real), as torch accepts them; bool refused.
#   integer: Python or NumPy ints (numbers.Integral); bool refused.
#   flag:    a Python bool only (torch's bool arguments refuse ints and NumPy bools too).
# While torch.compile traces with dynamic shapes a float may be a SymFloat and an int a SymInt
# (dynamo presents them as float / int). The value checks therefore use plain arithmetic and
# comparisons, which on a symbolic value become guards, never math.* (a graph break); float() /
# int() only turn a concrete NumPy value into the Python one.
# ---------------------------------------------------------------------------------------------
def _type_name(x) -> str:
    return type(x).__name__


def check_real(name: str, value, *, allow_none: bool = False, lo=None, lo_open: bool = False,
               hi=None, hi_open: bool = False) -> None:
    """A finite real scalar (or None when allow_none), optionally within [lo, hi] (open ends
    with lo_open / hi_open)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got {_type_name(value)}")
    if not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        value = float(value)  # NumPy scalars: compared as the Python float the op will use
    if not value - value == 0:  # inf - inf and nan - nan are nan (math.isfinite does not trace)
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def check_integer(name: str, value, *, allow_none: bool = False, lo=None) -> None:
    """An int (Python or NumPy; or None when allow_none), optionally >= lo."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {_type_name(value)}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def check_flag(name: str, value) -> None:
    """A bool argument: True or False, nothing else (as torch's is_causal, not 1 or "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {_dtype_name(x.dtype)}")


def check_scale(scale) -> None:
    check_real("scale", scale, allow_none=True)


def check_attention_inputs(q, k, v, scale, names=("k", "v"), kv_layout="[B, Hkv, Nk, D]") -> None:
    """q [B, Hq, Nq, D] and k, v [B, Hkv, N, D] (called `names`: decode's are k_cache and
    v_cache): dtypes, devices, batch, head dim, head counts and scale."""
    kn, vn = names
    check_tensor("q", q, 4, "[B, Hq, Nq, D]")
    check_tensor(kn, k, 4, kv_layout)
    check_tensor(vn, v, 4, kv_layout)
    for name, x in ((kn, k), (vn, v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {_dtype_name(q.dtype)}, got {_dtype_name(x.dtype)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    B, Hq, _, D = q.shape
    for name, x in ((kn, k), (vn, v)):
        if x.shape[0] != B:
            raise ValueError(f"{name} must have q's batch size {B}, got shape {tuple(x.shape)}")
        if x.shape[3] != D:
            raise ValueError(f"{name} must have q's head dim D={D}, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{vn} must have {kn}'s shape {kv_layout} = {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D of q must be in 1..{MAX_HEAD_DIM}, got {D}")
    Hkv = k.shape[1]
    if Hkv == 0:  # Hq = Hkv = 0 is accepted: an empty output, as torch's SDPA on zero heads
        if Hq != 0:
            raise ValueError(f"{kn}/{vn} have no heads (Hkv = 0) but q has {Hq}: each query head "
                             f"needs a key/value head (Hq must be a multiple of Hkv >= 1)")
    elif Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of {kn}/{vn}'s head count ({Hkv})")
    check_scale(scale)


def _check_mask(name, mask, meaning, ref, ref_name, want: tuple, target: str) -> None:
    """A bool (True = `meaning`) or additive float mask on ref's device, broadcastable to
    `want` (described as `target` in the error)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be bool (True = {meaning}) or a float additive mask, got {_dtype_name(mask.dtype)}")
    if mask.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {mask.device}")
    try:
        shape = tuple(torch.broadcast_shapes(mask.shape, want))
    except RuntimeError:
        shape = None
    if shape != want:  # (more dims than `want` broadcast to a longer shape: refused too)
        raise ValueError(f"{name} of shape {tuple(mask.shape)} must broadcast to {target}")


def check_softmax_inputs(x, dim, scale, mask, causal) -> int:
    """Validate tritformer.softmax's arguments; returns dim normalised to 0..x.dim()-1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {_dtype_name(x.dtype)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    check_integer("dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    dim = dim % x.dim()
    if not isinstance(dim, torch.SymInt):
        dim = int(dim)  # a NumPy int as a Python int
    check_real("scale", scale)
    check_flag("causal", causal)
    if mask is not None:
        _check_mask("mask", mask, "keep", x, "x", tuple(x.shape), f"x's shape {tuple(x.shape)}")
    if causal:
        if x.dim() < 2:
            raise ValueError(f"causal=True masks the last two dims: x needs 2+ dims, got shape {tuple(x.shape)}")
        if dim != x.dim() - 1:
            raise ValueError(f"causal=True needs the softmax over the last dim, got dim={dim}")
    return dim


def _check_same(name, t, ref, ref_name):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {_dtype_name(ref.dtype)}, got {_dtype_name(t.dtype)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_activation(activation, allowed):
    if not isinstance(activation, str) or activation not in allowed:
        raise ValueError(f"activation must be one of {', '.join(map(repr, allowed))}, got {activation!r}")


def _check_weight(name, w, out_dim_name, in_dim, in_name, x):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{out_dim_name}, {in_name}] (nn.Linear layout), got shape {tuple(w.shape)}")
    _check_same(name, w, x, "x")
    if w.shape[1] != in_dim:
        raise ValueError(f"{name} must be [{out_dim_name}, {in_dim}] to match {in_name}={in_dim}, got shape {tuple(w.shape)}")


def _check_bias(name, b, n, x):
    if b is None:
        return
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    _check_same(name, b, x, "x")
    if tuple(b.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-d tensor")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {_dtype_name(x.dtype)}")


def check_ffn_inputs(x, w1, b1, w2, b2, activation, residual, recompute) -> None:
    from .reference import ACTIVATIONS
    _check_x(x)
    _check_weight("w1", w1, "hidden", x.shape[-1], "in_features", x)
    _check_bias("b1", b1, w1.shape[0], x)
    _check_weight("w2", w2, "out_features", w1.shape[0], "hidden", x)
    _check_bias("b2", b2, w2.shape[0], x)
    _check_activation(activation, ACTIVATIONS)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        _check_same("residual", residual, x, "x")
        want = (*x.shape[:-1], w2.shape[0])
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
    check_flag("recompute", recompute)


def check_gated_ffn_inputs(x, w_gate, w_up, w_down, activation, recompute, b_gate=None,
                           b_up=None, b_down=None) -> None:
    from .reference import ACTIVATIONS
    _check_x(x)
    _check_weight("w_gate", w_gate, "intermediate", x.shape[-1], "hidden", x)
    _check_weight("w_up", w_up, "intermediate", x.shape[-1], "hidden", x)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    _check_weight("w_down", w_down, "hidden_out", w_gate.shape[0], "intermediate", x)
    _check_bias("b_gate", b_gate, w_gate.shape[0], x)
    _check_bias("b_up", b_up, w_up.shape[0], x)
    _check_bias("b_down", b_down, w_down.shape[0], x)
    _check_activation(activation, ACTIVATIONS)
    check_flag("recompute", recompute)


def check_attention_options(q, k, *, attn_mask=None, key_padding_mask=None, dropout_p=0.0,
                            window=None, alibi_slopes=None, softcap=None, batch=None,
                            heads=None, causal=False, return_lse=False) -> None:
    """The optional arguments of attention / varlen_attention (q, k already checked).

    batch/heads: for varlen (q [T, Hq, D]): the number of sequences and Hq."""
    if batch is None:
        batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask is not None:
        want = (batch, heads, n_q, n_k)
        _check_mask("attn_mask", attn_mask, "attend", q, "q", want, f"[B, Hq, Nq, Nk] = {list(want)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padding), got {_dtype_name(key_padding_mask.dtype)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
        if tuple(key_padding_mask.shape) != (batch, n_k):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = [{batch}, {n_k}], got {tuple(key_padding_mask.shape)}")
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    check_real("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, (numbers.Integral, torch.SymInt)) and not isinstance(w, bool)
                           for w in window)):
            raise TypeError(f"window must be a (left, right) pair of ints (-1 = unbounded) or None, got {window!r}")
        if window[0] < -1 or window[1] < -1:
            raise ValueError(f"window values must be >= -1 (-1 = unbounded), got {tuple(window)}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if not alibi_slopes.dtype.is_floating_point:
            raise TypeError(f"alibi_slopes must be a float tensor, got {_dtype_name(alibi_slopes.dtype)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes must have shape [Hq] = [{heads}] or [B, Hq] = [{batch}, {heads}], got {tuple(alibi_slopes.shape)}")
    check_real("softcap", softcap, lo=0.0, allow_none=True)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale) -> None:
    """varlen_attention's tensors. The cu_seqlens contents are checked too (a device sync),
    except while torch.compile traces, where they are data the graph cannot inspect."""
    check_tensor("q", q, 3, "[total_q, Hq, D]")
    check_tensor("k", k, 3, "[total_k, Hkv, D]")
    check_tensor("v", v, 3, "[total_k, Hkv, D]")
    # shapes named in varlen's layout first; the other rules of attention on [1, H, T, D] views
    for name, x in (("k", k), ("v", v)):
        if x.shape[2] != q.shape[2]:
            raise ValueError(f"{name} must have q's head dim D={q.shape[2]}, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape [total_k, Hkv, D] = {tuple(k.shape)}, got {tuple(v.shape)}")
    check_attention_inputs(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                           v.unsqueeze(0).transpose(1, 2), scale)
    totals = {"cu_seqlens_q": q.shape[0], "cu_seqlens_k": k.shape[0]}
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {_dtype_name(cu.dtype)}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    check_integer("max_seqlen_q", max_seqlen_q, lo=0)
    check_integer("max_seqlen_k", max_seqlen_k, lo=0)
    if torch.compiler.is_compiling():
        return
    for (name, cu), m_name, m in ((("cu_seqlens_q", cu_seqlens_q), "max_seqlen_q", max_seqlen_q),
                                  (("cu_seqlens_k", cu_seqlens_k), "max_seqlen_k", max_seqlen_k)):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c[0]}")
        lengths = [b - a for a, b in zip(c, c[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        if c[-1] != totals[name]:
            raise ValueError(f"{name} must end at the total length {totals[name]}, got {c[-1]}")
        if lengths and max(lengths) > m:
            raise ValueError(f"{m_name}={m} is smaller than the longest sequence ({max(lengths)}) in {name}")
