"""Inputs of the `python -m tritformer validate` cases (declared in tritformer.registry), and the
check each runs: run_<op>(case, dtype name, device, generator, seed) -> (case name, [Check]).

The generator draws every input; `seed` (the case's index in the grid) also seeds torch's global
generator where the op draws a dropout seed from it.
"""
from __future__ import annotations

import torch

from .checks import (check_attention, check_decode_attention, check_ffn, check_gated_ffn,
                     check_softmax, check_varlen_attention)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # the case names say fp16/bf16/fp32, as the CLI


def run_attention(case, dt: str, device, gen, seed):
    B, Hq, Hkv, Nq, Nk, D, causal = case
    q, k, v = (torch.randn(B, h, s, D, generator=gen).to(device, DTYPES[dt])
               for h, s in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    name = f"attention {dt} B={B} H={Hq}/{Hkv} N={Nq}x{Nk} D={D}{' causal' if causal else ''}"
    return name, check_attention(q, k, v, causal=causal, return_lse=True)


def masked_inputs(case, dtype, device, gen):
    """(q, k, v, causal, options for check_attention, name) of a masked case."""
    B, Hq, Hkv, Nq, Nk, D, causal, spec = case
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
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
    name = (f"attention {DTYPE_NAMES.get(dtype, str(dtype).split('.')[-1])} B={B} H={Hq}/{Hkv} N={Nq}x{Nk} D={D}"
            f"{' causal' if causal else ''} {spec}")
    return q, k, v, causal, opts, name


def run_masked(case, dt: str, device, gen, seed):
    q, k, v, causal, opts, name = masked_inputs(case, DTYPES[dt], device, gen)
    torch.manual_seed(seed)  # the dropout seed
    return name, check_attention(q, k, v, causal=causal, return_lse=True, **opts)


def varlen_inputs(case, dtype, device, gen):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, options, name)."""
    Hq, Hkv, lq, lk, D, causal, spec = case
    cu = lambda ls: torch.tensor([0, *ls], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
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
    name = (f"varlen {DTYPE_NAMES.get(dtype, str(dtype).split('.')[-1])} H={Hq}/{Hkv} q={'+'.join(map(str, lq))} "
            f"k={'+'.join(map(str, lk))} D={D}{' causal' if causal else ''}{' ' + spec if spec else ''}")
    return (q, kv[:, 0], kv[:, 1], cu(lq), cu(lk), max(lq), max(lk), causal, opts, name)


def run_varlen(case, dt: str, device, gen, seed):
    *tensors, causal, opts, name = varlen_inputs(case, DTYPES[dt], device, gen)
    torch.manual_seed(seed)
    return name, check_varlen_attention(*tensors, causal=causal, return_lse=True, **opts)


def run_softmax(case, dt: str, device, gen, seed):
    shape, mask_shape, causal, scale = case
    x = (torch.randn(shape, generator=gen) * 3).to(device, DTYPES[dt])
    mask = None if mask_shape is None else (torch.rand(mask_shape, generator=gen) > 0.3).to(device)
    name = (f"softmax {dt} {'x'.join(map(str, shape))} scale={scale}"
            f"{' mask' + 'x'.join(map(str, mask_shape)) if mask_shape else ''}{' causal' if causal else ''}")
    return name, check_softmax(x, scale=scale, mask=mask, causal=causal)


def run_ffn(case, dt: str, device, gen, seed):
    gated, M, d_in, hidden, d_out, act, extra = case
    dtype = DTYPES[dt]
    x = torch.randn(M, d_in, generator=gen).to(device, dtype)
    w = lambda o, i: (torch.randn(o, i, generator=gen) / i ** 0.5).to(device, dtype)
    if gated:
        name = f"gated_ffn {dt} M={M} {d_in}->{hidden}->{d_out} {act}"
        return name, check_gated_ffn(x, w(hidden, d_in), w(hidden, d_in), w(d_out, hidden),
                                     activation=act, recompute=extra == "recompute")
    b = lambda n: (torch.randn(n, generator=gen) * 0.5).to(device, dtype)
    res = torch.randn(M, d_out, generator=gen).to(device, dtype) if extra == "residual" else None
    name = f"ffn {dt} M={M} {d_in}->{hidden}->{d_out} {act}{' ' + extra if extra else ''}"
    return name, check_ffn(x, w(hidden, d_in), b(hidden), w(d_out, hidden), b(d_out),
                           activation=act, residual=res, recompute=extra == "recompute")


def run_decode(case, dt: str, device, gen, seed):
    B, Hq, Hkv, Nq, n_max, lengths, D, splits = case
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(device, DTYPES[dt])
    kc, vc = (torch.randn(B, Hkv, n_max, D, generator=gen).to(device, DTYPES[dt])
              for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    name = (f"decode {dt} B={B} H={Hq}/{Hkv} Nq={Nq} cache={n_max} lens={list(lengths)} "
            f"D={D} splits={splits or 'auto'}")
    return name, check_decode_attention(q, kc, vc, lens, num_splits=splits)
