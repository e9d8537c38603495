"""The attention kernels pass their runtime arguments from wrapper to tile body positionally
(the constexprs by keyword): this checks that each wrapper's call lists exactly the tile
body's parameters, in order, so an argument added in the wrong place fails here, not as a
silently wrong result."""
import ast
import inspect

import pytest

from tritformer.kernels.attention import backward, forward


def _calls(module, caller: str, callee: str):
    tree = ast.parse(inspect.getsource(module))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == caller)
    return [c for c in ast.walk(fn) if isinstance(c, ast.Call)
            and isinstance(c.func, ast.Name) and c.func.id == callee]


@pytest.mark.parametrize("module, wrapper, tile", [
    (forward, "_attn_fwd", "_attn_fwd_tile"),
    (backward, "_attn_bwd_dkdv", "_attn_bwd_dkdv_tile"),
    (backward, "_attn_bwd_dq", "_attn_bwd_dq_tile"),
])
def test_wrapper_passes_tile_arguments_in_order(module, wrapper, tile):
    params = list(inspect.signature(getattr(module, tile).fn).parameters)
    calls = _calls(module, wrapper, tile)
    assert len(calls) == 2  # the SEQ_LOOP loop and the single-tile call
    for call in calls:
        positional = [a.id for a in call.args]
        keywords = [k.arg for k in call.keywords]
        # first argument: the tile index (t in the loop, tile otherwise); the rest by name
        assert positional[1:] == params[1:len(positional)], (wrapper, positional)
        assert positional + keywords == [positional[0], *params[1:]]
        assert all(k.arg == k.value.id for k in call.keywords)  # NAME=NAME, the same switch


@pytest.mark.parametrize("module, tile, inner", [
    (forward, "_attn_fwd_tile", "_attn_fwd_inner"),
    (backward, "_attn_bwd_dkdv_tile", "_attn_bwd_dkdv_inner"),
    (backward, "_attn_bwd_dq_tile", "_attn_bwd_dq_inner"),
])
def test_one_sweep_call_site_per_kernel(module, tile, inner):
    # the three key/query ranges go through one call site (a static_range over the parts)
    calls = _calls(module, tile, inner)
    assert len(calls) == 1
    params = list(inspect.signature(getattr(module, inner).fn).parameters)
    named = [k.arg for k in calls[0].keywords]
    assert [a.id for a in calls[0].args] + named == params[:len(calls[0].args)] + named
    assert sorted(params) == sorted(params[:len(calls[0].args)] + named)
