"""With quantization off, the transformed and folded model computes the original function (1e-4 relative)."""
import copy

import pytest
import torch

from core.config import parse_config
from core.algorithms import apply_flat_structure
from core.flat import FlatNormTransform, FlatQuantLinear, fold_model, iter_transforms, set_quant_enabled

TOL = 1e-4


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _randomize(model):
    """Move every transform away from its start: random skew generators, singular values and diag scales."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in iter_transforms(model):
            for name, p in t.named_parameters():
                if "skew" in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.mul_(torch.exp(0.3 * torch.randn(p.shape, generator=g)))


def _check(model, vocab, cfg):
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        q = copy.deepcopy(model)
        apply_flat_structure(q, cfg)
        _randomize(q)
        set_quant_enabled(q, False)
        transformed = q(ids).logits
        fold_model(q)
        folded = q(ids).logits
        set_quant_enabled(q, True)
        quantized = q(ids).logits
    assert _rel(transformed, ref) < TOL
    assert _rel(folded, ref) < TOL
    assert _rel(quantized, ref) > 10 * TOL  # quantization really is on afterwards
    return q


@pytest.mark.parametrize("extra", [{}, {"use_o_quant": True, "use_kcache_quant": True, "k_bits": 4,
                                        "use_vcache_quant": True, "v_bits": 4}])
def test_folding_equivalence_smollm2(smollm2, extra):
    cfg = parse_config()
    for k, v in extra.items():
        setattr(cfg, k, v)
    model = copy.deepcopy(smollm2.model)
    q = _check(model, model.config.vocab_size, cfg)
    layer = q.model.layers[0]
    assert isinstance(layer.input_layernorm, FlatNormTransform)
    assert isinstance(layer.mlp.down_proj, FlatQuantLinear) and layer.mlp.down_proj.in_trans is not None
    assert layer.mlp.down_proj.in_trans.left_size * layer.mlp.down_proj.in_trans.right_size == 1536


def test_folding_equivalence_qwen3(tiny_qwen3):
    q = _check(copy.deepcopy(tiny_qwen3), tiny_qwen3.config.vocab_size, parse_config())
    attn = q.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") and isinstance(attn.q_proj, FlatQuantLinear)


def test_skip_layers_keep_full_precision(tiny_qwen3):
    cfg = parse_config()
    cfg.skip_layers = ["layers.0.self_attn.k_proj", "down_proj"]
    cfg.use_down_quant = True
    q = copy.deepcopy(tiny_qwen3)
    apply_flat_structure(q, cfg)
    attn, mlp = q.model.layers[0].self_attn, q.model.layers[0].mlp
    assert attn.k_proj.weight_quantizer.bits == 16 and not attn.k_proj.real_quant_eligible
    assert attn.q_proj.weight_quantizer.bits == 4 and attn.q_proj.real_quant_eligible
    assert isinstance(mlp.down_proj, torch.nn.Linear) and not isinstance(mlp.down_proj, FlatQuantLinear)
    assert q.model.layers[1].self_attn.k_proj.weight_quantizer.bits == 4


def test_no_down_quant_leaves_down_proj_plain(tiny_qwen3):
    cfg = parse_config()
    cfg.use_down_quant = False
    q = copy.deepcopy(tiny_qwen3)
    apply_flat_structure(q, cfg)
    assert all(type(layer.mlp.down_proj) is torch.nn.Linear for layer in q.model.layers)
