"""Every registered algorithm (flatquant, rtn, quarot) under both weight roundings (rtn, gptq) through the generic
layer-wise loop and the quantize job: folding equivalence with quantization off, real == fake, save/load through
flat_matrices.pth, resume after an interruption, cancel; GPTQ lowers the layer-output error under FlatQuant."""
import copy

import pytest
import torch

from core.algorithms import ALGORITHMS, get_algorithm
from core.calibrate import calibrate_model, capture_layer_inputs, run_layer
from core.config import parse_config
from core.data import sample_windows, token_ids
from core.errors import JobCancelled
from core.flat import FlatQuantLinear, set_quant_enabled
from core.matrices import MATRIX_FILE, RESUME_FILE, load_matrices
from core.models import decoder_layers, load_model
from core.pipeline import QuantizeOptions, run_quantize
from core.progress import CancelToken, Reporter
from core.realquant.convert import convert_model

ROUNDINGS = ("rtn", "gptq")
COMBOS = [(a, r) for a in sorted(ALGORITHMS) for r in ROUNDINGS]
IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))


def _options(model_dir, out, algorithm, rounding, **kw):
    base = dict(model_path=str(model_dir), algorithm=algorithm, weight_rounding=rounding, nsamples=2, seqlen=32,
                epochs=1, skip_ppl=True, keep_original=True, output_dir=str(out))
    base.update(kw)
    return QuantizeOptions(**base)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_every_algorithm_is_registered():
    assert set(ALGORITHMS) == {"flatquant", "rtn", "quarot"}


@pytest.mark.parametrize("algorithm,rounding", COMBOS)
def test_real_equals_fake_and_load_matrix_gives_identical_logits(tiny_qwen3_dir, tmp_path, algorithm, rounding):
    """With lm_head quantized too (skip_layers empty: int8, core.flat.wrap_lm_head) under every algorithm."""
    result = run_quantize(_options(tiny_qwen3_dir, tmp_path / "run", algorithm, rounding, skip_layers=[]))
    assert isinstance(result.quantized.lm_head, FlatQuantLinear) and result.quantized.lm_head.weight_quantizer.bits == 8
    fake = _logits(result.quantized)
    assert torch.equal(_logits(convert_model(copy.deepcopy(result.quantized), "auto")), fake)
    # the float original the job kept is untouched (QuaRot rotates the whole model: its tensors were unshared)
    assert torch.equal(_logits(result.original.model), _logits(load_model(str(tiny_qwen3_dir)).model))
    state = torch.load(result.matrix_path, weights_only=True)["layers"][0]
    assert any(k.startswith("gptq.") for k in state) == (rounding == "gptq")
    if rounding == "gptq":
        assert all(v.dtype == torch.int8 for k, v in state.items() if k.endswith(".codes"))
    loaded = run_quantize(_options(tiny_qwen3_dir, tmp_path / "load", algorithm, rounding, load_matrix=True,
                                   flat_matrix_path=str(result.matrix_path), skip_layers=[]))
    assert torch.equal(_logits(loaded.quantized), fake)
    # the library's load (tests, benches, export) is the same rebuild: any algorithm, any rounding
    fresh = load_model(str(tiny_qwen3_dir)).model
    assert load_matrices(result.matrix_path, fresh).to_amct_dict() == result.config.to_amct_dict()
    assert torch.equal(_logits(fresh), fake)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_folded_model_with_quantization_off_computes_the_original(tiny_qwen3, algorithm):
    model = copy.deepcopy(tiny_qwen3)
    samples = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = parse_config()
    cfg.epochs = 1
    calibrate_model(model, samples, cfg, torch.device("cpu"), Reporter(), dtype=None, algorithm=algorithm)
    set_quant_enabled(model, False)
    ref, out = _logits(tiny_qwen3), _logits(model)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    set_quant_enabled(model, True)
    assert not torch.allclose(_logits(model), ref, atol=1e-3)  # and quantization is really on


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_gptq_run_resumes_after_an_interruption_and_cancels_cleanly(tiny_qwen3_dir, tmp_path, algorithm):
    class Boom(Exception):
        pass

    def crash_in_layer_1(e):
        if e.stage == "calibrate" and e.layer == 1:
            raise Boom

    out = tmp_path / "run"
    with pytest.raises(Boom):
        run_quantize(_options(tiny_qwen3_dir, out, algorithm, "gptq"), on_event=crash_in_layer_1)
    assert (out / RESUME_FILE).exists()
    events = []
    resumed = run_quantize(_options(tiny_qwen3_dir, out, algorithm, "gptq"), on_event=events.append)
    assert any("resuming: 1 layer" in e.message for e in events)
    assert {e.layer for e in events if e.stage == "calibrate"} == {1}  # layer 0 was neither retrained nor rounded
    straight = run_quantize(_options(tiny_qwen3_dir, tmp_path / "straight", algorithm, "gptq"))
    assert torch.equal(_logits(resumed.quantized), _logits(straight.quantized))

    token = CancelToken()

    def cancel_in_layer_1(e):
        if e.stage == "calibrate" and e.layer == 1:
            token.cancel()

    with pytest.raises(JobCancelled):
        run_quantize(_options(tiny_qwen3_dir, tmp_path / "cancel", algorithm, "gptq"), on_event=cancel_in_layer_1,
                     cancel=token)
    assert not (tmp_path / "cancel" / MATRIX_FILE).exists() and not (tmp_path / "cancel" / RESUME_FILE).exists()


def test_gptq_lowers_layer_output_error_under_flatquant(smollm2):
    """Same FlatQuant transforms (the RTN run's states restored), rounding rtn vs gptq: layer 0's output error
    against the float layer on held-out windows (the embedded text's perplexity half: never the calibration text)."""
    calib_ids, held_ids = (token_ids(smollm2.tokenizer, None, split)[0] for split in ("train", "test"))
    samples, held_out = sample_windows(calib_ids, 8, 128, seed=0), sample_windows(held_ids, 4, 128, seed=1)
    cfg = parse_config()
    cfg.epochs = 2
    states = {}
    models = {}
    for rounding in ROUNDINGS:
        model = copy.deepcopy(smollm2.model)
        calibrate_model(model, samples, cfg, torch.device("cpu"), Reporter(), dtype=None, max_layers=1,
                        weight_rounding=rounding, done_states=dict(states),
                        on_layer_done=lambda i, s, _r: states.__setitem__(i, s))
        models[rounding] = model
    inps, kwargs = capture_layer_inputs(smollm2.model, held_out, torch.device("cpu"))
    with torch.no_grad():
        ref = run_layer(decoder_layers(smollm2.model)[0], inps, kwargs)
        err = {r: float(((run_layer(decoder_layers(m)[0], inps, kwargs) - ref) ** 2).mean())
               for r, m in models.items()}
    assert err["gptq"] < 0.95 * err["rtn"], err  # measured: 0.127 vs 0.136, 0.936x (activation error stays)


@pytest.mark.parametrize("calib_inputs", ["fp", "quant"])
def test_calib_inputs_chooses_what_the_next_layer_trains_on(tiny_qwen3, calib_inputs):
    """"fp" (the reference): layer 1 trains on the float layer 0's outputs; "quant": on the quantized, folded layer
    0's outputs. Its targets stay the float model's either way."""
    model = copy.deepcopy(tiny_qwen3)
    samples = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = parse_config()
    cfg.epochs = 1
    seen = {}
    algo = get_algorithm("flatquant", cfg)
    train = algo.calibrate_layer

    def recording(layer, index, ctx):
        seen[index] = (ctx.inps.clone(), ctx.fp_outs.clone())
        return train(layer, index, ctx)

    algo.calibrate_layer = recording
    calibrate_model(model, samples, cfg, torch.device("cpu"), Reporter(), dtype=None, algorithm=algo, max_layers=2,
                    calib_inputs=calib_inputs)
    inps, kwargs = capture_layer_inputs(tiny_qwen3, samples, torch.device("cpu"))
    with torch.no_grad():
        fp_out = run_layer(decoder_layers(tiny_qwen3)[0], inps, kwargs)
        q_out = run_layer(decoder_layers(model)[0], inps, kwargs)
        target = run_layer(decoder_layers(tiny_qwen3)[1], fp_out, kwargs)
    assert not torch.allclose(q_out, fp_out, atol=1e-3)
    torch.testing.assert_close(seen[1][0], q_out if calib_inputs == "quant" else fp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1][1], target, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="calib_inputs"):
        calibrate_model(copy.deepcopy(tiny_qwen3), samples, cfg, torch.device("cpu"), Reporter(), calib_inputs="x")
