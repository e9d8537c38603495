"""Autotuning keys with bucketed lengths (issue #18 item 3), without a GPU.

On a GPU a launch with several candidate configs goes through a `triton.autotune` wrapper
(kernels/_launch.run). Its key held the exact sequence lengths, so every new length (each varlen
batch in training) re-ran the benchmarks. The lengths now enter the key rounded up to a power of
two. These tests build the real launch plans (meta tensors, the sm_90 / sm_86 tables), stand in a
recording object for the compiled kernel and a stub for the benchmarker, and count how often
Triton's own Autotuner benchmarks.
"""
import dataclasses
import functools

import pytest
import torch
import triton

from tritformer.kernels import _launch
from tritformer.kernels import attention as KA
from tritformer.kernels import decode as KD
from tritformer.kernels import ffn as KF


class _Compiled:
    """What the autotuner needs of a compiled kernel (arg_names, fn, run): records launches."""

    def __init__(self, kernel):
        self.arg_names = list(kernel.arg_names)
        self.fn = kernel.fn  # the Python function (Autotuner looks for it to name the kernel)
        self.launches = []   # (positional args, kwargs)

    def run(self, *args, **kwargs):
        self.launches.append((args, kwargs))

    def __getitem__(self, grid):  # a single-config launch calls the kernel directly
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)


@pytest.fixture
def tuning(monkeypatch):
    """Fresh tuner cache; triton.autotune with a benchmarker that counts its calls and prefers
    the first config. Yields the counter: {"benchmarks": n}."""
    count = {"benchmarks": 0}

    def bench(kernel_call, quantiles=None):
        kernel_call()
        count["benchmarks"] += 1
        return [float(count["benchmarks"])] * 3

    monkeypatch.setattr(_launch, "_TUNERS", {})
    monkeypatch.setattr(triton, "autotune", functools.partial(triton.autotune, do_bench=bench))
    return count


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _run_plans(plans, fakes: dict):
    """Run each plan with its kernel replaced by the recording stand-in (one per kernel name)."""
    for launch in plans:
        fake = fakes.setdefault(launch.name, _Compiled(launch.fn))
        _launch.run(dataclasses.replace(launch, fn=fake))


def _tunes(count, n_configs):
    assert count["benchmarks"] % n_configs == 0
    return count["benchmarks"] // n_configs


def test_tune_bucket():
    assert [_launch.tune_bucket(n) for n in (1, 16, 17, 100, 127, 128, 129, 250)] == \
        [16, 16, 32, 128, 128, 128, 256, 256]


def _fwd_plan(n, d=64, causal=True, arch=90):
    q, k, v, o = (_meta(2, 4, n, d) for _ in range(4))
    lse = _meta(2, 4, n, dtype=torch.float32)
    opts = KA.Options(scale=d ** -0.5, right=0 if causal else None)
    return KA.plan_forward(q, k, v, o, lse, opts, arch)


@pytest.mark.parametrize("arch", [90, 86])
def test_attention_forward_tunes_once_per_power_of_two(tuning, arch):
    fakes = {}
    lengths = (100, 120, 127, 200, 250)
    for n in lengths:
        _run_plans(_fwd_plan(n, arch=arch), fakes)
    n_configs = len(_fwd_plan(100, arch=arch)[0].configs)
    assert n_configs > 1
    assert _tunes(tuning, n_configs) == 2  # buckets 128 and 256
    # the kernel still receives the exact lengths, in the benchmarks and in the launches
    names = fakes["attn_fwd"].arg_names
    seen = [dict(zip(names, args)) for args, _ in fakes["attn_fwd"].launches]
    assert sorted({a["N_Q"] for a in seen}) == list(lengths)
    assert sorted({a["MAX_SEQLEN"] for a in seen}) == list(lengths)


def test_attention_non_length_keys_still_retune(tuning):
    fakes = {}
    for causal in (True, False):  # a constexpr of the key: a different kernel, tuned again
        for n in (100, 120):
            _run_plans(_fwd_plan(n, causal=causal), fakes)
    n_configs = len(_fwd_plan(100)[0].configs)
    assert _tunes(tuning, n_configs) == 2


def test_attention_backward_tunes_once_per_power_of_two(tuning):
    fakes = {}
    plans = []
    for n in (100, 120, 127, 200, 250):
        q, k, v, o, do = (_meta(2, 4, n, 64) for _ in range(5))
        lse = _meta(2, 4, n, dtype=torch.float32)
        opts = KA.Options(scale=0.125, right=0)
        plans.append(KA.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q, k, v,
                                      opts, 90))
        _run_plans(plans[-1], fakes)
    # the candidates the plans carry (configs.TMA_BWD's cells where descriptors are taken,
    # otherwise the bwd_* table's), the same for every length
    _, dkdv_launch, dq_launch = plans[0]
    assert all([len(p[1].configs), len(p[2].configs)] == [len(dkdv_launch.configs),
               len(dq_launch.configs)] for p in plans)
    dkdv, dq = len(dkdv_launch.configs), len(dq_launch.configs)
    assert dkdv > 1 and dq > 1
    assert tuning["benchmarks"] == 2 * (dkdv + dq)


def test_every_constexpr_separates_tunings(tuning):
    """A config tuned for one specialisation is never reused for another: every compile-time
    argument is in the autotuner's key, named in tune_key or not. The backward plans once left
    TMA (descriptor or pointer loads) out of their keys."""
    q, k, v, o, do = (_meta(2, 4, 256, 64) for _ in range(5))
    lse = _meta(2, 4, 256, dtype=torch.float32)
    plan = KA.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), q, k, v,
                            KA.Options(scale=0.125, right=0), 90)
    dkdv = plan[1]
    assert len(dkdv.configs) > 1 and "TMA" in dkdv.constexprs
    fakes = {}
    for tma in (True, False, True):  # the same configs and arguments, another kernel
        _run_plans([dataclasses.replace(dkdv, constexprs={**dkdv.constexprs, "TMA": tma},
                                        tune_key=[n for n in dkdv.tune_key if n != "TMA"])],
                   fakes)
    assert _tunes(tuning, len(dkdv.configs)) == 2


def test_plans_name_their_constexprs_in_the_tune_key():
    """The plans themselves list every constexpr in tune_key (what `inspect` and reports show)."""
    for arch, hkv, d, det in [(a, h, d, det) for a in (80, 90) for h in (4, 1) for d in (64, 128)
                              for det in (True, False)]:
        q, o, do = (_meta(2, 4, 256, d) for _ in range(3))
        k, v = (_meta(2, hkv, 256, d) for _ in range(2))
        lse = _meta(2, 4, 256, dtype=torch.float32)
        acc = q if det else _meta(2, 4, 256, d, dtype=torch.float32)
        opts = KA.Options(scale=0.1, right=0)
        plans = (KA.plan_forward(q, k, v, o, lse, opts, arch)
                 + KA.plan_backward(do, q, k, v, o, lse, None, torch.empty_like(lse), acc, k, v,
                                    opts, arch, deterministic=det))
        for launch in plans:
            if len(launch.configs) > 1:
                missing = [c for c in launch.constexprs if c not in launch.tune_key]
                assert not missing, (arch, hkv, d, det, launch.name, missing)


def test_varlen_tunes_once_per_bucket(tuning):
    """Packed batches: a new total and a new longest sequence every step."""
    fakes = {}
    steps = [(1000, 300), (1010, 310), (990, 290), (1020, 500)]  # (total tokens, max_seqlen)
    for total, longest in steps:
        view = lambda: _meta(total, 4, 64).transpose(0, 1)[None]
        q, k, v, o = view(), view(), view(), view()
        lse = _meta(1, 4, total, dtype=torch.float32)
        cu = _meta(5, dtype=torch.int32)
        opts = KA.Options(scale=0.125, right=0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                          max_seqlen_q=longest, max_seqlen_k=longest, seqlens_checked=True)
        _run_plans(KA.plan_forward(q, k, v, o, lse, opts, 90), fakes)
    n_configs = len(KA.configs_for("fwd", 90, 64, 2, "varlen"))
    assert n_configs > 1
    # totals 990-1020 share the 1024 bucket; longest 290-310 share 512, 500 too: one tune
    assert _tunes(tuning, n_configs) == 1


def test_ffn_tunes_once_per_power_of_two_token_count(tuning):
    fakes = {}
    for m in (100, 120, 127, 200, 250):
        a, b, c = _meta(m, 256), _meta(256, 512), _meta(m, 512)
        _run_plans(KF.plan_gemm(a, b, c, arch=90), fakes)
    n_configs = len(KF.configs_for(90, 2, KF.EPI_BIAS_ACT))
    assert _tunes(tuning, n_configs) == 2


def test_decode_cache_length_is_bucketed(monkeypatch, tuning):
    # one decode config ships per bucket today: give the split kernel two candidates to tune
    cfgs = [KD._cfg(64, 4, 2), KD._cfg(32, 4, 2)]
    monkeypatch.setattr(KD, "configs_for", lambda kernel, *a, **k: cfgs if kernel == "split"
                        else [KD.COMBINE_CONFIG])
    fakes = {}
    for n_max in (1000, 1100, 1500, 2000, 3000):
        q, k = _meta(2, 8, 1, 128), _meta(2, 2, n_max, 128)
        lse = _meta(2, 8, 1, dtype=torch.float32)
        _run_plans(KD.plan_decode(q, k, k, None, torch.empty_like(q), lse, None, None, 0.1, 1, 90),
                   fakes)
    assert _tunes(tuning, 2) == 3  # 1024 (1000); 2048 (1100, 1500, 2000); 4096 (3000)
