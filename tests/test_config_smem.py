"""Architecture families and their shared-memory limits (issue #18 item 4).

Each config table is per family (kernels._launch.arch_family): sm_80 (A100, 163 KB per block),
sm_86/sm_89 (99 KB), sm_90 (227 KB), sm_120 (99 KB). A config over its family's limit fails at
launch, so no shipped config may exceed it. The bytes are measured: tests/data/config_smem.json
holds the shared memory Triton's compile assigns each shipped config of each recorded target
(benchmarks/config_smem.py; the LLVM stage of the same compile `inspect` runs). For a recorded
target every shipped config must be in the file (a table change needs a re-run) and within the
limit.
"""
import json
import pathlib

import pytest

from tritformer import inspect as I
from tritformer.kernels import _launch

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "config_smem.json").read_text())
HEAD_DIMS, DTYPES, CAUSAL = (64, 128, 256), ("fp16", "fp32"), (False, True)


def _key(kernel, dtype, head_dim, causal, heads, config):
    return f"{kernel}|{dtype}|{head_dim}|{'causal' if causal else 'full'}|{heads}|{config}"


def _shipped(arch):
    """The key of every distinct compile `inspect` runs for `arch` (every shipped config of
    every plan; launches compiling to the same kernel, e.g. the backward preprocess of the MHA
    and GQA plans, once, as inspect.jobs_for dedups them)."""
    for (op, a, dt, d, c, heads), li, ci in I.jobs_for(
            I.cases([arch], HEAD_DIMS, DTYPES, CAUSAL, I.ALL_OPS)):
        launch = I.PLANS[op](a, I.DTYPE_NAMES[dt], d, c, heads)[li]
        yield _key(launch.name + I._tag(op), dt, d, c, heads, I._describe(launch.configs[ci]))


@pytest.mark.parametrize("capability,family", [
    (75, 80), (80, 80), (86, 86), (87, 86), (89, 86), (90, 90), (100, 90), (120, 120), (121, 120)])
def test_arch_family(capability, family):
    assert _launch.arch_family(capability) == family
    assert family in _launch.SHARED_MEMORY_LIMIT


def test_limits():
    assert _launch.SHARED_MEMORY_LIMIT == {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024,
                                           120: 99 * 1024}
    assert all(I.shared_memory_limit(a) == _launch.SHARED_MEMORY_LIMIT[_launch.arch_family(c)]
               for a, c in I.ARCHES.items())


def test_new_families_are_recorded():
    assert {"sm_86", "sm_120"} <= set(DATA["targets"])


@pytest.mark.parametrize("arch", sorted(DATA["targets"]))
def test_no_shipped_config_exceeds_its_family_limit(arch):
    measured = DATA["targets"][arch]
    limit = I.shared_memory_limit(arch)
    missing, over = [], []
    for key in _shipped(arch):
        if key not in measured:
            missing.append(key)
        elif measured[key] > limit:
            over.append(f"{key}: {measured[key]} B")
    assert not missing, (f"{len(missing)} shipped configs of {arch} not measured (re-run "
                         f"benchmarks/config_smem.py --arch {arch}): {missing[:5]}")
    assert not over, f"over {arch}'s {limit} B: {over}"
