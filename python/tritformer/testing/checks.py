"""The check_* helpers: run an op (forward and backward) and compare it against the float64
reference with the project's criterion (tritformer.numerics: error-ratio bound against PyTorch's
own same-dtype error). One implementation of the comparison for the tests, `validate` and the
fuzzers.
"""
from __future__ import annotations

import torch

from .. import numerics, reference


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
    from ..ops.attention import _dropout_seed
    state = torch.get_rng_state()
    result = fn()
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    seed = _dropout_seed(dropout_p)
    torch.set_rng_state(after)
    return result, seed


def _dropout_reference_mask(q, seed, dropout_p, n_rows, n_cols, shape):
    """The keep mask the backend drew for `seed`, for the reference computation."""
    from ..backend import backend_for
    if seed is None:
        return None
    if backend_for(q) in ("torch", "reference"):  # the CPU fallback: a torch-generator mask
        from ..ops.attention import _reference_dropout_mask
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
    norm = lambda t: float(t.norm(dim=-1).max()) if t.numel() else 0.0
    amax = lambda t: float(t.abs().max()) if t.numel() else 0.0
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


def _path_option(options: dict) -> dict:
    """{"deterministic": ...} popped from options (the kernel's backward path, which the
    reference does not take), or {} for the default path."""
    return {"deterministic": options.pop("deterministic")} if "deterministic" in options else {}


def check_attention(q, k, v, *, causal=False, scale=None, grads=True, return_lse=False,
                    **options) -> list[numerics.Check]:
    """Run tritformer.attention forward (and backward) and check out (lse, dq, dk, dv, and
    dmask for a float attn_mask that requires grad).

    options: attn_mask, key_padding_mask, dropout_p, window, alibi_slopes, softcap, as
    `tritformer.attention`, and deterministic (the backward path; the kernel only). Error of the
    kernel vs a float64 reference, bounded by PyTorch's own error in q's dtype
    (reference.attention run in that dtype); with dropout the reference uses the kernel's own
    keep mask (regenerated from the same seed).
    """
    from ..ops.attention import attention
    path = _path_option(options)
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
                          alibi_slopes=sk, **options, **path), p)
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
    deterministic: the backward path, as `check_attention`.
    """
    from ..ops.attention import varlen_attention
    path = _path_option(options)
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
                                 alibi_slopes=sk, **options, **path), p)
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
    from ..ops.sdpa import scaled_dot_product_attention
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
                           scale=None, **options) -> list[numerics.Check]:
    """tritformer.decode_attention (out, lse) against float64 (reference.decode_attention),
    bounded by PyTorch's own error in q's dtype. Forward only: decoding has no backward.
    options: decode_attention's (causal, window, alibi_slopes, softcap, block_table,
    cache_leftpad, cache_batch_idx), given to the reference too (which gathers paged caches
    in torch)."""
    from ..ops.decode import decode_attention
    out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale,
                                num_splits=num_splits, return_lse=True, **options)
    ref_options = dict(options)
    if options.get("alibi_slopes") is not None:
        ref_options["alibi_slopes"] = options["alibi_slopes"].double()
    ref, ref_lse = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(),
                                              cache_seqlens, scale=scale, return_lse=True,
                                              **ref_options)
    base, base_lse = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale,
                                                return_lse=True, **options)
    return [numerics.check("out", out, ref, base),
            numerics.check("lse", lse, ref_lse, base_lse, eps_dtype=q.dtype)]


def check_softmax(x, dim=-1, *, scale=1.0, mask=None, causal=False, grads=True) -> list[numerics.Check]:
    """tritformer.softmax forward (and backward: dx, and d(mask) for a float mask requiring
    grad) against float64, bounded by PyTorch's own error in x's dtype (reference.softmax)."""
    from ..ops.softmax import softmax
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
    from ..ops.ffn import ffn
    t = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    names = [k for k, v in t.items() if v is not None]
    return _check_grads(
        lambda **a: ffn(**a, activation=activation, recompute=recompute),
        lambda **a: reference.ffn(**a, activation=activation), t, names)


def check_gated_ffn(x, w_gate, w_up, w_down, *, activation="silu", recompute=False,
                    b_gate=None, b_up=None, b_down=None):
    from ..ops.ffn import gated_ffn
    t = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b_gate, b_up=b_up, b_down=b_down)
    names = [k for k, v in t.items() if v is not None]
    return _check_grads(
        lambda **a: gated_ffn(**a, activation=activation, recompute=recompute),
        lambda **a: reference.gated_ffn(**a, activation=activation), t, names)
