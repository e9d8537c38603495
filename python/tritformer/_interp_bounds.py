"""Out-of-bounds detection for kernels run in Triton's interpreter (a test-side checker).

Triton's interpreter reads and writes host memory through raw addresses and never checks them:
a tail-masking bug passes every numerical test on CPU and corrupts memory on a GPU. With the
checker on, every address a load or store touches where its mask is on must lie inside the
extent of one of the launch's tensor arguments (the bytes between the view's lowest and highest
element), else `OutOfBoundsError` names the kernel, the access and the nearest argument with
the element offset. `enable()` patches the interpreter once; tests/conftest.py turns it on for
the whole suite.
"""
from __future__ import annotations

import threading

import numpy as np

_state = threading.local()


class OutOfBoundsError(AssertionError):
    pass


def _extent(t) -> tuple[int, int] | None:
    """[lo, hi) bytes a view can address, or None for an empty tensor."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride
        if span < 0:
            lo += span
        else:
            hi += span
    item = t.element_size()
    base = t.data_ptr()
    return base + lo * item, base + (hi + 1) * item


def _check(kind: str, ptrs, mask, builder) -> None:
    launch = getattr(_state, "launch", None)
    if launch is None:
        return
    name, ranges = launch
    addrs = np.asarray(ptrs.data, dtype=np.uint64)
    on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    addrs = addrs[on].astype(np.int64)
    if addrs.size == 0:
        return
    size = max(1, getattr(ptrs.get_element_ty(), "primitive_bitwidth", 8) // 8)
    inside = np.zeros(addrs.shape, dtype=bool)
    for _, lo, hi, _ in ranges:
        inside |= (addrs >= lo) & (addrs + size <= hi)
    if inside.all():
        return
    bad = int(addrs[~inside][0])
    if ranges:
        arg, lo, hi, item = min(ranges, key=lambda r: min(abs(bad - r[1]), abs(bad - r[2])))
        where = (f"{(bad - lo) // item} elements from the start of '{arg}' "
                 f"({(hi - lo) // item} elements long)")
    else:
        where = "no tensor argument"
    grid = tuple(int(g) for g in getattr(builder, "grid_idx", ()))
    raise OutOfBoundsError(f"{name}: {kind} of {int((~inside).sum())} address(es) outside every "
                           f"tensor argument; first at {where}; program {grid}")


def enable() -> bool:
    """Patch the interpreter (idempotent). Returns True when the checker is in place."""
    from triton.runtime import interpreter as I

    B, G = I.InterpreterBuilder, I.GridExecutor
    if getattr(B, "_tritformer_bounds", False):
        return True
    load, store, call = B.create_masked_load, B.create_masked_store, G.__call__

    # the trailing arguments differ between Triton versions (cache/eviction policies): pass through
    def create_masked_load(self, ptrs, mask, *rest, **kw):
        _check("load", ptrs, mask, self)
        return load(self, ptrs, mask, *rest, **kw)

    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        _check("store", ptrs, mask, self)
        return store(self, ptrs, value, mask, *rest, **kw)

    def grid_call(self, *args_dev, **kwargs):
        # the interpreter runs on host copies of the arguments: wrap the copy step to record the
        # copies' extents for this launch before any program runs
        init = self._init_args_hst
        ranges: list = []

        def init_and_record(a_dev, kw):
            args_hst, kwargs_hst = init(a_dev, kw)
            for arg_name, t in list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items()):
                if hasattr(t, "data_ptr") and hasattr(t, "element_size"):
                    ext = _extent(t)
                    if ext is not None:
                        ranges.append((arg_name, ext[0], ext[1], t.element_size()))
            return args_hst, kwargs_hst

        self._init_args_hst = init_and_record
        prev = getattr(_state, "launch", None)
        _state.launch = (getattr(self.fn, "__name__", "kernel"), ranges)
        try:
            return call(self, *args_dev, **kwargs)
        finally:
            del self._init_args_hst
            _state.launch = prev

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    G.__call__ = grid_call
    B._tritformer_bounds = True
    return True
