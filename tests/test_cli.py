"""The CLI end to end (subprocess), and one-line errors for each kind of bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quantize_qwen3_folder_end_to_end(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("quantize", "--model_path", str(tiny_qwen3_dir), "--nsamples", "4", "--seqlen", "64",
                   "--epochs", "1", "--ppl_max_windows", "2", "--output_dir", str(out), "--baselines", "rtn,quarot")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PPL score:" in proc.stdout and proc.stdout.rstrip().endswith("All done!")
    assert "PPL score (rtn): " in proc.stdout and "PPL score (quarot): " in proc.stdout
    assert "Time diff orig: " in proc.stdout and "Time diff after real quant: " in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["real_quant"]["time_orig_ms"] > 0 and report["real_quant"]["time_real_quant_ms"] > 0
    assert report["model"]["architecture"] == "Qwen3ForCausalLM"
    assert report["ppl"]["seqlen"] == 512 and report["calibration"]["epochs"] == 1
    assert report["ppl"]["rtn"] > 0 and report["ppl"]["quarot"] > 0
    assert (out / "flat_matrices.pth").exists() and (out / "quantize.log").exists()
    # load the matrices back instead of recalibrating
    proc = run_cli("quantize", "--model_path", str(tiny_qwen3_dir), "--load_matrix", "--flat_matrix_path",
                   str(out / "flat_matrices.pth"), "--no_ppl", "--output_dir", str(tmp_path / "loaded"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "All done!" in proc.stdout


def _unsupported_model(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return d


def _bad_config(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"algorithm": {"flatquant": {"k_bits": 5}}}))
    return p


def _corrupt_matrix(tmp_path):
    p = tmp_path / "flat_matrices.pth"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    return p


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: ["--model_path", str(t / "nope")], "does not exist"),
    (lambda t: ["--model_path", str(_unsupported_model(t))],
     "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    (lambda t: ["--skip_layers=--"], "no letter or digit"),
    (lambda t: ["--config", str(_bad_config(t))], "algorithm.flatquant.k_bits"),
    (lambda t: ["--load_matrix", "--flat_matrix_path", str(_corrupt_matrix(t))], "corrupt"),
    (lambda t: ["--load_matrix"], "--flat_matrix_path"),
    (lambda t: ["--calib_data", str(t / "missing.txt")], "does not exist"),
    (lambda t: ["--nsamples", "0"], "--nsamples"),
    (lambda t: ["--device", "tpu"], "--device"),
])
def test_bad_input_gives_one_line_error(tmp_path, make_args, needle):
    proc = run_cli("quantize", *make_args(tmp_path), "--no_ppl", "--output_dir", str(tmp_path / "o"), timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
