"""`--op attention`: dense attention (causal or not), the providers every attention sweep builds
on (naive, SDPA and its pinned backends, tritformer, flash_attn, flex), the FLOP formulas
(tritformer.bench's docstring) and the float64 reference of the masked and varlen sweeps.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from .core import (DTYPES, MODES, Provider, _active_providers, _backend, _cuda_only,
                   adaptive_timing, peak_bytes, time_ms)


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
def visible_pairs(n_q: int, n_k: int, causal: bool) -> int:
    """(query, key) pairs the softmax sees; causal is bottom-right aligned (key j <= i + Nk - Nq)."""
    if not causal:
        return n_q * n_k
    off = n_k - n_q
    return sum(min(n_k, max(0, i + off + 1)) for i in range(n_q))


_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    fwd = 4.0 * batch * heads * visible_pairs(n_q, n_k, causal) * head_dim
    return fwd * _MODE_FACTOR[mode]


# ---------------------------------------------------------------------------------------------
# Providers: fn(q, k, v, causal) on [B, H, N, D] tensors, Nq == Nk in the sweeps
# ---------------------------------------------------------------------------------------------
def _naive(q, k, v, causal):
    from .. import reference
    return reference.attention(q, k, v, causal=causal)


def _tritformer(q, k, v, causal):
    from ..ops.attention import attention
    return attention(q, k, v, causal=causal)


def _sdpa(q, k, v, causal):
    # Nq == Nk in every sweep, so SDPA's top-left is_causal equals the bottom-right convention
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


_SDPA_BACKENDS = {"sdpa_math": "MATH", "sdpa_flash": "FLASH_ATTENTION",
                  "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def _sdpa_pinned(name: str):
    def fn(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[name])):
            return _sdpa(q, k, v, causal)
    return fn


def _sdpa_why_not(name: str):
    def why(device, dtype):
        if name == "sdpa_math":
            return None
        if device != "cuda":
            return f"{name} runs on CUDA only"
        if name in ("sdpa_flash", "sdpa_cudnn") and dtype == torch.float32:
            return f"{name} takes fp16/bf16 only"
        return None
    return why


def _flash_attn(q, k, v, causal):
    from flash_attn import flash_attn_func  # [B, N, H, D] layout: transposed views, no copy
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           causal=causal).transpose(1, 2)


_FLEX = {}


def _flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    block_mask = None
    if causal:
        n = q.shape[2]
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, n, n, device=q.device)
    return _FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_providers() -> dict[str, Provider]:
    return {
        "naive": Provider("naive", _naive, lambda d, t: None, lambda d: "pytorch"),
        "sdpa": Provider("sdpa", _sdpa, lambda d, t: None,
                         lambda d: "sdpa (default dispatch)" if d == "cuda" else "sdpa (cpu)"),
        **{n: Provider(n, _sdpa_pinned(n), _sdpa_why_not(n), lambda d, n=n: n.replace("_", " ", 1))
           for n in _SDPA_BACKENDS},
        "tritformer": Provider("tritformer", _tritformer, lambda d, t: None, _backend),
        "flash_attn": Provider("flash_attn", _flash_attn, _cuda_only("flash_attn", "flash_attn"),
                               lambda d: "flash_attn"),
        "flex": Provider("flex", _flex, _cuda_only("flex"), lambda d: "flex_attention (compiled)"),
    }


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionSweep:
    """Latency/throughput sweep (batch * seqlen constant, as FlashAttention's benchmark) and a
    forward peak-memory sweep over longer sequences."""
    seqlens: tuple
    tokens: int                # batch * seqlen
    head_dims: tuple
    model_dim: int             # heads = model_dim // head_dim
    dtype: str
    modes: tuple = MODES
    causal: tuple = (False, True)
    memory_seqlens: tuple = ()
    reps: int = 3


def attention_sweep(device: str, quick: bool) -> AttentionSweep:
    if device == "cuda":
        if quick:
            return AttentionSweep((1024, 4096), 16384, (64,), 2048, "bf16",
                                  memory_seqlens=(1024, 4096, 16384))
        return AttentionSweep((512, 1024, 2048, 4096, 8192, 16384), 16384, (64, 128), 2048, "bf16",
                              memory_seqlens=(1024, 2048, 4096, 8192, 16384, 32768))
    # CPU: the fused kernels run in the interpreter (~5 ms per tile iteration); small shapes.
    # Memory needs no speed: naive attention's N x N scores pass a gigabyte at N = 16384.
    if quick:
        return AttentionSweep((128, 256), 256, (64,), 128, "fp32", causal=(False, True),
                              memory_seqlens=(1024, 2048, 4096, 8192), reps=2)
    return AttentionSweep((128, 256, 512), 512, (64, 128), 256, "fp32",
                          memory_seqlens=(1024, 2048, 4096, 8192, 16384), reps=3)


# The memory sweeps run the interpreted forward at N up to 16K: 256 x 256 tiles cut its
# iterations 32x against the test tiles (INTERPRETER_CONFIGS in kernels/attention.py).
INTERPRETER_TILES = {"fwd": (256, 256, 4, 1)}  # kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)


@contextlib.contextmanager
def interpreter_tiles(tiles: dict | None = None):
    """Within the block, the interpreted attention kernels use `tiles` ({kernel: (BLOCK_M,
    BLOCK_N, num_warps, num_stages)}, default INTERPRETER_TILES) in place of the test tiles. The
    bytes a call allocates (out and lse) do not depend on the tiles: tiles live in
    registers/shared memory on a GPU. A no-op when the kernels are compiled (GPU_CONFIGS).

    Non-mutating: kernels.attention.interpreter_configs binds the kernels' table name to a
    merged copy for the block and binds the shipped dict back on exit. Process-wide while the
    block runs."""
    from tritformer.kernels import attention as K
    from tritformer.kernels._launch import is_interpreted
    if not is_interpreted(K._attn_fwd):
        yield
        return
    with K.interpreter_configs({name: K._cfg(*tile) for name, tile in
                                (INTERPRETER_TILES if tiles is None else tiles).items()}):
        yield


_large_interpreter_tiles = interpreter_tiles  # its former name


def _qkv(batch, heads, n, d, dtype, device, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float32)
            .to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _max_error(provider: Provider, q, k, v, causal) -> float:
    from .. import reference
    with torch.no_grad():
        out = provider.fn(q, k, v, causal)
        ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    return float((out.double() - ref).abs().max())


def _attention_call(p: Provider, q, k, v, causal, mode) -> Callable[[], object]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return p.fn(q, k, v, causal)
        return fwd
    do = torch.randn_like(q)
    if mode == "fwd_bwd":
        return lambda: torch.autograd.grad(p.fn(q, k, v, causal), (q, k, v), do)
    out = p.fn(q, k, v, causal)  # bwd: the graph is built once and replayed
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def bench_attention(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                    progress: Callable[[str], None], skipped: dict) -> None:
    """Run the attention sweeps; `emit` receives one row dict per measurement."""
    sweep = attention_sweep(device, quick)
    active = _active_providers(attention_providers(), providers, device, DTYPES[sweep.dtype],
                               skipped, "attention")
    dtype = DTYPES[sweep.dtype]

    def row(p, mode, metric, unit, x, value, p20, p80, batch, heads, d, causal):
        emit(dict(op="attention", provider=p.name, backend=p.backend(device), mode=mode,
                  metric=metric, unit=unit, x_name="seqlen", x_value=x, value=value, p20=p20,
                  p80=p80, batch=batch, heads=heads, head_dim=d, causal=causal,
                  dtype=sweep.dtype))

    for d in sweep.head_dims:
        heads = max(1, sweep.model_dim // d)
        for n in sweep.seqlens:
            batch = max(1, sweep.tokens // n)
            for causal in sweep.causal:
                for p in active:
                    progress(f"attention {p.name} D={d} N={n} causal={causal}")
                    q, k, v = _qkv(batch, heads, n, d, dtype, device, grad=False)
                    row(p, "fwd", "max_error", "abs", n, _max_error(p, q, k, v, causal), None,
                        None, batch, heads, d, causal)
                    for mode in sweep.modes:
                        q, k, v = _qkv(batch, heads, n, d, dtype, device, grad=mode != "fwd")
                        fn = _attention_call(p, q, k, v, causal, mode)
                        med, p20, p80 = time_ms(fn, device, sweep.reps,
                                                adaptive=adaptive_timing(p.backend(device)))
                        row(p, mode, "latency", "ms", n, med, p20, p80, batch, heads, d, causal)
                        if device == "cuda":  # a TFLOP/s of the interpreter would mean nothing
                            fl = attention_flops(batch, heads, n, n, d, causal, mode)
                            row(p, mode, "tflops", "TFLOP/s", n, fl / med * 1e-9, fl / p80 * 1e-9,
                                fl / p20 * 1e-9, batch, heads, d, causal)
                        row(p, mode, "peak_memory", "bytes", n, peak_bytes(fn, device), None, None,
                            batch, heads, d, causal)
    # forward peak memory against sequence length: one sequence, one head
    d = sweep.head_dims[0]
    with interpreter_tiles():
        for n in sweep.memory_seqlens:
            for p in active:
                progress(f"attention memory {p.name} N={n}")
                q, k, v = _qkv(1, 1, n, d, dtype, device, grad=False)
                with torch.no_grad():
                    value = peak_bytes(lambda: p.fn(q, k, v, True), device)
                emit(dict(op="attention", provider=p.name, backend=p.backend(device), mode="fwd",
                          metric="peak_memory", unit="bytes", x_name="seqlen", x_value=n,
                          value=value, p20=None, p80=None, batch=1, heads=1, head_dim=d,
                          causal=True, dtype=sweep.dtype))


def attention_cases(device: str, quick: bool, providers: list[str]) -> int:
    """The progress steps of bench_attention (one per provider and sweep point)."""
    sweep = attention_sweep(device, quick)
    n = len(_active_providers(attention_providers(), providers, device, DTYPES[sweep.dtype], {},
                              "attention"))
    return n * (len(sweep.head_dims) * len(sweep.seqlens) * len(sweep.causal)
                + len(sweep.memory_seqlens))


bench_attention.cases = attention_cases


# ---------------------------------------------------------------------------------------------
# Shared by the masked and varlen sweeps
# ---------------------------------------------------------------------------------------------
def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.to(torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def _reference64(q, k, v, causal, attn_mask=None, key_padding_mask=None,
                 budget=1 << 28) -> torch.Tensor:
    """reference.attention in float64, per batch row and chunk of heads so that the float64
    scores stay under `budget` bytes (the GPU sweeps' shapes would not fit at once)."""
    from .. import reference
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    group = H // k.shape[1]
    hc = max(group, min(H, budget // max(1, n_q * n_k * 8)) // group * group)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    with torch.no_grad():
        for b in range(B):
            for h in range(0, H, hc):
                am = None
                if attn_mask is not None:
                    am = attn_mask[b:b + 1] if attn_mask.dim() == 4 else attn_mask
                    if am.dim() == 4 and am.shape[1] > 1:
                        am = am[:, h:h + hc]
                out[b:b + 1, h:h + hc] = reference.attention(
                    q[b:b + 1, h:h + hc].double(), k[b:b + 1, h // group:(h + hc) // group].double(),
                    v[b:b + 1, h // group:(h + hc) // group].double(), causal=causal,
                    attn_mask=am, key_padding_mask=None if key_padding_mask is None
                    else key_padding_mask[b:b + 1])
    return out
