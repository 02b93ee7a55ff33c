"""QuaRot-style rotation: exact in float (logits within 1e-4 relative), and QuaRot-RTN W4A4 much better than RTN."""
import copy

import pytest
import torch

from core.algorithms.quarot import QuaRotConfig, apply_quarot, rotate_model
from core.config import parse_config
from core.algorithms import apply_flat_structure
from core.flat import FlatQuantLinear, fold_model, set_quant_enabled
from core.hadamard import HadamardTransform, random_hadamard, random_hadamard_factors, split_pow2, sylvester_hadamard
from core.models import decoder_layers
from core.perplexity import perplexity_from_ids
from core.realquant.convert import convert_model

TOL = 1e-4


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n,odd", [(576, 9), (1536, 3), (11008, 43), (256, 1), (96, 3)])
def test_randomized_hadamard_is_orthogonal_for_any_width(n, odd):
    """L ⊗ R is orthogonal iff L and R are; the dense n x n matrix is checked too where it is small (at 11008 it
    is 0.9 GiB in float64, and the check would hold several: the default suite stays under 4 GiB)."""
    assert split_pow2(n)[0] == odd
    left, right = random_hadamard_factors(n, seed=1)
    assert left.shape[0] * right.shape[0] == n
    for f in (left, right):
        assert torch.allclose(f @ f.t(), torch.eye(f.shape[0], dtype=torch.float64), atol=1e-12)
    other = random_hadamard_factors(n, seed=2)
    assert not (torch.equal(left, other[0]) and torch.equal(right, other[1]))  # randomized: the seed matters
    if n <= 2048:
        q = random_hadamard(n, seed=1)
        assert torch.equal(q, torch.kron(left, right))
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    if odd == 1:  # a power of two: a signed Hadamard matrix, every entry ±1/sqrt(block)
        assert torch.allclose(right.abs(), torch.full_like(right, right.shape[0] ** -0.5))


def test_sylvester_hadamard_refuses_other_widths():
    assert torch.equal(sylvester_hadamard(2) * 2 ** 0.5, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        sylvester_hadamard(12)


def test_online_hadamard_transform_folds_exactly():
    h = HadamardTransform(1536, seed=5)
    x, w = torch.randn(3, 1536, dtype=torch.float64), torch.randn(8, 1536, dtype=torch.float64)
    h.double()
    assert torch.allclose(torch.nn.functional.linear(h(x), h.transform_weight(w)), x @ w.t(), atol=1e-9)
    assert torch.allclose(h(x).norm(dim=-1), x.norm(dim=-1))  # orthogonal


def _check_float_equivalence(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rotated = rotate_model(copy.deepcopy(model), QuaRotConfig(seed=3))
        assert _rel(rotated(ids).logits, ref) < TOL
        q = apply_quarot(copy.deepcopy(model), parse_config(), QuaRotConfig(seed=3))
        set_quant_enabled(q, False)
        assert _rel(q(ids).logits, ref) < TOL  # online Hadamard before down_proj, not folded
        fold_model(q)
        assert _rel(q(ids).logits, ref) < TOL
        set_quant_enabled(q, True)
        assert _rel(q(ids).logits, ref) > 10 * TOL
    return q, ids


def test_rotation_leaves_smollm2_logits_unchanged(smollm2):
    q, _ = _check_float_equivalence(smollm2.model)
    down = decoder_layers(q)[0].mlp.down_proj
    assert isinstance(down, FlatQuantLinear) and isinstance(down.in_trans, HadamardTransform)
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight  # the original stays tied


def test_rotation_leaves_tiny_qwen3_logits_unchanged_and_real_equals_fake(tiny_qwen3):
    q, ids = _check_float_equivalence(tiny_qwen3)
    attn = decoder_layers(q)[0].self_attn
    assert abs(float(attn.q_proj.act_quantizer.clip_ratio()) - 0.9) < 1e-6  # QuaRot's fixed activation clip
    assert attn.k_proj.act_quantizer is attn.q_proj.act_quantizer  # still one quantizer for q/k/v
    w_clip = decoder_layers(q)[1].mlp.down_proj.weight_quantizer.clip_ratio()
    assert w_clip is not None and bool((w_clip <= 1).all()) and bool((w_clip < 0.99).any())  # MSE-searched
    with torch.no_grad():
        ref = q(ids).logits
        assert torch.equal(convert_model(copy.deepcopy(q), "auto")(ids).logits, ref)


@pytest.mark.slow
def test_quarot_rtn_w4a4_beats_plain_rtn_on_smollm2(smollm2, shared_data):
    """Calibration-free, so no calibration text is involved; PPL at 512 on the first 24 windows of WikiText-2 test
    (the whole file: bench/algorithms.py). About two minutes on 2 vCPUs."""
    from core.data import load_text, tokenize

    ids = tokenize(smollm2.tokenizer, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")[0])
    cfg = parse_config()

    def ppl(model):
        return perplexity_from_ids(model, ids, 512, max_windows=24, dtype=None)

    rtn = copy.deepcopy(smollm2.model)
    apply_flat_structure(rtn, cfg, use_transforms=False)
    fold_model(rtn)
    rtn_ppl = ppl(rtn)
    del rtn
    quarot = apply_quarot(copy.deepcopy(smollm2.model), cfg)
    fold_model(quarot)
    quarot_ppl = ppl(quarot)
    fp_ppl = ppl(smollm2.model)
    print(f"PPL@512 x24 windows: FP {fp_ppl:.2f}, QuaRot-RTN {quarot_ppl:.2f}, RTN {rtn_ppl:.2f}")
    assert fp_ppl < quarot_ppl < 0.5 * rtn_ppl, (fp_ppl, quarot_ppl, rtn_ppl)


def test_quarot_is_a_function_of_its_seed(tiny_qwen3):
    """QuaRot's whole state is its seed: rebuilding with the same seed gives the same quantized model (what a saved
    run needs), another seed another rotation."""
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    with torch.no_grad():
        for key, seed in (("a", 7), ("b", 7), ("c", 8)):
            q = apply_quarot(copy.deepcopy(tiny_qwen3), parse_config(), QuaRotConfig(seed=seed))
            fold_model(q)
            out[key] = q(ids).logits
    assert torch.equal(out["a"], out["b"]) and not torch.equal(out["a"], out["c"])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_rotation_is_exact_for_other_families(family):
    """Qwen2's q/k/v biases and Mistral's sliding window do not disturb the rotation (float, 1e-4 relative)."""
    from core.models import build_random_mistral, build_random_qwen2

    build = {"qwen2": build_random_qwen2, "mistral": build_random_mistral}[family]
    _check_float_equivalence(build(hidden_size=192, intermediate_size=384, vocab_size=512))


def test_rotation_refuses_a_wrapped_model(tiny_qwen3):
    q = copy.deepcopy(tiny_qwen3)
    apply_flat_structure(q, parse_config(), use_transforms=False)
    with pytest.raises(ValueError, match="float model"):
        rotate_model(q)
