"""Bad input raises a clear error naming the argument, before any kernel launch."""
import pytest
import torch

import tritformer
from tritformer.kernels import attention as K


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("a kernel was launched for invalid input")
    monkeypatch.setattr(K, "attention_forward", fail)


def t(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((t(2, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16)), {}, ValueError, r"q must have 4 dimensions"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 16, 1), t(2, 2, 8, 16)), {}, ValueError, r"k must have 4 dimensions"),
    (([1.0], t(2, 2, 8, 16), t(2, 2, 8, 16)), {}, TypeError, r"q must be a torch.Tensor"),
    ((t(2, 2, 8, 16), t(3, 2, 8, 16), t(3, 2, 8, 16)), {}, ValueError, r"batch sizes differ"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 16), t(2, 2, 9, 16)), {}, ValueError, r"k and v must agree"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 16), t(2, 1, 8, 16)), {}, ValueError, r"k and v must agree"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 32), t(2, 2, 8, 32)), {}, ValueError, r"head dims differ"),
    ((t(2, 3, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16)), {}, ValueError, r"multiple of k/v's head count"),
    ((t(1, 1, 8, 300), t(1, 1, 8, 300), t(1, 1, 8, 300)), {}, ValueError, r"head dim D must be in 1\.\.256"),
    ((t(1, 1, 8, 0), t(1, 1, 8, 0), t(1, 1, 8, 0)), {}, ValueError, r"head dim D"),
    ((t(1, 1, 8, 16, dtype=torch.float64),) * 3, {}, TypeError, r"q must be float16, bfloat16 or float32, got float64"),
    ((torch.ones(1, 1, 8, 16, dtype=torch.int32),) * 3, {}, TypeError, r"q must be float16"),
    ((t(1, 1, 8, 16), t(1, 1, 8, 16, dtype=torch.float32), t(1, 1, 8, 16)), {}, TypeError, r"k must have q's dtype"),
    ((t(1, 1, 8, 16), t(1, 1, 8, 16), t(1, 1, 8, 16, dtype=torch.bfloat16)), {}, TypeError, r"v must have q's dtype"),
    ((t(1, 1, 8, 16), t(1, 1, 8, 16), t(1, 1, 8, 16)), {"scale": float("nan")}, ValueError, r"scale must be finite"),
    ((t(1, 1, 8, 16), t(1, 1, 8, 16), t(1, 1, 8, 16)), {"scale": "0.1"}, TypeError, r"scale must be a float"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tritformer.attention(*args, **kwargs)


def test_mixed_devices():
    q = t(1, 1, 8, 16)
    k = t(1, 1, 8, 16).to("meta")
    with pytest.raises(ValueError, match=r"k must be on q's device"):
        tritformer.attention(q, k, t(1, 1, 8, 16))

