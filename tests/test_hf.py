"""attn_implementation="tritformer" (tritformer.integrations.hf) against transformers' "eager".

Criterion (tritformer.numerics): against the same model in float64, the logits of "tritformer"
may err at most 2x (gradients: 3x) as much as "eager" in the same dtype. The float64 reference
runs "sdpa" (torch's exact math in float64), not "eager": Llama's eager attention computes its
softmax in float32 whatever the model dtype, so in float64 it is only float32-accurate (1e-6 off
on these logits) and, with left padding, NaN (the float64 mask minimum becomes -inf in float32,
fully masked rows turn NaN and reach real tokens through 0 * NaN).

Models: small random GPT-2 (MHA) and Llama (GQA: 4 query heads over 2 kv heads) configs, head
dim 16, initializer_range 0.2 so that the attention is far from uniform (the default 0.02 makes
every softmax nearly flat, which would hide a wrong mask). Dropouts are 0, so "train" mode is
deterministic. Every case counts the fused kernel's calls (`fused`) and asserts the path it took
(causal flag / explicit mask), so a silent fallback to eager or SDPA fails.

Left padding: query rows at padding positions see no key at all. The kernel outputs 0 there,
eager a uniform average of the values; neither reaches a real token (no real query attends to a
padding key), so logits are compared at real tokens only.
"""
import copy
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritformer.ops.attention as attn_ops
from tritformer import numerics
from tritformer.numerics import assert_checks
from tritformer.integrations import hf

pytestmark = pytest.mark.integration  # model-level; select or skip with -m (pyproject.toml)

VOCAB, LAYERS = 97, 2


@pytest.fixture(autouse=True, scope="module")
def _registered():
    assert hf.register() == "tritformer"


@pytest.fixture
def fused(monkeypatch):
    """Records every call of the fused kernel (tritformer.attention) made by the integration."""
    calls = []
    real = attn_ops.attention

    def spy(q, k, v, **kw):
        calls.append({"nq": q.shape[2], "nk": k.shape[2], "hkv": k.shape[1],
                      "causal": kw["causal"], "mask": kw["attn_mask"] is not None,
                      "kpm": kw.get("key_padding_mask") is not None,
                      "window": kw["window"], "dropout_p": kw["dropout_p"]})
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn_ops, "attention", spy)
    return calls


def config(arch, **kw):
    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=0, eos_token_id=None,
                  pad_token_id=0, attn_implementation="eager")
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=LAYERS, n_head=4, n_embd=64, n_positions=64,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       **{**common, **kw})
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, num_hidden_layers=LAYERS,
                                    max_position_embeddings=64, **{**common, **kw})


def model_class(arch):
    return transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM


def models(arch, dtype=torch.float32, **kw):
    """(ours: "tritformer" in dtype, base: "eager" in dtype, ref: "sdpa" in float64), one set
    of random weights; ours switched with set_attn_implementation."""
    torch.manual_seed(0)
    eager = model_class(arch)(config(arch, **kw)).eval()
    ref = copy.deepcopy(eager).double()
    ref.set_attn_implementation("sdpa")  # see the module docstring
    base = copy.deepcopy(eager).to(dtype)
    ours = copy.deepcopy(eager).to(dtype)
    ours.set_attn_implementation("tritformer")
    assert ours.config._attn_implementation == "tritformer"
    assert base.config._attn_implementation == "eager"
    return ours, base, ref


def left_padded(batch=2, n=10, pads=(0, 4)):
    """input_ids [batch, n] and an attention_mask with pads[b] leading padding tokens."""
    ids = torch.randint(1, VOCAB, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Logits and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, dtype", [
    ("gpt2", torch.float32),   # MHA, no mask -> causal=True (Nq == Nk)
    ("llama", torch.float32),  # GQA 4/2 read natively (k/v not repeated)
    ("llama", torch.bfloat16),
])
def test_logits_match_eager(arch, dtype, fused):
    ours, base, ref = models(arch, dtype)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        out, b, r = (m(ids).logits for m in (ours, base, ref))
    assert out.dtype == dtype
    assert len(fused) == LAYERS
    assert all(c["causal"] and not c["mask"] and c["nq"] == c["nk"] == 12 for c in fused)
    assert fused[0]["hkv"] == (2 if arch == "llama" else 4)
    assert_checks([numerics.check(f"{arch} logits", out, r, b, numerics.FORWARD_FACTOR)])


def _loss(model, ids, mask=None):
    """The causal-LM loss on real tokens only: the logits at position t predict token t + 1, so
    the first real token's label (predicted from a padding position) is dropped too."""
    labels = ids
    if mask is not None:
        predicted_from_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
        labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
    return model(ids, attention_mask=mask, labels=labels).loss


def _grad_checks(ours, base, ref, ids, mask=None):
    """One training step's loss and every parameter's gradient, ours vs eager."""
    for m in (ours, base, ref):
        m.train()
        m.zero_grad(set_to_none=True)
    losses = [_loss(m, ids, mask) for m in (ours, base, ref)]
    for loss in losses:
        loss.backward()
    checks = [numerics.check("loss", losses[0], losses[2], losses[1], numerics.FORWARD_FACTOR)]
    params = [dict(m.named_parameters()) for m in (ours, base, ref)]
    for name, p in params[0].items():
        checks.append(numerics.check(f"d {name}", p.grad, params[2][name].grad,
                                     params[1][name].grad, numerics.GRAD_FACTOR))
    return checks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_step_gradients_match_eager(arch, fused):
    # train mode, no mask: fused forward + backward with causal=True
    ours, base, ref = models(arch)
    ids = torch.randint(0, VOCAB, (2, 12))
    checks = _grad_checks(ours, base, ref, ids)
    assert len(fused) == LAYERS and all(c["causal"] and not c["mask"] for c in fused)
    assert sum(p.grad is not None for p in ours.parameters()) == len(list(ours.parameters()))
    assert_checks(checks)


@pytest.mark.parametrize("arch, grads", [
    ("gpt2", False),
    ("llama", True),  # GQA with a mask, backward included
])
def test_left_padding(arch, grads, fused):
    # causal AND padding: the mask carries the key padding (hf.mask), so the kernel runs
    # causal=True with key_padding_mask, no dense mask; the 4 padding query rows of sequence 1
    # see no key (kernel output 0)
    ours, base, ref = models(arch)
    ids, mask = left_padded(pads=(0, 4))
    with torch.no_grad():
        out, b, r = (m(ids, attention_mask=mask).logits for m in (ours, base, ref))
    assert len(fused) == LAYERS and all(c["kpm"] and c["causal"] and not c["mask"] for c in fused)
    real = mask.bool()  # compare real tokens only (see the module docstring)
    checks = [numerics.check(f"{arch} logits (real tokens)", out[real], r[real], b[real])]
    if grads:
        checks += _grad_checks(ours, base, ref, ids, mask)
    assert_checks(checks)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, pads, cache", [
    # DynamicCache: prefill Nq == Nk, then Nq = 1 over Nk = 9..12: no mask, causal=True
    ("gpt2", (0, 0), "dynamic"),
    # StaticCache (a 12-slot buffer, empty after the last query) and left padding: explicit
    # masks in prefill and decoding
    ("llama", (0, 3), "static"),
    # DynamicCache and left padding: causal with the key padding, prefill and decoding
    ("llama", (0, 3), "dynamic"),
])
def test_generate_greedy_matches_eager(arch, pads, cache, fused):
    ours, base, _ = models(arch)
    ids, mask = left_padded(n=8, pads=pads)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        want = base.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(fused) == 5 * LAYERS  # prefill + 4 decoding steps, every layer
    decode = [c for c in fused if c["nq"] == 1]
    assert len(decode) == 4 * LAYERS
    if cache == "dynamic":
        assert all(not c["mask"] and c["causal"] and c["kpm"] == any(pads) for c in fused)
        assert [c["nk"] for c in decode[::LAYERS]] == [9, 10, 11, 12]
    else:
        assert all(c["mask"] and not c["causal"] and c["nk"] == 12 for c in fused)


def test_chunked_prefill_is_bottom_right_causal(fused):
    # 7 tokens, then 5 more on the dynamic cache: Nq = 5 < Nk = 12 with no mask, i.e. the
    # kernel's bottom-right causal=True (torch SDPA's top-left is_causal would be wrong here)
    ours, base, ref = models("llama")
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = []
    with torch.no_grad():
        for m in (ours, base, ref):
            past = m(ids[:, :7], use_cache=True).past_key_values
            # the cache argument's name: `cache` in recent transformers, `past_key_values` before
            # (an unknown keyword is swallowed by **kwargs, i.e. silently no cache)
            name = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            logits.append(m(ids[:, 7:], use_cache=True, **{name: past}).logits)
    chunk = [c for c in fused if c["nq"] == 5]
    assert len(chunk) == LAYERS and all(c["nk"] == 12 and c["causal"] and not c["mask"] for c in chunk)
    out, base_out, ref_out = logits
    assert_checks([numerics.check("logits after the cache", out, ref_out, base_out)])


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def test_config_and_from_pretrained(tmp_path, fused):
    ids = torch.randint(0, VOCAB, (1, 5))
    gpt2 = transformers.GPT2LMHeadModel(config("gpt2", attn_implementation="tritformer"))
    assert gpt2.config._attn_implementation == "tritformer"
    transformers.LlamaForCausalLM(config("llama")).save_pretrained(tmp_path)
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tritformer")
    assert llama.config._attn_implementation == "tritformer"
    with torch.no_grad():
        for m in (gpt2, llama):
            m(ids)
    assert len(fused) == 2 * LAYERS


def test_register_is_idempotent_and_name_is_valid():
    assert hf.register() == hf.register() == "tritformer"
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert ALL_ATTENTION_FUNCTIONS["tritformer"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["tritformer"] is hf.mask


def test_imports():
    # tritformer and tritformer.integrations never import transformers; hf says how to get it
    code = """
import sys, tritformer, tritformer.integrations
assert 'transformers' not in sys.modules, 'imported'
sys.modules['transformers'] = None  # as if not installed
try:
    import tritformer.integrations.hf
except ImportError as e:
    assert 'pip install transformers' in str(e), e
else:
    raise AssertionError('no ImportError')
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Fallback and the attention function's options
# ---------------------------------------------------------------------------------------------
def test_float64_falls_back_to_sdpa_with_one_warning(monkeypatch, fused):
    monkeypatch.setattr(hf, "_warned", set())
    ours, _, ref = models("llama", torch.float64)
    ids, mask = left_padded(pads=(0, 2))
    with pytest.warns(RuntimeWarning, match="float64.*falling back") as record:
        with torch.no_grad():
            out = ours(ids, attention_mask=mask).logits
            ours(ids, attention_mask=mask)
    assert len([w for w in record if "falling back" in str(w.message)]) == 1
    assert not fused
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], want[real], rtol=1e-12, atol=1e-12)  # the same SDPA


class _Layer(torch.nn.Module):
    """The attributes transformers' attention functions read from the calling layer."""

    def __init__(self, is_causal=True, training=False):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, 2
        self.train(training)


def _eager(q, k, v, keep, scale, softcap=None):
    """Eager math on [B, H, N, D]; keep: bool [Nq, Nk] (True = attend)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return (s.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("nq, nk, kw, keep", [
    # causal, no mask, Nq < Nk: bottom-right (the queries are the last positions)
    (3, 7, {}, lambda i, j: j <= i + 4),
    # sliding_window=3 without a mask -> window (2, 0): i - 3 < j <= i
    (6, 6, {"sliding_window": 3}, lambda i, j: (j <= i) & (j > i - 3)),
    # Gemma-2's softcap
    (5, 5, {"softcap": 2.0}, lambda i, j: j <= i),
])
def test_attention_forward_options(nq, nk, kw, keep, fused, monkeypatch):
    B, Hq, Hkv, D, scale = 2, 4, 2, 16, 0.5
    q = torch.randn(B, Hq, nq, D, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, nk, D, dtype=torch.float64) * 2
    v = torch.randn(B, Hkv, nk, D, dtype=torch.float64)
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    mask = keep(i, j)
    ref = _eager(q, k, v, mask, scale, kw.get("softcap"))
    # float32: the kernel, causal=True (and window / softcap), no explicit mask
    out, weights = hf.attention_forward(_Layer(), q.float(), k.float(), v.float(), None,
                                        scaling=scale, **kw)
    assert weights is None and out.shape == (B, nq, Hq, D) and out.is_contiguous()
    assert len(fused) == 1 and fused[0]["causal"] and not fused[0]["mask"]
    base = _eager(q.float(), k.float(), v.float(), mask, scale, kw.get("softcap"))
    assert_checks([numerics.check("out", out, ref, base)])
    # float64: the fallback (transformers' SDPA, or the math path with softcap), the same
    # bottom-right causal / window made into an explicit mask
    monkeypatch.setattr(hf, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back"):
        out, _ = hf.attention_forward(_Layer(), q, k, v, None, scaling=scale, **kw)
    assert len(fused) == 1
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_dropout_only_in_training_and_no_attention_weights(fused, monkeypatch):
    monkeypatch.setattr(hf, "_warned", set())
    q = torch.randn(1, 4, 4, 16)
    k = v = torch.randn(1, 2, 4, 16)
    for training, want in ((False, 0.0), (True, 0.25)):
        hf.attention_forward(_Layer(training=training), q, k, v, None, dropout=0.25)
        assert fused[-1]["dropout_p"] == want
    with pytest.warns(RuntimeWarning, match="output_attentions"):
        _, weights = hf.attention_forward(_Layer(), q, k, v, None, output_attentions=True)
    assert weights is None and len(fused) == 3
    with pytest.raises(ValueError, match="sinks"):
        hf.attention_forward(_Layer(), q, k, v, None, s_aux=torch.zeros(4))


def test_mask_function():
    # None exactly when the kernel's bottom-right causal is the whole mask
    args = dict(batch_size=2, mask_function=transformers.masking_utils.causal_mask_function)
    full = torch.ones(2, 8, dtype=torch.bool)
    assert hf.mask(q_length=8, kv_length=8, attention_mask=full, **args) is None
    assert hf.mask(q_length=3, kv_length=8, q_offset=5, attention_mask=full, **args) is None
    padded = full.clone()
    padded[1, :2] = False
    m = hf.mask(q_length=8, kv_length=8, attention_mask=padded, **args)
    assert m.dtype == torch.bool and m.shape == (2, 1, 8, 8)
    assert not m[1, 0, :, :2].any() and m[1, 0].diagonal()[2:].all()
    # causal AND padding: the key padding rides along, and is the dense mask's exactly
    kpm = getattr(m, hf.KEY_PADDING_ATTR)
    assert torch.equal(kpm, ~padded)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(m[:, 0], causal & ~kpm[:, None, :])
    # decoding on a dynamic cache with padding: 1 query after 7 cached keys (2 of them padding)
    m = hf.mask(q_length=1, kv_length=8, q_offset=7, attention_mask=padded, **args)
    assert torch.equal(getattr(m, hf.KEY_PADDING_ATTR), ~padded)
    # StaticCache prefill: 3 queries at positions 0..2 of an 8-slot buffer -> explicit, top-left
    m = hf.mask(q_length=3, kv_length=8, q_offset=0, attention_mask=full[:, :3], **args)
    assert torch.equal(m[0, 0], torch.ones(3, 8, dtype=torch.bool).tril())
    assert not hasattr(m, hf.KEY_PADDING_ATTR)  # not bottom-right: the dense mask only
    # a composed mask function (packed sequences, overlays) is not plain causal: dense only
    packed = transformers.masking_utils.and_masks(args["mask_function"], lambda b, h, q, k: q >= 0)
    m = hf.mask(q_length=8, kv_length=8, attention_mask=padded, **{**args, "mask_function": packed})
    assert not hasattr(m, hf.KEY_PADDING_ATTR)
    # a sliding window that can bind stays in the mask; one that cannot is dropped
    sliding = transformers.masking_utils.sliding_window_causal_mask_function(4)
    assert hf.mask(q_length=8, kv_length=8, local_size=4, **{**args, "mask_function": sliding}) is not None
    assert hf.mask(q_length=3, kv_length=3, local_size=4, **{**args, "mask_function": sliding}) is None
    # the caller forbids skipping (packed sequences, or_mask_function, ...)
    assert hf.mask(q_length=8, kv_length=8, allow_is_causal_skip=False, **args) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.mask(q_length=1, kv_length=8, q_offset=7, attention_mask=full, **args)
