"""evaluate_pair and the evaluate command: every section lands in report.json with units."""
from __future__ import annotations

import argparse
import copy
import json

import pytest

from core.evaluate import (SECTIONS, EvalOptions, add_eval_args, build_rtn_model, eval_options_from_args,
                           evaluate_pair, wrapped_layer_count)
from core.errors import ConfigError
from core.report import load_report

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. ") * 8


@pytest.fixture(scope="module")
def flat_smollm2(smollm2):
    """SmolLM2 with FlatQuant W4A4 structure on every layer (random orthogonal transforms, not calibrated), folded."""
    from core.config import parse_config
    from core.algorithms import apply_flat_structure
    from core.flat import fold_model

    model = copy.deepcopy(smollm2.model)
    apply_flat_structure(model, parse_config(None))
    fold_model(model)
    return model.eval()


def test_evaluate_pair_writes_every_section(smollm2, flat_smollm2, shared_data, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    opts = EvalOptions(output_dir=str(tmp_path / "out"), ppl_data=str(text_file), ppl_seqlens=(32, 64),
                       ppl_max_windows=2, tasks=("arc_easy", "piqa"), tasks_data_dir=str(shared_data / "eval"),
                       limit=3, latency_seqlen=8, decode_tokens=2, latency_repeats=1, max_new_tokens=4)
    events = []
    from core.progress import Reporter

    res = evaluate_pair(smollm2.model, flat_smollm2, smollm2.tokenizer, opts, Reporter(events.append))
    report = load_report(tmp_path / "out")
    assert set(res) == {"ppl", "accuracy", "latency", "generation"} and json.loads(json.dumps(res)) == report

    ppl = report["ppl"]
    assert ppl["seqlens"] == [32, 64] and ppl["seqlen"] == 32 and ppl["unit"].startswith("perplexity")
    for s in ("32", "64"):
        row = ppl["by_seqlen"][s]
        assert set(row) == {"original", "quantized", "rtn"} and all(v > 1 for v in row.values())
    assert ppl["original"] == ppl["by_seqlen"]["32"]["original"]
    assert ppl["rtn"] > ppl["original"]  # W4A4 round-to-nearest hurts a 135M model badly

    acc = report["accuracy"]
    assert acc["unit"] == "percent" and acc["limit"] == 3 and acc["metric"] == {"arc_easy": "acc_norm",
                                                                                 "piqa": "acc_norm"}
    assert set(acc["acc"]) == {"original", "quantized"}
    assert acc["delta"]["acc_avg"] == pytest.approx(acc["acc"]["quantized"]["acc_avg"]
                                                   - acc["acc"]["original"]["acc_avg"], abs=0.011)

    lat = report["latency"]
    for name in ("original", "quantized"):
        assert lat[name]["prefill_ms"] > 0 and lat[name]["decode_ms_per_token"] > 0 and lat[name]["tokens_per_s"] > 0
        assert lat[name]["peak_memory_mb"] > 0 and lat[name]["prompt_tokens"] == 8
    assert {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_memory_mb"} <= set(lat["units"])
    from core.device import compute_dtype  # the timed copies are in the compute dtype: bf16 only where native

    dtype = compute_dtype("cpu")
    assert lat["speedup"]["quantized"]["prefill"] > 0 and lat["dtype"] == str(dtype).replace("torch.", "")
    assert lat["original"]["weights_mb"] == pytest.approx(
        sum(p.numel() for p in smollm2.model.parameters()) * dtype.itemsize / 2**20, rel=0.01)
    try:
        import core.realquant.convert  # noqa: F401 - the optional real-quant package
    except ImportError:
        assert "quantized_real" not in lat
    else:  # the int4 conversion is timed too, and its linear weights take far less memory
        assert lat["quantized_real"]["decode_ms_per_token"] > 0 and lat["real_quant_backend"]
        assert lat["speedup"]["quantized_real"]["weights_ratio"] < 0.9

    gen = report["generation"]
    assert gen["chat_template_applied"] and gen["original"]["text"] and gen["quantized"]["text"]
    stages = {e.stage for e in events}
    assert {"ppl", "eval", "latency"} <= stages


def test_rtn_covers_the_same_layers_as_the_quantized_model(smollm2):
    from core.config import parse_config
    from core.algorithms import apply_flat_structure
    from core.flat import is_wrapped

    partial = copy.deepcopy(smollm2.model)
    apply_flat_structure(partial, parse_config(None), num_layers=2)
    assert wrapped_layer_count(partial) == 2
    rtn = build_rtn_model(smollm2.model, None, wrapped_layer_count(partial))
    assert [is_wrapped(layer) for layer in rtn.model.layers[:3]] == [True, True, False]
    assert wrapped_layer_count(build_rtn_model(smollm2.model)) is None  # every layer


def test_eval_args_parse_and_share_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ppl_data", default="mine")  # a command that already owns a flag keeps it
    add_eval_args(parser)
    args = parser.parse_args([])
    opts = eval_options_from_args(args)
    assert opts.sections == () and opts.ppl_data == "mine" and opts.tasks[0] == "arc_challenge"
    opts = eval_options_from_args(parser.parse_args(["--eval"]))
    assert opts.sections == SECTIONS
    opts = eval_options_from_args(parser.parse_args(["--eval", "acc", "gen", "--tasks", "piqa,arc_easy", "boolq",
                                                     "--limit", "7", "--ppl_seqlens", "128", "--no_rtn"]))
    assert opts.sections == ("acc", "gen") and opts.tasks == ("piqa", "arc_easy", "boolq")
    assert opts.limit == 7 and opts.ppl_seqlens == (128,) and opts.ppl_rtn is False

    p2 = argparse.ArgumentParser()
    add_eval_args(p2, default_sections=SECTIONS)
    assert eval_options_from_args(p2.parse_args([])).sections == SECTIONS
    with pytest.raises(SystemExit):
        p2.parse_args(["--eval", "nonsense"])
    with pytest.raises(ConfigError):
        EvalOptions(sections=("accuracy",))
    with pytest.raises(ConfigError):
        EvalOptions(limit=0)


def test_evaluate_command_original_only(shared_data, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "eval"
    rc = main(["evaluate", "--eval", "acc", "gen", "--tasks", "piqa", "--tasks_data_dir", str(shared_data / "eval"),
               "--limit", "3", "--max_new_tokens", "3", "--output_dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[original]\nACC: {'piqa': " in printed and "original model only" in printed
    report = load_report(out)
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    assert set(report["accuracy"]["acc"]) == {"original"} and "quantized" not in report["generation"]


def test_evaluate_command_rebuilds_quantized_model_from_matrices(shared_data, tmp_path, capsys):
    from core.cli import main

    qdir = tmp_path / "q"
    assert main(["quantize", "--max_layers", "1", "--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--no_ppl",
                 "--output_dir", str(qdir)]) == 0
    out = tmp_path / "eval"
    rc = main(["evaluate", "--flat_matrix_path", str(qdir / "flat_matrices.pth"), "--eval", "ppl", "acc",
               "--tasks", "arc_easy", "--tasks_data_dir", str(shared_data / "eval"), "--limit", "2",
               "--ppl_seqlens", "32", "--ppl_max_windows", "1", "--output_dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[quantized]\nACC: {'arc_easy': " in printed
    report = load_report(out)
    assert set(report["accuracy"]["acc"]) == {"original", "quantized"}
    assert set(report["ppl"]["by_seqlen"]["32"]) == {"original", "quantized", "rtn"}
    assert report["calibration"]["loaded_from"].endswith("flat_matrices.pth")


def test_quantize_eval_reports_each_baselines_accuracy(shared_data, tiny_qwen3_dir, tmp_path, capsys):
    """`quantize --eval acc` (the CLI quantizes in place, so the baselines are rebuilt from the re-read original):
    report.json's accuracy holds every --baselines model next to the original and the quantized one."""
    from core.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "--model_path", str(tiny_qwen3_dir), "--nsamples", "2", "--seqlen", "32", "--epochs", "1",
               "--ppl_seqlen", "32", "--ppl_max_windows", "1", "--no_time_diff", "--baselines", "rtn,quarot",
               "--eval", "acc", "--tasks", "arc_easy", "--tasks_data_dir", str(shared_data / "eval"),
               "--limit", "2", "--output_dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[rtn]\nACC: {'arc_easy': " in printed and "[quarot]\nACC: {'arc_easy': " in printed
    report = load_report(out)
    models = {"original", "quantized", "rtn", "quarot"}
    assert set(report["accuracy"]["acc"]) == models and models <= set(report["accuracy"])
    assert report["accuracy"]["quarot"]["tasks"]["arc_easy"]["samples"] == 2  # really evaluated, not copied
    assert {"rtn", "quarot"} <= set(report["ppl"])  # the run's own perplexities of the same baselines
