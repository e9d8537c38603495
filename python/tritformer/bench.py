"""Benchmark harness: `python -m tritformer bench` and the pytest-benchmark tests in benchmarks/.

One measurement per row, in tidy columns (`COLUMNS`), written as CSV and JSON, drawn as PNG plots.

What is measured where:
- CUDA: latency (median, p20, p80 of `triton.testing.do_bench`), TFLOP/s (GB/s for softmax),
  each also as a fraction of the datasheet peak on known GPUs (`DEVICE_PEAKS`), peak memory
  (`torch.cuda.max_memory_allocated` above what was allocated before the call), max error.
- CPU: the fused kernels run in Triton's interpreter. Their latencies are interpreter times
  (the rows say backend=triton-interpreter) and say nothing about GPU speed; no TFLOP/s is
  reported for them. What a CPU measures meaningfully is memory: the bytes each provider's call
  allocates (peak over the call, from the PyTorch profiler's allocation events) against sequence
  length, fused O(N) against naive O(N^2), and every provider's max error against float64.

FLOP counts (FlashAttention's benchmark convention):
    attention forward   4 * B * H * P * D       P = visible (query, key) pairs:
                                                Nq * Nk, or under the bottom-right causal mask
                                                sum_i clamp(i + Nk - Nq + 1, 0, Nk)
    attention backward  2.5 * forward           (5 matmuls against the forward's 2)
    forward + backward  3.5 * forward
    ffn forward         2 * M * (in * hidden + hidden * out)   (gated: 3 matmuls of M x in x I)
    ffn backward        2 * forward
    masked forward      4 * D * P_masked            P_masked = visible (query, key) pairs summed
                                                over batch and heads: (i, j) is visible iff
                                                the causal condition holds (if causal), the
                                                bool attn_mask[b, h, i, j] is True and
                                                key_padding_mask[b, j] is False. Padded query
                                                rows count too: the masked call computes them.
    varlen forward      sum_s 4 * H * P_s * D       P_s = visible pairs of packed sequence s:
                                                n_q,s * n_k,s, or causal (bottom-right within
                                                the sequence) as in the attention line
    masked / varlen backward and forward + backward: 2.5 and 3.5 * forward, as attention
    gpt forward         2 * M * W + sum_layers 4 * B * P * C
                                                M = B * T tokens, W = weights of every Linear
                                                (lm_head included; embeddings are lookups),
                                                P = causal visible pairs of T, C = n_embd
    gpt backward        2 * forward (the attention part 2.5x, counted as 2x: a lower bound)
    gpt decode          one new token per row against a cache of T - 1: 2 * B * W + L * 4 * B * T * C
Bytes for GB/s (the minimum a kernel must move): softmax forward reads x (+ the mask as
stored) and writes y; backward reads y and dy and writes dx. FFN forward reads x [M, d] and
the weights W (all matrices and biases) and writes y [M, d]: (2·M·d + W)·itemsize; backward
reads dy, x, W and writes dx and dW: (3·M·d + 2·W)·itemsize.

`--op masked` runs two sweeps, with rows op=masked_padding and op=masked_dense:
- masked_padding: a padded batch, key_padding_mask [B, N] (True = pad), each batch row's valid
  length drawn uniformly from [N/2, N] (~25% padding). naive = reference.attention with the
  mask; sdpa = torch SDPA with the equivalent bool attn_mask [B, 1, N, N] (True = attend; the
  causal mask folded in), built inside the timed call as a user would; flash_attn = unpad,
  flash_attn_varlen_func, pad back (what flash_attn's bert_padding does); flex = a mask_mod over
  the same mask. max_error is taken over the valid query rows (padded rows are don't-care in a
  padded batch, and flash_attn's unpadded path leaves them 0).
- masked_dense: a dense bool attn_mask [B, 1, N, N] (a document mask: each row packs documents
  of random lengths, a token attends within its document), broadcast over heads. The fused
  kernel reads it tile by tile; naive materialises the scores. flash_attn takes no dense mask.
  Both also run a forward peak-memory sweep (B = 1, H = 1, causal) over longer sequences.
`--op gpt`: the reference GPT (tritformer.models.GPT) end to end, providers naive (naive
attention, unfused MLP), sdpa (torch SDPA, unfused MLP) and tritformer (fused attention, fused
FFN with the residual in its epilogue); x = sequence length T with batch * T constant. Modes fwd
(logits and loss), fwd_bwd (a training step's forward and backward) and decode (one token
against a KV cache of T - 1 positions: tritformer's split-KV decode kernel); max_error = the
logits against the float64 naive model.
`--op varlen`: packed sequences (q/k/v [total, H, D], int32 cu_seqlens); x = the longest
sequence (max_seqlen), the other lengths drawn uniformly from [max/4, max] until the total
reaches the tokens of the attention sweep (batch * seqlen); the batch column = number of
sequences. naive = reference.varlen_attention (a per-sequence loop); sdpa = what users do
without varlen: pad to [num_seqs, H, max_seqlen, D], a bool key-padding (+ causal) mask, SDPA,
unpad (the padding copies are inside the timed call); tritformer = varlen_attention; flash_attn
= flash_attn_varlen_func; flex = a document mask_mod over the packed tokens.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch

OPS = ("attention", "masked", "varlen", "softmax", "ffn", "gated_ffn", "gpt")
IMPLEMENTED_OPS = OPS
PROVIDERS = ("naive", "sdpa", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
             "tritformer", "flash_attn", "flex")
# sdpa = torch's default dispatch; sdpa_<backend> pins one SDPA backend (attention op only;
# flash / efficient / cudnn are CUDA kernels, math runs everywhere)
# softmax / FFN: the unfused PyTorch sequence ("naive") against the fused kernels; for the FFNs
# also "tritformer_recompute" (recompute=True), whose point is the saved_bytes metric
MODES = ("fwd", "bwd", "fwd_bwd")
COLUMNS = ("op", "provider", "backend", "mode", "metric", "unit", "x_name", "x_value", "value",
           "p20", "p80", "batch", "heads", "head_dim", "causal", "dtype", "device", "torch",
           "triton", "tritformer", "timestamp")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def masked_visible_pairs(batch: int, heads: int, n_q: int, n_k: int, causal: bool,
                         attn_mask: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None) -> int:
    """Visible (query, key) pairs summed over batch and heads (module docstring, P_masked):
    causal bottom-right, bool attn_mask (True = attend, broadcastable to [B, H, Nq, Nk]),
    key_padding_mask [B, Nk] (True = pad)."""
    if attn_mask is None:  # O(B * Nk): a key j is seen by the queries i >= j - (Nk - Nq)
        seen = torch.full((n_k,), n_q, dtype=torch.int64)
        if causal:
            j = torch.arange(n_k, dtype=torch.int64)
            seen = (n_q - (j - (n_k - n_q))).clamp(0, n_q)
        if key_padding_mask is None:
            return int(seen.sum()) * batch * heads
        valid = (~key_padding_mask).to("cpu", torch.int64)
        return int((valid * seen).sum()) * heads
    if attn_mask.dtype != torch.bool:
        raise TypeError("visible pairs are defined for bool masks")
    keep = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if causal:
        from . import reference
        keep = keep & reference.causal_mask(n_q, n_k, keep.device)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :].to(keep.device)
    shape = torch.broadcast_shapes(keep.shape, (batch, heads, n_q, n_k))
    repeat = 1
    for have, want in zip(keep.shape, shape):
        repeat *= want // have  # a broadcast dimension repeats the pairs counted
    return int(keep.sum()) * repeat


def masked_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool,
                 mode: str, attn_mask=None, key_padding_mask=None) -> float:
    pairs = masked_visible_pairs(batch, heads, n_q, n_k, causal, attn_mask, key_padding_mask)
    return 4.0 * pairs * head_dim * _MODE_FACTOR[mode]


def varlen_visible_pairs(seqlens_q, seqlens_k, causal: bool) -> int:
    """Visible pairs of one head over packed sequences (causal: bottom-right per sequence)."""
    return sum(visible_pairs(int(nq), int(nk), causal) for nq, nk in zip(seqlens_q, seqlens_k))


def varlen_flops(seqlens_q, seqlens_k, heads: int, head_dim: int, causal: bool,
                 mode: str) -> float:
    fwd = 4.0 * heads * varlen_visible_pairs(seqlens_q, seqlens_k, causal) * head_dim
    return fwd * _MODE_FACTOR[mode]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_ms(fn: Callable[[], object], device: str, reps: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: do_bench on CUDA, a wall-clock timer (1 warm-up) on CPU."""
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _percentiles(samples)


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's C++ side prints start/stop and allocator notes on fd 2; hide them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes the call allocates beyond what was live before it (outputs included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


# ---------------------------------------------------------------------------------------------
# Attention providers: fn(q, k, v, causal) on [B, H, N, D] tensors, Nq == Nk in the sweeps
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Provider:
    name: str
    fn: Callable
    why_not: Callable[[str, torch.dtype], Optional[str]]  # None when usable, else the reason
    backend: Callable[[str], str]


def _naive(q, k, v, causal):
    from . import reference
    return reference.attention(q, k, v, causal=causal)


def _tritformer(q, k, v, causal):
    from .ops.attention import attention
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


def _module_missing(mod: str) -> Optional[str]:
    import importlib.util
    return None if importlib.util.find_spec(mod) else f"{mod} is not installed"


def _cuda_only(name: str, mod: str | None = None):
    def why(device, dtype):
        if device != "cuda":
            return f"{name} runs on CUDA only"
        if mod and _module_missing(mod):
            return _module_missing(mod)
        if name == "flash_attn" and dtype == torch.float32:
            return "flash_attn takes fp16/bf16 only"
        return None
    return why


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
# Sweeps
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


@contextlib.contextmanager
def _large_interpreter_tiles():
    """The memory sweep runs the interpreted forward at N up to 16K; 256 x 256 tiles cut its
    iterations 32x against the test tiles. The bytes a call allocates (out and lse) do not
    depend on the tiles: tiles live in registers/shared memory on a GPU."""
    from tritformer.kernels import attention as K
    saved = dict(K.INTERPRETER_CONFIGS)
    if K.is_interpreted(K._attn_fwd):
        K.INTERPRETER_CONFIGS["fwd"] = K._cfg(256, 256, 4, 1)
    try:
        yield
    finally:
        K.INTERPRETER_CONFIGS.update(saved)


# Datasheet peaks (dense, no sparsity) of known GPUs, matched by a substring of the device name:
# (TFLOP/s by dtype for tensor-core math; fp32 = what our fp32 paths use, 3xTF32 / FMA, so the
# non-tensor fp32 peak), memory GB/s. Fractions are reported only for these.
DEVICE_PEAKS = {
    "H100": ({"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, 3350.0),   # H100 SXM5
    "A100": ({"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0),   # A100 SXM4 80GB
}


def device_peak(device_name: str, dtype_name: str) -> tuple[float, float] | None:
    """(peak TFLOP/s, peak GB/s) of a known device for this dtype, else None."""
    for key, (tflops, gbps) in DEVICE_PEAKS.items():
        if key in device_name and dtype_name in tflops:
            return tflops[dtype_name], gbps
    return None


def machine_info(device: str) -> dict:
    import triton
    from . import __version__
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "tritformer": __version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _qkv(batch, heads, n, d, dtype, device, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float32)
            .to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _max_error(provider: Provider, q, k, v, causal) -> float:
    from . import reference
    with torch.no_grad():
        out = provider.fn(q, k, v, causal)
        ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    return float((out.double() - ref).abs().max())


def bench_attention(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                    progress: Callable[[str], None], skipped: dict) -> None:
    """Run the attention sweeps; `emit` receives one row dict per measurement."""
    sweep = attention_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    table = attention_providers()
    active = []
    for name in providers:
        reason = table[name].why_not(device, dtype)
        if reason:
            skipped[name] = reason
        else:
            active.append(table[name])

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
                        med, p20, p80 = time_ms(fn, device, sweep.reps)
                        row(p, mode, "latency", "ms", n, med, p20, p80, batch, heads, d, causal)
                        if device == "cuda":  # a TFLOP/s of the interpreter would mean nothing
                            fl = attention_flops(batch, heads, n, n, d, causal, mode)
                            row(p, mode, "tflops", "TFLOP/s", n, fl / med * 1e-9, fl / p80 * 1e-9,
                                fl / p20 * 1e-9, batch, heads, d, causal)
                        row(p, mode, "peak_memory", "bytes", n, peak_bytes(fn, device), None, None,
                            batch, heads, d, causal)
    # forward peak memory against sequence length: one sequence, one head
    d = sweep.head_dims[0]
    with _large_interpreter_tiles():
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


# ---------------------------------------------------------------------------------------------
# Masked attention (key padding, dense bool mask) and packed variable-length sequences
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MaskCase:
    """The masks of one masked sweep point. lengths: valid keys (= valid queries) per batch row
    of a padded batch (right padding), None for the dense mask."""
    attn_mask: Optional[torch.Tensor] = None         # bool [B, 1, N, N], True = attend
    key_padding_mask: Optional[torch.Tensor] = None  # bool [B, N], True = pad
    lengths: Optional[torch.Tensor] = None           # int [B]


def padded_lengths(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Valid lengths of a padded batch: uniform in [N/2, N] (~25% padding on average)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(max(1, n // 2), n + 1, (batch,), generator=gen)


def document_mask(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Bool [B, 1, N, N], True = attend: each row packs documents of lengths drawn from
    [N/8, N/2]; a token attends to the tokens of its own document."""
    gen = torch.Generator().manual_seed(seed)
    doc = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        pos, d = 0, 0
        while pos < n:
            length = int(torch.randint(max(1, n // 8), max(2, n // 2) + 1, (1,), generator=gen))
            doc[b, pos:pos + length] = d
            pos, d = pos + length, d + 1
    return (doc[:, :, None] == doc[:, None, :])[:, None]


def mask_case(variant: str, batch: int, n: int, device: str, seed: int = 0) -> MaskCase:
    if variant == "padding":
        lengths = padded_lengths(batch, n, seed)
        kpm = torch.arange(n)[None, :] >= lengths[:, None]
        return MaskCase(key_padding_mask=kpm.to(device), lengths=lengths.to(device))
    return MaskCase(attn_mask=document_mask(batch, n, seed).to(device))


def _sdpa_keep(case: MaskCase, causal: bool, n_q: int, n_k: int, device) -> Optional[torch.Tensor]:
    """One bool attn_mask for torch SDPA (True = attend): causal, attn_mask and key padding."""
    keep = case.attn_mask
    if case.key_padding_mask is not None:
        kp = ~case.key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if causal:  # bottom-right; Nq == Nk in the sweeps, where it equals SDPA's top-left
        from . import reference
        c = reference.causal_mask(n_q, n_k, device)
        keep = c if keep is None else keep & c
    return keep


def _masked_naive(q, k, v, causal, case):
    from . import reference
    return reference.attention(q, k, v, causal=causal, attn_mask=case.attn_mask,
                               key_padding_mask=case.key_padding_mask)


def _masked_tritformer(q, k, v, causal, case):
    from .ops.attention import attention
    return attention(q, k, v, causal=causal, attn_mask=case.attn_mask,
                     key_padding_mask=case.key_padding_mask)


def _masked_sdpa(q, k, v, causal, case):
    keep = _sdpa_keep(case, causal, q.shape[2], k.shape[2], q.device)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.to(torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def _masked_flash_attn(q, k, v, causal, case):
    """A padded batch through flash_attn: unpad the valid tokens, flash_attn_varlen_func, pad
    back with zeros (flash_attn.bert_padding's approach; right padding, Nq == Nk)."""
    from flash_attn import flash_attn_varlen_func
    B, H, N, D = q.shape
    idx = (~case.key_padding_mask).reshape(-1).nonzero().squeeze(1)
    cu = _cu_seqlens(case.lengths)
    max_len = int(case.lengths.max())
    unpad = lambda t: t.transpose(1, 2).reshape(B * N, t.shape[1], D).index_select(0, idx)  # noqa: E731
    out = flash_attn_varlen_func(unpad(q), unpad(k), unpad(v), cu, cu, max_len, max_len,
                                 causal=causal)
    return out.new_zeros(B * N, H, D).index_copy(0, idx, out).view(B, N, H, D).transpose(1, 2)


def _masked_flex(q, k, v, causal, case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    B, _, n_q, _ = q.shape
    n_k = k.shape[2]
    am, kpm, off = case.attn_mask, case.key_padding_mask, n_k - n_q

    def mask_mod(b, h, i, j):
        keep = (j <= i + off) if causal else (j >= 0)
        if am is not None:
            keep = keep & am[b, 0, i, j]
        if kpm is not None:
            keep = keep & ~kpm[b, j]
        return keep
    block_mask = create_block_mask(mask_mod, B, None, n_q, n_k, device=q.device)
    return _FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def masked_providers(variant: str) -> dict[str, Provider]:
    """Providers of the masked sweeps: fn(q, k, v, causal, case: MaskCase) -> out [B, H, N, D]."""
    base = attention_providers()
    flash_why = _cuda_only("flash_attn", "flash_attn")
    if variant == "dense":
        flash_why = lambda d, t: "flash_attn takes no dense attn_mask"  # noqa: E731
    return {
        "naive": dataclasses.replace(base["naive"], fn=_masked_naive),
        "sdpa": dataclasses.replace(base["sdpa"], fn=_masked_sdpa),
        "tritformer": dataclasses.replace(base["tritformer"], fn=_masked_tritformer),
        "flash_attn": Provider("flash_attn", _masked_flash_attn, flash_why,
                               lambda d: "flash_attn (unpad + varlen)"),
        "flex": dataclasses.replace(base["flex"], fn=_masked_flex),
    }


@dataclasses.dataclass
class Packing:
    """Packed sequences: lengths, int32 cu_seqlens, and the token -> padded-batch indices (the
    per-batch bookkeeping a data loader computes once) for the padded SDPA path."""
    seqlens_q: list
    seqlens_k: list
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    pad_index_q: torch.Tensor  # packed token t -> s * max_seqlen_q + (t - cu_seqlens_q[s])
    pad_index_k: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens_q)


def varlen_lengths(tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """One sequence of max_len, the others uniform in [max_len/4, max_len], until the total
    reaches `tokens` (the last one cut to fit), in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [min(max_len, tokens)]
    while sum(lengths) < tokens:
        n = int(torch.randint(max(1, max_len // 4), max_len + 1, (1,), generator=gen))
        lengths.append(min(n, tokens - sum(lengths)))
    order = torch.randperm(len(lengths), generator=gen).tolist()
    return [lengths[i] for i in order]


def packing(seqlens_q: list, seqlens_k: list, device: str) -> Packing:
    def index(lengths, n_max):
        return torch.cat([s * n_max + torch.arange(n) for s, n in enumerate(lengths)]
                         ).to(device)
    lq, lk = torch.tensor(seqlens_q), torch.tensor(seqlens_k)
    return Packing(list(seqlens_q), list(seqlens_k), _cu_seqlens(lq).to(device),
                   _cu_seqlens(lk).to(device), max(seqlens_q), max(seqlens_k),
                   index(seqlens_q, max(seqlens_q)), index(seqlens_k, max(seqlens_k)))


def _packed_qkv(pk: Packing, heads, d, dtype, device, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, heads, d, generator=gen, dtype=torch.float32)
            .to(device, dtype).requires_grad_(grad)
            for total in (sum(pk.seqlens_q), sum(pk.seqlens_k), sum(pk.seqlens_k))]


def _varlen_naive(q, k, v, causal, pk):
    from . import reference
    return reference.varlen_attention(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, causal=causal)


def _varlen_tritformer(q, k, v, causal, pk):
    from .ops.attention import varlen_attention
    return varlen_attention(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, pk.max_seqlen_q,
                            pk.max_seqlen_k, causal=causal)


def _varlen_sdpa(q, k, v, causal, pk):
    """Without varlen: pad to [S, H, max_seqlen, D], mask keys past each length (and causal,
    bottom-right within each sequence), SDPA, gather the valid rows back."""
    S, nq, nk = pk.num_seqs, pk.max_seqlen_q, pk.max_seqlen_k

    def pad(t, index, n):
        return (t.new_zeros(S * n, *t.shape[1:]).index_copy(0, index, t)
                .view(S, n, *t.shape[1:]).transpose(1, 2))
    lq = torch.tensor(pk.seqlens_q, device=q.device)
    lk = torch.tensor(pk.seqlens_k, device=q.device)
    j = torch.arange(nk, device=q.device)
    keep = (j[None, :] < lk[:, None])[:, None, None, :]  # [S, 1, 1, Nk]
    if causal:
        i = torch.arange(nq, device=q.device)
        keep = keep & (j[None, None, :] <= i[None, :, None] + (lk - lq)[:, None, None])[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        pad(q, pk.pad_index_q, nq), pad(k, pk.pad_index_k, nk), pad(v, pk.pad_index_k, nk),
        attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(S * nq, *q.shape[1:]).index_select(0, pk.pad_index_q)


def _varlen_flash_attn(q, k, v, causal, pk):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, pk.cu_seqlens_q, pk.cu_seqlens_k, pk.max_seqlen_q,
                                  pk.max_seqlen_k, causal=causal)


def _varlen_flex(q, k, v, causal, pk):
    """Packed tokens as one [1, H, T, D] sequence with a document mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    dev = q.device
    lq = torch.tensor(pk.seqlens_q, device=dev)
    lk = torch.tensor(pk.seqlens_k, device=dev)
    doc_q = torch.repeat_interleave(torch.arange(pk.num_seqs, device=dev), lq)
    doc_k = torch.repeat_interleave(torch.arange(pk.num_seqs, device=dev), lk)
    pos_q = torch.arange(q.shape[0], device=dev) - pk.cu_seqlens_q.long()[doc_q]
    pos_k = torch.arange(k.shape[0], device=dev) - pk.cu_seqlens_k.long()[doc_k]
    off = lk - lq

    def mask_mod(b, h, i, j):
        keep = doc_q[i] == doc_k[j]
        if causal:
            keep = keep & (pos_k[j] <= pos_q[i] + off[doc_q[i]])
        return keep
    block_mask = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=dev)
    view = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    out = _FLEX["fn"](view(q), view(k), view(v), block_mask=block_mask,
                      enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def varlen_providers() -> dict[str, Provider]:
    """Providers of the varlen sweep: fn(q, k, v, causal, pk: Packing) -> out [total_q, H, D]."""
    base = attention_providers()
    return {
        "naive": dataclasses.replace(base["naive"], fn=_varlen_naive),
        "sdpa": dataclasses.replace(base["sdpa"], fn=_varlen_sdpa),
        "tritformer": dataclasses.replace(base["tritformer"], fn=_varlen_tritformer),
        "flash_attn": Provider("flash_attn", _varlen_flash_attn,
                               _cuda_only("flash_attn", "flash_attn"),
                               lambda d: "flash_attn (varlen)"),
        "flex": dataclasses.replace(base["flex"], fn=_varlen_flex),
    }


def _reference64(q, k, v, causal, attn_mask=None, key_padding_mask=None,
                 budget=1 << 28) -> torch.Tensor:
    """reference.attention in float64, per batch row and chunk of heads so that the float64
    scores stay under `budget` bytes (the GPU sweeps' shapes would not fit at once)."""
    from . import reference
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


def masked_max_error(p: Provider, q, k, v, causal, case: MaskCase) -> float:
    """Max |out - float64 reference|, over the valid query rows of a padded batch."""
    with torch.no_grad():
        out = p.fn(q, k, v, causal, case)
    diff = (out.double() - _reference64(q, k, v, causal, case.attn_mask,
                                        case.key_padding_mask)).abs()
    if case.key_padding_mask is not None:
        diff = diff.masked_fill(case.key_padding_mask[:, None, :, None], 0.0)
    return float(diff.max())


def varlen_max_error(p: Provider, q, k, v, causal, pk: Packing) -> float:
    with torch.no_grad():
        out = p.fn(q, k, v, causal, pk).double()
    err = 0.0
    cq, ck = pk.cu_seqlens_q.tolist(), pk.cu_seqlens_k.tolist()
    for s in range(pk.num_seqs):  # per sequence: the float64 scores of one at a time
        view = lambda t, c: t[c[s]:c[s + 1]].transpose(0, 1)[None]  # noqa: E731
        if cq[s + 1] == cq[s]:
            continue
        ref = _reference64(view(q, cq), view(k, ck), view(v, ck), causal)
        err = max(err, float((view(out, cq) - ref).abs().max()))
    return err


def _active_providers(table, names, device, dtype, skipped, op) -> list[Provider]:
    active = []
    for name in names:
        if name not in table:
            skipped[f"{op} {name}"] = "a provider of the attention op only"
            continue
        reason = table[name].why_not(device, dtype)
        if reason:
            skipped[f"{op} {name}"] = reason
        else:
            active.append(table[name])
    return active


def masked_sweep(device: str, quick: bool) -> AttentionSweep:
    if device == "cuda":
        if quick:
            return AttentionSweep((1024, 4096), 16384, (64,), 2048, "bf16",
                                  memory_seqlens=(1024, 4096, 16384))
        return AttentionSweep((512, 1024, 2048, 4096, 8192), 16384, (64, 128), 2048, "bf16",
                              memory_seqlens=(1024, 2048, 4096, 8192, 16384))
    # CPU: interpreter times (a masked tile iteration costs tens of ms, backward ~5x forward):
    # tiny shapes, and in --quick one head and the causal case only (~25 s for both variants)
    if quick:
        return AttentionSweep((64, 128), 256, (64,), 64, "fp32", causal=(True,),
                              memory_seqlens=(512, 1024, 2048), reps=1)
    return AttentionSweep((64, 128, 256), 256, (64,), 128, "fp32",
                          memory_seqlens=(1024, 2048, 4096, 8192), reps=3)


def varlen_sweep(device: str, quick: bool) -> AttentionSweep:
    """seqlens: the longest packed sequence; tokens: the packed total."""
    if device == "cuda":
        if quick:
            return AttentionSweep((1024, 4096), 16384, (64,), 2048, "bf16")
        return AttentionSweep((512, 1024, 2048, 4096, 8192), 16384, (64, 128), 2048, "bf16")
    if quick:  # as masked: one head, causal only
        return AttentionSweep((64, 128), 192, (64,), 64, "fp32", causal=(True,), reps=1)
    return AttentionSweep((64, 128, 256), 512, (64,), 128, "fp32", reps=3)


def _leaf_modes(fn, leaves, modes) -> dict:
    fns = _fwd_bwd_fns(fn, leaves, None)
    return {m: fns[m] for m in modes}


def bench_masked(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                 progress: Callable[[str], None], skipped: dict) -> None:
    """Masked attention sweeps (module docstring): rows op=masked_padding and op=masked_dense."""
    sweep = masked_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    for variant in ("padding", "dense"):
        op = f"masked_{variant}"
        active = _active_providers(masked_providers(variant), providers, device, dtype, skipped, op)
        for d in sweep.head_dims:
            heads = max(1, sweep.model_dim // d)
            for n in sweep.seqlens:
                batch = max(1, sweep.tokens // n)
                case = mask_case(variant, batch, n, device, seed=n)
                for causal in sweep.causal:
                    fl = masked_flops(batch, heads, n, n, d, causal, "fwd", case.attn_mask,
                                      case.key_padding_mask)
                    for p in active:
                        progress(f"{op} {p.name} D={d} N={n} causal={causal}")
                        q, k, v = _qkv(batch, heads, n, d, dtype, device, grad=True)
                        err = masked_max_error(p, q, k, v, causal, case)
                        fns = _leaf_modes(lambda: p.fn(q, k, v, causal, case), [q, k, v],
                                          sweep.modes)
                        _timed_rows(op, p.name, p.backend(device), device, fns, "seqlen", n,
                                    dict(batch=batch, heads=heads, head_dim=d, causal=causal),
                                    sweep.dtype, emit, sweep.reps,
                                    flops={m: fl * f for m, f in _MODE_FACTOR.items()},
                                    max_error=err)
        # forward peak memory against sequence length: one sequence, one head, causal
        d = sweep.head_dims[0]
        with _large_interpreter_tiles():
            for n in sweep.memory_seqlens:
                case = mask_case(variant, 1, n, device, seed=n)
                for p in active:
                    progress(f"{op} memory {p.name} N={n}")
                    q, k, v = _qkv(1, 1, n, d, dtype, device, grad=False)
                    with torch.no_grad():
                        value = peak_bytes(lambda: p.fn(q, k, v, True, case), device)
                    emit(dict(op=op, provider=p.name, backend=p.backend(device), mode="fwd",
                              metric="peak_memory", unit="bytes", x_name="seqlen", x_value=n,
                              value=value, p20=None, p80=None, batch=1, heads=1, head_dim=d,
                              causal=True, dtype=sweep.dtype))


def bench_varlen(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                 progress: Callable[[str], None], skipped: dict) -> None:
    """Packed variable-length sequences (module docstring); x = max_seqlen, batch = sequences."""
    sweep = varlen_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    active = _active_providers(varlen_providers(), providers, device, dtype, skipped, "varlen")
    for d in sweep.head_dims:
        heads = max(1, sweep.model_dim // d)
        for n in sweep.seqlens:
            lengths = varlen_lengths(sweep.tokens, n, seed=n)
            pk = packing(lengths, lengths, device)
            for causal in sweep.causal:
                fl = varlen_flops(lengths, lengths, heads, d, causal, "fwd")
                for p in active:
                    progress(f"varlen {p.name} D={d} max_seqlen={n} causal={causal}")
                    q, k, v = _packed_qkv(pk, heads, d, dtype, device, grad=True)
                    err = varlen_max_error(p, q, k, v, causal, pk)
                    fns = _leaf_modes(lambda: p.fn(q, k, v, causal, pk), [q, k, v], sweep.modes)
                    _timed_rows("varlen", p.name, p.backend(device), device, fns, "max_seqlen",
                                n, dict(batch=pk.num_seqs, heads=heads, head_dim=d,
                                        causal=causal),
                                sweep.dtype, emit, sweep.reps,
                                flops={m: fl * f for m, f in _MODE_FACTOR.items()},
                                max_error=err)


# ---------------------------------------------------------------------------------------------
# Softmax and FFN: the unfused PyTorch sequence against the fused kernels
# ---------------------------------------------------------------------------------------------
def _sweep_rows(device: str, quick: bool, gpu: tuple, cpu_quick: tuple, cpu_full: tuple):
    return gpu if device == "cuda" else (cpu_quick if quick else cpu_full)


def _timed_rows(op, name, backend, device, fn_by_mode, x_name, x_value, shape, dtype_name,
                emit, reps, flops=None, bytes_moved=None, max_error=None):
    """Latency (+ TFLOP/s or GB/s on CUDA) and peak memory of each mode, one row each."""
    def row(mode, metric, unit, value, p20=None, p80=None):
        emit(dict(op=op, provider=name, backend=backend, mode=mode, metric=metric, unit=unit,
                  x_name=x_name, x_value=x_value, value=value, p20=p20, p80=p80, **shape,
                  dtype=dtype_name))
    if max_error is not None:
        row("fwd", "max_error", "abs", max_error)
    for mode, fn in fn_by_mode.items():
        med, p20, p80 = time_ms(fn, device, reps)
        row(mode, "latency", "ms", med, p20, p80)
        if device == "cuda" and flops:
            fl = flops[mode]
            row(mode, "tflops", "TFLOP/s", fl / med * 1e-9, fl / p80 * 1e-9, fl / p20 * 1e-9)
        if device == "cuda" and bytes_moved:
            by = bytes_moved[mode]
            row(mode, "gbps", "GB/s", by / med * 1e-6, by / p80 * 1e-6, by / p20 * 1e-6)
        row(mode, "peak_memory", "bytes", peak_bytes(fn, device))


def _fwd_bwd_fns(fn, leaves, grad_out_like):
    def fwd():
        with torch.no_grad():
            return fn()
    out = fn()
    g = torch.randn_like(grad_out_like if grad_out_like is not None else out)
    return {"fwd": fwd,
            "bwd": lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
            "fwd_bwd": lambda: torch.autograd.grad(fn(), leaves, g)}


def bench_softmax(device, quick, providers, emit, progress, skipped) -> None:
    from . import reference
    from .ops.softmax import softmax
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    # rows x columns; attention-score shaped [B, H, N, N] with a causal mask on CUDA
    cols = _sweep_rows(device, quick, (1024, 2048, 4096, 8192, 16384, 65536), (1024, 4096, 32768),
                       (1024, 4096, 16384, 65536, 262144))
    impls = {"naive": lambda x: reference.softmax(x, -1, scale=0.125, causal=True),
             "tritformer": lambda x: softmax(x, -1, scale=0.125, causal=True)}
    for name in providers:
        if name not in impls:
            skipped.setdefault(f"softmax {name}", "not a softmax provider")
    for c in cols:
        rows = max(1, (2 ** 26 if device == "cuda" else 2 ** 16) // c)
        x0 = torch.randn(rows, c, generator=torch.Generator().manual_seed(c)).mul(3).to(device, dtype)
        ref = reference.softmax(x0.double(), -1, scale=0.125, causal=True)
        nbytes = x0.numel() * x0.element_size()
        for name in (n for n in providers if n in impls):
            progress(f"softmax {name} C={c}")
            x = x0.clone().requires_grad_()
            fn = impls[name]
            with torch.no_grad():
                err = float((fn(x0).double() - ref).abs().max())
            _timed_rows("softmax", name, "pytorch" if name == "naive" else _backend(device),
                        device, _fwd_bwd_fns(lambda: fn(x), [x], None), "row_length", c,
                        dict(batch=rows, heads=None, head_dim=None, causal=True), dtype_name, emit,
                        reps=3, bytes_moved={"fwd": 2 * nbytes, "bwd": 3 * nbytes,
                                             "fwd_bwd": 5 * nbytes}, max_error=err)


def _backend(device):
    from .backend import backend_for
    return backend_for(torch.empty(0, device=device))


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of fn() (held between forward and backward)."""
    from torch.autograd.graph import saved_tensors_hooks
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def ffn_bytes(m: int, weight_numels: list[int], d: int, itemsize: int) -> dict:
    """The bytes an FFN call must move at least (module docstring): forward reads x and every
    weight/bias once and writes y; backward reads dy, x and the weights and writes dx and one
    gradient per weight (activations it saved or recomputes are not counted)."""
    w = sum(weight_numels)
    fwd = (m * d + w + m * d) * itemsize
    bwd = (m * d + m * d + w + m * d + w) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def bench_ffn(device, quick, providers, emit, progress, skipped, gated: bool) -> None:
    from . import reference
    from .ops.ffn import ffn, gated_ffn
    op = "gated_ffn" if gated else "ffn"
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    d, hidden = (1024, 4096) if device == "cuda" else (64, 256)
    if gated:
        hidden = hidden * 2 // 3  # Llama's intermediate size keeps the parameter count
    tokens = _sweep_rows(device, quick, (512, 2048, 8192, 16384), (64,), (64, 256))
    gen = torch.Generator().manual_seed(0)
    w = lambda o, i: (torch.randn(o, i, generator=gen) / i ** 0.5).to(device, dtype).requires_grad_()  # noqa: E731
    if gated:
        weights = [w(hidden, d), w(hidden, d), w(d, hidden)]
        impls = {"naive": lambda x: reference.gated_ffn(x, *weights, activation="silu"),
                 "tritformer": lambda x: gated_ffn(x, *weights),
                 "tritformer_recompute": lambda x: gated_ffn(x, *weights, recompute=True)}
        flops_fwd = lambda m: 2 * m * 3 * d * hidden  # noqa: E731
    else:
        weights = [w(hidden, d), torch.zeros(hidden, device=device, dtype=dtype).requires_grad_(),
                   w(d, hidden), torch.zeros(d, device=device, dtype=dtype).requires_grad_()]
        impls = {"naive": lambda x: reference.ffn(x, *weights, activation="gelu"),
                 "tritformer": lambda x: ffn(x, *weights),
                 "tritformer_recompute": lambda x: ffn(x, *weights, recompute=True)}
        flops_fwd = lambda m: 2 * m * 2 * d * hidden  # noqa: E731
    wanted = [n for n in ("naive", "tritformer", "tritformer_recompute")
              if n in providers or (n == "tritformer_recompute" and "tritformer" in providers)]
    for m in tokens:
        x0 = torch.randn(m, d, generator=torch.Generator().manual_seed(m)).to(device, dtype)
        w64 = [t.detach().double() for t in weights]
        x64 = x0.double()
        with torch.no_grad():
            ref = (reference.gated_ffn(x64, *w64, activation="silu") if gated
                   else reference.ffn(x64, *w64, activation="gelu"))
        for name in wanted:
            progress(f"{op} {name} M={m}")
            x = x0.clone().requires_grad_()
            fn = impls[name]
            with torch.no_grad():
                err = float((fn(x0).double() - ref).abs().max())
            leaves = [x, *weights]
            fl = flops_fwd(m)
            _timed_rows(op, name, "pytorch" if name == "naive" else _backend(device), device,
                        _fwd_bwd_fns(lambda: fn(x), leaves, None), "tokens", m,
                        dict(batch=m, heads=None, head_dim=d, causal=None), dtype_name, emit,
                        reps=3, flops={"fwd": fl, "bwd": 2 * fl, "fwd_bwd": 3 * fl},
                        bytes_moved=ffn_bytes(m, [t.numel() for t in weights], d,
                                              x0.element_size()),
                        max_error=err)
            emit(dict(op=op, provider=name, backend="pytorch" if name == "naive" else _backend(device),
                      mode="fwd", metric="saved_bytes", unit="bytes", x_name="tokens", x_value=m,
                      value=saved_bytes(lambda: fn(x)), p20=None, p80=None, batch=m, heads=None,
                      head_dim=d, causal=None, dtype=dtype_name))


GPT_PROVIDERS = {"naive": ("naive", "torch"), "sdpa": ("sdpa", "torch"),
                 "tritformer": ("tritformer", "tritformer")}  # provider: (attn, mlp) backends


def gpt_shape(device: str):
    """GPTConfig fields of the benchmarked model: GPT-2 small on CUDA, a tiny one on CPU."""
    if device == "cuda":
        return dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    return dict(n_layer=1, n_head=2, n_embd=32, vocab_size=256)  # interpreter: tiny


def gpt_flops(model, batch: int, seqlen: int, mode: str) -> float:
    """FLOPs of `mode` (module docstring): matmuls over every Linear + causal attention."""
    cfg = model.config
    w = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if mode == "decode":
        return 2 * batch * w + cfg.n_layer * 4 * batch * seqlen * cfg.n_embd
    fwd = 2 * batch * seqlen * w + cfg.n_layer * 4 * batch * visible_pairs(seqlen, seqlen, True) * cfg.n_embd
    return fwd if mode == "fwd" else 3 * fwd


def bench_gpt(device, quick, providers, emit, progress, skipped) -> None:
    from .models.gpt import GPT, GPTConfig, KVCache
    dtype_name = "bf16" if device == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    seqlens = _sweep_rows(device, quick, (256, 512, 1024), (32,), (32, 128))
    tokens = 8192 if device == "cuda" else 32  # batch * T held constant
    shape = gpt_shape(device)
    for name in providers:
        if name not in GPT_PROVIDERS:
            skipped.setdefault(f"gpt {name}", "not a GPT provider (naive, sdpa, tritformer)")
    names = [n for n in providers if n in GPT_PROVIDERS]
    for t in seqlens:
        b = max(1, tokens // t)
        cfg = GPTConfig(block_size=t, **shape)
        torch.manual_seed(0)
        ref_model = GPT(dataclasses.replace(cfg, attn_backend="naive", mlp_backend="torch"))
        state = ref_model.state_dict()
        idx = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(t)).to(device)
        with torch.no_grad():
            ref = ref_model.double().to(device)(idx, all_logits=True)[0]
        for name in names:
            progress(f"gpt {name} T={t}")
            attn, mlp = GPT_PROVIDERS[name]
            model = GPT(dataclasses.replace(cfg, attn_backend=attn, mlp_backend=mlp))
            model.load_state_dict(state)
            model.to(device, dtype)
            with torch.no_grad():
                err = float((model(idx, all_logits=True)[0].double() - ref).abs().max())
            cache = KVCache(cfg, b, t, device, dtype)
            with torch.no_grad():
                model(idx[:, :-1], kv_cache=cache)  # prefill T - 1 positions

            def decode():
                cache.length = t - 1
                with torch.no_grad():
                    return model(idx[:, -1:], kv_cache=cache)

            def fwd():
                with torch.no_grad():
                    return model(idx, idx)

            def fwd_bwd():
                model.zero_grad(set_to_none=True)
                model(idx, idx)[1].backward()
            backend = "pytorch" if name != "tritformer" else _backend(device)
            _timed_rows("gpt", name, backend, device,
                        {"fwd": fwd, "fwd_bwd": fwd_bwd, "decode": decode}, "seqlen", t,
                        dict(batch=b, heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
                             causal=True), dtype_name, emit, reps=3,
                        flops={m: gpt_flops(model, b, t, m) for m in ("fwd", "fwd_bwd", "decode")},
                        max_error=err)


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


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_results(rows: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.json")]
    with open(paths[0], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return paths + plot_results(rows, out_dir)


def plot_results(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per (op, metric, mode, head_dim): a line per (provider, causal) against x."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["metric"] == "max_error":
            continue
        memory_sweep = r["metric"] == "peak_memory" and r["batch"] == 1 and r["heads"] == 1
        key = (r["op"], r["metric"], r["mode"], r["head_dim"], "seqlen_sweep" if memory_sweep else "")
        groups.setdefault(key, []).append(r)
    paths = []
    for (op, metric, mode, d, tag), rs in sorted(groups.items(), key=str):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lines: dict[tuple, list] = {}
        for r in rs:
            lines.setdefault((r["provider"], r["causal"]), []).append((r["x_value"], r["value"]))
        for (prov, causal), pts in sorted(lines.items(), key=str):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    label=f"{prov}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        if metric in ("peak_memory", "latency"):
            ax.set_yscale("log")
        unit = rs[0]["unit"]
        ax.set_xlabel(rs[0]["x_name"])
        ax.set_ylabel(f"{metric} ({unit})")
        where = rs[0]["device"]
        shape = ""
        if op in ("attention", "masked_padding", "masked_dense"):
            shape = "B=1 H=1" if tag else f"B*N={rs[0]['batch'] * rs[0]['x_value']} H={rs[0]['heads']}"
        elif op == "varlen":
            shape = f"packed, H={rs[0]['heads']}"
        interp = " (Triton interpreter times: not GPU speed)" if (
            metric == "latency" and any("interpreter" in r["backend"] for r in rs)) else ""
        dim = "" if d is None else f"D={d} "
        ax.set_title(f"{op} {mode} {metric}, {dim}{rs[0]['dtype']} {shape}{interp}\n{where}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        name = f"{op}_{metric}_{mode}{'' if d is None else f'_d{d}'}{'_' + tag if tag else ''}.png"
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.4g}"


def format_table(rows: list[dict]) -> str:
    """Terminal table: one line per measurement, peak memory also as a ratio to naive."""
    naive = {(r["op"], r["mode"], r["metric"], r["x_value"], r["batch"], r["heads"],
              r["head_dim"], r["causal"]): r["value"] for r in rows if r["provider"] == "naive"}
    head = (f"{'op':<14} {'provider':<11} {'backend':<22} {'mode':<8} {'D':>4} {'causal':<6} "
            f"{'seqlen':>7} {'metric':<12} {'value':>14} {'p20..p80':>21} {'vs naive':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        key = (r["op"], r["mode"], r["metric"], r["x_value"], r["batch"], r["heads"], r["head_dim"],
               r["causal"])
        ratio = ""
        # interpreter latencies against PyTorch's are no speed ratio: only memory is compared
        comparable = r["metric"] == "peak_memory" or (
            r["metric"] == "latency" and "interpreter" not in r["backend"])
        if comparable and naive.get(key) and r["value"] is not None:
            ratio = f"{r['value'] / naive[key]:.3f}x"
        spread = ("-" if r["p20"] is None else f"{_fmt(r['p20'], r['unit'])}..{_fmt(r['p80'], r['unit'])}")
        val = _fmt(r["value"], r["unit"]) + ("" if r["unit"] == "bytes" else f" {r['unit']}")
        d = "-" if r["head_dim"] is None else r["head_dim"]
        causal = "-" if r["causal"] is None else str(r["causal"])
        out.append(f"{r['op']:<14} {r['provider'][:11]:<11} {r['backend'][:22]:<22} {r['mode']:<8} "
                   f"{d:>4} {causal:<6} {r['x_value']:>7} {r['metric']:<12} "
                   f"{val:>14} {spread:>21} {ratio:>9}")
    return "\n".join(out)


def setup_device() -> str:
    """CUDA when available; else CPU with the kernels in Triton's interpreter (set up here)."""
    if torch.cuda.is_available():
        return "cuda"
    if "tritformer.kernels.attention" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from . import _interp_patch
    _interp_patch.apply()
    return "cpu"


def run(ops=("all",), quick=False, out_dir="bench-results", providers=PROVIDERS,
        progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    device = setup_device()
    info = machine_info(device)
    wanted = OPS if "all" in ops else tuple(ops)
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    t0 = time.time()
    count = [0]

    def emit(r):
        r.update(info)
        rows.append({c: r.get(c) for c in COLUMNS})
        peak = device_peak(info["device"], r.get("dtype") or "")
        if peak and r["metric"] in ("tflops", "gbps"):  # as a fraction of the datasheet peak
            frac = dict(r, metric=r["metric"] + "_peak_fraction", unit="fraction")
            top = peak[0] if r["metric"] == "tflops" else peak[1]
            for c in ("value", "p20", "p80"):
                frac[c] = None if r[c] is None else r[c] / top
            rows.append({c: frac.get(c) for c in COLUMNS})

    def prog(msg):
        count[0] += 1
        if progress:
            progress(f"[{count[0]:3d}] {time.time() - t0:6.1f}s  {msg}")

    for op in wanted:
        if op not in IMPLEMENTED_OPS:
            skipped[f"op {op}"] = "no kernel in this release yet"
            continue
        if op == "attention":
            bench_attention(device, quick, list(providers), emit, prog, skipped)
        elif op == "masked":
            bench_masked(device, quick, list(providers), emit, prog, skipped)
        elif op == "varlen":
            bench_varlen(device, quick, list(providers), emit, prog, skipped)
        elif op == "softmax":
            bench_softmax(device, quick, list(providers), emit, prog, skipped)
        elif op in ("ffn", "gated_ffn"):
            bench_ffn(device, quick, list(providers), emit, prog, skipped, gated=op == "gated_ffn")
        elif op == "gpt":
            bench_gpt(device, quick, list(providers), emit, prog, skipped)
    return rows, skipped


# inspect's kernels behind each benchmarked op
INSPECT_OPS = {"attention": ("attention",), "masked": ("masked",), "varlen": ("varlen",),
               "softmax": ("softmax",), "ffn": ("ffn",), "gated_ffn": ("ffn",),
               "gpt": ("attention", "decode", "ffn")}


def inspect_command(ops, device: str) -> list[str]:
    """`tritformer inspect` argv for the kernels of the benchmarked ops: this GPU's arch family
    (sm_80 / sm_90) on CUDA, both without one; the benchmarks' dtype (bf16 on CUDA; fp16
    elsewhere, whose configs bf16 shares); head dims 64 and 128 (the sweep's)."""
    wanted = OPS if "all" in ops else tuple(ops)
    kernels = sorted({k for op in wanted for k in INSPECT_OPS.get(op, ())})
    if device == "cuda":
        archs = ["sm_90" if torch.cuda.get_device_capability()[0] >= 9 else "sm_80"]
    else:
        archs = ["sm_80", "sm_90"]
    return ["inspect", "--op", *kernels, "--arch", *archs, "--head-dim", "64", "128",
            "--dtype", "bf16" if device == "cuda" else "fp16"]


def run_inspect(ops, device: str, out_dir: Optional[str]) -> tuple[int, str]:
    """Run `tritformer inspect` for the benchmarked kernels in a fresh process (the kernels of
    this one may be interpreted); its table is written to OUT/inspect.txt."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "tritformer", *inspect_command(ops, device)],
                         env=env, capture_output=True, text=True)
    text = res.stdout + (res.stderr if res.returncode else "")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "inspect.txt"), "w") as f:
            f.write(text)
    return res.returncode, text


def main(args) -> int:
    def progress(msg):
        print(f"\r{msg:<78}", end="", file=sys.stderr, flush=True)

    rows, skipped = run(args.op, args.quick, args.out, args.providers, progress)
    print(file=sys.stderr)
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    if not rows:
        print("no measurements")
        return 1
    print(format_table(rows))
    cpu = rows[0]["device"].startswith("cpu")
    if cpu:
        print("\nCPU run: tritformer latencies are Triton-interpreter times; they say nothing about "
              "GPU speed. Memory and max error are the meaningful columns here.")
    for path in write_results(rows, args.out):
        print(f"wrote {path}")
    if getattr(args, "inspect", False):
        print("\ninspect (AOT compile of the benchmarked kernels' shipped configs):", flush=True)
        code, text = run_inspect(args.op, rows[0]["device"].startswith("cpu") and "cpu" or "cuda",
                                 args.out)
        print(text)
        print(f"wrote {os.path.join(args.out, 'inspect.txt')}")
        if code:
            return code
    return 0
