"""The interpreter's out-of-bounds checker (tritformer._interp_bounds), on for the whole suite."""
import pytest
import torch


def test_bounds_checker_catches_an_off_by_one_tail_mask():
    # the interpreter never checks addresses; tritformer._interp_bounds (on for the whole suite,
    # see conftest.py) must flag a load one element past the end, and pass the correct kernel
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, n, INCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        load_mask = offs <= n if INCLUSIVE else offs < n  # the bug: <= reads X[n]
        tl.store(Y + offs, tl.load(X + offs, mask=load_mask), mask=offs < n)

    x, y = torch.randn(100), torch.empty(100)
    copy[(4,)](x, y, 100, INCLUSIVE=False, BLOCK=32)
    assert torch.equal(x, y)
    with pytest.raises(Exception, match="copy: load of 1 address.*100 elements from the start of 'X'"):
        copy[(4,)](x, y, 100, INCLUSIVE=True, BLOCK=32)


def test_bounds_checker_catches_a_store_past_a_view():
    # a store past the end of a view is caught even when the storage behind it is larger:
    # the extent is the view's, so writing into a neighbouring slice is an error too
    import triton
    import triton.language as tl

    @triton.jit
    def fill(Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n + 1)

    base = torch.ones(2, 16)
    with pytest.raises(Exception, match="fill: store of 1 address.*16 elements from the start of 'Y'"):
        fill[(1,)](base[0], 16, BLOCK=32)
