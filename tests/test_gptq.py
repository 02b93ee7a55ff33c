"""GPTQ weight rounding: its codes are those of GPTQ's definition (column by column, the columns left re-fitted by
least squares), the folded model re-quantizes GPTQ's weights to GPTQ's own codes (so real == fake holds), and GPTQ
lowers the layer-output error against round-to-nearest by a stated margin on a real SmolLM2 layer and real text."""
import copy

import pytest
import torch

from core.adapters import adapter_for
from core.algorithms.quarot import apply_quarot
from core.config import parse_config
from core.data import sample_windows, token_ids
from core.algorithms import apply_flat_structure
from core.flat import FlatQuantLinear, fold_model, set_quant_enabled
from core.gptq import GPTQConfig, HessianCollector, dequantize, gptq_layer, gptq_linear, gptq_quantize, \
    quantized_linears
from core.models import decoder_layers
from core.quantizer import qmax, quantize_codes
from core.realquant.convert import convert_model


def _hessian(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("with_clip", [False, True])
def test_requantizing_gptq_weights_gives_back_its_codes(act_order, with_clip):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.exp(torch.randn(1, 96, generator=g))  # uneven columns
    w[5] = 0.0  # an all-zero row stays zero
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated inputs
    clip = torch.sigmoid(torch.randn(48, 1, generator=g) + 2) if with_clip else None
    codes, scale = gptq_quantize(w, _hessian(x), GPTQConfig(act_order=act_order, block_size=32), clip)
    assert codes.abs().max() <= 7 and torch.equal(codes, codes.round())
    assert torch.equal(codes.abs().amax(1)[torch.arange(48) != 5], torch.full((47,), 7.0))  # absmax pinned
    stored = dequantize(codes, scale)
    requant, rescale = quantize_codes(stored, 4, 1, None)  # what the folded model's quantizer does (no clip)
    assert torch.equal(requant, codes)
    assert torch.allclose(rescale, scale, rtol=1e-6)
    assert torch.equal(stored[5], torch.zeros(96))


def _gptq_by_definition(w: torch.Tensor, hessian: torch.Tensor, damp: float, act_order: bool) -> torch.Tensor:
    """GPTQ's codes from its definition, without its Cholesky factor or lazy batches: in GPTQ's column order, round
    column j to the nearest code of the row's grid (scale = absmax/7; the row's absmax column pinned to ±7), then
    move every column not yet rounded (R) to the least-squares optimum given the codes so far (F): minimizing
    (w - v)·H·(w - v)ᵀ over v_R gives v_R = w_R + (w_F - s·q_F)·H_FR·H_RR⁻¹, H damped as GPTQ damps it."""
    w64 = w.double()
    scale = (w.abs().amax(1, keepdim=True) / qmax(4)).double()
    pin = w.abs().argmax(1)
    h = hessian.double() + damp * hessian.double().diagonal().mean() * torch.eye(w.shape[1], dtype=torch.float64)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    codes, v = torch.zeros_like(w64), w64.clone()
    for j in range(len(order)):
        col = order[j]
        q = torch.clamp(torch.round(v[:, col] / scale[:, 0]), -qmax(4), qmax(4))
        codes[:, col] = torch.where(pin == col, torch.sign(w64[:, col]) * qmax(4), q)
        done, rest = order[:j + 1], order[j + 1:]
        if len(rest):
            delta = w64[:, done] - scale * codes[:, done]
            v[:, rest] = w64[:, rest] + delta @ h[done][:, rest] @ torch.linalg.inv(h[rest][:, rest])
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_equal_its_least_squares_definition(act_order):
    """Every code equals the closed form's, across 3 lazy-batch blocks: an error feedback that is missing, partial
    (within a block only) or of the wrong size changes codes."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 24, generator=g)
    x = torch.randn(256, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    h = _hessian(x)
    codes, scale = gptq_quantize(w, h, GPTQConfig(act_order=act_order, block_size=8, damp=0.01))
    want = _gptq_by_definition(w, h, 0.01, act_order)
    assert torch.equal(scale, w.abs().amax(1, keepdim=True) / qmax(4))
    assert torch.equal(codes.double(), want), (codes.double() != want).sum()
    assert not torch.equal(codes, quantize_codes(w, 4, 1, None)[0])  # far from round-to-nearest: the test can tell


def test_hessian_collector_matches_the_formula_and_sees_the_online_transform():
    from core.hadamard import HadamardTransform

    lin = torch.nn.Linear(64, 8)
    h = HadamardTransform(64, seed=1)
    flat = FlatQuantLinear(torch.nn.Linear(64, 8), 4, 4, False, in_trans=h, weight_trans=h)
    flat.fold()
    xs = [torch.randn(3, 10, 64) for _ in range(3)]
    with HessianCollector({"plain": lin, "flat": flat}) as hc:
        for x in xs:
            lin(x)
            flat(x)
    x_all = torch.cat([x.reshape(-1, 64) for x in xs])
    assert torch.allclose(hc.hessians["plain"], _hessian(x_all), rtol=1e-5, atol=1e-6)
    assert torch.allclose(hc.hessians["flat"], _hessian(h(x_all)), rtol=1e-5, atol=1e-6)
    assert not lin._forward_pre_hooks  # hooks are removed on exit


def test_gptq_refuses_an_unfolded_linear():
    from core.transforms import KroneckerTransform

    t = KroneckerTransform(16, seed=0)
    m = FlatQuantLinear(torch.nn.Linear(16, 4), 4, 4, False, in_trans=t, weight_trans=t)
    with pytest.raises(ValueError, match="fold"):
        gptq_linear(m, torch.eye(16))


@pytest.fixture(scope="module")
def rotated_smollm2(smollm2):
    """The first 4 layers of SmolLM2, QuaRot-rotated and folded (the transformed weights), quantization off, and
    windows of the embedded text (real prose on every machine): calibration from its calibration half, held-out
    from its perplexity half."""
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:4]  # layer 3 is the one under test
    apply_quarot(model, parse_config())
    fold_model(model)
    set_quant_enabled(model, False)
    calib, _ = token_ids(smollm2.tokenizer, None, "train")
    held, _ = token_ids(smollm2.tokenizer, None, "test")
    return model, sample_windows(calib, 16, 256, seed=0), sample_windows(held, 4, 128, seed=1)


def _layer_inputs(model, targets, ids):
    """Each target's input as its weight sees it (after its online transform), on these windows."""
    seen = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            trans = getattr(module, "in_trans", None)
            seen.setdefault(name, []).append((trans(x) if trans is not None else x).reshape(-1, x.shape[-1]))
        return fn

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop  # the layer under test is done: skip the rest and lm_head

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    handles.append(decoder_layers(model)[3].register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Stop:
        pass
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


# Highest allowed ‖X·Wᵀ - X·Q_gptqᵀ‖ / ‖X·Wᵀ - X·Q_rtnᵀ‖ per linear of SmolLM2's layer 3 (QuaRot, embedded text, 16 x
# 256 calibration tokens). Measured (act_order off / on): calibration q k v gate up 0.376-0.398 / 0.369-0.390,
# down_proj 0.621 / 0.615; held-out q k v gate up 0.444-0.471 / 0.437-0.463, down_proj 0.969 / 0.970 (4096 tokens are
# few for down_proj's 1536 inputs: its rounding fits them and generalizes least). The bounds are those values plus
# about 15%; a GPTQ without error feedback is round-to-nearest (ratio 1.0) and fails every one of them.
MAX_RATIO = {"calib": {"down_proj": 0.72, "other": 0.46}, "held": {"down_proj": 1.0, "other": 0.54}}


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_layer_output_error_against_rtn(rotated_smollm2, act_order):
    """Per linear of a QuaRot-rotated SmolLM2 layer: ‖X·Wᵀ - X·Qᵀ‖ for GPTQ's Q against the project's RTN of the same
    weight, on the calibration activations (what GPTQ minimizes) and on held-out ones, at most MAX_RATIO."""
    model, calib, held = rotated_smollm2
    layer = decoder_layers(model)[3]
    targets = quantized_linears(layer, adapter_for(model).linears())
    assert len(targets) == 6  # q k v gate up down (o_proj stays float by default)
    with HessianCollector(targets) as hc:
        x_calib = _layer_inputs(model, targets, calib)
    x_held = _layer_inputs(model, targets, held)
    ratios = {"calib": {}, "held": {}}
    for name, m in targets.items():
        w = m.linear.weight.detach()
        codes, scale = gptq_quantize(w, hc.hessians[name], GPTQConfig(act_order=act_order))
        rtn_codes, rtn_scale = quantize_codes(w, 4, 1, None)  # the project's RTN on the same weight
        for split, xs in (("calib", x_calib), ("held", x_held)):
            x = xs[name]
            ref = x @ w.t()
            err_gptq = (x @ dequantize(codes, scale).t() - ref).norm()
            err_rtn = (x @ (rtn_codes * rtn_scale).t() - ref).norm()
            ratios[split][name] = float(err_gptq / err_rtn)
    for split, by_name in ratios.items():
        for name, ratio in by_name.items():
            bound = MAX_RATIO[split]["down_proj" if name.endswith("down_proj") else "other"]
            assert ratio <= bound, (split, name, ratio, ratios)


@pytest.mark.parametrize("algorithm", ["quarot", "flatquant"])
def test_gptq_rounded_model_real_equals_fake(tiny_qwen3, algorithm):
    model = copy.deepcopy(tiny_qwen3)
    cfg = parse_config()
    if algorithm == "quarot":
        apply_quarot(model, cfg)
    else:
        apply_flat_structure(model, cfg)  # learnable weight clips (LWC): GPTQ takes them into its grid
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, FlatQuantLinear) and m.weight_quantizer.clip is not None:
                m.weight_quantizer.clip.data = 2 + torch.randn(m.weight_quantizer.clip.shape, generator=g)
    fold_model(model)
    ad = adapter_for(model)
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    for layer in decoder_layers(model):
        set_quant_enabled(model, False)
        losses = gptq_layer(layer, lambda: model(input_ids=ids), ad.linears())
        assert len(losses) == 6 and all(v["gptq"] < v["rtn"] for v in losses.values()), losses
    set_quant_enabled(model, True)
    lin = decoder_layers(model)[0].mlp.up_proj
    assert lin.weight_quantizer.clip is None
    codes, _ = quantize_codes(lin.linear.weight, 4, 1, None)
    assert torch.equal(codes.abs().amax(1), torch.full((codes.shape[0],), 7.0))
    test_ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = model(input_ids=test_ids).logits
        assert torch.equal(convert_model(copy.deepcopy(model), "auto")(input_ids=test_ids).logits, fake)
