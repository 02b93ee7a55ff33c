"""Reliability: every bad input or fault found by trying the CLI as a new user (issue 13) ends with exit code 2, one
`error:` line naming what to fix, no traceback, and nothing lost or half-written.

The cases that must be caught before the model loads run in-process with the model loader replaced by one that
fails the test, so they take milliseconds and prove the order; the others run tiny real calibrations."""
import errno
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import cli
from core.errors import CalibrationError, MatrixFileError

TINY = ["--max_layers", "1", "--nsamples", "2", "--seqlen", "64", "--epochs", "1", "--no_ppl", "--no_time_diff"]


def run_main(capsys, *args):
    code = cli.main(["quantize", *args])
    out, err = capsys.readouterr()
    return code, out, err


def tree_hashes(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error(code, err, needle):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    """A real flat_matrices.pth for SmolLM2 (first layer calibrated, tiny budget)."""
    out = tmp_path_factory.mktemp("calibrated")
    assert cli.main(["quantize", *TINY, "--output_dir", str(out)]) == 0
    return out / "flat_matrices.pth"


def _model_copy(src: Path, dst: Path, **config_changes) -> Path:
    """A model folder sharing src's weights (symlinks), with config.json fields changed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _write(c, name, data) -> str:
    p = c.tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def _matrix_variant(c, name, change) -> str:
    payload = torch.load(c.matrix_file, weights_only=True)
    change(payload)
    p = c.tmp / name
    torch.save(payload, p)
    return str(p)


def _nan_all(payload):
    for state in payload["layers"].values():
        for t in state.values():
            t.fill_(float("nan"))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _disk_full_from_start(c):
    usage = shutil.disk_usage(c.tmp)
    c.monkeypatch.setattr("core.validate.shutil.disk_usage", lambda p: usage._replace(free=100 * 1024))
    return []


def _weights_overwritten(c):
    # An int4 export (or anything else) written over the model's own weights: the layer weights are gone.
    from safetensors.torch import save_file

    d = _model_copy(c.qwen3_dir, c.tmp / "overwritten")
    (d / "model.safetensors").unlink()
    save_file({"qweight": torch.zeros(4, 4, dtype=torch.int8)}, str(d / "model.safetensors"))
    return ["--model_path", str(d)]


def _model_config(c, text: bytes):
    d = c.tmp / "model"
    d.mkdir()
    (d / "config.json").write_bytes(text)
    return ["--model_path", str(d)]


# name -> (args from a context, needle in the error line)
PRELOAD_CASES = {
    "flat_lr_inf": (lambda c: ["--flat_lr", "inf"], "flat_lr must be a finite number"),
    "flat_lr_nan": (lambda c: ["--flat_lr", "nan"], "flat_lr must be a finite number"),
    "config_flat_lr_1e999": (lambda c: ["--config", _write(c, "c.json", '{"algorithm": {"flatquant": '
                                                                       '{"flat_lr": 1e999}}}')], "finite"),
    "config_yaml_inf_alpha": (lambda c: ["--config", _write(c, "c.yaml", "algorithm:\n  flatquant:\n"
                                                                         "    diag_alpha: .nan\n")], "diag_alpha"),
    "config_not_utf8": (lambda c: ["--config", _write(c, "c.json", b"\xff\xfe{\x00}\x00")], "not UTF-8"),
    "config_not_object": (lambda c: ["--config", _write(c, "c.json", "[1, 2]")], "must hold a mapping"),
    "model_config_json_not_object": (lambda c: _model_config(c, b"[1, 2]"), "not an object"),
    "model_config_json_not_utf8": (lambda c: _model_config(c, b"\xff\xfe\x00"), "not UTF-8"),
    "model_weights_overwritten": (_weights_overwritten, "lacks"),
    "skip_layers_every_layer": (lambda c: ["--skip_layers", "layers"], "skips every layer"),
    "skip_layers_every_calibrated_layer": (lambda c: ["--skip_layers", "layers.0."], "skips every layer"),
    "skip_layers_no_layer": (lambda c: ["--skip_layers", "layers.999"], "matches no layer"),
    "seqlen_over_context": (lambda c: ["--model_path", str(_model_copy(c.qwen3_dir, c.tmp / "m512",
                                                                        max_position_embeddings=512)),
                                       "--seqlen", "100000"], "max_position_embeddings"),
    "matrix_missing": (lambda c: ["--load_matrix", "--flat_matrix_path", str(c.tmp / "none.pth")], "does not exist"),
    "matrix_all_nan": (lambda c: ["--load_matrix", "--flat_matrix_path", _matrix_variant(c, "nan.pth", _nan_all)],
                       "NaN/inf"),
    "matrix_random_bytes": (lambda c: ["--load_matrix", "--flat_matrix_path",
                                       _write(c, "r.pth", bytes(range(256)) * 16)], "corrupt"),
    "matrix_pickle_payload": (lambda c: ["--load_matrix", "--flat_matrix_path",
                                         _matrix_variant(c, "evil.pth", lambda p: p.update(meta=_Evil()))],
                              "unsafe pickle"),
    "matrix_partial": (lambda c: ["--load_matrix", "--flat_matrix_path",
                                  _matrix_variant(c, "part.pth", lambda p: p.update(complete=False))], "partial"),
    "matrix_other_model": (lambda c: ["--model_path", str(c.qwen3_dir), "--load_matrix", "--flat_matrix_path",
                                      str(c.matrix_file)], "another model"),
    "calib_data_missing": (lambda c: ["--calib_data", str(c.tmp / "missing.txt")], "does not exist"),
    "baselines_unknown": (lambda c: ["--baselines", "rtn,spinquant"], "--baselines must name some of rtn, quarot"),
    "output_dir_is_a_file": (lambda c: ["--output_dir", _write(c, "a_file", "x")], "is a file"),
    "output_dir_inside_a_file": (lambda c: ["--output_dir", str(Path(_write(c, "b_file", "x")) / "sub")],
                                 "which is a file"),
    "disk_full_from_the_start": (_disk_full_from_start, "Not enough free disk space"),
}


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("core.pipeline.load_model", refuse)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh_dir", "existing_dir"])
@pytest.mark.parametrize("case", sorted(PRELOAD_CASES))
def test_bad_input_caught_before_the_model_loads(case, existing, tmp_path, capsys, monkeypatch, no_model_load,
                                                 matrix_file, tiny_qwen3_dir):
    ctx = SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, matrix_file=matrix_file, qwen3_dir=tiny_qwen3_dir)
    make_args, needle = PRELOAD_CASES[case]
    out_dir = tmp_path / "out"
    if existing:  # a previous run's files must come out untouched
        out_dir.mkdir()
        shutil.copy(matrix_file, out_dir / "flat_matrices.pth")
        (out_dir / "report.json").write_text('{"ppl": {"original": 1.0}}')
    before = tree_hashes(out_dir)
    args = make_args(ctx)
    if "--output_dir" not in args:
        args += ["--output_dir", str(out_dir)]
    code, _, err = run_main(capsys, *TINY, *args)
    assert_one_error(code, err, needle)
    assert tree_hashes(out_dir) == before
    assert out_dir.exists() == existing  # an early error leaves no output folder behind


def test_error_lines_name_files_not_server_paths(tmp_path, capsys, no_model_load):
    bad = tmp_path / "deep" / "folder"
    bad.mkdir(parents=True)
    (bad / "c.json").write_text("[1]")
    code, _, err = run_main(capsys, *TINY, "--config", str(bad / "c.json"), "--output_dir", str(tmp_path / "o"))
    assert_one_error(code, err, "'c.json'")
    assert str(bad) not in err


def test_loss_rise_is_warned_in_log_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(capsys, *TINY, "--flat_lr", "100", "--output_dir", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    layer = report["calibration"]["layers"][0]
    assert layer["last_loss"] > layer["first_loss"]
    assert len(report["calibration"]["warnings"]) == 1 and "loss rose" in report["calibration"]["warnings"][0]
    assert "[warning] layer 1: loss rose" in (out / "quantize.log").read_text()


def test_sane_run_has_no_loss_warning(matrix_file):
    report = json.loads((matrix_file.parent / "report.json").read_text())
    layer = report["calibration"]["layers"][0]
    assert layer["last_loss"] < layer["first_loss"] and report["calibration"]["warnings"] == []


def test_disk_full_at_final_save_keeps_resume_file_and_rerun_resumes(tmp_path, capsys, monkeypatch):
    import core.matrices as matrices

    real_write = matrices.atomic_write_bytes

    def full_disk_for_final_file(path, data):
        if Path(path).name == matrices.MATRIX_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    out = tmp_path / "out"
    args = [*TINY, "--max_layers", "2", "--output_dir", str(out)]
    monkeypatch.setattr(matrices, "atomic_write_bytes", full_disk_for_final_file)
    code, _, err = run_main(capsys, *args)
    assert_one_error(code, err, "No space left on device")
    assert "flat_matrices.resume.pth" in err and "run the same command again" in err
    resume = matrices.read_matrices(out / matrices.RESUME_FILE)
    assert sorted(resume["layers"]) == [0, 1] and not resume["complete"]
    assert not (out / matrices.MATRIX_FILE).exists() and not list(out.glob(".*.tmp"))

    monkeypatch.setattr(matrices, "atomic_write_bytes", real_write)
    code, out_text, err = run_main(capsys, *args)
    assert code == 0, err
    assert "resuming: 2 layer(s) restored" in (out / "quantize.log").read_text()
    assert matrices.read_matrices(out / matrices.MATRIX_FILE)["complete"]
    assert not (out / matrices.RESUME_FILE).exists()


def test_load_matrix_run_says_loaded_not_saved(matrix_file, tmp_path, capsys):
    before = tree_hashes(matrix_file.parent)
    code, out, err = run_main(capsys, "--load_matrix", "--flat_matrix_path", str(matrix_file), "--no_ppl",
                              "--no_time_diff", "--output_dir", str(tmp_path / "o"))
    assert code == 0, err
    assert f"Loaded {matrix_file}" in out and f"Saved {matrix_file}" not in out
    assert tree_hashes(matrix_file.parent) == before


def test_complete_matrix_file_with_nan_is_never_written(matrix_file, tmp_path):
    from core.matrices import save_matrices

    payload = torch.load(matrix_file, weights_only=True)
    _nan_all(payload)
    with pytest.raises(CalibrationError, match="NaN/inf"):
        save_matrices(tmp_path / "f.pth", payload)
    assert not (tmp_path / "f.pth").exists()
    payload["complete"] = False  # a resume checkpoint is only a copy of what trained; reading it refuses NaN
    save_matrices(tmp_path / "r.pth", payload)
    with pytest.raises(MatrixFileError, match="NaN/inf"):
        from core.matrices import read_matrices

        read_matrices(tmp_path / "r.pth")


def test_trained_layer_check(matrix_file):
    from core.validate import check_trained_layer

    state = dict(torch.load(matrix_file, weights_only=True)["layers"][0])
    assert check_trained_layer(0, state, 0.2, 0.1) is None
    assert "loss rose from 0.1 to 2.7" in check_trained_layer(0, state, 0.1, 2.7)
    assert check_trained_layer(0, state, math.nan, math.nan) is None  # restored from a resume file
    with pytest.raises(CalibrationError, match="loss inf"):
        check_trained_layer(0, state, 0.1, math.inf)
    key = next(iter(state))
    state[key] = state[key].clone().fill_(math.inf)
    with pytest.raises(CalibrationError, match=key.replace(".", r"\.")):
        check_trained_layer(0, state, 0.2, 0.1)


def test_safe_message_hides_server_paths(tmp_path):
    from core.validate import safe_message

    runs = tmp_path / "runs"
    msg = f"Matrix file '{runs}/20260101-000000/flat_matrices.pth' is corrupt; also /usr/lib/python3/x/secret.py"
    out = safe_message(msg, roots=[runs])
    assert "'20260101-000000/flat_matrices.pth'" in out and "secret.py" in out
    assert str(tmp_path) not in out and "/usr/lib" not in out


@pytest.mark.parametrize("case", ["matrix_all_nan", "matrix_random_bytes", "matrix_other_model",
                                  "model_config_json_not_object", "output_dir_is_a_file"])
def test_evaluate_command_checks_before_loading(case, tmp_path, capsys, monkeypatch, matrix_file, tiny_qwen3_dir):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("core.models.load_model", refuse)
    monkeypatch.setattr("core.pipeline.load_model", refuse)
    ctx = SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, matrix_file=matrix_file, qwen3_dir=tiny_qwen3_dir)
    make_args, needle = PRELOAD_CASES[case]
    args = make_args(ctx)
    args = [a for a in args if a != "--load_matrix"]
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    code = cli.main(["evaluate", "--eval", "ppl", *args])
    _, err = capsys.readouterr()
    assert_one_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_calibration_jsonl_that_is_not_json_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\nnot json at all\n')
    code, _, err = run_main(capsys, *TINY, "--calib_data", str(bad), "--output_dir", str(tmp_path / "out"))
    assert_one_error(code, err, "calib.jsonl line 2 is not JSON")
    assert not (tmp_path / "out").exists()
