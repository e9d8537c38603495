"""Launch plumbing shared by the kernels: launch plans, per-architecture config choice, autotuning.

A launcher first builds a list of `Launch` plans (kernel, arguments, candidate configs, grid) and
then runs them. `python -m tritformer inspect` builds the same plans from meta tensors and
compiles them ahead of time, so what is inspected is exactly what would run.

Configs: on a GPU every kernel has a per-architecture candidate list; when it holds more than one
config, a `triton.autotune` wrapper (built lazily at the first launch, never at import) benchmarks
them on the device. In Triton's interpreter (no GPU) the single `interpreter` config runs as is:
the autotuner's benchmarker needs a driver and is never invoked.

Tuning keys: a launch names the arguments whose change re-runs the autotuner (`tune_key`); those
of them that are sequence lengths or token counts (`bucketed`) enter the key rounded up to a power
of two (`tune_bucket`), so that a training run whose batches all have different lengths (varlen)
tunes once per power-of-two bucket instead of at every new length. `run` keeps one Triton
autotuner per bucket, keyed by Triton on the exact remaining names: the kernels receive exactly
the arguments they did before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable

import torch
import triton

# Shared memory per block, opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, per
# config family (arch_family): sm_80 A100 163 KB; sm_86/sm_89 (RTX 30xx/40xx, A10, A40, L4, L40)
# 99 KB; sm_90 H100/H200 227 KB; sm_120 (RTX 50xx, RTX PRO Blackwell) 99 KB.
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 90: 232_448, 120: 101_376}


@dataclasses.dataclass
class Launch:
    name: str                      # kernel name for reports
    fn: Any                        # the @triton.jit function (JITFunction or InterpretedFunction)
    args: dict[str, Any]           # runtime arguments by name, in signature order
    constexprs: dict[str, Any]     # compile-time arguments that do not depend on the config
    grid: Callable[[dict], tuple]  # config kwargs -> launch grid
    configs: list[triton.Config]   # candidates; one when interpreting
    tune_key: list[str]            # argument names whose change re-runs the autotuner
    bucketed: tuple = ()           # those of tune_key that enter it rounded up (tune_bucket)


def is_interpreted(fn) -> bool:
    """True when `fn` was decorated while TRITON_INTERPRET was set (it runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


def arch_family(capability: int) -> int:
    """Config table used for a compute capability (keys of SHARED_MEMORY_LIMIT):
    120 for sm_120 and newer consumer Blackwell (99 KB, mma.sync: no wgmma), 90 for sm_90 up to
    sm_11x (Hopper, datacenter Blackwell: 227 KB), 80 for sm_80 (A100: 163 KB) and, as before,
    anything older, 86 for the other sm_8x (sm_86, sm_89; sm_87 too: its 163 KB is not confirmed
    here, so it gets the 99 KB table, which fits either way)."""
    if capability >= 120:
        return 120
    if capability >= 90:
        return 90
    return 80 if capability <= 80 else 86


def device_arch(t: torch.Tensor) -> int | None:
    """Compute capability as an int (80, 86, 90 ...) of a CUDA tensor's device; None otherwise."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


# In-tile element offsets (tile index x stride) and tile steps (BLOCK x stride) are int32 in the
# kernels, as in Triton's attention tutorial: 64-bit offsets per element cost registers. With
# tiles of at most 256 along an axis, strides below 2^31 / 512 keep them in range even summed over
# a tile's two axes. Base offsets (batch, head, tile start) are int64 and take any stride.
MAX_TILE_STRIDE = 2 ** 31 // 512


def int32_tiles(t: torch.Tensor, dims: tuple = (-2, -1)) -> torch.Tensor:
    """t, or a contiguous copy of it when a stride along one of its tiled `dims` is so large
    (a strided view, e.g. one sequence position every 2^22 elements) that an in-tile offset
    could wrap around int32. Measured without it: the attention kernel's K tile at stride 2^27
    loaded from -2^31 elements (the interpreter's bounds checker, tests/test_large_offsets.py)."""
    if all(t.shape[d] <= 1 or abs(t.stride(d)) < MAX_TILE_STRIDE for d in dims):
        return t
    return t.contiguous()


# CUDA's grid limits: 2^31 - 1 blocks on axis x, 65,535 on y and z. Every launcher puts all its
# programs on axis x (flat_grid) and decodes (tile, head, batch) in the kernel, so batch and head
# counts of any size the checks accept launch.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def flat_grid(*sizes: int) -> tuple:
    """A one-axis grid of prod(sizes) programs (the kernel decodes the index, first size
    fastest); ValueError past CUDA's 2^31 - 1."""
    n = 1
    for size in sizes:
        n *= int(size)
    if n > MAX_GRID[0]:
        raise ValueError(f"the launch needs {n} programs ({' x '.join(map(str, sizes))}), more than "
                         f"CUDA's grid limit of {MAX_GRID[0]}: split the batch")
    return (n,)


_TUNERS: dict[tuple, Any] = {}

# Triton's interpreter swaps `triton.language`'s functions for interpreted ones for the duration
# of each launch (and restores them after): two interpreted launches overlapping in time, from
# two Python threads, break each other (InterpreterError). Interpreted launches are serialised;
# compiled launches run concurrently as CUDA launches do.
INTERPRETER_LOCK = threading.RLock()
NO_LOCK = contextlib.nullcontext()


def launch_lock(interpreted: bool):
    """The context a launch runs in: INTERPRETER_LOCK for interpreted kernels, else NO_LOCK."""
    return INTERPRETER_LOCK if interpreted else NO_LOCK


def run(launch: Launch) -> None:
    """Run a plan: the single config directly, or several through a cached autotuner."""
    interpreted = is_interpreted(launch.fn)
    if len(launch.configs) == 1 or interpreted:
        cfg = launch.configs[0]
        kwargs = dict(launch.constexprs, **cfg.kwargs)
        if not interpreted:
            kwargs.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        with launch_lock(interpreted):
            launch.fn[launch.grid(cfg.kwargs)](*launch.args.values(), **kwargs)
        return
    exact = [name for name in launch.tune_key if name not in launch.bucketed]
    # every compile-time argument is part of the key, named in tune_key or not: a config tuned
    # for one specialisation (e.g. descriptor loads) is never reused for another
    exact += [name for name in launch.constexprs if name not in exact]
    values = {**launch.args, **launch.constexprs}
    buckets = tuple((name, tune_bucket(values[name])) for name in launch.bucketed)
    key = (launch.name, tuple(str(c) for c in launch.configs), tuple(exact), buckets)
    tuner = _TUNERS.get(key)
    if tuner is None:
        # one autotuner per bucket; Triton's own key (the exact names, and the dtypes) within it
        tuner = triton.autotune(configs=launch.configs, key=exact)(launch.fn)
        tuner = _TUNERS.setdefault(key, tuner)
    tuner[launch.grid](*launch.args.values(), **launch.constexprs)


def tune_bucket(n: int) -> int:
    """The value a sequence length or token count `n` takes in a tuning key: the next power of
    two (at least 16, the smallest tile): 100, 120 and 127 tune once (128), 200 and 250 once
    (256)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))
