"""Ops called from several Python threads at once.

Triton's interpreter patches `triton.language` for the duration of each launch, so two
interpreted launches overlapping in time break each other (InterpreterError). The launch path
serialises interpreted launches with a lock; compiled launches (and the reference backend)
never take it.
"""
import threading

import torch

import tritformer
from tritformer.kernels import _launch


def _work(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    x = torch.randn(8, 24, generator=g)
    w1, w2 = torch.randn(32, 24, generator=g), torch.randn(24, 32, generator=g)
    return (tritformer.attention(q, k, v, causal=True), tritformer.softmax(x),
            tritformer.ffn(x, w1, None, w2, None))


def test_ops_from_several_threads_match_sequential_runs():
    want = [_work(s) for s in range(4)]
    got, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(2):
                got[i] = _work(i)
        except Exception as e:  # collected: an exception in a thread does not fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_lock_is_for_interpreted_launches_only():
    # a compiled kernel (what runs on a GPU) is launched without the lock
    assert _launch.launch_lock(interpreted=False) is _launch.NO_LOCK
    assert _launch.launch_lock(interpreted=True) is _launch.INTERPRETER_LOCK
