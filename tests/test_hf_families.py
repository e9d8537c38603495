"""tritformer.patch and hf.apply_to_<family> on small random transformers models of each family.

Criterion (tritformer.numerics): against the unpatched model in float64, the patched model's
logits may err at most 2x (gradients: 3x) as much as the unpatched "eager" model in float32.
The float64 reference runs "sdpa" (torch's exact math in float64): "eager" computes its softmax
in float32 whatever the model dtype (see test_hf.py). Gemma-2 is the exception: SDPA ignores its
attention softcap, so its reference runs attn_implementation="tritformer" in float64, which
takes the integration's float64 fallback (`_math_attention`: float64 softmax, softcap, masks
from sdpa_mask; checked against an independent eager formula in test_hf.py) while the float32
model under test runs the fused kernel (causal / window flags, no mask).

Every case spies on the fused attention (tritformer.ops.attention.attention, which the
integration calls) and on tritformer.ffn / gated_ffn, so a silent fallback fails. Sizes: 2
layers, hidden 32, 4 query heads over 2 kv heads (head dim 8), vocab 100, sequences of 12;
initializer_range 0.2 so that the attention is far from uniform.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritformer
import tritformer.ops.attention as attn_ops
import tritformer.ops.ffn as ffn_ops
from tritformer import numerics
from tritformer.integrations import hf
from tritformer.numerics import assert_checks

pytestmark = pytest.mark.integration  # model-level; select or skip with -m (pyproject.toml)

VOCAB, LAYERS, N = 100, 2, 12
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0, bos_token_id=0,
              eos_token_id=None)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

# family -> (config class, its arguments, LM class, MLP op, MLP activation)
FAMILIES = {
    "llama": ("LlamaConfig", DECODER, "LlamaForCausalLM", "gated_ffn", "silu"),
    "mistral": ("MistralConfig", {**DECODER, "sliding_window": 6}, "MistralForCausalLM",
                "gated_ffn", "silu"),
    "qwen2": ("Qwen2Config", DECODER, "Qwen2ForCausalLM", "gated_ffn", "silu"),
    "gemma": ("GemmaConfig", {**DECODER, "head_dim": 8}, "GemmaForCausalLM", "gated_ffn",
              "gelu_tanh"),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 8, "sliding_window": 6,
                                "attn_logit_softcapping": 2.0}, "Gemma2ForCausalLM",
               "gated_ffn", "gelu_tanh"),
    "gpt2": ("GPT2Config", dict(n_layer=LAYERS, n_head=4, n_embd=32, n_positions=32,
                                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
             "GPT2LMHeadModel", "ffn", "gelu_tanh"),
}
MLP_NAMES = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP",
             "gemma": "GemmaMLP", "gemma2": "Gemma2MLP", "gpt2": "GPT2MLP"}


def family_param(fam):
    present = all(hasattr(transformers, FAMILIES[fam][i]) for i in (0, 2))
    return pytest.param(fam, marks=pytest.mark.skipif(not present,
                                                      reason=f"transformers has no {fam}"))


ALL = [family_param(f) for f in FAMILIES]


def config(fam, **kw):
    cfg_cls, args, *_ = FAMILIES[fam]
    return getattr(transformers, cfg_cls)(**{**COMMON, **args, **kw})


def build(fam, **kw):
    torch.manual_seed(0)
    return getattr(transformers, FAMILIES[fam][2])(config(fam, **kw))


@pytest.fixture
def calls(monkeypatch):
    """Counts of the fused attention (as the integration calls it), tritformer.ffn and
    tritformer.gated_ffn; take() returns them and resets."""
    counts = {"attention": 0, "ffn": 0, "gated_ffn": 0}

    def spy(mod, key):
        real = getattr(mod, key)

        def wrapped(*a, **k):
            counts[key] += 1
            return real(*a, **k)
        monkeypatch.setattr(mod, key, wrapped)

    spy(attn_ops, "attention")
    spy(ffn_ops, "ffn")
    spy(ffn_ops, "gated_ffn")

    def take():
        out = dict(counts)
        counts.update(dict.fromkeys(counts, 0))
        return out
    return take


@pytest.fixture
def clean_classes():
    """Undo apply_to_<family>()'s class patches after the test, whatever it did."""
    yield
    hf.revert()
    assert not hf._class_patches


def reference(fam, model):
    """The unpatched model in float64 (see the module docstring)."""
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("tritformer" if fam == "gemma2" else "sdpa")
    return ref


def run(model, ids, train):
    """Logits (eval, no grad) or loss (train, backward done)."""
    if not train:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float64 reference's fallback warning
            return model(ids).logits
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(ids, labels=ids).loss
        loss.backward()
    return loss


def measure(model, ids):
    """(logits in eval mode, loss in train mode, {name: gradient}) of `model` on ids."""
    logits = run(model, ids, train=False)
    loss = run(model, ids, train=True)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits, loss, grads


def measure_fused(model, ids, fam, calls):
    """`measure`, asserting that the fused attention and MLP ran in every layer of both passes
    (the eval forward, then the training forward; backward calls no forward op)."""
    calls()
    op = FAMILIES[fam][3]
    logits = run(model, ids, train=False)
    got = calls()
    assert got["attention"] == LAYERS and got[op] == LAYERS, got
    loss = run(model, ids, train=True)
    got = calls()
    assert got["attention"] == LAYERS and got[op] == LAYERS, got
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


def checks(ours, base, ref, fam):
    """Logits, loss and every gradient of ours vs base (same dtype) vs ref (float64)."""
    result = [numerics.check(f"{fam} logits", ours[0], ref[0], base[0], numerics.FORWARD_FACTOR),
              numerics.check("loss", ours[1], ref[1], base[1], numerics.FORWARD_FACTOR)]
    assert list(ours[2]) == list(base[2])  # patching keeps every parameter and name
    for name, g in ours[2].items():
        assert g is not None, name
        result.append(numerics.check(f"d {name}", g, ref[2][name], base[2][name],
                                     numerics.GRAD_FACTOR))
    return result


# ---------------------------------------------------------------------------------------------
# tritformer.patch(model)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ALL)
def test_patch_switches_attention_and_mlps(fam, calls):
    eager = build(fam, attn_implementation="eager")
    base, ref = copy.deepcopy(eager), reference(fam, eager)
    ours = copy.deepcopy(eager)
    report = tritformer.patch(ours)
    assert ours.config._attn_implementation == "tritformer"
    prefix = "transformer.h" if fam == "gpt2" else "model.layers"
    mlp = MLP_NAMES[fam]
    what = mlp if fam in ("llama", "gpt2") else f"{mlp} (same forward as LlamaMLP)"
    repl = "FusedConv1DMLP" if fam == "gpt2" else "FusedLlamaMLP"
    act = FAMILIES[fam][4]
    assert [tuple(s[:3]) for s in report] == [
        ("", "attn_implementation='eager'", "attn_implementation='tritformer'")] + [
        (f"{prefix}.{i}.mlp", what, f"tritformer.patching.{repl}[{act}]") for i in range(LAYERS)]
    assert report.skipped == [] and report.adjusted == []
    assert "attn_implementation='tritformer'" in str(report)
    ids = torch.randint(1, VOCAB, (2, N))
    got = measure_fused(ours, ids, fam, calls)
    assert_checks(checks(got, measure(base, ids), measure(ref, ids), fam))
    # idempotent: a second call swaps nothing and does not register again
    again = tritformer.patch(ours)
    assert (len(again), again.skipped, again.adjusted) == (0, [], [])
    assert ours.config._attn_implementation == "tritformer"


def test_patch_registers_once(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for interface in (AttentionInterface, AttentionMaskInterface):  # as in a fresh process
        monkeypatch.delitem(interface._global_mapping, "tritformer", raising=False)
    registered = []
    real = AttentionInterface.register.__func__
    monkeypatch.setattr(AttentionInterface, "register",
                        classmethod(lambda cls, k, v: (registered.append(k), real(cls, k, v))))
    models = [build("llama", attn_implementation="sdpa") for _ in range(2)]
    for m in models + models:  # two models, each patched twice
        tritformer.patch(m)
    assert registered == ["tritformer"]
    assert AttentionInterface()["tritformer"] is hf.attention_forward
    assert AttentionMaskInterface()["tritformer"] is hf.mask
    assert [m.config._attn_implementation for m in models] == ["tritformer"] * 2


def test_patch_reports_skipped_attention(monkeypatch):
    # head dim over the kernel's limit: every call would fall back, so the model is left as is
    m = build("llama", attn_implementation="sdpa", hidden_size=32, num_attention_heads=2,
              num_key_value_heads=1, head_dim=320)
    r = tritformer.patch(m)
    assert m.config._attn_implementation == "sdpa"
    assert [tuple(s[:2]) for s in r.skipped] == [("", "LlamaForCausalLM attention")]
    assert "head dim 320" in r.skipped[0].reason and "256" in r.skipped[0].reason
    assert [s.name for s in r] == [f"model.layers.{i}.mlp" for i in range(LAYERS)]  # MLPs still
    assert "skipped:" in str(r) and "head dim 320" in str(r)
    # attention layers that do not go through AttentionInterface (transformers' own test)
    m = build("llama", attn_implementation="sdpa")
    monkeypatch.setattr(type(m), "_can_set_attn_implementation", classmethod(lambda cls: False))
    r = tritformer.patch(m)
    assert m.config._attn_implementation == "sdpa"
    assert "do not dispatch through transformers' AttentionInterface" in r.skipped[0].reason
    # attention=False leaves it alone, unreported
    m = build("llama", attn_implementation="sdpa")
    r = tritformer.patch(m, attention=False)
    assert m.config._attn_implementation == "sdpa" and r.skipped == [] and len(r) == LAYERS


def test_patch_model_held_by_a_plain_module():
    holder = torch.nn.ModuleDict({"lm": build("gpt2", attn_implementation="sdpa")})
    r = tritformer.patch(holder)
    assert [tuple(s[:3]) for s in r][0] == ("lm", "attn_implementation='sdpa'",
                                            "attn_implementation='tritformer'")
    assert holder["lm"].config._attn_implementation == "tritformer"
    assert holder["lm"].transformer.config._attn_implementation == "tritformer"


# ---------------------------------------------------------------------------------------------
# hf.apply_to_<family>()
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ["llama", "gpt2"])  # the two MLP kinds: gated, Conv1D
def test_apply_before_load(fam, calls, clean_classes):
    report = getattr(hf, f"apply_to_{fam}")()
    assert [(s.old, s.new) for s in report] == [
        ("default attn_implementation 'sdpa'", "default attn_implementation 'tritformer'"),
        (f"{MLP_NAMES[fam]}.forward", f"tritformer.{FAMILIES[fam][3]}")]
    assert report.skipped == []
    assert len(getattr(hf, f"apply_to_{fam}")()) == 0  # idempotent
    ours = build(fam)  # no attn_implementation: the family's default, now ours
    assert ours.config._attn_implementation == "tritformer"
    assert build(fam, attn_implementation="eager").config._attn_implementation == "eager"
    # patch() on such a model finds nothing left to do
    r = tritformer.patch(copy.deepcopy(ours))
    assert (len(r), r.skipped) == (0, [])
    ids = torch.randint(1, VOCAB, (2, N))
    hf.revert()  # the baseline and the reference run the unpatched classes (the MLP forward
    base = copy.deepcopy(ours)  # is class-wide: it would fuse their MLPs too)
    base.set_attn_implementation("eager")
    base, ref = measure(base, ids), measure(reference(fam, ours), ids)
    got = calls()
    assert got["attention"] == got[FAMILIES[fam][3]] == 0, got  # nothing fused in them
    hf.apply_to(fam)  # ours again (its MLPs use the class's forward)
    assert_checks(checks(measure_fused(ours, ids, fam, calls), base, ref, fam))


@pytest.mark.parametrize("fam", ALL)
def test_apply_classes_and_revert(fam, clean_classes):
    # every family: the default switches, the family's MLP class gets the fused forward, other
    # families are untouched, revert restores everything
    mlp_cls = type(build(fam).get_submodule("transformer.h.0.mlp" if fam == "gpt2"
                                            else "model.layers.0.mlp"))
    original = mlp_cls.forward
    other = "gpt2" if fam != "gpt2" else "llama"
    default = build(fam).config._attn_implementation  # "sdpa"; Gemma-2: "eager"
    assert default != "tritformer"
    report = hf.apply_to(fam)
    assert len(report) == 2 and report.skipped == []
    assert build(fam).config._attn_implementation == "tritformer"
    assert build(other).config._attn_implementation == "sdpa"  # llama / gpt2's default
    assert mlp_cls.forward is not original and mlp_cls.forward._tritformer_original is original
    hf.revert(other)  # another family's revert leaves this one patched
    assert build(fam).config._attn_implementation == "tritformer"
    hf.revert(fam)
    assert mlp_cls.forward is original
    assert build(fam).config._attn_implementation == default


def test_apply_with_model_and_errors(calls, clean_classes):
    m = build("qwen2", attn_implementation="sdpa")
    r = hf.apply_to_qwen2(model=m)
    assert [s.name for s in r] == ["", "model.layers.0.mlp", "model.layers.1.mlp"]
    assert m.config._attn_implementation == "tritformer"
    assert not hf._class_patches  # a model given: classes untouched
    r = hf.apply_to_qwen2(model=m, attention=False, mlp=False)
    assert (len(r), r.skipped) == (0, [])
    with pytest.raises(TypeError, match="model must be a llama model .* got Qwen2ForCausalLM"):
        hf.apply_to_llama(model=m)
    with pytest.raises(ValueError, match="family must be one of .* got 'llama3'"):
        hf.apply_to("llama3")
    with pytest.raises(ValueError, match="family must be one of"):
        hf.revert("llama3")
