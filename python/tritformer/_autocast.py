"""torch.autocast for the public ops: each follows the autocast rule of its torch counterpart.

    attention, varlen_attention, decode_attention, scaled_dot_product_attention   like SDPA
    ffn, gated_ffn                                                                like linear
        torch's lower-precision list (CPU and CUDA): floating inputs are cast to the autocast
        dtype (torch.get_autocast_dtype), so the output is in it.
    softmax                                                                       like softmax
        whatever torch.softmax does under the same autocast on that device type: CUDA lists it
        as fp32 (fp16/bf16 inputs computed and returned in float32), CPU not at all. Read off
        torch itself (an empty softmax), not a copy of its lists.

Only the eligible tensors move, as in torch's autocast: float16 / bfloat16 / float32 (float64
and integer or bool tensors stay), and only the arguments the torch counterpart's kernel would
receive (q/k/v, a float attn_mask, weights, biases); tritformer's own extras stay (alibi_slopes).
A fused residual (ffn's) is torch's `linear(...) + residual`: the add is not autocast, so a
residual in another dtype is added after the op with torch's type promotion (a float32 residual
gives a float32 output, as in torch), not fused.

Why in the public functions rather than `torch.library.register_autocast` on the custom ops:
the public functions validate dtypes (mixed q/k dtypes are refused without autocast) before
the custom op is reached, and register_autocast casts every floating tensor argument (ALiBi
slopes, masks) alike. The casts are `Tensor.to`, differentiable, so gradients come back in each
input's own dtype. The op body then runs with autocast off: the launchers and the reference
backend compute in the dtypes they chose (a float32 F.linear in the reference backend must not
be cast again).
"""
from __future__ import annotations

import functools
import inspect

import torch

_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _device_type(args) -> str | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def _cast(t, dtype):
    if isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch.softmax computes and returns for x under the current autocast."""
    return torch.softmax(x.new_empty(0), -1).dtype


def autocast(*cast: str, policy: str = "lower", added: str | None = None):
    """Decorator of a public op: when autocast is on for its inputs' device type, cast the
    arguments named in `cast` (policy "lower": to the autocast dtype; "softmax": to the dtype
    torch.softmax would use for the first of them), then run the op with autocast off.
    added: a keyword argument the op adds to its output (ffn's residual): one in another dtype
    than the cast inputs is added after the op, with torch's type promotion."""

    def wrap(fn):
        params = list(inspect.signature(fn).parameters)
        where = [(params.index(name), name) for name in cast]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            device_type = _device_type((*args, *kwargs.values()))
            if device_type is None or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            args = list(args)
            if policy == "lower":
                dtype = torch.get_autocast_dtype(device_type)
            else:
                first = args[where[0][0]] if where[0][0] < len(args) else kwargs[where[0][1]]
                dtype = _softmax_dtype(first) if isinstance(first, torch.Tensor) else None
            if dtype is not None:
                for i, name in where:
                    if i < len(args):
                        args[i] = _cast(args[i], dtype)
                    elif name in kwargs:
                        kwargs[name] = _cast(kwargs[name], dtype)
            extra = kwargs.get(added) if added is not None else None
            if isinstance(extra, torch.Tensor) and extra.dtype != dtype:
                kwargs[added] = None
            else:
                extra = None
            with torch.autocast(device_type, enabled=False):
                out = fn(*args, **kwargs)
            return out if extra is None else out + extra

        return op

    return wrap
