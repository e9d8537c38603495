"""Forward and backward are bitwise identical across repeated runs (no atomics on these paths;
the dK/dV and dQ kernels own their outputs: attention's deterministic=True, which
torch.use_deterministic_algorithms(True) also selects). Each op runs twice on the same inputs;
dropout draws its seed from torch's generator, reset to the same state before each run."""
import pytest
import torch

import tritformer


def _twice(fn, *inputs):
    """Outputs and input gradients of two runs of fn on fresh leaves of the same inputs."""
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad([o for o in outs if o.requires_grad],
                                    [x for x in leaves if x.requires_grad],
                                    [torch.ones_like(o) * 0.5 + torch.arange(o.numel()).reshape(o.shape) % 3
                                     for o in outs if o.requires_grad], allow_unused=True)
        runs.append([o.detach() for o in outs] + [g for g in grads if g is not None])
    return runs


def _torch_deterministic(fn):
    """fn run with torch.use_deterministic_algorithms(True) (attention picks its backward path
    when the forward runs: the switch need not be on for the backward itself)."""
    def run(*args):
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return fn(*args)
        finally:
            torch.use_deterministic_algorithms(prev)
    return run


def _qkv(B=2, Hq=4, Hkv=2, Nq=70, Nk=90, D=32, dtype=torch.float16):
    return (torch.randn(B, Hq, Nq, D).to(dtype), torch.randn(B, Hkv, Nk, D).to(dtype),
            torch.randn(B, Hkv, Nk, D).to(dtype))


CASES = {
    # GQA 2:1 (the dK/dV group loop), causal, several tiles both ways
    "attention": lambda: (lambda q, k, v: tritformer.attention(q, k, v, causal=True, return_lse=True,
                                                               deterministic=True),
                          *_qkv()),
    # the same through torch's switch (forces deterministic=True over an explicit False)
    "attention_torch_switch": lambda: (_torch_deterministic(
        lambda q, k, v: tritformer.attention(q, k, v, causal=True, deterministic=False)), *_qkv()),
    # every option at once, the float mask with its gradient (dS written by the dQ kernel)
    "attention_options": lambda: (
        lambda q, k, v, m: tritformer.attention(
            q, k, v, attn_mask=m, key_padding_mask=(torch.arange(90) > 80).expand(2, 90), window=(40, 5),
            alibi_slopes=torch.rand(4), softcap=20.0, dropout_p=0.2, deterministic=True),
        *_qkv(), torch.randn(2, 1, 70, 90)),
    "varlen": lambda: (
        lambda q, k, v: tritformer.varlen_attention(
            q, k, v, torch.tensor([0, 30, 31, 90], dtype=torch.int32),
            torch.tensor([0, 40, 40, 100], dtype=torch.int32), 59, 60, causal=True,
            deterministic=True),
        torch.randn(90, 4, 32).half(), torch.randn(100, 2, 32).half(), torch.randn(100, 2, 32).half()),
    "softmax": lambda: (lambda x, m: tritformer.softmax(x, mask=m), torch.randn(6, 300),
                        torch.randn(6, 300)),
    "ffn": lambda: (lambda x, w1, w2: tritformer.ffn(x, w1, None, w2, None, activation="gelu_tanh"),
                    torch.randn(70, 48), torch.randn(96, 48) / 7, torch.randn(40, 96) / 10),
    "gated_ffn": lambda: (lambda x, wg, wu, wd: tritformer.gated_ffn(x, wg, wu, wd, recompute=True),
                          torch.randn(70, 48), torch.randn(96, 48) / 7, torch.randn(96, 48) / 7,
                          torch.randn(40, 96) / 10),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_are_bitwise_repeatable(name):
    fn, *inputs = CASES[name]()
    a, b = _twice(fn, *inputs)
    assert len(a) == len(b) and len(a) > 1
    for x, y in zip(a, b):
        assert torch.equal(x, y), name


def test_decode_is_bitwise_repeatable():
    # split KV (several splits and the combine kernel), GQA, ragged lengths
    q = torch.randn(2, 4, 2, 32).half()
    k, v = torch.randn(2, 2, 70, 32).half(), torch.randn(2, 2, 70, 32).half()
    lens = torch.tensor([70, 33], dtype=torch.int32)
    runs = [tritformer.decode_attention(q, k, v, lens, num_splits=3, return_lse=True) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
