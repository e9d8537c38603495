"""Public test helpers of tritformer: the numerics criterion, the per-op check_* helpers and the
memory-layout variants of tensor arguments.

- criterion (defined in `tritformer.numerics`, re-exported here): `Check`, `check`,
  `assert_close`, `assert_checks`, `FORWARD_FACTOR`, `GRAD_FACTOR`: a kernel's max error against
  float64 <= factor x PyTorch's own same-dtype error + one unit of roundoff.
- checks (`tritformer.testing.checks`): `check_attention`, `check_varlen_attention`,
  `check_sdpa`, `check_decode_attention`, `check_softmax`, `check_ffn`, `check_gated_ffn`: run
  the op forward (and backward) and return a list of `Check`.
- layouts (`tritformer.testing.layouts`): `layout_variants`, `strided`, `offset`, `expanded`.
- cases (`tritformer.testing.cases`): the input builders behind `python -m tritformer validate`
  (imported on use, not here).

    from tritformer.testing import assert_checks, check_attention
    assert_checks(check_attention(q, k, v, causal=True))
"""
from ..numerics import FORWARD_FACTOR, GRAD_FACTOR, Check, assert_checks, assert_close, check
from .checks import (_attention_grad_checks, _backprop, _check_grads, _dropout_reference_mask,
                     _grad_floors, _same_rng_seed, check_attention, check_decode_attention,
                     check_ffn, check_gated_ffn, check_sdpa, check_softmax, check_varlen_attention)
from .layouts import LAYOUTS, expanded, layout_variants, offset, strided

__all__ = ["Check", "check", "assert_close", "assert_checks", "FORWARD_FACTOR", "GRAD_FACTOR",
           "check_attention", "check_varlen_attention", "check_sdpa", "check_decode_attention",
           "check_softmax", "check_ffn", "check_gated_ffn",
           "LAYOUTS", "layout_variants", "strided", "offset", "expanded"]
# also importable from here (used by tests): _backprop, _attention_grad_checks, _grad_floors,
# _check_grads, _same_rng_seed, _dropout_reference_mask
