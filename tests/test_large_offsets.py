"""Offsets past 2^31 elements.

Base offsets (batch, head, row, tile start, mask rows) are int64 in every kernel: a view whose
batch/row stride is 2^30 elements puts its third slice at element 2^31. In-tile offsets (tile
index x stride) and tile steps are int32 by design (registers); a tensor whose stride along a
tiled axis could wrap them is copied by the launchers (kernels/_launch.int32_tiles). The storage
behind these views is 4-11 GB of virtual memory that is never touched beyond the few elements
written (RSS stays ~0.4 GB). A wrapped offset is caught by the interpreter's bounds checker (on
for the suite): checked by mutating softmax's row offset to int32, and by disabling
int32_tiles (the three *_past_int32_tiles tests then fail with loads at -2^31 elements).
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
    numerics.assert_checks(checks)


def _strided(shape, strides, dtype=torch.float16, fill=None):
    """A view of `shape` with `strides` over a lazily allocated storage, filled with randn (or
    `fill`); only the pages of the written elements are ever touched."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    view = torch.empty(size, dtype=dtype).as_strided(shape, strides)
    view.copy_(torch.randn(shape).to(dtype) if fill is None else fill)
    return view


def _attention_checks(q, k, v, **opts):
    """Forward and backward of tritformer.attention under the criterion (fp16 inputs)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = tritformer.attention(*leaves, **opts)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    base_in = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ropts = {n: (o.double() if torch.is_tensor(o) and o.is_floating_point() else o)
             for n, o in opts.items()}
    ref = reference.attention(*ref_in, **ropts)
    base = reference.attention(*base_in, **opts)
    checks = [numerics.check("out", out, ref, base)]
    do = torch.randn(out.shape).half()
    for o in (out, ref, base):
        o.backward(do.to(o.dtype))
    for name, a_, r, b_ in zip(("dq", "dk", "dv"), leaves, ref_in, base_in):
        checks.append(numerics.check(name, a_.grad, r.grad, b_.grad, numerics.GRAD_FACTOR))
    numerics.assert_checks(checks)


TILE_STRIDE = 2 ** 27  # key j of a 32-key tile at j * 2^27: past 2^31 from j = 16 on


def test_attention_sequence_stride_past_int32_tiles():
    # the kernels' in-tile offsets (tile index x stride) are int32; a sequence stride this large
    # would wrap them (measured: the K tile loaded from -2^31 elements, caught by the bounds
    # checker). The launchers copy such a tensor to a contiguous one (kernels/_launch.int32_tiles)
    k = _strided((1, 2, 40, 16), (0, 16, TILE_STRIDE, 1))
    v = _strided((1, 2, 40, 16), (0, 16, TILE_STRIDE, 1))
    q = _strided((1, 2, 24, 16), (0, 16, TILE_STRIDE, 1))
    _attention_checks(q, k, v, causal=True)


def test_decode_cache_stride_past_int32_tiles():
    # decode's key tiles are 16 wide in the interpreter: key 8 of a tile at 8 x 2^28 = 2^31
    k = _strided((1, 1, 20, 16), (0, 0, 2 * TILE_STRIDE, 1))
    v = _strided((1, 1, 20, 16), (0, 0, 2 * TILE_STRIDE, 1))
    q = torch.randn(1, 2, 1, 16).half()
    out = tritformer.decode_attention(q, k, v)
    ref = reference.decode_attention(q.double(), k.double(), v.double())
    base = reference.decode_attention(q, k.contiguous(), v.contiguous())
    check = numerics.check("out", out, ref, base)
    assert check.ok, str(check)


def test_ffn_reduction_stride_past_int32_tiles():
    # the GEMM's K-loop steps its pointers by BLOCK_K x stride (int32): x's columns 2^27 apart
    x = _strided((4, 40), (1, TILE_STRIDE))
    w1, w2 = torch.randn(24, 40).half() / 6, torch.randn(40, 24).half() / 5
    out = tritformer.ffn(x, w1, None, w2, None, activation="gelu")
    ref = reference.ffn(x.double(), w1.double(), None, w2.double(), None, activation="gelu")
    base = reference.ffn(x.contiguous(), w1, None, w2, None, activation="gelu")
    check = numerics.check("out", out, ref, base)
    assert check.ok, str(check)


def test_masks_past_2_31_elements():
    # a float mask whose batch 2 starts at element 2^31 (batch stride 2^30) and a bool mask
    # whose query row 2 does (row stride 2^30): the mask offsets are int64
    q, k, v = (torch.randn(3, 2, n, 16).half() for n in (5, 30, 30))
    fmask = _strided((3, 1, 5, 30), (STRIDE, 0, 30, 1))
    _attention_checks(q, k, v, attn_mask=fmask)
    keep = torch.rand(5, 30) > 0.3
    keep[:, 0] = True  # every query keeps a key
    bmask = _strided((5, 30), (STRIDE, 1), dtype=torch.bool, fill=keep)
    _attention_checks(q, k, v, attn_mask=bmask, causal=False)
