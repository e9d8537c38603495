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


def check_attention_inputs(q, k, v, scale, names=("k", "v"), kv_layout="[B, Hkv, Nk, D]",
                           same_batch: bool = True) -> None:
    """q [B, Hq, Nq, D] and k, v [B, Hkv, N, D] (called `names`: decode's are k_cache and
    v_cache): dtypes, devices, batch (unless not same_batch: paged or batch-indexed caches),
    head dim, head counts and scale."""
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
        if same_batch and x.shape[0] != B:
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
        raise TypeError(f"{name} must be bool (True = {meaning}) or a float additive mask, got "
                        f"{_dtype_name(mask.dtype)}")
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
        raise ValueError(f"{name} must be 2-D [{out_dim_name}, {in_name}] (nn.Linear layout), got "
                         f"shape {tuple(w.shape)}")
    _check_same(name, w, x, "x")
    if w.shape[1] != in_dim:
        raise ValueError(f"{name} must be [{out_dim_name}, {in_dim}] to match {in_name}={in_dim}, "
                         f"got shape {tuple(w.shape)}")


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
    _check_x(x)
    _check_weight("w1", w1, "hidden", x.shape[-1], "in_features", x)
    _check_bias("b1", b1, w1.shape[0], x)
    _check_weight("w2", w2, "out_features", w1.shape[0], "hidden", x)
    _check_bias("b2", b2, w2.shape[0], x)
    check_activation(activation)
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
    _check_x(x)
    _check_weight("w_gate", w_gate, "intermediate", x.shape[-1], "hidden", x)
    _check_weight("w_up", w_up, "intermediate", x.shape[-1], "hidden", x)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    _check_weight("w_down", w_down, "hidden_out", w_gate.shape[0], "intermediate", x)
    _check_bias("b_gate", b_gate, w_gate.shape[0], x)
    _check_bias("b_up", b_up, w_up.shape[0], x)
    _check_bias("b_down", b_down, w_down.shape[0], x)
    check_activation(activation)
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
            raise TypeError("key_padding_mask must be bool (True = padding), "
                            f"got {_dtype_name(key_padding_mask.dtype)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
        if tuple(key_padding_mask.shape) != (batch, n_k):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = [{batch}, {n_k}], got "
                             f"{tuple(key_padding_mask.shape)}")
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
            raise ValueError(f"alibi_slopes must have shape [Hq] = [{heads}] or [B, Hq] = [{batch}, "
                             f"{heads}], got {tuple(alibi_slopes.shape)}")
    check_real("softcap", softcap, lo=0.0, allow_none=True)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                        block_table=None, seqused_k=None) -> None:
    """varlen_attention's tensors. The contents of cu_seqlens (and of block_table and seqused_k)
    are checked too, with one device sync, except while torch.compile traces, where they are
    data the graph cannot inspect (the kernel then clamps every paged read into k / v).

    block_table: k / v are paged caches [num_blocks, page_block_size, Hkv, D]; sequence s's
    keys are at block_table[s, j // page], slot j % page, for j below its length (seqused_k[s]
    if given, else its cu_seqlens_k length). Entries past the blocks a sequence uses are never
    read and not checked (padding such as -1 is fine)."""
    paged = block_table is not None
    check_tensor("q", q, 3, "[total_q, Hq, D]")
    kv_layout = ("[num_blocks, page_block_size, Hkv, D] (paged: block_table given)" if paged
                 else "[total_k, Hkv, D]")
    check_tensor("k", k, 4 if paged else 3, kv_layout)
    check_tensor("v", v, 4 if paged else 3, kv_layout)
    # shapes named in varlen's layout first; the other rules of attention on [1, H, T, D] views
    for name, x in (("k", k), ("v", v)):
        if x.shape[-1] != q.shape[2]:
            raise ValueError(f"{name} must have q's head dim D={q.shape[2]}, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {kv_layout.split(' (')[0]} = {tuple(k.shape)}, got {tuple(v.shape)}")
    if paged:
        if k.shape[1] < 1:
            raise ValueError(f"k's page_block_size (dim 1 of the paged cache) must be >= 1, got shape {tuple(k.shape)}")
        # the dtype / device / head rules on one block (an empty view with no block at all)
        kv = [(x[:1] if x.shape[0] else x.new_empty((1, *x.shape[1:]))).permute(0, 2, 1, 3)
              for x in (k, v)]
    else:
        kv = [x.unsqueeze(0).transpose(1, 2) for x in (k, v)]
    check_attention_inputs(q.unsqueeze(0).transpose(1, 2), *kv, scale)
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
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), "
                         f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    check_integer("max_seqlen_q", max_seqlen_q, lo=0)
    check_integer("max_seqlen_k", max_seqlen_k, lo=0)
    n_seq = cu_seqlens_q.shape[0] - 1
    if paged:
        _check_int32_tensor("block_table", block_table, 2, "[num_seqs, max_blocks]", q)
        if block_table.shape[0] != n_seq:
            raise ValueError(f"block_table must be [num_seqs, max_blocks] with num_seqs = {n_seq} "
                             f"(cu_seqlens_q), got shape {tuple(block_table.shape)}")
    if seqused_k is not None:
        _check_int32_tensor("seqused_k", seqused_k, 1, "[num_seqs]", q)
        if seqused_k.shape[0] != n_seq:
            raise ValueError(f"seqused_k must have shape [num_seqs] = [{n_seq}], got {tuple(seqused_k.shape)}")
    if torch.compiler.is_compiling():
        return
    _check_varlen_contents(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table, seqused_k)


def _check_int32_tensor(name, x, ndim, layout, q) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {_dtype_name(x.dtype)}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def _check_varlen_contents(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table, seqused_k) -> None:
    """The contents of varlen_attention's index tensors, read with one device sync."""
    paged = block_table is not None
    n_seq = cu_seqlens_q.shape[0] - 1
    parts = [cu_seqlens_q.long(), cu_seqlens_k.long()]
    if seqused_k is not None:
        parts.append(seqused_k.long())
    if paged and block_table.numel():
        # the first out-of-range entry among those a sequence uses (its first
        # ceil(used / page) blocks): [found, flat index, value], computed on the device
        lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        used = lens if seqused_k is None else seqused_k.long()
        n_blocks = (used.clamp(min=0) + k.shape[1] - 1) // k.shape[1]
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        bt = block_table.long()
        bad = (cols[None, :] < n_blocks[:, None]) & ((bt < 0) | (bt >= k.shape[0]))
        first = bad.flatten().to(torch.int8).argmax()
        parts.append(torch.stack([bad.any().long(), first, bt.flatten()[first]]))
    flat = torch.cat(parts).tolist()  # the one sync
    cq, flat = flat[:n_seq + 1], flat[n_seq + 1:]
    ck, flat = flat[:n_seq + 1], flat[n_seq + 1:]
    used = None
    if seqused_k is not None:
        used, flat = flat[:n_seq], flat[n_seq:]
    totals = {"cu_seqlens_q": q.shape[0], "cu_seqlens_k": None if paged else k.shape[0]}
    lengths = {}
    for (name, c), m_name, m in ((("cu_seqlens_q", cq), "max_seqlen_q", max_seqlen_q),
                                 (("cu_seqlens_k", ck), "max_seqlen_k", max_seqlen_k)):
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c[0]}")
        lens = [b - a for a, b in zip(c, c[1:])]
        if any(n < 0 for n in lens):
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        if totals[name] is not None and c[-1] != totals[name]:
            raise ValueError(f"{name} must end at the total length {totals[name]}, got {c[-1]}")
        if lens and max(lens) > m:
            raise ValueError(f"{m_name}={m} is smaller than the longest sequence ({max(lens)}) in {name}")
        lengths[name] = lens
    need = lengths["cu_seqlens_k"]
    if used is not None:
        for s, (u, n) in enumerate(zip(used, need)):
            if u < 0:
                raise ValueError(f"seqused_k values must be >= 0, got seqused_k[{s}] = {u}")
            if u > n:
                raise ValueError(f"seqused_k[{s}] = {u} is more than sequence {s}'s {n} keys "
                                 f"(its cu_seqlens_k length)")
        need = used
    if not paged:
        return
    page, max_blocks = k.shape[1], block_table.shape[1]
    for s, n in enumerate(need):
        if n > max_blocks * page:
            raise ValueError(f"block_table has {max_blocks} blocks of {page} keys per sequence, "
                             f"fewer than sequence {s}'s {n} keys need")
    if flat and flat[0]:
        s, b = divmod(flat[1], max_blocks)
        raise ValueError(f"block_table[{s}, {b}] = {flat[2]} is not a block of k/v: block "
                         f"indices must be in [0, num_blocks={k.shape[0]})")


def check_varlen_inference_only(q, k, v, block_table, seqused_k) -> None:
    """varlen_attention with block_table or seqused_k has no backward: refuse inputs that
    require grad while grad mode is on."""
    if block_table is None and seqused_k is None:
        return
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        name = "block_table" if block_table is not None else "seqused_k"
        raise RuntimeError(
            f"varlen_attention with {name} is inference-only (no backward): q, k or v requires "
            "grad while grad mode is on. Run it under torch.no_grad() / torch.inference_mode(), "
            f"or pass packed k/v without {name} for training.")


def check_activation(activation) -> None:
    """One of tritformer.ffn's activations (reference.ACTIVATIONS): ffn, gated_ffn and the
    FusedMLP / FusedGatedMLP constructors."""
    from .reference import ACTIVATIONS
    _check_activation(activation, ACTIVATIONS)


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------
def _check_index(name, t, shape: tuple, layout: str, q) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {_dtype_name(t.dtype)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {list(shape)}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _first_bad(bad: torch.Tensor) -> tuple:
    return tuple(int(x) for x in bad.nonzero()[0])


def check_decode_inputs(q, k_cache, v_cache, cache_seqlens, scale, num_splits, return_lse, *,
                        causal=True, window=None, alibi_slopes=None, softcap=None,
                        block_table=None, cache_leftpad=None, cache_batch_idx=None) -> None:
    """decode_attention's arguments, before any launch; errors name the argument. The contents
    of the index tensors (cache_seqlens, cache_leftpad, cache_batch_idx, the block_table entries
    the lengths use) are checked too (a device sync each), except while torch.compile traces
    (the kernel clamps them there)."""
    paged = block_table is not None
    layout = "[num_blocks, Hkv, page_size, D] (paged: block_table given)" if paged else "[B, Hkv, Nmax, D]"
    check_attention_inputs(q, k_cache, v_cache, scale, ("k_cache", "v_cache"), layout,
                           same_batch=not paged and cache_batch_idx is None)
    B, Hq = q.shape[0], q.shape[1]
    check_integer("num_splits", num_splits, allow_none=True, lo=1)
    check_flag("return_lse", return_lse)
    check_attention_options(q, k_cache, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                            batch=B, heads=Hq, causal=causal)
    if paged and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx cannot be combined with block_table (the block table "
                         "already maps each batch row to its cache blocks)")
    n_max = k_cache.shape[2]
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError("block_table must be an int32 tensor [B, max_blocks], got "
                             f"{getattr(block_table, 'shape', type(block_table).__name__)}")
        _check_index("block_table", block_table, (B, block_table.shape[1]), "[B, max_blocks]", q)
        n_max = block_table.shape[1] * k_cache.shape[2]  # the capacity of a row
    what = {"cache_seqlens": cache_seqlens, "cache_leftpad": cache_leftpad,
            "cache_batch_idx": cache_batch_idx}
    for name, t in what.items():
        if t is not None:
            _check_index(name, t, (B,), "[B]", q)
    if torch.compiler.is_compiling() or B == 0:
        return
    if cache_seqlens is not None:
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo < 0 or hi > n_max:
            cap = (f"{n_max}] (the paged capacity: block_table.shape[1] x page size)" if paged
                   else f"Nmax={n_max}] (k_cache.shape[2])")
            raise ValueError(f"cache_seqlens values must be in [0, {cap}, got {lo if lo < 0 else hi}")
    lens = (cache_seqlens.long() if cache_seqlens is not None
            else torch.full((B,), n_max, dtype=torch.long, device=q.device))
    if cache_leftpad is not None:
        bad = (cache_leftpad < 0) | (cache_leftpad.long() > lens)
        if bool(bad.any()):
            b, = _first_bad(bad)
            raise ValueError(f"cache_leftpad[{b}] = {int(cache_leftpad[b])} must be in [0, "
                             f"cache_seqlens[{b}] = {int(lens[b])}]")
    if cache_batch_idx is not None:
        bad = (cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])
        if bool(bad.any()):
            b, = _first_bad(bad)
            raise ValueError(f"cache_batch_idx[{b}] = {int(cache_batch_idx[b])} must be a row of "
                             f"k_cache, in [0, {k_cache.shape[0]})")
    if paged and block_table.numel():
        page = k_cache.shape[2]
        used = torch.arange(block_table.shape[1], device=q.device)[None, :] * page < lens[:, None]
        bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        if bool(bad.any()):
            b, n = _first_bad(bad)
            raise ValueError(f"block_table[{b}, {n}] = {int(block_table[b, n])} must be a block of "
                             f"k_cache, in [0, num_blocks={k_cache.shape[0]}) (row {b} holds "
                             f"{int(lens[b])} keys)")


def check_inference_only(q, k_cache, v_cache) -> None:
    """decode_attention has no backward: refuse inputs that require grad while grad mode is on."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_cache, v_cache)):
        raise RuntimeError(
            "decode_attention is inference-only (no backward): an input requires grad while grad "
            "mode is on. Use tritformer.attention for training, or run generation under "
            "torch.no_grad() / torch.inference_mode().")


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention: torch's error types (RuntimeError where torch raises it)
# ---------------------------------------------------------------------------------------------
class SDPAError(RuntimeError, ValueError):
    """Bad argument to `scaled_dot_product_attention` where torch raises RuntimeError: caught by
    ``except RuntimeError`` (as torch's) and by ``except ValueError`` (as before)."""


class SDPATypeError(RuntimeError, TypeError):
    """Bad dtype where torch raises RuntimeError: caught by ``except RuntimeError`` and by
    ``except TypeError``."""


SDPAError.__module__ = SDPATypeError.__module__ = "tritformer.ops.sdpa"  # where users import them


def _sdpa_broadcast(names_shapes, what: str) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(*(s for _, s in names_shapes)))
    except RuntimeError:
        desc = ", ".join(f"{n} {list(s)}" for n, s in names_shapes)
        raise SDPAError(f"the {what} of query, key and value must broadcast, got {desc}") from None


def _check_sdpa_tensors(query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise SDPATypeError(f"{name} must be a floating-point tensor, got {_dtype_name(t.dtype)}")
        if t.dim() < 2:
            raise SDPAError(f"{name} must have at least 2 dimensions [..., seq, features], got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise SDPATypeError(f"{name} must have query's dtype {_dtype_name(query.dtype)}, "
                                f"got {_dtype_name(t.dtype)}")
        if t.device != query.device:
            raise SDPAError(f"{name} must be on query's device {query.device}, got {t.device}")
    if key.shape[-1] != query.shape[-1]:
        raise SDPAError(f"key's last dim must equal query's embedding dim E={query.shape[-1]}, got "
                        f"key shape {tuple(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise SDPAError(f"value must have key's sequence length S={key.shape[-2]} (dim -2), got "
                        f"value shape {tuple(value.shape)}")


def _sdpa_out_lead(query, key, value, enable_gqa) -> tuple:
    """The output's leading dims (head dim included) as torch broadcasts them."""
    lead = {"query": tuple(query.shape[:-2]), "key": tuple(key.shape[:-2]), "value": tuple(value.shape[:-2])}
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise SDPAError("enable_gqa=True needs query, key and value with a head dimension "
                            f"[..., H, seq, E] (3+ dims), got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        for name, h in (("key", hk), ("value", hv)):
            if h == 0 and hq != 0:  # (both 0: an empty output, as torch)
                raise SDPAError(f"enable_gqa=True: {name} has no heads but query has {hq}: each "
                                f"query head needs a {name} head")
            if h != 0 and hq % h != 0:
                raise SDPAError(f"enable_gqa=True: query's head count ({hq}) must be a multiple of "
                                f"{name}'s head count ({h})")
        batch = _sdpa_broadcast([(n, s[:-1]) for n, s in lead.items()], "batch dims (before the head dim)")
        return batch + (hq,)
    heads = {n: t.shape[-3] for n, t in (("query", query), ("key", key), ("value", value))
             if t.dim() >= 3}
    for name, h in heads.items():
        if name != "query" and "query" in heads and 1 != h != heads["query"] != 1:
            raise SDPAError(f"query has {heads['query']} heads and {name} {h}: head counts "
                            "must match (or be 1) unless enable_gqa=True")
    return _sdpa_broadcast(list(lead.items()), "batch and head dims")


def _check_sdpa_mask(attn_mask, query, key, out_lead) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, query.dtype):
        raise SDPATypeError("attn_mask must be bool (True = attend) or a float additive mask in float32 "
                            f"or query's dtype {_dtype_name(query.dtype)}, got {_dtype_name(attn_mask.dtype)}")
    if attn_mask.device != query.device:
        raise SDPAError(f"attn_mask must be on query's device {query.device}, got {attn_mask.device}")
    want = out_lead + (query.shape[-2], key.shape[-2])
    try:
        ok = attn_mask.dim() >= 2 and tuple(torch.broadcast_shapes(attn_mask.shape, want)) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise SDPAError(f"attn_mask of shape {tuple(attn_mask.shape)} must broadcast to [..., L, S] = {list(want)}")


def check_sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple:
    """scaled_dot_product_attention's arguments: raise naming the argument (SDPAError /
    SDPATypeError where torch raises RuntimeError, TypeError where torch's argument parser
    does); returns the output's leading dims (batch dims and head dim, as torch broadcasts
    them) for the fused mapping."""
    _check_sdpa_tensors(query, key, value)
    check_flag("is_causal", is_causal)
    check_flag("enable_gqa", enable_gqa)
    try:  # torch raises RuntimeError for a dropout_p outside [0, 1]
        check_real("dropout_p", dropout_p, lo=0.0, hi=1.0)
    except ValueError as e:
        raise SDPAError(str(e)) from None
    check_real("scale", scale, allow_none=True)
    out_lead = _sdpa_out_lead(query, key, value, enable_gqa)
    if attn_mask is not None:
        _check_sdpa_mask(attn_mask, query, key, out_lead)
    return out_lead


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention (torch's _mha_shape_check, as ValueError / TypeError naming the argument)
# ---------------------------------------------------------------------------------------------
def check_mha_inputs(query, key, value, key_padding_mask, attn_mask) -> bool:
    """Types, ranks, mask dtypes and devices of MultiheadAttention.forward's arguments (in the
    caller's layout); returns whether the inputs are batched (3-D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (unbatched [L, E]) or 3-D (batched), got {query.dim()}-D")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query, got {t.dim()}-D")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool and not m.dtype.is_floating_point:
            raise TypeError(f"{name} must be bool or floating point, got {m.dtype}")
        if m.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {m.device}")
    if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
        raise ValueError(f"key_padding_mask must be {'2-D [B, S]' if batched else '1-D [S]'} for "
                         f"{query.dim()}-D query, got shape {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError("attn_mask must be 2-D [L, S] or 3-D [B * num_heads, L, S], got shape "
                         f"{tuple(attn_mask.shape)}")
    return batched


def check_mha_shapes(mha, query, key, value, key_padding_mask, attn_mask, is_causal) -> None:
    """The sizes of MultiheadAttention.forward's arguments in torch's layout (query [L, B, E],
    key/value [S, B, kdim/vdim], key_padding_mask [B, S]) against the module `mha`, and
    is_causal's need for an attn_mask. attn_mask's shape is checked only where it is used (the
    is_causal hint without a key_padding_mask replaces it by the causal mask, as torch)."""
    L, B, E = query.shape
    S = key.shape[0]
    if E != mha.embed_dim:
        raise ValueError(f"query's embedding dim must be embed_dim={mha.embed_dim}, got {E}")
    if mha._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
    elif key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match "
                         f"value's {tuple(value.shape[:2])}")
    if key.shape[1] != B:
        raise ValueError(f"key's batch size must be query's ({B}), got {key.shape[1]}")
    for name, t, dim in (("key", key, mha.kdim), ("value", value, mha.vdim)):
        if t.shape[-1] != dim:
            raise ValueError(f"{name}'s embedding dim must be "
                             f"{'kdim' if name == 'key' else 'vdim'}={dim}, got {t.shape[-1]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask must have shape [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}")
    if is_causal and attn_mask is None:  # torch's error, type and text
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if attn_mask is not None and not (is_causal and key_padding_mask is None):
        want = (L, S) if attn_mask.dim() == 2 else (B * mha.num_heads, L, S)
        if tuple(attn_mask.shape) != want:
            raise ValueError(f"the {attn_mask.dim()}-D attn_mask must have shape {list(want)}, got "
                             f"{tuple(attn_mask.shape)}")
