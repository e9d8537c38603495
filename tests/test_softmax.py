"""tritformer.softmax against the float64 reference (error-ratio criterion), in the interpreter.

Kernel paths (kernels/softmax.py): rows up to MAX_SINGLE_TILE (16K) elements are one on-chip
tile; longer rows take the two-pass online path over MULTI_TILE (4K) tiles. Some cases shrink
the tiles (monkeypatch) to run the multi-tile path on short, fast rows.
"""
import pytest
import torch

import tritformer
from tritformer.kernels import softmax as K
from tritformer.testing import assert_checks, check_softmax

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [
    1,      # single element: y = 1, dx = 0
    17,     # odd, one padded tile
    1000,   # padded to 1024
])
def test_row_lengths_and_dtypes(dtype, n):
    x = torch.randn(3, 5, n, dtype=dtype) * 3
    assert_checks(check_softmax(x, scale=0.7))


def test_long_rows_multi_tile_path():
    # 70,000 > 16K: the online two-pass path, 18 tiles with a ragged tail (Liger stops at 64K)
    x = torch.randn(2, 70_000) * 4
    assert_checks(check_softmax(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_multi_tile_path_with_small_tiles(dtype, causal, monkeypatch):
    # 64-element tiles over rows of 1000: the same code as 64K+ rows, 16 tiles + a tail
    monkeypatch.setattr(K, "MAX_SINGLE_TILE", 32)
    monkeypatch.setattr(K, "MULTI_TILE", 64)
    x = torch.randn(2, 7, 1000, dtype=dtype) * 3
    mask = torch.rand(1, 7, 1000) > 0.3
    assert_checks(check_softmax(x, mask=mask, causal=causal))


@pytest.mark.parametrize("nq,nk", [(9, 9), (5, 12), (12, 5)])
def test_causal_is_bottom_right(nq, nk):
    # rectangular: the same alignment as tritformer.attention; nq > nk leaves empty rows (0)
    x = torch.randn(2, 3, nq, nk)
    assert_checks(check_softmax(x, causal=True, scale=0.5))
    y = tritformer.softmax(x, causal=True)
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    assert (y[..., j > i + nk - nq] == 0).all()


@pytest.mark.parametrize("mask_shape", [
    (2, 3, 16, 40),  # full
    (1, 3, 1, 40),   # broadcast: read through stride-0 dims
    (40,),           # a row mask broadcast to everything
])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(mask_shape, kind):
    x = torch.randn(2, 3, 16, 40, dtype=torch.float16)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.4
    else:  # additive, with -inf entries; the gradient reaches the mask
        mask = torch.randn(mask_shape).masked_fill(torch.rand(mask_shape) < 0.2, float("-inf"))
        mask = mask.to(torch.float16).requires_grad_()
    assert_checks(check_softmax(x, scale=0.3, mask=mask))


def test_fully_masked_rows_are_zero_not_nan():
    x = torch.randn(4, 10, requires_grad=True)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1] = False
    y = tritformer.softmax(x, mask=mask)
    assert torch.equal(y[1], torch.zeros(10)) and torch.isfinite(y).all()
    y.backward(torch.randn(4, 10))
    assert torch.equal(x.grad[1], torch.zeros(10)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims_and_strided_input(dim):
    base = torch.randn(6, 30, 50)
    x = base.transpose(0, 2)[:, ::2]  # non-contiguous view
    assert_checks(check_softmax(x, dim=dim))


def test_large_logits_and_five_dims():
    # |scale * x| up to ~1e4: the max subtraction keeps it finite; rank 5 merges leading dims
    x = torch.randn(2, 2, 3, 4, 33) * 2000
    assert_checks(check_softmax(x, scale=5.0))


def test_module():
    x = torch.randn(2, 4, 7, 7)
    m = tritformer.nn.FusedSoftmax(dim=-1, scale=0.5, causal=True)
    torch.testing.assert_close(m(x), tritformer.softmax(x, scale=0.5, causal=True), rtol=0, atol=0)
    assert "causal=True" in repr(m)


def test_opcheck_and_compile():
    x = torch.randn(3, 4, 20, requires_grad=True)
    mask = torch.randn(1, 4, 20).expand(3, 4, 20).requires_grad_()
    torch.library.opcheck(torch.ops.tritformer.softmax_fwd.default, (x, mask, 0.5, False))
    torch.library.opcheck(torch.ops.tritformer.softmax_fwd.default, (x, None, 1.0, True))
    torch._dynamo.reset()

    def f(x, w):
        return tritformer.softmax(x @ w, scale=0.5, causal=True).sum(-1)

    x2, w = torch.randn(2, 8, 8), torch.randn(8, 8, requires_grad=True)
    w2 = w.detach().clone().requires_grad_()
    out = torch.compile(f, fullgraph=True)(x2, w)
    ref = f(x2, w2)
    torch.testing.assert_close(out, ref)
    (out * torch.arange(8.0)).sum().backward()
    (ref * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(3, 4).int()), TypeError, "x must be float16"),
    (dict(x=torch.randn(3, 4), dim=2), ValueError, "dim must be in"),
    (dict(x=torch.randn(3, 4), mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask of shape"),
    (dict(x=torch.randn(3, 4), mask=torch.ones(4, dtype=torch.int32)), TypeError, "mask must be bool"),
    (dict(x=torch.randn(3, 4), causal=True, dim=0), ValueError, "last dim"),
    (dict(x=torch.randn(4), causal=True), ValueError, "2\\+ dims"),
    (dict(x=torch.randn(3, 4), scale=float("nan")), ValueError, "scale must be finite"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        tritformer.softmax(**kwargs)


# ---------------------------------------------------------------------------------------------
# Issue 14: every tensor honoured with its strides, no silent wrong results, launch limits
# ---------------------------------------------------------------------------------------------
def _small_tiles(monkeypatch, path):
    """path "single": rows of <= 100 are one tile; "multi": 32-element single-tile limit and
    64-element tiles, so a row of 100 takes the online two-pass path (two tiles, ragged tail)."""
    if path == "multi":
        monkeypatch.setattr(K, "MAX_SINGLE_TILE", 32)
        monkeypatch.setattr(K, "MULTI_TILE", 64)


def _check_backward(x, dy, dim=-1, mask=None, **kw):
    """y and dx against float64 with a given (strided, expanded, offset) grad_output dy."""
    from tritformer import numerics, reference
    xk, xr, xb = (x.detach().to(d).requires_grad_() for d in (x.dtype, torch.float64, x.dtype))
    y = tritformer.softmax(xk, dim, mask=mask, **kw)
    ref = reference.softmax(xr, dim, mask=mask, **kw)
    base = reference.softmax(xb, dim, mask=mask, **kw)
    y.backward(dy)
    ref.backward(dy.double())
    base.backward(dy)
    gscale = float(xr.grad.abs().max())
    return [numerics.check("y", y, ref, base),
            numerics.check("dx", xk.grad, xr.grad, xb.grad, numerics.GRAD_FACTOR, floor_scale=gscale)]


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("kind", ["x", "mask", "float_mask", "dy", "dim0"])
def test_unmergeable_leading_dims(kind, path, monkeypatch):
    # rank 5 whose leading dims (2, 3, 4) cannot be viewed as one axis: the launcher used to
    # write into a reshape *copy* of the output and return uninitialised memory (fwd and bwd)
    _small_tiles(monkeypatch, path)
    n = 100
    x = torch.randn(3, 2, 4, 5, n).transpose(0, 1)
    if kind == "x":
        assert_checks(check_softmax(x, scale=0.5))
    elif kind == "mask":  # bool mask, broadcast over dims 1 and 3, itself unmergeable
        mask = (torch.rand(4, 2, 1, 1, n) > 0.3).permute(1, 2, 0, 3, 4)  # [2, 1, 4, 1, n]
        assert_checks(check_softmax(x, mask=mask, causal=True))
    elif kind == "float_mask":  # an additive mask with its gradient (summed over dim 1)
        mask = torch.randn(2, 1, 4, 5, n).requires_grad_()
        assert_checks(check_softmax(x, mask=mask))
    elif kind == "dy":  # contiguous x and y, an unmergeable grad_output
        x = x.contiguous()
        dy = torch.randn(3, 2, 4, 5, n).transpose(0, 1)
        assert_checks(_check_backward(x, dy))
    else:  # softmax over dim 0 of a 5-D tensor: the moved view's leading dims do not merge
        x = torch.randn(6, 2, 3, 4, 5).transpose(1, 3)
        assert_checks(check_softmax(x, dim=0))


def _layout(t, layout):
    """t's values (or, "expanded", a broadcast of its first slice) in a view the kernels must
    read through its real strides. Buffers around the views hold NaN (True for bool), so any
    read outside the view's elements shows up as a wrong result."""
    fill = True if t.dtype == torch.bool else float("nan")
    if layout == "strided":  # every dim of size > 1 at twice its contiguous stride
        buf = torch.full([2 * n for n in t.shape], fill, dtype=t.dtype)
        view = buf[tuple(slice(None, None, 2) for _ in t.shape)]
    elif layout == "offset":  # contiguous at storage offset 1: big[1:]
        view = torch.full((t.numel() + 1,), fill, dtype=t.dtype)[1:].view(t.shape)
    elif layout == "expanded":  # stride 0 along dim 0
        return t[:1].expand(t.shape)
    elif layout == "expanded_row":  # stride 0 along the softmax dim itself
        return t[..., :1].expand(t.shape)
    else:
        raise ValueError(layout)
    view.copy_(t)
    return view


LAYOUTS = ["strided", "offset", "expanded", "expanded_row"]


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_x_layouts(layout, path, monkeypatch):
    _small_tiles(monkeypatch, path)
    x = _layout(torch.randn(3, 4, 100, dtype=torch.float16) * 3, layout)
    assert_checks(check_softmax(x, scale=0.5, causal=True))


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_layouts(kind, layout, path, monkeypatch):
    # the mask as given (full shape, then broadcast by expand: layouts on top of broadcasting)
    _small_tiles(monkeypatch, path)
    x = torch.randn(3, 4, 100)
    if kind == "bool":
        mask = _layout(torch.rand(3, 4, 100) > 0.3, layout)
    else:  # additive, with -inf entries and its gradient
        mask = torch.randn(3, 4, 100).masked_fill(torch.rand(3, 4, 100) < 0.2, float("-inf"))
        mask = _layout(mask, layout).requires_grad_()
    assert_checks(check_softmax(x, mask=mask))


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_output_layouts(layout, path, monkeypatch):
    # dy as autograd hands it over: strided, offset, expanded (e.g. the backward of .sum())
    _small_tiles(monkeypatch, path)
    x = torch.randn(3, 4, 100, dtype=torch.bfloat16) * 2
    dy = _layout(torch.randn(3, 4, 100, dtype=torch.bfloat16), layout)
    assert_checks(_check_backward(x, dy, causal=True))


def _empty_row_case(source):
    """x [2, 6, 100] and softmax kwargs where rows (0, 1) and (1, 4) have no finite score (causal:
    x [1, 102, 100], rows 0 and 1)."""
    x = torch.randn(2, 6, 100) * 2
    kw = {}
    if source == "data":  # -inf in x itself, no mask
        x[0, 1] = float("-inf")
        x[1, 4] = float("-inf")
    elif source in ("bool", "float"):
        keep = torch.rand(2, 6, 100) > 0.3
        keep[0, 1] = False
        keep[1, 4] = False
        if source == "bool":
            kw["mask"] = keep
        else:
            kw["mask"] = torch.zeros(2, 6, 100).masked_fill(~keep, float("-inf")).requires_grad_()
    else:  # causal with more rows than columns: row i sees columns j <= i - 2 (rows 0, 1 empty)
        x = torch.randn(1, 102, 100)
        kw["causal"] = True
    return x, kw


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("source", ["data", "bool", "float", "causal"])
def test_rows_without_finite_score(source, path, monkeypatch):
    # the README's rule on every path: such a row gives 0 and a zero gradient, never NaN
    _small_tiles(monkeypatch, path)
    x, kw = _empty_row_case(source)
    assert_checks(check_softmax(x, **kw))
    y = tritformer.reference.softmax(x, **{k: v.detach() if torch.is_tensor(v) else v
                                           for k, v in kw.items()})
    empty = (y == 0).all(-1)
    assert empty.sum() == 2
    # a non-finite grad_output in an empty row still gives a zero gradient (as the reference,
    # whose masked_fill cuts the row off)
    dy = torch.randn(x.shape)
    dy[empty] = float("nan")
    dy[tuple(empty.nonzero()[0].tolist() + [3])] = float("inf")
    assert_checks(_check_backward(x, dy, **kw))


@pytest.mark.parametrize("path", ["single", "multi"])
def test_nan_and_inf_inputs_propagate_as_pytorch(path, monkeypatch):
    # +inf and NaN scores are not "no finite score": the row is NaN as in torch.softmax
    _small_tiles(monkeypatch, path)
    x = torch.randn(4, 100)
    x[0, 7] = float("nan")
    x[1, 70] = float("inf")
    x[2] = float("-inf")
    x[2, 99] = float("inf")
    assert_checks(check_softmax(x))
    assert torch.isnan(tritformer.softmax(x)[:3]).all()


CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


@pytest.mark.parametrize("shape", [
    (2 ** 16, 2 ** 12, 2 ** 4, 2),     # 2^32 rows of 2: more rows than CUDA's grid axis 0 takes
    (2 ** 20, 2 ** 12, 1024, 8),       # a huge batch x heads x queries
    (3, 65537, 65537, 16),             # both inner dims past 65,535
    (1, 1, 2 ** 31 - 1, 4),            # exactly the axis-0 limit
])
@pytest.mark.parametrize("n_cols", [None, 70_000])  # the shape's last dim (one tile); multi-tile
def test_planned_grids_within_cuda_limits(shape, n_cols):
    # plans built from meta tensors, as `python -m tritformer inspect` does: nothing allocated
    if n_cols is not None:
        shape = shape[:3] + (n_cols,)
    x = torch.empty(1, device="meta", dtype=torch.float16).expand(shape)  # stride 0: any size
    mask = torch.empty(1, device="meta", dtype=torch.bool).expand(shape)
    plans = (K.plan_forward(x, mask, x, 0.5, True) + K.plan_forward(x, None, x, 1.0, False)
             + K.plan_backward(x, x, x, 1.0))
    for launch in plans:
        for cfg in launch.configs:
            grid = launch.grid(cfg.kwargs)
            assert 1 <= len(grid) <= 3, grid
            assert all(1 <= g <= lim for g, lim in zip(grid, CUDA_GRID_LIMITS)), (launch.name, grid)
            # every row has a program, or the programs loop over the rows
            assert launch.constexprs["ROW_LOOP"] == (launch.args["n_rows"] > grid[0])


def test_large_plan_keeps_the_row_count():
    x = torch.empty(1, device="meta").expand(2 ** 16, 2 ** 12, 2 ** 4, 2)
    (launch,) = K.plan_forward(x, None, x, 1.0, False)
    assert launch.args["n_rows"] == 2 ** 32 and launch.grid({}) == (2 ** 31 - 1,)


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("programs", [
    1,   # one program loops over every row
    7,   # 30 rows over 7 programs: a ragged last round
])
def test_rows_loop_when_grid_is_capped(programs, path, monkeypatch):
    # the cap on programs (CUDA's axis-0 limit) shrunk so that each program loops over several
    # rows (the ROW_LOOP grid-stride kernels), forward and backward
    _small_tiles(monkeypatch, path)
    monkeypatch.setattr(K, "MAX_PROGRAMS", programs)
    x = torch.randn(2, 3, 5, 100)
    mask = torch.rand(3, 1, 100) > 0.2
    assert_checks(check_softmax(x, scale=0.5, mask=mask, causal=True))
