"""Offsets past 2^31 elements: every kernel computes addresses in int64.

A view whose batch/row stride is 2^30 elements puts its third slice at element 2^31; the
storage is 4 GiB of virtual memory that is never touched beyond the few slices written (RSS
stays ~0.4 GB). With an int32 offset the address wraps, which the interpreter's bounds checker
(on for the suite) reports; checked by mutating softmax's row offset to int32.
"""
import torch

import tritformer
from tritformer import numerics, reference

STRIDE = 2 ** 30


def _far_apart(n_slices, *rest, dtype=torch.float16):
    """A [n_slices, *rest] view with slice stride 2^30 elements, filled with randn."""
    inner = 1
    for s in rest:
        inner *= s
    base = torch.empty((n_slices - 1) * STRIDE + inner, dtype=dtype)
    strides, acc = [], 1
    for s in reversed(rest):
        strides.insert(0, acc)
        acc *= s
    view = base.as_strided((n_slices, *rest), (STRIDE, *strides))
    view.copy_(torch.randn(n_slices, *rest).to(dtype))
    return view


def test_softmax_rows_past_2_31_elements():
    x = _far_apart(3, 40)  # row 2 starts at element 2^31
    y = tritformer.softmax(x)
    torch.testing.assert_close(y.double(), reference.softmax(x.double()), rtol=0, atol=1e-3)


def test_attention_batch_past_2_31_elements():
    # batch 2 of q starts at element 2^31; the kernels read q through that view (forward, dQ
    # and dK/dV all load it), not a copy (check_attention's clone would make it contiguous)
    qv = _far_apart(3, 2, 24, 16)
    q = qv.detach().requires_grad_()
    assert q.stride(0) == STRIDE
    k, v = (torch.randn(3, 2, 30, 16, dtype=torch.float16, requires_grad=True) for _ in range(2))
    out = tritformer.attention(q, k, v, causal=True)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    base_in = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_in, causal=True)
    base = reference.attention(*base_in, causal=True)
    checks = [numerics.check("out", out, ref, base)]
    do = torch.randn(out.shape).half()
    for o, leaves in ((out, (q, k, v)), (ref, ref_in), (base, base_in)):
        o.backward(do.to(o.dtype))
    for name, a_, r, b_ in zip(("dq", "dk", "dv"), (q, k, v), ref_in, base_in):
        checks.append(numerics.check(name, a_.grad, r.grad, b_.grad, numerics.GRAD_FACTOR))
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, bad
