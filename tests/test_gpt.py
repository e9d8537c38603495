"""tritformer.models.GPT: backends agree under the numerics criterion, GPT-2 weights from
transformers, generation with and without the KV cache, bad input. Interpreter, tiny configs."""
import dataclasses

import pytest
import torch

from tritformer import numerics
from tritformer.models import GPT, GPTConfig

pytestmark = pytest.mark.integration  # model-level; select or skip with -m (pyproject.toml)

# 2 layers, 4 heads of 16; T = 40 spans two interpreter key tiles (32) and a row-tile tail
CFG = GPTConfig(block_size=48, vocab_size=97, n_layer=2, n_head=4, n_embd=64)


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return GPT(dataclasses.replace(CFG, **kw)).to(dtype).eval()


def _logits(model, idx):
    return model(idx, all_logits=True)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("attn,mlp", [
    ("tritformer", "tritformer"),  # both fused ops, residual in the FFN epilogue
    ("tritformer", "torch"),       # fused attention only
    ("naive", "tritformer"),       # fused FFN only
    ("sdpa", "torch"),             # torch's SDPA
])
def test_backends_give_the_same_logits(dtype, attn, mlp):
    idx = torch.randint(0, CFG.vocab_size, (2, 40))
    ref = _logits(_model(torch.float64, attn_backend="naive", mlp_backend="torch"), idx)
    base = _logits(_model(dtype, attn_backend="naive", mlp_backend="torch"), idx)
    out = _logits(_model(dtype, attn_backend=attn, mlp_backend=mlp), idx)
    c = numerics.check("logits", out, ref, base)
    assert c.ok, str(c)


def test_fused_gradients_match_naive():
    # a training step's gradients (loss over every position), fused vs float64 naive
    idx = torch.randint(0, CFG.vocab_size, (2, 40))
    grads = {}
    for key, dtype, attn, mlp in (("ref", torch.float64, "naive", "torch"),
                                  ("base", torch.float32, "naive", "torch"),
                                  ("out", torch.float32, "tritformer", "tritformer")):
        m = _model(dtype, attn_backend=attn, mlp_backend=mlp).train()
        m(idx, idx)[1].backward()
        grads[key] = {n: p.grad for n, p in m.named_parameters()}
    bad = [str(c) for n in grads["ref"] for c in [numerics.check(
        n, grads["out"][n], grads["ref"][n], grads["base"][n], factor=numerics.GRAD_FACTOR)] if not c.ok]
    assert not bad, "\n".join(bad)


def test_targets_and_logits_shapes():
    m = _model(attn_backend="naive", mlp_backend="torch")
    idx = torch.randint(0, CFG.vocab_size, (3, 10))
    logits, loss = m(idx)
    assert logits.shape == (3, 1, CFG.vocab_size) and loss is None  # nanoGPT: last position
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 10, CFG.vocab_size) and loss.ndim == 0
    ignored = idx.clone()
    ignored[:, :5] = -1  # nanoGPT's ignore_index
    assert torch.isfinite(m(idx, ignored)[1])


@pytest.mark.parametrize("attn", ["tritformer", "sdpa", "naive"])
def test_greedy_generation_with_cache_equals_without(attn):
    # prompt 5, 6 new tokens: prefill + decode steps through the cache (the tritformer backend:
    # decode_attention); the MLP is torch's here, the cache only concerns attention
    m = _model(attn_backend=attn, mlp_backend="torch")
    idx = torch.randint(0, CFG.vocab_size, (2, 5))
    a = m.generate(idx, 6, temperature=0.0, use_cache=True)
    b = m.generate(idx, 6, temperature=0.0, use_cache=False)
    assert a.shape == (2, 11) and torch.equal(a, b)
    # block_size 8: the last 2 steps outgrow the context (cropped, rerun path)
    small = _model(attn_backend=attn, mlp_backend="torch", block_size=8)
    a = small.generate(idx, 5, temperature=0.0, use_cache=True)
    assert torch.equal(a, small.generate(idx, 5, temperature=0.0, use_cache=False))


def test_decode_steps_use_the_decode_kernel(monkeypatch):
    import tritformer.ops.decode as decode
    calls = []
    real = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _model()
    m.generate(torch.randint(0, CFG.vocab_size, (1, 4)), 3, temperature=0.0)
    assert len(calls) == 2 * CFG.n_layer  # steps 2 and 3 (step 1 is the prefill)


def test_sampling_top_k_and_temperature():
    m = _model(attn_backend="naive", mlp_backend="torch")
    idx = torch.randint(0, CFG.vocab_size, (1, 4))
    torch.manual_seed(1)
    a = m.generate(idx, 8, temperature=0.9, top_k=5)
    torch.manual_seed(1)
    assert torch.equal(a, m.generate(idx, 8, temperature=0.9, top_k=5))  # seeded: reproducible
    # top_k=1 is greedy
    assert torch.equal(m.generate(idx, 8, temperature=1.0, top_k=1), m.generate(idx, 8, temperature=0.0))


# ---------------------------------------------------------------------------------------------
# GPT-2 from transformers
# ---------------------------------------------------------------------------------------------
def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=97)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_from_hf_instance_matches_transformers_logits():
    hf = _hf_gpt2()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        base = hf(idx).logits
        ref = hf.double()(idx).logits
    ours = GPT.from_hf(hf.float())  # attention and FFN on the fused kernels
    assert ours.config.vocab_size == 97 and ours.config.block_size == 48
    with torch.no_grad():
        c = numerics.check("logits", _logits(ours.eval(), idx), ref, base)
    assert c.ok, str(c)


@pytest.mark.parametrize("safetensors", [True, False])  # model.safetensors / pytorch_model.bin
def test_from_hf_directory(tmp_path, safetensors):
    hf = _hf_gpt2()
    if safetensors:
        hf.save_pretrained(tmp_path)
    else:  # the older layout: config.json + pytorch_model.bin with GPT2LMHeadModel's keys
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_hf(str(tmp_path), attn_backend="naive", mlp_backend="torch").eval()
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_from_hf_bad_input(tmp_path):
    hf = _hf_gpt2()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_hf(str(tmp_path / "nowhere"))
    hf.config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(FileNotFoundError, match="missing its weights"):
        GPT.from_hf(str(tmp_path))
    with pytest.raises(TypeError, match="model_or_path"):
        GPT.from_hf(123)
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_hf(hf)


def test_bad_input():
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=60, n_head=7)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(attn_backend="flash")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    m = _model(attn_backend="naive", mlp_backend="torch")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be an int64"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets must have"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the model's context"):
        m.generate(torch.zeros(1, 49, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), 1, top_k=0)
