"""Named constants shared by the kernels and their host code: one source for each number.

Every kernel switch is a `tl.constexpr` global: kernels branch on these names and the host passes
the same objects (or their `.value`), so no code depends on a literal or on the order of a tuple.
Float constants are `tl.constexpr` too, so a kernel folds them at compile time exactly as a literal.
"""
import triton.language as tl

# exp(x) = exp2(x * LOG2E), ln(x) = log2(x) * LN2: the kernels use exp2/log2 (MUFU.EX2 / LG2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# FFN activations (kernels/ffn.py: _act / _dact), by the name the public ops take
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU = (tl.constexpr(i) for i in range(5))
ACTIVATIONS = {"none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU,
               "silu": ACT_SILU}

# FFN GEMM epilogues (kernels/ffn.py's module docstring says what each computes)
EPI_BIAS_ACT, EPI_DACT, EPI_GATED, EPI_DGATED = (tl.constexpr(i) for i in range(4))
EPI_NAMES = {EPI_BIAS_ACT.value: "bias_act", EPI_DACT.value: "dact", EPI_GATED.value: "gated",
             EPI_DGATED.value: "dgated"}
