"""`--op decode`: one decoding step (Nq = 1 new query per batch row) against a KV cache, over a
batch x cache-length grid; x = cache_len, the batch column = B, heads = the query heads Hq
(Hkv = Hq / 4: GQA 4:1 on every device).

Each point's cache holds, per batch row, a valid length: row 0 exactly cache_len, the others
uniform in [cache_len / 2, cache_len] (fixed seed per point), so the per-row lengths and masks
matter; positions past a row's length are never valid. Providers, each timed as one call:

- naive: `reference.attention` over the whole cache with a key_padding_mask built from the
  lengths inside the call (matmul, scores [B, Hq, 1, Nmax] materialised);
- sdpa (and sdpa_math, sdpa_efficient pinned): torch SDPA over the whole cache with an explicit
  bool attn_mask [B, 1, 1, Nmax] (True = key j < length_b), built inside the call as a user
  would. GQA: each kv head's Hq / Hkv query heads are folded into the query rows
  ([B, Hkv, Hq / Hkv, D], exact for Nq = 1), so K/V are neither expanded (repeat_interleave: 4x
  the cache) nor sent through SDPA's enable_gqa path;
- tritformer: `tritformer.decode_attention` on the contiguous head-major cache [B, Hkv, Nmax, D]
  with int32 cache_seqlens;
- tritformer_paged: `tritformer.flash_attn_interface.flash_attn_with_kvcache` with a paged cache
  [num_blocks, page, Hkv, D] and an int32 block_table [B, ceil(Nmax / page)]: the pool holds
  just the pages the rows use, in shuffled order (unused table entries point at block 0);
- flash_attn / flash_attn_paged: flash-attn's own `flash_attn_with_kvcache` on the same caches
  (the contiguous one as [B, Nmax, Hkv, D] transposed views), when it is installed, on CUDA,
  fp16/bf16; its paged cache needs pages of a multiple of 256 keys.
`--providers tritformer` brings tritformer_paged, `flash_attn` brings flash_attn_paged.

Pages: 256 keys on CUDA (flash-attn's paged KV cache takes multiples of 256, so both paged
providers read one pool), 16 on CPU (several pages per row at the interpreter's small caches).

Metrics per provider and point: max_error (the output against a float64 reference over each
row's valid keys), latency, GB/s on CUDA (bytes in tritformer.bench's docstring: the K/V of
the valid keys plus q and out, the same count for every provider), peak_memory (bytes the call
allocates beyond what was live: out, masks, split workspaces, gathers). On CPU the fused
kernels run in Triton's interpreter (times are interpreter times, with 64-key tiles:
`interpreter_tiles`); what the CPU rows measure meaningfully is memory and error. On CUDA a
point whose caches do not fit in free memory is skipped, and so is a provider that runs out of
memory at a point (naive's expanded K/V at B=128 x 16K), each with its reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from typing import Callable, Optional

import torch

from .attention import _SDPA_BACKENDS
from .core import DTYPES, Provider, _backend, _timed_rows

DECODE_HEAD_RATIO = 4  # Hq / Hkv of every sweep


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
def decode_bytes(lengths, heads_q: int, heads_kv: int, head_dim: int, itemsize: int,
                 n_q: int = 1) -> int:
    """Bytes a decoding step must move at least: K and V of each row's valid keys, q read and
    out written (cache_seqlens and the block table, B and B * pages int32s, left out)."""
    kv = 2 * sum(int(n) for n in lengths) * heads_kv * head_dim
    return (kv + 2 * len(lengths) * heads_q * n_q * head_dim) * itemsize


# ---------------------------------------------------------------------------------------------
# Sweep and cases
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeSweep:
    batches: tuple
    cache_lens: tuple
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    page_size: int
    reps: int = 3


def decode_sweep(device: str, quick: bool) -> DecodeSweep:
    if device == "cuda":  # a Llama-3-8B-like layer: 32 query heads, 8 kv heads, D = 128
        if quick:
            return DecodeSweep((1, 32), (1024, 16384), 32, 8, 128, "fp16", 256)
        return DecodeSweep((1, 8, 32, 128), (1024, 4096, 16384), 32, 8, 128, "fp16", 256)
    # CPU: the fused kernel runs in the interpreter, whose cost grows with B * Hkv * cache_len
    # (B=4 x 512 keys: ~0.7 s a call on a 2-core CPU): one kv head, fp32, 16-key pages
    if quick:
        return DecodeSweep((1, 4), (128, 512), 4, 1, 64, "fp32", 16, reps=1)
    return DecodeSweep((1, 4, 8), (128, 512, 2048), 4, 1, 64, "fp32", 16, reps=2)


def decode_lengths(batch: int, cache_len: int, seed: int = 0) -> list[int]:
    """Valid keys per row: row 0 holds cache_len, the others uniform in [cache_len/2, cache_len]."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randint(max(1, cache_len // 2), cache_len + 1, (batch - 1,), generator=gen)
    return [cache_len] + rest.tolist()


@dataclasses.dataclass
class DecodeCase:
    """One point's inputs: q [B, Hq, 1, D]; the contiguous cache k, v [B, Hkv, Nmax, D]; the
    same keys paged: k_pages, v_pages [num_blocks, page, Hkv, D] and block_table int32
    [B, ceil(Nmax / page)]; cache_seqlens int32 [B] (= lengths)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_seqlens: torch.Tensor
    lengths: list
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]


def page_count(lengths, page_size: int) -> int:
    """Pages the rows use (the paged pool's blocks)."""
    return sum(-(-int(n) // page_size) for n in lengths)


def _pages(cache: torch.Tensor, page: int, block_table: torch.Tensor, lengths,
           num_blocks: int) -> torch.Tensor:
    """cache [B, Hkv, Nmax, D] as a page pool [num_blocks, page, Hkv, D]: row b's page j
    (keys j * page ...) goes to block block_table[b, j], for the pages its length uses; the
    last page's keys past the length are zeros. One row at a time (no copy of the whole cache)."""
    B, H, n, D = cache.shape
    pool = cache.new_zeros(num_blocks, page, H, D)
    for b, length in enumerate(lengths):
        used = page_count([length], page)
        rows = cache[b, :, :length].transpose(0, 1)  # [length, H, D]
        rows = torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, used * page - length))
        pool[block_table[b, :used].long()] = rows.reshape(used, page, H, D)
    return pool


def decode_case(batch: int, cache_len: int, heads_q: int, heads_kv: int, head_dim: int,
                dtype: torch.dtype, device: str, page_size: int, seed: int = 0,
                lengths: Optional[list] = None) -> DecodeCase:
    lengths = decode_lengths(batch, cache_len, seed) if lengths is None else list(lengths)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)
    q = rand(batch, heads_q, 1, head_dim)
    k = rand(batch, heads_kv, cache_len, head_dim)
    v = rand(batch, heads_kv, cache_len, head_dim)
    max_blocks = -(-cache_len // page_size)
    need = torch.tensor([page_count([n], page_size) for n in lengths])
    used = torch.arange(max_blocks)[None, :] < need[:, None]  # [B, max_blocks]
    num_blocks = max(1, int(need.sum()))
    table = torch.zeros(batch, max_blocks, dtype=torch.int32)  # unused entries: block 0
    table[used] = torch.randperm(num_blocks, generator=gen)[:int(need.sum())].to(torch.int32)
    table = table.to(device)
    return DecodeCase(q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device), lengths,
                      _pages(k, page_size, table, lengths, num_blocks),
                      _pages(v, page_size, table, lengths, num_blocks), table)


def decode_reference64(case: DecodeCase) -> torch.Tensor:
    """float64 attention of each row's query against its valid keys: [B, Hq, 1, D]."""
    from .. import reference
    out = torch.empty(case.q.shape, dtype=torch.float64, device=case.q.device)
    with torch.no_grad():
        for b, n in enumerate(case.lengths):
            out[b:b + 1] = reference.attention(case.q[b:b + 1].double(),
                                               case.k[b:b + 1, :, :n].double(),
                                               case.v[b:b + 1, :, :n].double())
    return out


# ---------------------------------------------------------------------------------------------
# Providers: fn(case: DecodeCase) -> out [B, Hq, 1, D]
# ---------------------------------------------------------------------------------------------
def _valid_keys(case: DecodeCase) -> torch.Tensor:
    """bool [B, Nmax]: True where key j < the row's length."""
    n = case.k.shape[2]
    return torch.arange(n, device=case.k.device)[None, :] < case.cache_seqlens[:, None]


def _decode_naive(case):
    from .. import reference
    return reference.attention(case.q, case.k, case.v, key_padding_mask=~_valid_keys(case))


def _decode_sdpa(case):
    """SDPA over the whole cache with an explicit bool mask; each kv head's query heads folded
    into its query rows (Nq = 1: no causal structure among them)."""
    B, Hq, _, D = case.q.shape
    Hkv = case.k.shape[1]
    keep = _valid_keys(case)[:, None, None, :]  # [B, 1, 1, Nmax]
    out = torch.nn.functional.scaled_dot_product_attention(
        case.q.reshape(B, Hkv, Hq // Hkv, D), case.k, case.v, attn_mask=keep)
    return out.reshape(B, Hq, 1, D)


def _decode_sdpa_pinned(name: str):
    def fn(case):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[name])):
            return _decode_sdpa(case)
    return fn


def _decode_tritformer(case):
    from ..ops.decode import decode_attention
    return decode_attention(case.q, case.k, case.v, case.cache_seqlens)


def _decode_tritformer_paged(case):
    from ..flash_attn_interface import flash_attn_with_kvcache
    return flash_attn_with_kvcache(case.q.transpose(1, 2), case.k_pages, case.v_pages,
                                   cache_seqlens=case.cache_seqlens,
                                   block_table=case.block_table).transpose(1, 2)


def _decode_flash_attn(case):
    from flash_attn import flash_attn_with_kvcache  # [B, N, H, D]: transposed views, no copy
    return flash_attn_with_kvcache(case.q.transpose(1, 2), case.k.transpose(1, 2),
                                   case.v.transpose(1, 2),
                                   cache_seqlens=case.cache_seqlens).transpose(1, 2)


def _decode_flash_attn_paged(case):
    from flash_attn import flash_attn_with_kvcache
    return flash_attn_with_kvcache(case.q.transpose(1, 2), case.k_pages, case.v_pages,
                                   cache_seqlens=case.cache_seqlens,
                                   block_table=case.block_table).transpose(1, 2)


FLASH_ATTN_PAGE_MULTIPLE = 256  # flash-attn 2's paged KV cache: page_block_size % 256 == 0


def _flash_why_not(name: str, page_size: int):
    def why(device, dtype):
        if device != "cuda":
            return f"{name} runs on CUDA only"
        if importlib.util.find_spec("flash_attn") is None:
            return ("flash_attn is not installed" if name == "flash_attn"
                    else f"{name} needs flash_attn, which is not installed")
        if dtype == torch.float32:
            return f"{name} takes fp16/bf16 only"
        import inspect

        import flash_attn
        fn = getattr(flash_attn, "flash_attn_with_kvcache", None)
        if fn is None:
            return f"{name}: this flash_attn has no flash_attn_with_kvcache"
        if name.endswith("_paged"):
            if "block_table" not in inspect.signature(fn).parameters:
                return f"{name}: this flash_attn's flash_attn_with_kvcache takes no block_table"
            if page_size % FLASH_ATTN_PAGE_MULTIPLE:
                return (f"{name} needs pages of a multiple of {FLASH_ATTN_PAGE_MULTIPLE} keys "
                        f"(the sweep's: {page_size})")
        return None
    return why


def _sdpa_pinned_why_not(name: str):
    def why(device, dtype):
        if name == "sdpa_math":
            return None
        if name == "sdpa_flash":
            return f"{name} takes no attn_mask, which the per-row cache lengths need"
        if device != "cuda":
            return f"{name} runs on CUDA only"
        if name == "sdpa_cudnn" and dtype == torch.float32:
            return f"{name} takes fp16/bf16 only"
        return None
    return why


def decode_providers(page_size: int = 16) -> dict[str, Provider]:
    """Providers of the decode sweep: fn(case: DecodeCase) -> out [B, Hq, 1, D]."""
    usable = lambda d, t: None
    return {
        "naive": Provider("naive", _decode_naive, usable, lambda d: "pytorch"),
        "sdpa": Provider("sdpa", _decode_sdpa, usable,
                         lambda d: "sdpa (default dispatch)" if d == "cuda" else "sdpa (cpu)"),
        **{n: Provider(n, _decode_sdpa_pinned(n), _sdpa_pinned_why_not(n),
                       lambda d, n=n: n.replace("_", " ", 1)) for n in _SDPA_BACKENDS},
        "tritformer": Provider("tritformer", _decode_tritformer, usable, _backend),
        "tritformer_paged": Provider("tritformer_paged", _decode_tritformer_paged, usable,
                                     _backend),
        "flash_attn": Provider("flash_attn", _decode_flash_attn,
                               _flash_why_not("flash_attn", page_size),
                               lambda d: "flash_attn (kvcache)"),
        "flash_attn_paged": Provider("flash_attn_paged", _decode_flash_attn_paged,
                                     _flash_why_not("flash_attn_paged", page_size),
                                     lambda d: "flash_attn (kvcache, paged)"),
    }


# a --providers name brings its paged variant along
_PAGED = {"tritformer": "tritformer_paged", "flash_attn": "flash_attn_paged"}


def _decode_active(providers, device: str, sweep: DecodeSweep, skipped: dict) -> list[Provider]:
    table = decode_providers(sweep.page_size)
    names = []
    for name in providers:
        if name not in table:
            skipped[f"decode {name}"] = "not a decode provider"
            continue
        names.append(name)
        if name in _PAGED:
            names.append(_PAGED[name])
    active = []
    for name in dict.fromkeys(names):
        reason = table[name].why_not(device, DTYPES[sweep.dtype])
        if reason:
            skipped[f"decode {name}"] = reason
        else:
            active.append(table[name])
    return active


# ---------------------------------------------------------------------------------------------
# The interpreter's tiles
# ---------------------------------------------------------------------------------------------
INTERPRETER_BLOCK_N = 64  # the split kernel's key tile in the interpreter (the tests' is 16)


@contextlib.contextmanager
def interpreter_tiles(block_n: int = INTERPRETER_BLOCK_N):
    """Within the block, the interpreted decode split kernel takes `block_n` keys per tile (the
    interpreter's cost is per program and loop iteration: 64 runs the CPU sweep ~4x faster than
    the tests' 16, and the split count follows the tile count as on a GPU, whose configs take
    16-128). Binds kernels.decode's INTERPRETER_CONFIGS to a merged copy and back on exit, as
    bench.attention.interpreter_tiles does; a no-op when the kernels are compiled or the module
    does not have that table."""
    try:
        from tritformer.kernels import decode as K
        from tritformer.kernels._launch import is_interpreted
        shipped = K.INTERPRETER_CONFIGS
        active = "split" in shipped and is_interpreted(K._decode_split)
        tile = K._cfg(block_n, 4, 1) if active else None
    except (ImportError, AttributeError, TypeError):
        active = False
    if not active:
        yield
        return
    K.INTERPRETER_CONFIGS = {**shipped, "split": tile}
    try:
        yield
    finally:
        K.INTERPRETER_CONFIGS = shipped


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------
def _cuda_room(batch: int, cache_len: int, sweep: DecodeSweep, lengths) -> Optional[str]:
    """Why a CUDA point does not fit in free memory (None: it does): the contiguous cache, the
    page pool and one contiguous copy of the cache (the paged wrapper's gather, SDPA's math)."""
    item = DTYPES[sweep.dtype].itemsize
    kv = 2 * batch * sweep.heads_kv * cache_len * sweep.head_dim * item
    pages = page_count(lengths, sweep.page_size) * sweep.page_size
    pool = 2 * pages * sweep.heads_kv * sweep.head_dim * item
    need = 2 * kv + pool
    free = torch.cuda.mem_get_info()[0]
    if need <= 0.9 * free:
        return None
    return f"needs ~{need / 2**30:.1f} GiB for its caches, {free / 2**30:.1f} GiB free"


def decode_cases(device: str, quick: bool, providers: list[str]) -> int:
    """The progress steps of bench_decode (one per provider and sweep point)."""
    sweep = decode_sweep(device, quick)
    n = len(_decode_active(providers, device, sweep, {}))
    return n * len(sweep.batches) * len(sweep.cache_lens)


def bench_decode(device: str, quick: bool, providers: list[str], emit: Callable[[dict], None],
                 progress: Callable[[str], None], skipped: dict) -> None:
    """One decoding step over the batch x cache-length grid (module docstring)."""
    sweep = decode_sweep(device, quick)
    dtype = DTYPES[sweep.dtype]
    active = _decode_active(providers, device, sweep, skipped)
    if not active:
        return
    with interpreter_tiles():
        for n in sweep.cache_lens:
            for b in sweep.batches:
                seed = 1000 * n + b
                lengths = decode_lengths(b, n, seed)
                if device == "cuda":
                    why = _cuda_room(b, n, sweep, lengths)
                    if why:
                        skipped[f"decode@B={b},cache_len={n} all"] = why
                        for p in active:
                            progress(f"decode {p.name} B={b} cache_len={n} (skipped)")
                        continue
                case = decode_case(b, n, sweep.heads_q, sweep.heads_kv, sweep.head_dim, dtype,
                                   device, sweep.page_size, seed, lengths)
                ref = decode_reference64(case)
                moved = decode_bytes(lengths, sweep.heads_q, sweep.heads_kv, sweep.head_dim,
                                     dtype.itemsize)
                for p in list(active):
                    progress(f"decode {p.name} B={b} cache_len={n}")
                    try:
                        with torch.no_grad():
                            err = float((p.fn(case).double() - ref).abs().max())

                        def call(p=p, case=case):
                            with torch.no_grad():
                                return p.fn(case)
                        _timed_rows("decode", p.name, p.backend(device), device, {"fwd": call},
                                    "cache_len", n, dict(batch=b, heads=sweep.heads_q,
                                                         head_dim=sweep.head_dim, causal=None),
                                    sweep.dtype, emit, sweep.reps, bytes_moved={"fwd": moved},
                                    max_error=err)
                    except torch.OutOfMemoryError:  # e.g. naive's expanded K/V at B=128 x 16K
                        skipped[f"decode@B={b},cache_len={n} {p.name}"] = "out of memory"
                        torch.cuda.empty_cache()
                    except RuntimeError as e:
                        if p.name not in _SDPA_BACKENDS:
                            raise
                        # a pinned SDPA backend that cannot take these inputs raises
                        skipped[f"decode {p.name}"] = (
                            f"{p.name} refused the call: {str(e).strip().splitlines()[0][:200]}")
                        active.remove(p)
                del case, ref
                if device == "cuda":
                    torch.cuda.empty_cache()


bench_decode.cases = decode_cases

