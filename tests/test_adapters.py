"""Every supported family goes through its adapter: small random Qwen2 (q/k/v bias), Mistral, Qwen3 and LLaMA models
pass the same structure tests (folding equivalence with quantization off, real == fake, save/load of matrices)."""
import copy
import json

import pytest
import torch

from core.adapters import adapter_for, supported_architectures
from core.config import parse_config
from core.errors import UnsupportedModelError
from core.algorithms import apply_flat_structure
from core.flat import FlatQuantLinear, flat_state, fold_model, iter_transforms, set_quant_enabled
from core.matrices import MATRIX_FILE, build_payload, load_matrices, save_matrices
from core.models import build_random_mistral, build_random_qwen2, build_random_qwen3, decoder_layers, \
    model_identity, read_architecture
from core.realquant.convert import convert_model

TOL = 1e-4
SMALL = dict(hidden_size=128, intermediate_size=384, layers=2, heads=4, kv_heads=2, vocab_size=512)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


BUILDERS = {
    "qwen2": lambda: build_random_qwen2(**SMALL),
    "mistral": lambda: build_random_mistral(**SMALL),
    "qwen3": lambda: build_random_qwen3(head_dim=32, **SMALL),
    "llama": _tiny_llama,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_model(request):
    return request.param, BUILDERS[request.param]()


def _ids(vocab, shape=(2, 40), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _perturb(model):
    """Random transforms away from their start, so folding has something to get right."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in iter_transforms(model):
            for p in t.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _wrapped(model, perturb=True):
    q = copy.deepcopy(model)
    apply_flat_structure(q, parse_config())
    if perturb:
        _perturb(q)
    return q


def test_adapter_is_found_for_model_and_layer(family_model):
    family, model = family_model
    ad = adapter_for(model)
    assert ad.family == family and ad.architecture == type(model).__name__
    assert adapter_for(decoder_layers(model)[0]) is ad
    assert model_identity(model)["architecture"] == ad.architecture
    for path in ad.linears():  # the adapter's names are the model's
        assert isinstance(decoder_layers(model)[0].get_submodule(path), torch.nn.Linear)
    q_bias = decoder_layers(model)[0].get_submodule(ad.readers()[0]).bias
    assert (q_bias is not None) == ad.qkv_bias
    if ad.qkv_bias:
        assert q_bias.abs().max() > 0  # the random model's biases are not zero: the tests below exercise them


def test_folding_equivalence_with_quantization_off(family_model):
    _, model = family_model
    ids = _ids(model.config.vocab_size)
    q = _wrapped(model)
    rel = {}
    with torch.no_grad():
        ref = model(ids).logits
        for stage in ("transformed", "folded", "quantized"):
            if stage == "folded":
                fold_model(q)
            set_quant_enabled(q, stage == "quantized")
            rel[stage] = float((q(ids).logits - ref).norm() / ref.norm())
    assert rel["transformed"] < TOL and rel["folded"] < TOL and rel["quantized"] > 10 * TOL, rel
    assert sum(isinstance(m, FlatQuantLinear) for m in q.modules()) == 6 * model.config.num_hidden_layers


def test_real_quant_equals_fake_quant(family_model):
    _, model = family_model
    fake = _wrapped(model)
    fold_model(fake)
    ids = _ids(model.config.vocab_size, (1, 24), seed=1)
    with torch.no_grad():
        ref = fake(ids).logits
        real = convert_model(copy.deepcopy(fake), "auto")
        assert not any(isinstance(m, FlatQuantLinear) for m in real.modules())
        assert torch.equal(real(ids).logits, ref)


def test_matrices_save_and_load(family_model, tmp_path):
    _, model = family_model
    q = _wrapped(model)
    states = {}
    for i, layer in enumerate(decoder_layers(q)):
        for t in iter_transforms(layer):
            t.freeze()
        states[i] = flat_state(layer)
    path = save_matrices(tmp_path / MATRIX_FILE, build_payload(q, parse_config(), states, complete=True))
    fold_model(q)
    fresh = copy.deepcopy(model)
    load_matrices(path, fresh)
    ids = _ids(model.config.vocab_size, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, q(ids).logits)


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        decoder_layers(gpt2)
    msg = str(err.value)
    assert "\n" not in msg and "'GPT2LMHeadModel' is not supported" in msg
    assert all(a in msg for a in supported_architectures())
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        apply_flat_structure(gpt2, parse_config())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM"):
        read_architecture(tmp_path)


def test_every_family_is_listed():
    assert set(supported_architectures()) >= {"LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
                                              "MistralForCausalLM"}


def test_real_quant_checkpoint_round_trip(family_model, tmp_path):
    """Export (packed int4, biases, transforms) and load without the original weights, through the adapter's
    architecture check: identical logits."""
    from core.realquant.checkpoint import export_checkpoint, load_checkpoint

    _, model = family_model
    fake = _wrapped(model)
    fold_model(fake)
    real = convert_model(copy.deepcopy(fake), "auto")
    export_checkpoint(real, None, tmp_path / "ck", parse_config())
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.architecture == type(model).__name__
    ids = _ids(model.config.vocab_size, (1, 16), seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, real(ids).logits)
