"""Hostile command lines (issue 21, round three): every kind of bad input ends with exit code 2, exactly one stderr
line starting with `error:` that names what to fix, no traceback, before the model loads, and no output folder left
behind. Each kind is tried with several inputs, as a re-test would.

Kinds: argparse's own errors; skip_layers text that is only separators or blanks; config files that expand (YAML
aliases, deep nesting, size) and values echoed in messages; config.json sizes that are not positive integers; model
folders without safetensors weights; an --activation_dir that cannot be a folder; evaluate's options and malformed
task files; count options out of range (0 perplexity windows included)."""
import json
import re
import time
from pathlib import Path

import pytest
import torch

from core import cli
from core.errors import ConfigError, LINE_LIMIT, ModelLoadError, one_line, shown

FAST = ["--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--max_layers", "1", "--no_time_diff"]

SIZES = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
         "vocab_size": 256, "max_position_embeddings": 512, "torch_dtype": "float32"}


def one_error(capsys, argv, *needles) -> str:
    """Run the CLI in-process: exit code 2 and stderr exactly one `error:` line holding every needle."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err[-3000:]
    assert "Traceback" not in err and len(lines[0]) <= len("error: ") + LINE_LIMIT
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def model_folder(path: Path, **changes) -> Path:
    """A model folder whose config.json has ``changes`` and whose safetensors file names every layer weight
    (1-element tensors: read from its header only, the model never loads in these tests)."""
    from safetensors.torch import save_file

    from core.models import model_layer_names

    path.mkdir()
    cfg = {k: v for k, v in dict(SIZES, **changes).items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({f"{n}.weight": torch.zeros(1) for n in model_layer_names(SIZES)}, str(path / "model.safetensors"))
    return path


# --- 1. argparse's own errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--nsamples", "abc"], "--nsamples"),
    (["quantize", "--seqlen", "1e3"], "--seqlen"),
    (["quantize", "--flat_lr", "fast"], "--flat_lr"),
    (["quantize", "--nsamples"], "expected one argument"),
    (["quantize", "--bogus", "1"], "--bogus"),
    (["evaluate", "--eval", "bogus"], "--eval"),
    (["evaluate", "--limit", "1.5"], "--limit"),
    (["evaluate", "--ppl_seqlens", "x"], "--ppl_seqlens"),
    (["export", "--format", "nonsense"], "--format"),
    (["export"], "--flat_matrix_path"),
    (["export", "--flat_matrix_path", "m.pth"], "--output_dir"),
    ([], "quantize"),
    (["bogus"], "bogus"),
    (["--verbose"], "quantize"),
])
def test_argparse_errors_are_one_line(capsys, argv, needle):
    line = one_error(capsys, argv, needle)
    assert "--help" in line and "usage:" not in line


def test_huge_or_multiline_arguments_stay_one_bounded_line(capsys):
    one_error(capsys, ["quantize", "--nsamples", "9" * 100_000], "--nsamples")
    one_error(capsys, ["quantize", "--bogus\nsecond line\rthird"], "--bogus")


# --- 2. skip_layers of separators or blanks only ------------------------------------------------------------------

EMPTY_ENTRIES = [",", " ", ", ,", ",,", "lm_head,", " , lm_head", "\t"]


@pytest.mark.parametrize("value", EMPTY_ENTRIES)
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_skip_layers_with_an_empty_entry_is_refused(capsys, tmp_path, no_model_load, value, form):
    flag = ["--skip_layers", value] if form == "separate" else [f"--skip_layers={value}"]
    out = tmp_path / "out"
    one_error(capsys, ["quantize", *flag, *FAST, "--output_dir", str(out)], "--skip_layers", "empty entry")
    assert not out.exists()


@pytest.mark.parametrize("name,text", [
    ("c.json", '{"skip_layers": ","}'),
    ("c.json", '{"skip_layers": [" "]}'),
    ("c.json", '{"skip_layers": ["lm_head", ""]}'),
    ("c.yaml", "skip_layers: ', ,'\n"),
    ("c.yaml", "skip_layers:\n  - lm_head\n  - ' '\n"),
])
def test_skip_layers_with_an_empty_entry_in_a_config_file_is_refused(capsys, tmp_path, no_model_load, name, text):
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    one_error(capsys, ["quantize", "--config", str(tmp_path / name), *FAST, "--output_dir", str(out)],
              "skip_layers", "empty entry")
    assert not out.exists()


def test_every_skip_layers_path_goes_through_the_normalizer():
    from flatgui.settings import GuiSettings

    from core.commands.quantize import quantize_options_from_args
    from core.pipeline import QuantizeOptions

    with pytest.raises(ConfigError, match="empty entry"):
        QuantizeOptions(skip_layers=", ,").resolved_config()
    with pytest.raises(ConfigError, match="empty entry"):
        QuantizeOptions(skip_layers=["lm_head", " "]).resolved_config()
    with pytest.raises(ConfigError, match="empty entry"):
        GuiSettings(skip_layers=",").config_dict()
    # an empty value skips nothing (lm_head quantized int8), the same from the CLI, the API and the GUI
    args = cli.build_parser().parse_args(["quantize", "--skip_layers", ""])
    assert quantize_options_from_args(args).resolved_config().skip_layers == []
    assert QuantizeOptions(skip_layers=[]).resolved_config().skip_layers == []
    assert GuiSettings(skip_layers="").config_dict()["skip_layers"] == []


# --- 3. config files that expand, and values echoed in messages --------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("name,text,needle", [
    ("laughs.yaml", LAUGHS, "alias"),
    ("anchor.yml", "base: &b {epochs: 1}\nalgorithm:\n  flatquant: *b\n", "alias"),
    ("merge.yaml", "x: &x {a: 1}\nalgorithm:\n  <<: *x\n", "alias"),
    ("deep.yaml", "a: " + "[" * 50_000 + "]" * 50_000 + "\n", "deeper than"),
    ("deep.json", '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", "recursion"),
    ("big.json", '{"skip_layers": ["' + "x" * (2 ** 20) + '"]}', "larger than"),
    ("keys.yaml", "1: a\nb: c\n", "Unknown key(s)"),
])
def test_config_files_cannot_expand(capsys, tmp_path, no_model_load, name, text, needle):
    from core.config import load_config_file, parse_config

    (tmp_path / name).write_text(text)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(load_config_file(tmp_path / name))
    assert time.monotonic() - start < 1.0  # the "billion laughs" file took 28 s and a 28-million-character line
    one_error(capsys, ["quantize", "--config", str(tmp_path / name), *FAST, "--output_dir", str(tmp_path / "o")],
              needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needle", [
    ('{"skip_layers": [' + ", ".join(['"lm_head"'] * 50_000) + ', 5]}', "entries must be strings"),
    ('{"algorithm": {"flatquant": {"epochs": "' + "1" * 500_000 + '"}}}', "epochs must be int"),
    ('{"' + "k" * 500_000 + '": 1}', "Unknown key(s)"),
    ('{"quant_cfg": {"inputs": {"type": "' + "i" * 500_000 + '"}}}', "quant_cfg.inputs.type"),
])
def test_values_echoed_in_errors_are_bounded(capsys, tmp_path, no_model_load, text, needle):
    (tmp_path / "c.json").write_text(text)
    line = one_error(capsys, ["quantize", "--config", str(tmp_path / "c.json"), *FAST,
                              "--output_dir", str(tmp_path / "o")], needle)
    assert len(line) < 400


def test_shown_and_one_line_are_bounded():
    nested = [1]
    for _ in range(40):
        nested = [nested] * 9  # 9**40 leaves: reprlib never walks them
    start = time.monotonic()
    assert len(shown(nested)) <= 80 and len(shown("x" * 10 ** 6)) <= 80
    assert time.monotonic() - start < 0.1
    assert one_line("a\nb\r\nc\u2028d") == "a b c d"
    long = one_line("start " + "y" * 10_000 + " what to fix")
    assert len(long) <= LINE_LIMIT and long.endswith("what to fix")


# --- 4. config.json sizes -----------------------------------------------------------------------------------------

BAD_SIZES = [("hidden_size", "abc"), ("hidden_size", 12.5), ("hidden_size", True), ("hidden_size", [64]),
             ("hidden_size", -4), ("hidden_size", 0), ("hidden_size", None), ("num_hidden_layers", "2"),
             ("intermediate_size", 1e3), ("num_attention_heads", 0), ("num_key_value_heads", -1),
             ("head_dim", "32"), ("vocab_size", {"n": 256}), ("max_position_embeddings", 0.5)]


@pytest.mark.parametrize("field,value", BAD_SIZES, ids=[f"{f}={v!r}" for f, v in BAD_SIZES])
@pytest.mark.parametrize("command", ["quantize", "evaluate"])
def test_config_json_sizes_must_be_positive_integers(capsys, tmp_path, no_model_load, command, field, value):
    model = model_folder(tmp_path / "m", **{field: value})
    out = tmp_path / "out"
    extra = FAST if command == "quantize" else ["--eval", "ppl"]
    one_error(capsys, [command, "--model_path", str(model), *extra, "--output_dir", str(out)], field,
              "positive integer")
    assert not out.exists()


@pytest.mark.parametrize("changes,needle", [
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"head_dim": None, "hidden_size": 65}, "no head_dim"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"pad_token_id": "x" * 100_000}, "pad_token_id"),
    ({"hidden_act": "bogus"}, "hidden_act"),
])
def test_config_json_values_must_fit_together_and_type_check(capsys, tmp_path, no_model_load, changes, needle):
    model = model_folder(tmp_path / "m", **changes)
    one_error(capsys, ["quantize", "--model_path", str(model), *FAST, "--output_dir", str(tmp_path / "o")], needle)


# --- 5. model folders without safetensors weights ----------------------------------------------------------------


@pytest.fixture
def pickle_only_model(tmp_path) -> Path:
    folder = tmp_path / "bin_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SIZES))
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("command", ["quantize", "evaluate"])
def test_pickle_only_model_folder_is_refused(capsys, tmp_path, no_model_load, pickle_only_model, command):
    out = tmp_path / "out"
    extra = FAST if command == "quantize" else []
    line = one_error(capsys, [command, "--model_path", str(pickle_only_model), *extra, "--output_dir", str(out)],
                     "'bin_model'", "*.safetensors", "safe_serialization=True")
    assert "weights_only" not in line and not out.exists()


def test_every_loader_refuses_a_pickle_only_folder(pickle_only_model):
    """core.models.load_model is the loader of quantize, evaluate, export and the GUI's jobs."""
    from core.models import load_model

    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights") as info:
        load_model(str(pickle_only_model))
    assert "weights_only" not in str(info.value)


# --- 6. --activation_dir that cannot be a folder -------------------------------------------------------------------


@pytest.mark.parametrize("where,needle", [
    (lambda t: t / "a_file", "is a file"),
    (lambda t: t / "a_file" / "sub", "which is a file"),
    (lambda t: Path("/proc/flatquant_activations"), "not writable"),
    (lambda t: t / "dangling" / "acts", "symbolic link to a missing target"),
    (lambda t: t / "dangling", "symbolic link to a missing target"),
])
def test_activation_dir_must_be_a_writable_folder(capsys, tmp_path, no_model_load, where, needle):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deeper")
    out = tmp_path / "out"
    one_error(capsys, ["quantize", "--activation_dir", str(where(tmp_path)), *FAST, "--output_dir", str(out)],
              "--activation_dir", needle)
    assert not out.exists() and (tmp_path / "a_file").read_text() == "x"


# --- 7. evaluate: options and task files checked before the model loads ------------------------------------------

ARC = {"id": "q0", "question": "Which gas do plants take in?",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
       "answerKey": "B"}


def arc_lines(n: int = 4, **changes) -> list[str]:
    return [json.dumps(dict(ARC, id=f"q{i}", **changes)) for i in range(n)]


TASK_FILES = {
    "broken_json_line": ("arc_easy.jsonl", "\n".join(arc_lines(3) + ['{"id": "q9", "question": broken'])),
    "not_an_object": ("arc_easy.jsonl", "\n".join(arc_lines(2) + ["[1, 2, 3]"])),
    "other_fields_in_one_line": ("arc_easy.jsonl", "\n".join(arc_lines(2) + [json.dumps({"id": "q2"})])),
    "wrong_schema": ("arc_easy.jsonl", "\n".join(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
                                                 for _ in range(3))),
    "answer_not_a_choice": ("arc_easy.jsonl", "\n".join(arc_lines(3, answerKey="Z"))),
    "empty": ("arc_easy.jsonl", "\n\n"),
    "not_utf8": ("arc_easy.jsonl", b"\xff\xfe\x00{"),
    "json_dict": ("arc_easy.json", json.dumps({"data": [ARC]})),
    "yaml_in_a_json_file": ("arc_easy.json", "task: arc_easy\ndataset_path: json\n"),
    "task_yaml_only": ("arc_easy.yaml", "task: arc_easy\ndataset_kwargs:\n  data_files: missing.jsonl\n"),
}


@pytest.mark.parametrize("case", sorted(TASK_FILES))
def test_malformed_task_file_is_one_line_before_the_model_loads(capsys, tmp_path, no_model_load, case):
    name, content = TASK_FILES[case]
    data = tmp_path / "eval"
    data.mkdir()
    (data / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    line = one_error(capsys, ["evaluate", "--eval", "acc", "--tasks", "arc_easy", "--tasks_data_dir", str(data),
                              "--limit", "3", "--output_dir", str(out)], "arc_easy")
    assert "Traceback" not in line and str(tmp_path) not in line.replace(str(data), "")
    assert not out.exists()  # no stub report, no folder


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "not_a_task_anywhere"], "not an lm-eval task"),
    (["--tasks", ","], "No lm-eval task"),
    (["--tasks_data_dir", "/nonexistent/eval"], "--tasks_data_dir"),
])
def test_evaluate_task_options_are_checked_before_the_model_loads(capsys, tmp_path, no_model_load, argv, needle):
    out = tmp_path / "out"
    one_error(capsys, ["evaluate", "--eval", "acc", *argv, "--output_dir", str(out)], needle)
    assert not out.exists()


@pytest.mark.parametrize("existing", [False, True], ids=["fresh_dir", "existing_dir"])
def test_task_data_error_during_the_run_leaves_no_report(capsys, tmp_path, tiny_qwen3_dir, monkeypatch, existing):
    """A bad document past the ones checked before the run: one error line, and the run that measured nothing
    leaves the output folder as it found it (none, or an old report byte for byte)."""
    import core.accuracy

    monkeypatch.setattr(core.accuracy, "CHECKED_DOCS", 1)
    data = tmp_path / "eval"
    data.mkdir()
    (data / "arc_easy.jsonl").write_text("\n".join(arc_lines(1) + arc_lines(1, answerKey="Z")))
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "report.json").write_text('{"ppl": {"original": 1.0}}')
    code = cli.main(["evaluate", "--model_path", str(tiny_qwen3_dir), "--device", "cpu", "--eval", "acc",
                     "--tasks", "arc_easy", "--tasks_data_dir", str(data), "--output_dir", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "could not use the documents of arc_easy" in errors[0] and "'Z' is not in list" in errors[0]
    assert out.exists() == existing
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["report.json"]
        assert (out / "report.json").read_text() == '{"ppl": {"original": 1.0}}'


# --- 8. counts ---------------------------------------------------------------------------------------------------

QUANTIZE_COUNTS = [("--nsamples", "0"), ("--nsamples", "-1"), ("--seqlen", "0"), ("--epochs", "-1"),
                   ("--cali_bsz", "0"), ("--ppl_seqlen", "0"), ("--max_layers", "0"), ("--ppl_max_windows", "-2"),
                   ("--seed", "-1"), ("--limit", "0"), ("--limit", "-3"), ("--eval_batch_size", "0"),
                   ("--ppl_seqlens", "1"), ("--decode_tokens", "0"), ("--latency_repeats", "0"),
                   ("--max_new_tokens", "-5"), ("--latency_seqlen", "0")]


@pytest.mark.parametrize("flag,value", QUANTIZE_COUNTS)
def test_quantize_counts_are_refused_before_the_model_loads(capsys, tmp_path, no_model_load, flag, value):
    out = tmp_path / "out"
    argv = ["quantize", "--no_time_diff", flag, value, "--output_dir", str(out)]
    one_error(capsys, argv, f"{flag} must be an integer", f"got {value}")
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-3"), ("--ppl_seqlens", "0"),
                                        ("--ppl_max_windows", "-1"), ("--eval_batch_size", "0"),
                                        ("--latency_seqlen", "-1"), ("--decode_tokens", "0"),
                                        ("--latency_repeats", "0"), ("--max_new_tokens", "0")])
def test_evaluate_counts_are_refused_before_the_model_loads(capsys, tmp_path, no_model_load, flag, value):
    out = tmp_path / "out"
    one_error(capsys, ["evaluate", flag, value, "--output_dir", str(out)], f"{flag} must be an integer")
    assert not out.exists()


@pytest.mark.parametrize("command,fix", [("quantize", "--no_ppl"), ("evaluate", "leave ppl out of --eval")])
def test_zero_perplexity_windows_says_how_to_skip_perplexity(capsys, tmp_path, no_model_load, command, fix):
    """The GUI's 'PPL windows = 0' is its own control (it sets --no_ppl); on the command line 0 windows is refused
    with the flag that skips perplexity, never 'text has fewer tokens than one window'."""
    one_error(capsys, [command, "--ppl_max_windows", "0", "--output_dir", str(tmp_path / "o")],
              "--ppl_max_windows must be an integer >= 1", fix)


def test_latency_dtype_must_be_a_float_dtype(capsys, tmp_path, no_model_load):
    one_error(capsys, ["evaluate", "--latency_dtype", "int8", "--output_dir", str(tmp_path / "o")], "--latency_dtype")


# --- a path the OS refuses (a name too long, a loop of links): one line, whatever option carries it --------------


@pytest.mark.parametrize("option", ["--model_path", "--calib_data", "--output_dir"])
def test_a_path_the_os_refuses_is_one_line(capsys, tmp_path, no_model_load, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # ELOOP when resolved
    for bad in ("m" * 20000, str(loop / "x")):
        argv = ["quantize", *FAST, "--output_dir", str(tmp_path / "out"), option, bad]
        line = one_error(capsys, argv)
        assert len(line) < 400 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["evaluate", "quantize"])
def test_perplexity_windows_all_longer_than_the_context_are_refused(capsys, tmp_path, no_model_load, command):
    """A window longer than the model's context is n/a; when every one is, the perplexity section would measure
    nothing and the run would still say done: refused before the model loads (SmolLM2: 8192 positions)."""
    out = tmp_path / "o"
    extra = ["--no_time_diff"] if command == "quantize" else []
    one_error(capsys, [command, *extra, "--eval", "ppl", "--ppl_seqlens", "9000", "999999", "--output_dir", str(out)],
              "--ppl_seqlens 9000 999999", "longer than the model's context")
    assert not out.exists()
