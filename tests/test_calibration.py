"""Calibration on the real SmolLM2: it learns, saves/loads exactly, cancels cleanly, refuses bad matrix files."""
import copy
import os

import pytest
import torch

from core.calibrate import calibrate_model
from core.config import parse_config
from core.data import load_text, sample_windows, tokenize
from core.errors import CalibrationError, JobCancelled, MatrixFileError
from core.matrices import MATRIX_FILE, RESUME_FILE, build_payload, load_matrices, save_matrices
from core.pipeline import QuantizeOptions, rtn_model, run_quantize
from core.progress import CancelToken, Reporter

LAYERS = 2


@pytest.fixture(scope="module")
def samples(smollm2):
    text, _ = load_text(None)  # the embedded text works without ../shared
    return sample_windows(tokenize(smollm2.tokenizer, text), 8, 128)


def _cfg(epochs=4):
    cfg = parse_config()
    cfg.epochs = epochs
    cfg.flat_lr = 1e-2
    return cfg


def _calibrate(smollm2, samples, epochs):
    model = copy.deepcopy(smollm2.model)
    states = {}
    results = calibrate_model(model, samples, _cfg(epochs), torch.device("cpu"), Reporter(), max_layers=LAYERS,
                              on_layer_done=lambda i, s, r: states.__setitem__(i, s))
    return model, states, results


@pytest.fixture(scope="module")
def calibrated(smollm2, samples):
    return _calibrate(smollm2, samples, epochs=4)


def _logit_mse(model, reference, ids):
    with torch.no_grad():
        return float(((model(ids).logits - reference(ids).logits) ** 2).mean())


def test_calibration_beats_its_starting_point_and_rtn(smollm2, samples, calibrated):
    model, _, results = calibrated
    assert len(results) == LAYERS
    untrained, _, _ = _calibrate(smollm2, samples, epochs=0)  # same transforms and clips, before any step
    rtn = rtn_model(smollm2.model, _cfg(), LAYERS)
    ids = samples[:4, :96]
    trained_err = _logit_mse(model, smollm2.model, ids)
    assert trained_err < 0.95 * _logit_mse(untrained, smollm2.model, ids)
    assert trained_err < 0.5 * _logit_mse(rtn, smollm2.model, ids)


def test_save_load_round_trip_gives_identical_logits(smollm2, calibrated, samples, tmp_path):
    model, states, _ = calibrated
    path = save_matrices(tmp_path / MATRIX_FILE, build_payload(model, _cfg(), states, complete=True))
    fresh = copy.deepcopy(smollm2.model)
    load_matrices(path, fresh)
    ids = samples[:2, :64]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_matrix_file_for_another_model_is_refused(tiny_qwen3, calibrated, tmp_path):
    model, states, _ = calibrated
    path = save_matrices(tmp_path / MATRIX_FILE, build_payload(model, _cfg(), states, complete=True))
    with pytest.raises(MatrixFileError, match="another model.*hidden_size"):
        load_matrices(path, copy.deepcopy(tiny_qwen3))


def test_corrupt_truncated_and_pickle_files_are_refused(smollm2, calibrated, tmp_path):
    model, states, _ = calibrated
    good = save_matrices(tmp_path / "good.pth", build_payload(model, _cfg(), states, complete=True))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage):
        with pytest.raises(MatrixFileError, match="corrupt"):
            load_matrices(path, copy.deepcopy(smollm2.model))

    class Payload:  # an arbitrary object: weights_only loading must refuse to unpickle it
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    torch.save({"format": "x", "layers": Payload()}, evil)
    with pytest.raises(MatrixFileError, match="unsafe"):
        load_matrices(evil, copy.deepcopy(smollm2.model))
    assert not (tmp_path / "pwned").exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"a": torch.zeros(1)}, wrong)
    with pytest.raises(MatrixFileError, match="not a FlatQuant Studio matrix file"):
        load_matrices(wrong, copy.deepcopy(smollm2.model))
    with pytest.raises(MatrixFileError, match="does not exist"):
        load_matrices(tmp_path / "missing.pth", copy.deepcopy(smollm2.model))


def _options(tmp_path, **kw):
    base = dict(nsamples=4, seqlen=64, epochs=2, max_layers=2, skip_ppl=True, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return QuantizeOptions(**base)


def test_cancel_stops_within_one_step_and_leaves_no_partial_file(tmp_path):
    token = CancelToken()
    steps_after_cancel = []

    def on_event(e):
        if e.stage == "calibrate":
            if token.cancelled:
                steps_after_cancel.append(e)
            elif e.layer == 1:  # cancel in the second layer: the first one has been checkpointed already
                token.cancel()

    with pytest.raises(JobCancelled):
        run_quantize(_options(tmp_path), on_event=on_event, cancel=token)
    out = tmp_path / "run"
    assert steps_after_cancel == []
    assert not (out / MATRIX_FILE).exists() and not (out / RESUME_FILE).exists()
    assert not out.exists()  # the job created the folder and left nothing in it but its log: removed


def test_interrupted_run_resumes_from_finished_layers(tmp_path):
    class Boom(Exception):
        pass

    def crash_in_layer_1(e):
        if e.stage == "calibrate" and e.layer == 1:
            raise Boom

    with pytest.raises(Boom):
        run_quantize(_options(tmp_path), on_event=crash_in_layer_1)
    assert (tmp_path / "run" / RESUME_FILE).exists()
    events = []
    result = run_quantize(_options(tmp_path), on_event=events.append)
    assert any("resuming: 1 layer" in e.message for e in events)
    assert {e.layer for e in events if e.stage == "calibrate"} == {1}  # layer 0 was not retrained
    assert (tmp_path / "run" / MATRIX_FILE).exists() and not (tmp_path / "run" / RESUME_FILE).exists()
    assert result.report["calibration"]["nsamples"] == 4


def test_nan_loss_is_a_clear_error(smollm2, samples):
    model = copy.deepcopy(smollm2.model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="lower --flat_lr"):
        calibrate_model(model, samples[:4], _cfg(1), torch.device("cpu"), Reporter(), max_layers=1)


def test_pipeline_report_and_quantized_perplexity_beats_rtn(tmp_path, shared_data):
    result = run_quantize(_options(tmp_path, nsamples=8, seqlen=128, max_layers=None, epochs=1, skip_ppl=False,
                                   ppl_max_windows=4, calib_data=str(shared_data / "brown" / "brown.txt")))
    ppl = result.report["ppl"]
    assert set(ppl) >= {"original", "quantized", "rtn", "dataset", "seqlen"} and ppl["seqlen"] == 512
    assert ppl["original"] < ppl["quantized"] < ppl["rtn"]
    cal = result.report["calibration"]
    assert cal["nsamples"] == 8 and cal["seqlen"] == 128 and cal["epochs"] == 1 and cal["peak_rss_mb"] > 0
    assert (tmp_path / "run" / "report.json").exists() and (tmp_path / "run" / "quantize.log").exists()
