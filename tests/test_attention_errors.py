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
    ((t(2, 2, 8, 16), t(3, 2, 8, 16), t(3, 2, 8, 16)), {}, ValueError, r"^k must have q's batch size 2"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 16), t(2, 2, 9, 16)), {}, ValueError, r"^v must have k's shape"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 16), t(2, 1, 8, 16)), {}, ValueError, r"^v must have k's shape"),
    ((t(2, 2, 8, 16), t(2, 2, 8, 32), t(2, 2, 8, 32)), {}, ValueError, r"^k must have q's head dim D=16"),
    ((t(2, 3, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16)), {}, ValueError, r"multiple of k/v's head count"),
    ((t(1, 1, 8, 300), t(1, 1, 8, 300), t(1, 1, 8, 300)), {}, ValueError, r"^head dim D of q must be in 1\.\.256"),
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



QKV = lambda: (t(2, 4, 8, 16), t(2, 2, 10, 16), t(2, 2, 10, 16))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"attn_mask": torch.ones(8, 9, dtype=torch.bool)}, ValueError,
     r"attn_mask of shape \(8, 9\) must broadcast to \[B, Hq, Nq, Nk\] = \[2, 4, 8, 10\]"),
    ({"attn_mask": torch.ones(3, 1, 8, 10)}, ValueError, r"attn_mask of shape \(3, 1, 8, 10\) must broadcast"),
    ({"attn_mask": torch.ones(1, 2, 4, 8, 10)}, ValueError, r"attn_mask .* must broadcast"),
    ({"attn_mask": torch.ones(8, 10, dtype=torch.int64)}, TypeError, r"attn_mask must be bool .* got int64"),
    ({"attn_mask": [[True]]}, TypeError, r"attn_mask must be a torch.Tensor or None"),
    ({"attn_mask": torch.ones(8, 10, device="meta")}, ValueError, r"attn_mask must be on q's device"),
    ({"key_padding_mask": torch.zeros(2, 9, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \[B, Nk\] = \[2, 10\], got \(2, 9\)"),
    ({"key_padding_mask": torch.zeros(2, 10)}, TypeError, r"key_padding_mask must be bool \(True = "
                                                          r"padding\), got float32"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be < 1.0, got 1.0"),
    ({"dropout_p": -0.1}, ValueError, r"dropout_p must be >= 0.0"),
    ({"dropout_p": "0.1"}, TypeError, r"dropout_p must be a float"),
    ({"window": (-2, 4)}, ValueError, r"window values must be >= -1 \(-1 = unbounded\), got \(-2, 4\)"),
    ({"window": (3,)}, TypeError, r"window must be a \(left, right\) pair of ints"),
    ({"window": (1.5, 2)}, TypeError, r"window must be a \(left, right\) pair of ints"),
    ({"alibi_slopes": torch.ones(2)}, ValueError, r"alibi_slopes must have shape \[Hq\] = \[4\] or "
                                                  r"\[B, Hq\] = \[2, 4\], got \(2,\)"),
    ({"alibi_slopes": torch.ones(4, 2)}, ValueError, r"alibi_slopes must have shape"),
    ({"alibi_slopes": torch.ones(4, dtype=torch.int32)}, TypeError, r"alibi_slopes must be a float tensor"),
    ({"softcap": -1.0}, ValueError, r"softcap must be >= 0.0"),
    ({"softcap": float("inf")}, ValueError, r"softcap must be finite"),
])
def test_bad_options(kwargs, exc, match):
    # each option checked before any launch (the fixture fails the test on a launch)
    with pytest.raises(exc, match=match):
        tritformer.attention(*QKV(), **kwargs)
