"""`python -m tritformer validate`: every op against the float64 reference, error-ratio criterion.

`check_attention` is also the tests' helper: one implementation of the comparison everywhere.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from . import numerics, reference


def _backprop(out, ref, base, seed=1234):
    """Backward through the kernel output, the float64 reference and PyTorch's same-dtype
    baseline with one seeded cotangent (returned, in out's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
    out.backward(grad)
    ref.backward(grad.double())
    base.backward(grad)
    return grad


def _same_rng_seed(fn, dropout_p):
    """Run fn() and return (its result, the dropout seed it drew from torch's generator)."""
    from .ops.attention import _dropout_seed
    state = torch.get_rng_state()
    result = fn()
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    seed = _dropout_seed(dropout_p)
    torch.set_rng_state(after)
    return result, seed


def _dropout_reference_mask(q, seed, dropout_p, n_rows, n_cols, shape):
    """The keep mask the backend drew for `seed`, for the reference computation."""
    from .backend import backend_for
    if seed is None:
        return None
    if backend_for(q) == "reference":
        from .ops.attention import _reference_dropout_mask
        return _reference_dropout_mask(seed, dropout_p, shape, q.device)
    from tritformer.kernels import attention as K
    return K.dropout_keep_mask(int(seed.item()), dropout_p, n_rows, n_cols, q.device).view(shape)


def _grad_floors(ref_in, do, scale, D):
    """Roundoff floor at the magnitude of the terms each gradient sums (see numerics): dq and
    dk vanish by cancellation when the softmax is one-hot (a single key, or |logits| ~1e4),
    where PyTorch's delta = sum(P dP) cancels exactly (dq ~1e-40) and FlashAttention's
    delta = rowsum(dO O) leaves fp32 roundoff: measured dq 1.2e-4 with |k| ~100, |dP| ~10,
    i.e. one ulp of a single dS k term. dq sums scale*dS*k with |dS| <= |dP| <= |dO_i||v_j|;
    dk the same with q; dv sums P*dO."""
    qd, kd, vd = (x.detach().double() for x in ref_in[:3])
    dod = do.double()
    norm = lambda t: float(t.norm(dim=-1).max()) if t.numel() else 0.0  # noqa: E731
    amax = lambda t: float(t.abs().max()) if t.numel() else 0.0  # noqa: E731
    sc = abs(scale) if scale is not None else D ** -0.5
    dp = norm(dod) * norm(vd)
    gscale = max((amax(r.grad) for r in ref_in[:3]), default=0.0)
    return {"dq": max(gscale, sc * dp * amax(kd)), "dk": max(gscale, sc * dp * amax(qd)),
            "dv": max(gscale, amax(dod)), "dmask": max(gscale, dp)}


def _attention_grad_checks(out, ref, base, kernel, refs, bases, scale, mask=None):
    """Backward through the three outputs and check dq, dk, dv (kernel / float64 / same-dtype
    leaves q, k, v) and dmask when `mask` = (kernel, ref, base) masks, with _grad_floors."""
    do = _backprop(out, ref, base)
    q = kernel[0]
    pairs = list(zip(("dq", "dk", "dv"), kernel, refs, bases))
    if mask is not None:
        pairs.append(("dmask", *mask))
    floors = _grad_floors(refs, do, scale, q.shape[-1])
    checks = []
    for name, a, r, b in pairs:
        # dmask is dS, computed from q's dtype (dO, O, P of 16-bit inputs) whatever the mask's
        # storage: an fp32 mask on fp16 inputs takes fp16's roundoff floor (measured: Nq=1,
        # Nk=8, D=1 dmask 5.5e-6 = 14.6x the fp16 baseline's error, fp16-level)
        checks.append(numerics.check(name, a.grad, r.grad, b.grad, numerics.GRAD_FACTOR,
                                     floor_scale=floors[name],
                                     eps_dtype=q.dtype if name == "dmask" else None))
    return checks


def check_attention(q, k, v, *, causal=False, scale=None, grads=True, return_lse=False,
                    **options) -> list[numerics.Check]:
    """Run tritformer.attention forward (and backward) and check out (lse, dq, dk, dv, and
    dmask for a float attn_mask that requires grad).

    options: attn_mask, key_padding_mask, dropout_p, window, alibi_slopes, softcap, as
    `tritformer.attention`. Error of the kernel vs a float64 reference, bounded by PyTorch's own
    error in q's dtype (reference.attention run in that dtype); with dropout the reference
    uses the kernel's own keep mask (regenerated from the same seed).
    """
    from .ops.attention import attention
    mask = options.pop("attn_mask", None)
    mask_grad = grads and mask is not None and mask.dtype != torch.bool and mask.requires_grad
    slopes = options.pop("alibi_slopes", None)

    def leaves(dtype=None):
        ts = [x.detach().to(dtype or x.dtype).requires_grad_(grads) for x in (q, k, v)]
        m = mask
        if mask is not None and mask.dtype != torch.bool:
            m = mask.detach().to(dtype or mask.dtype).requires_grad_(mask_grad)
        s = None if slopes is None else slopes.detach().to(dtype or slopes.dtype)
        return ts, m, s

    (lk, mk, sk), (lr, mr, sr), (lb, mb, sb) = leaves(), leaves(torch.float64), leaves()
    p = float(options.get("dropout_p", 0.0))
    (out, lse), seed = _same_rng_seed(
        lambda: attention(*lk, causal=causal, scale=scale, return_lse=True, attn_mask=mk,
                          alibi_slopes=sk, **options), p)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    keep = _dropout_reference_mask(q, seed, p, B * Hq * Nq, Nk, (B, Hq, Nq, Nk))
    ref, ref_lse = reference.attention(*lr, causal=causal, scale=scale, return_lse=True,
                                       attn_mask=mr, alibi_slopes=sr, dropout_mask=keep, **options)
    base, base_lse = reference.attention(*lb, causal=causal, scale=scale, return_lse=True,
                                         attn_mask=mb, alibi_slopes=sb, dropout_mask=keep, **options)
    checks = [numerics.check("out", out, ref, base, numerics.FORWARD_FACTOR)]
    if return_lse:
        checks.append(numerics.check("lse", lse, ref_lse, base_lse, numerics.FORWARD_FACTOR))
    if grads:
        checks += _attention_grad_checks(out, ref, base, lk, lr, lb, scale,
                                         (mk, mr, mb) if mask_grad else None)
    return checks


def check_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           causal=False, scale=None, grads=True, return_lse=False,
                           **options) -> list[numerics.Check]:
    """`check_attention` for tritformer.varlen_attention (q [Tq, Hq, D], k/v [Tk, Hkv, D],
    packed sequences): out (lse [Hq, Tq]), dq, dk, dv of the kernel vs reference.varlen_attention
    on float64 copies, bounded by the same reference run in q's dtype. options: dropout_p,
    window, alibi_slopes ([Hq] or [num_seqs, Hq]), softcap; with dropout the reference uses the
    kernel's own keep bits (rows [Hq, Tq], max_seqlen_k columns, regenerated from the seed).
    """
    from .ops.attention import varlen_attention
    slopes = options.pop("alibi_slopes", None)
    cu = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    def leaves(dtype=None):
        ts = [x.detach().to(dtype or x.dtype).requires_grad_(grads) for x in (q, k, v)]
        s = None if slopes is None else slopes.detach().to(dtype or slopes.dtype)
        return ts, s

    (lk, sk), (lr, sr), (lb, sb) = leaves(), leaves(torch.float64), leaves()
    p = float(options.get("dropout_p", 0.0))
    (out, lse), seed = _same_rng_seed(
        lambda: varlen_attention(*lk, *cu, causal=causal, scale=scale, return_lse=True,
                                 alibi_slopes=sk, **options), p)
    Tq, Hq = q.shape[:2]
    keep = _dropout_reference_mask(q, seed, p, Hq * Tq, max_seqlen_k, (Hq, Tq, max_seqlen_k))
    ref, ref_lse = reference.varlen_attention(*lr, *cu, causal=causal, scale=scale, return_lse=True,
                                              alibi_slopes=sr, dropout_mask=keep, **options)
    base, base_lse = reference.varlen_attention(*lb, *cu, causal=causal, scale=scale,
                                                return_lse=True, alibi_slopes=sb,
                                                dropout_mask=keep, **options)
    checks = [numerics.check("out", out, ref, base, numerics.FORWARD_FACTOR)]
    if return_lse:
        checks.append(numerics.check("lse", lse, ref_lse, base_lse, numerics.FORWARD_FACTOR))
    if grads:
        checks += _attention_grad_checks(out, ref, base, lk, lr, lb, scale)
    return checks


def check_sdpa(q, k, v, attn_mask=None, *, grads=True, **kw) -> list[numerics.Check]:
    """tritformer.scaled_dot_product_attention vs torch's own SDPA: float64 (reference) and in
    q's dtype (baseline); outputs and the gradients of q, k, v and of a float attn_mask that
    requires grad. kw: dropout_p, is_causal, scale, enable_gqa (dropout_p > 0 cannot match)."""
    from .ops.sdpa import scaled_dot_product_attention
    _torch_sdpa = torch._C._nn.scaled_dot_product_attention  # torch's op, whatever F holds
    mask_grad = attn_mask is not None and attn_mask.requires_grad

    def leaves(dtype, mask_dtype=None):
        ins = [x.detach().to(dtype).requires_grad_(grads) for x in (q, k, v)]
        m = attn_mask
        if m is not None and m.dtype != torch.bool:
            m = m.detach().to(mask_dtype or dtype).requires_grad_(mask_grad)
        return ins, m

    # ours: the mask as given; reference: float64; baseline: everything in q's dtype. (A float32
    # mask with fp16 inputs: torch's CPU kernel then returns dmask at fp32 accuracy, while
    # FlashAttention's dS = P (dP - rowsum(dO O)) reads the fp16-rounded O: the same-dtype
    # criterion bounds the fp16 computation, so the baseline runs the mask in fp16 too.)
    mdt = None if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.dtype
    (ok, mk), (rk, mr), (bk, mb) = leaves(q.dtype, mdt), leaves(torch.float64), leaves(q.dtype)
    out = scaled_dot_product_attention(*ok, mk, **kw)
    ref = _torch_sdpa(*rk, mr, **kw)
    base = _torch_sdpa(*bk, mb, **kw)
    if out.shape != base.shape or out.dtype != base.dtype:
        return [numerics.Check("out", float("inf"), 0.0, 0.0,
                               f"shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(base.shape)} {base.dtype}")]
    checks = [numerics.check("out", out, ref, base, numerics.FORWARD_FACTOR)]
    if grads:  # check_attention's floors: dq/dk vanish by cancellation with a single key
        checks += _attention_grad_checks(out, ref, base, ok, rk, bk, kw.get("scale"),
                                         (mk, mr, mb) if mask_grad else None)
    return checks


def check_decode_attention(q, k_cache, v_cache, cache_seqlens=None, *, num_splits=None,
                           scale=None) -> list[numerics.Check]:
    """tritformer.decode_attention (out, lse) against float64 (reference.decode_attention),
    bounded by PyTorch's own error in q's dtype. Forward only: decoding has no backward."""
    from .ops.decode import decode_attention
    out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale,
                                num_splits=num_splits, return_lse=True)
    ref, ref_lse = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(),
                                              cache_seqlens, scale=scale, return_lse=True)
    base, base_lse = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale,
                                                return_lse=True)
    return [numerics.check("out", out, ref, base),
            numerics.check("lse", lse, ref_lse, base_lse, eps_dtype=q.dtype)]


def check_softmax(x, dim=-1, *, scale=1.0, mask=None, causal=False, grads=True) -> list[numerics.Check]:
    """tritformer.softmax forward (and backward: dx, and d(mask) for a float mask requiring
    grad) against float64, bounded by PyTorch's own error in x's dtype (reference.softmax)."""
    from .ops.softmax import softmax
    mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad

    def leaves(dtype=None):
        xi = x.detach().to(dtype or x.dtype).requires_grad_(grads)
        mi = mask
        if mask is not None:
            mi = mask.detach()
            if mi.dtype != torch.bool:
                mi = mi.to(dtype or x.dtype)
            mi.requires_grad_(grads and mask_grad)
        return xi, mi

    (xk, mk), (xr, mr), (xb, mb) = leaves(), leaves(torch.float64), leaves()
    y = softmax(xk, dim, scale=scale, mask=mk, causal=causal)
    ref = reference.softmax(xr, dim, scale=scale, mask=mr, causal=causal)
    base = reference.softmax(xb, dim, scale=scale, mask=mb, causal=causal)
    checks = [numerics.check("y", y, ref, base, numerics.FORWARD_FACTOR)]
    if grads:
        _backprop(y, ref, base)
        pairs = [("dx", xk, xr, xb)] + ([("dmask", mk, mr, mb)] if mask_grad else [])
        gscale = float(xr.grad.abs().max()) if xr.grad.numel() else 0.0
        for name, a, r, b in pairs:
            checks.append(numerics.check(name, a.grad, r.grad, b.grad, numerics.GRAD_FACTOR,
                                         floor_scale=gscale))
    return checks


def _check_grads(fn, ref_fn, tensors: dict, names: list, seed=1234) -> list[numerics.Check]:
    """Run fn (kernel dtype), ref_fn on float64 copies and ref_fn in the kernel dtype (PyTorch's
    own error); check the output and the gradient of every tensor in `names`."""
    def leaves(dtype=None):
        return {k: (None if v is None else v.detach().to(dtype or v.dtype).requires_grad_(k in names))
                for k, v in tensors.items()}
    lk, lr, lb = leaves(), leaves(torch.float64), leaves()
    y, ref, base = fn(**lk), ref_fn(**lr), ref_fn(**lb)
    checks = [numerics.check("y", y, ref, base, numerics.FORWARD_FACTOR)]
    _backprop(y, ref, base, seed)
    for k in names:
        checks.append(numerics.check("d" + k, lk[k].grad, lr[k].grad, lb[k].grad, numerics.GRAD_FACTOR))
    return checks


def check_ffn(x, w1, b1, w2, b2, *, activation="gelu", residual=None, recompute=False):
    """tritformer.ffn forward and every gradient against float64 (PyTorch's own error bound)."""
    from .ops.ffn import ffn
    t = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    names = [k for k, v in t.items() if v is not None]
    return _check_grads(
        lambda **a: ffn(**a, activation=activation, recompute=recompute),
        lambda **a: reference.ffn(**a, activation=activation), t, names)


def check_gated_ffn(x, w_gate, w_up, w_down, *, activation="silu", recompute=False,
                    b_gate=None, b_up=None, b_down=None):
    from .ops.ffn import gated_ffn
    t = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b_gate, b_up=b_up, b_down=b_down)
    names = [k for k, v in t.items() if v is not None]
    return _check_grads(
        lambda **a: gated_ffn(**a, activation=activation, recompute=recompute),
        lambda **a: reference.gated_ffn(**a, activation=activation), t, names)


def _cases(quick: bool):
    # (B, Hq, Hkv, Nq, Nk, D, causal): one line per code path
    cases = [
        (2, 4, 4, 128, 128, 64, False),   # MHA, square, full tiles
        (2, 4, 4, 128, 128, 64, True),    # causal diagonal tiles
        (1, 4, 2, 100, 157, 59, True),    # GQA, odd D, Nq < Nk (KV-cache alignment)
        (1, 4, 1, 200, 77, 128, True),    # MQA, Nq > Nk: rows with no visible key
        (1, 2, 2, 1, 300, 96, False),     # single query against a long cache
        (1, 2, 2, 33, 1, 40, False),      # single key
        (1, 1, 1, 65, 65, 256, True),     # largest head dim
    ]
    return cases[:3] if quick else cases


def _masked_cases(quick: bool):
    # (B, Hq, Hkv, Nq, Nk, D, causal, options): one line per code path of the option switches
    # (built by _masked_inputs; "mask=bool:1,1,Nq,Nk" is a mask of that broadcast shape)
    cases = [
        (2, 4, 2, 100, 130, 64, False, "mask=bool:B,1,Nq,Nk"),      # bool mask + GQA, masked rows
        (1, 4, 4, 96, 96, 48, False, "mask=float_grad:1,Hq,Nq,Nk"),  # additive mask with -inf, dmask
        (2, 2, 2, 80, 150, 64, True, "kpm"),                      # key padding (one batch all padding) + causal
        (1, 4, 4, 128, 160, 64, False, "window=40,8 alibi"),      # sliding window + ALiBi, skipped tiles
        (2, 2, 1, 90, 90, 64, True, "softcap=20"),                # softcap (tanh) + MQA
        (1, 2, 2, 100, 100, 64, False, "dropout=0.2"),            # Philox dropout, fwd and bwd
    ]
    return cases[:2] if quick else cases


def _masked_inputs(case, dtype, device, gen):
    """(q, k, v, causal, options for check_attention, name) of a _masked_cases line."""
    B, Hq, Hkv, Nq, Nk, D, causal, spec = case
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = (rnd(B, h, s, D).to(device, dtype) for h, s in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    dims = {"B": B, "Hq": Hq, "Nq": Nq, "Nk": Nk}
    opts = {}
    for item in spec.split():
        key, _, val = item.partition("=")
        if key == "mask":
            kind, shape = val.split(":")
            shape = [dims.get(d) or int(d) for d in shape.split(",")]
            if kind == "bool":
                m = torch.rand(*shape, generator=gen) > 0.3
                m[..., 3, :] = False  # a query row that sees no key
            else:
                m = (rnd(*shape) * 2).masked_fill(torch.rand(*shape, generator=gen) < 0.2, float("-inf"))
                m[..., 5, :] = float("-inf")  # a row with every key at -inf
                m = m.to(dtype).requires_grad_(kind == "float_grad")
            opts["attn_mask"] = m.to(device)
        elif key == "kpm":
            lengths = torch.randint(1, Nk + 1, (B,), generator=gen)
            lengths[-1] = 0  # a batch row that is all padding
            opts["key_padding_mask"] = (torch.arange(Nk)[None, :] >= lengths[:, None]).to(device)
        elif key == "window":
            opts["window"] = tuple(int(w) for w in val.split(","))
        elif key == "alibi":
            opts["alibi_slopes"] = torch.exp2(-8.0 * torch.arange(1, Hq + 1) / Hq).to(device)
        elif key == "softcap":
            opts["softcap"] = float(val)
            q = q * 4  # scores beyond the cap: tanh saturates
        elif key == "dropout":
            opts["dropout_p"] = float(val)
    name = (f"attention {str(dtype).split('.')[-1]} B={B} H={Hq}/{Hkv} N={Nq}x{Nk} D={D}"
            f"{' causal' if causal else ''} {spec}")
    return q, k, v, causal, opts, name


def _varlen_cases(quick: bool):
    # (Hq, Hkv, seqlens_q, seqlens_k, D, causal, options): packed sequences incl. empty ones
    cases = [
        (4, 2, (37, 0, 90, 5), (60, 0, 90, 1), 64, True, ""),          # GQA, causal, 0-length seq
        (2, 2, (100, 17), (100, 40), 48, False, "window=32,0 alibi softcap=15"),
        (2, 1, (50, 0, 70), (70, 20, 33), 64, False, "dropout=0.15"),  # queries without keys, dropout
    ]
    return cases[:1] if quick else cases


def _varlen_inputs(case, dtype, device, gen):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, options, name)."""
    Hq, Hkv, lq, lk, D, causal, spec = case
    cu = lambda ls: torch.tensor([0, *ls], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)  # noqa: E731
    q = torch.randn(sum(lq), Hq, D, generator=gen).to(device, dtype)
    kv = torch.randn(sum(lk), 2, Hkv, D, generator=gen).to(device, dtype)  # packed kv: strided views
    opts = {}
    for item in spec.split():
        key, _, val = item.partition("=")
        if key == "window":
            opts["window"] = tuple(int(w) for w in val.split(","))
        elif key == "alibi":  # [num_seqs, Hq]
            opts["alibi_slopes"] = (torch.rand(len(lq), Hq, generator=gen) * 0.5).to(device)
        elif key == "softcap":
            opts["softcap"] = float(val)
        elif key == "dropout":
            opts["dropout_p"] = float(val)
    name = (f"varlen {str(dtype).split('.')[-1]} H={Hq}/{Hkv} q={'+'.join(map(str, lq))} "
            f"k={'+'.join(map(str, lk))} D={D}{' causal' if causal else ''}{' ' + spec if spec else ''}")
    return (q, kv[:, 0], kv[:, 1], cu(lq), cu(lk), max(lq), max(lk), causal, opts, name)


def _softmax_cases(quick: bool):
    # (x shape, bool mask shape or None, causal, scale): one line per code path
    cases = [
        ((4, 8, 64, 64), (1, 8, 64, 64), True, 0.125),  # attention-score shape: mask + causal
        ((16, 1000), None, False, 1.0),                 # padded single tile
        ((2, 70_000), (70_000,), False, 2.0),           # multi-tile online path, broadcast mask
        ((3, 1), None, False, 1.0),                     # one element per row
    ]
    return cases[:2] if quick else cases


def _decode_cases(quick: bool):
    # (B, Hq, Hkv, Nq, Nmax, lengths, D, num_splits): one line per code path
    cases = [
        (2, 8, 2, 1, 300, (300, 123), 64, None),  # GQA 4:1 group tile, ragged lengths, default splits
        (1, 4, 4, 4, 257, (200,), 128, 5),         # MHA, Nq = 4 causal rows, 5 splits
        (3, 8, 1, 1, 64, (0, 1, 64), 40, 3),       # MQA, empty and single-key caches, odd D
    ]
    return cases[:1] if quick else cases


def _ffn_cases(quick: bool):
    # (gated, M, in, hidden, out, activation, extra): one line per code path
    cases = [
        (False, 100, 96, 200, 96, "gelu", "residual"),   # ragged tiles, residual epilogue
        (True, 64, 64, 160, 64, "silu", ""),             # SwiGLU: dual-accumulator kernel
        (False, 1, 40, 70, 33, "gelu_tanh", "recompute"),  # M = 1, recomputed activations
        (True, 33, 48, 80, 48, "gelu", "recompute"),     # GeGLU, recompute
        (False, 50, 64, 128, 64, "relu", ""),
    ]
    return cases[:2] if quick else cases


def main(args) -> int:
    interpreting = not torch.cuda.is_available()
    if interpreting:
        if "tritformer.kernels.attention" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
        from . import _interp_patch
        _interp_patch.apply()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from .backend import backend_for
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    grid = [("attention", dt, c) for dt in args.dtype for c in _cases(args.quick)]
    grid += [("masked", dt, c) for dt in args.dtype for c in _masked_cases(args.quick)]
    grid += [("varlen", dt, c) for dt in args.dtype for c in _varlen_cases(args.quick)]
    grid += [("softmax", dt, c) for dt in args.dtype for c in _softmax_cases(args.quick)]
    grid += [("ffn", dt, c) for dt in args.dtype for c in _ffn_cases(args.quick)]
    grid += [("decode", dt, c) for dt in args.dtype for c in _decode_cases(args.quick)]
    backend = backend_for(torch.empty(0, device=device))
    print(f"validate: attention (masks, options, varlen), decode, softmax, ffn on {device} ({backend}), {len(grid)} cases", file=sys.stderr)
    rows, failed, t0 = [], 0, time.time()
    for n, (op, dt, case) in enumerate(grid, 1):
        gen = torch.Generator().manual_seed(n)
        if op == "attention":
            B, Hq, Hkv, Nq, Nk, D, causal = case
            q, k, v = (torch.randn(B, h, s, D, generator=gen).to(device, dtypes[dt])
                       for h, s in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
            name = f"attention {dt} B={B} H={Hq}/{Hkv} N={Nq}x{Nk} D={D}{' causal' if causal else ''}"
            checks = check_attention(q, k, v, causal=causal, return_lse=True)
        elif op == "masked":
            q, k, v, causal, opts, name = _masked_inputs(case, dtypes[dt], device, gen)
            torch.manual_seed(n)  # the dropout seed
            checks = check_attention(q, k, v, causal=causal, return_lse=True, **opts)
        elif op == "varlen":
            *tensors, causal, opts, name = _varlen_inputs(case, dtypes[dt], device, gen)
            torch.manual_seed(n)
            checks = check_varlen_attention(*tensors, causal=causal, return_lse=True, **opts)
        elif op == "decode":
            B, Hq, Hkv, Nq, n_max, lengths, D, splits = case
            q = torch.randn(B, Hq, Nq, D, generator=gen).to(device, dtypes[dt])
            kc, vc = (torch.randn(B, Hkv, n_max, D, generator=gen).to(device, dtypes[dt])
                      for _ in range(2))
            lens = torch.tensor(lengths, dtype=torch.int32, device=device)
            name = (f"decode {dt} B={B} H={Hq}/{Hkv} Nq={Nq} cache={n_max} lens={list(lengths)} "
                    f"D={D} splits={splits or 'auto'}")
            checks = check_decode_attention(q, kc, vc, lens, num_splits=splits)
        elif op == "ffn":
            gated, M, d_in, hidden, d_out, act, extra = case
            dtype = dtypes[dt]
            x = torch.randn(M, d_in, generator=gen).to(device, dtype)
            w = lambda o, i: (torch.randn(o, i, generator=gen) / i ** 0.5).to(device, dtype)  # noqa: E731
            if gated:
                name = f"gated_ffn {dt} M={M} {d_in}->{hidden}->{d_out} {act}"
                checks = check_gated_ffn(x, w(hidden, d_in), w(hidden, d_in), w(d_out, hidden),
                                         activation=act, recompute=extra == "recompute")
            else:
                b = lambda n: (torch.randn(n, generator=gen) * 0.5).to(device, dtype)  # noqa: E731
                res = torch.randn(M, d_out, generator=gen).to(device, dtype) if extra == "residual" else None
                name = f"ffn {dt} M={M} {d_in}->{hidden}->{d_out} {act}{' ' + extra if extra else ''}"
                checks = check_ffn(x, w(hidden, d_in), b(hidden), w(d_out, hidden), b(d_out),
                                   activation=act, residual=res, recompute=extra == "recompute")
        else:
            shape, mask_shape, causal, scale = case
            x = (torch.randn(shape, generator=gen) * 3).to(device, dtypes[dt])
            mask = None if mask_shape is None else (torch.rand(mask_shape, generator=gen) > 0.3).to(device)
            name = (f"softmax {dt} {'x'.join(map(str, shape))} scale={scale}"
                    f"{' mask' + 'x'.join(map(str, mask_shape)) if mask_shape else ''}{' causal' if causal else ''}")
            checks = check_softmax(x, scale=scale, mask=mask, causal=causal)
        for c in checks:
            rows.append((name, c))
            failed += not c.ok
        elapsed = time.time() - t0
        print(f"\r[{n}/{len(grid)}] {elapsed:5.1f}s  {name:<60}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'out':<9}  {'max err':>10}  {'torch err':>10}  {'ratio':>6}  result")
    for name, c in rows:
        print(f"{name:<{w}}  {c.name:<9}  {c.error:10.3e}  {c.baseline:10.3e}  {c.ratio:6.2f}  "
              f"{'pass' if c.ok else 'FAIL ' + c.detail}")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
