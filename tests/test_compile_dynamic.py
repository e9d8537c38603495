"""torch.compile(fullgraph=True, dynamic=True) through every public op (issue 14, item 6).

Under dynamic=True shapes are SymInts, the default scale 1/sqrt(D) is a SymFloat, and float /
int arguments of the compiled function are traced symbolically too (dynamo's specialize_float
and specialize_int are off). The validation must trace without a graph break, and one compiled
graph must serve two shapes (a recompile fails the test) with the eager result (same kernels,
same inputs: bitwise equal), forward and backward.
"""
import pytest
import torch

import tritformer


def _leaves(inputs):
    return [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
            else x for x in inputs]


def _outs(res):
    return res if isinstance(res, tuple) else (res,)


def _run(fn, shapes, make, backward=True):
    """compile fn once; for each shape: make(shape) -> inputs; compare compiled vs eager
    (outputs, then the grads of every input that requires grad)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)  # a graph break raises
    for i, shape in enumerate(shapes):
        inputs = make(*shape)
        a, b = _leaves(inputs), _leaves(inputs)
        # the later shapes must reuse the first graph (no size is 0/1 or shared between
        # dims, so only a specialisation in tritformer, e.g. on D, would recompile)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _outs(compiled(*a))
        want = _outs(fn(*b))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        if not backward:
            continue
        sum(o.float().square().sum() for o in got).backward()
        sum(o.float().square().sum() for o in want).backward()
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                # the kernels' gradients are bitwise equal too; the gradient of a broadcast
                # mask is reduced over the broadcast dims by inductor, in another order
                torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def _qkv(B, Hq, Hkv, Nq, Nk, D, grad=True):
    return (torch.randn(B, Hq, Nq, D, requires_grad=grad),
            torch.randn(B, Hkv, Nk, D, requires_grad=grad),
            torch.randn(B, Hkv, Nk, D, requires_grad=grad))


# two shapes each: different B, heads, lengths and D (the default scale then differs)
ATTN_SHAPES = [(2, 6, 3, 5, 7, 16), (3, 8, 4, 9, 6, 8)]


@pytest.mark.parametrize("causal, deterministic", [
    (True, True),   # non-causal traces the same checks without the window edge (dropped for CI time)
    (True, False),  # the fused backward (dQ atomics) traced as well
])
def test_attention(causal, deterministic):
    # the failing case: default scale 1/sqrt(D) is a SymFloat, causal window right=0
    _run(lambda q, k, v: tritformer.attention(q, k, v, causal=causal,
                                              deterministic=deterministic), ATTN_SHAPES, _qkv)


def test_attention_scalar_args_traced():
    # scale / softcap / dropout_p / window given as arguments of the compiled function: dynamo
    # traces the floats (SymFloat) and ints (SymInt) symbolically; return_lse gives lse too
    def f(q, k, v, scale, softcap, left):
        return tritformer.attention(q, k, v, scale=scale, softcap=softcap, window=(left, 0),
                                    dropout_p=0.0, return_lse=True)

    def make(*shape):
        return (*_qkv(*shape), 0.3, 5.0, 3)
    # Nk >= Nq: every query sees a key (an lse of -inf would square to a NaN gradient)
    _run(f, [(2, 6, 3, 5, 7, 16), (3, 8, 4, 6, 9, 8)], make)


@pytest.mark.parametrize("deterministic", [True, False])  # the two backward paths
def test_varlen_attention(deterministic):
    def make(n_seq, H, D):
        lens_q = torch.arange(1, n_seq + 1) * 3
        lens_k = lens_q + 2
        cu_q = torch.nn.functional.pad(lens_q.cumsum(0), (1, 0)).to(torch.int32)
        cu_k = torch.nn.functional.pad(lens_k.cumsum(0), (1, 0)).to(torch.int32)
        tq, tk = int(cu_q[-1]), int(cu_k[-1])
        return (torch.randn(tq, H, D, requires_grad=True), torch.randn(tk, H, D, requires_grad=True),
                torch.randn(tk, H, D, requires_grad=True), cu_q, cu_k,
                int(lens_q.max()), int(lens_k.max()))

    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        return tritformer.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                           deterministic=deterministic)
    _run(f, [(2, 3, 16), (3, 4, 8)], make)


def test_decode_attention():
    def make(B, Hq, Hkv, n_max, D):
        q, k, v = _qkv(B, Hq, Hkv, 1, n_max, D, grad=False)
        return q, k, v, torch.full((B,), n_max - 1, dtype=torch.int32)
    f = lambda q, k, v, lens: tritformer.decode_attention(q, k, v, lens, return_lse=True)
    _run(f, [(2, 6, 3, 20, 16), (3, 8, 4, 33, 8)], make, backward=False)  # inference only


def test_softmax():
    def f(x, mask, scale):
        return tritformer.softmax(x, 1, scale=scale, mask=mask)
    _run(f, [(2, 5, 3), (3, 7, 4)],
         lambda a, b, c: (torch.randn(a, b, c, requires_grad=True),
                          torch.randn(b, 1, requires_grad=True), 0.7))


def test_softmax_causal():
    _run(lambda x: tritformer.softmax(x, causal=True), [(2, 5, 6), (3, 7, 4)],
         lambda *s: (torch.randn(*s, requires_grad=True),))


def test_ffn():
    def make(M, K, H, N):
        return (torch.randn(M, 2, K, requires_grad=True), torch.randn(H, K, requires_grad=True),
                torch.randn(H, requires_grad=True), torch.randn(N, H, requires_grad=True),
                torch.randn(N, requires_grad=True))
    f = lambda x, w1, b1, w2, b2: tritformer.ffn(x, w1, b1, w2, b2, activation="gelu")
    _run(f, [(3, 8, 16, 12), (5, 16, 24, 20)], make)


def test_gated_ffn():
    def make(M, K, I):
        return (torch.randn(M, K, requires_grad=True), torch.randn(I, K, requires_grad=True),
                torch.randn(I, K, requires_grad=True), torch.randn(K, I, requires_grad=True))
    _run(lambda x, wg, wu, wd: tritformer.gated_ffn(x, wg, wu, wd), [(3, 8, 16), (6, 16, 24)], make)


@pytest.mark.parametrize("is_causal", [False, True])
def test_scaled_dot_product_attention(is_causal):
    # the fused path (fp32, E == Ev), GQA: enable_gqa maps Hq to Hkv without a copy
    def f(q, k, v):
        return tritformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    _run(f, ATTN_SHAPES, _qkv)


def test_scaled_dot_product_attention_mask_and_scale():
    # a float mask broadcast over batch and heads, scale as a traced float argument
    def f(q, k, v, mask, scale):
        return tritformer.scaled_dot_product_attention(q, k, v, mask, scale=scale)

    def make(B, H, L, S, E):
        return (*_qkv(B, H, H, L, S, E), torch.randn(L, S, requires_grad=True), 0.4)
    _run(f, [(2, 3, 5, 7, 16), (3, 4, 9, 6, 8)], make)
