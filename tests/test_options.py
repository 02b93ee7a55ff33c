"""One source of truth for the quantize options (core/options.py): the CLI parser, the CLI-to-options mapping, the
GUI form and the GUI's command line are all generated from QuantizeOptions' field metadata. These tests call the
real mappings; none restates them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex

import pytest

from core import cli
from core.algorithms import ALGORITHMS
from core.calibrate import WEIGHT_ROUNDINGS
from core.commands.quantize import quantize_options_from_args
from core.options import (UNSET, canonical_values, choices_of, cli_default, described_fields, flag_of, option_of)
from core.pipeline import BASELINES, QuantizeOptions
from flatgui.i18n import LANGS, STRINGS
from flatgui.settings import FORM_FIELDS, FormOnly, GuiSettings


def _quantize_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"]


def _parse(*argv) -> QuantizeOptions:
    return quantize_options_from_args(cli.build_parser().parse_args(["quantize", *argv]))


def test_every_field_is_a_cli_flag_or_marked_internal():
    actions = _quantize_parser()._option_string_actions
    internal = []
    for f, opt in described_fields(QuantizeOptions):  # raises for a field without option(...) metadata
        if opt.internal:
            internal.append(f.name)
            continue
        flags = [x for x in (flag_of(f, opt), opt.negation) if x]
        assert flags, f"{f.name} has neither a flag nor a negation"
        for flag in flags:
            assert actions[flag].dest == f.name, flag
        assert opt.help
    assert internal == ["config"]  # a dict: the CLI gives --config FILE (config_file)


def test_flags_of_the_hand_written_parser_still_parse_the_same():
    """Every flag (and default) the quantize parser had before it was generated."""
    assert _parse() == QuantizeOptions(keep_original=False, output_dir="outputs/smollm2")
    o = _parse("--model_path", "/m/llama-7b/", "--config", "c.json", "--skip_layers", "lm_head,layers.0.",
               "--no_down_quant", "--use_o_quant", "--use_kcache_quant", "--use_vcache_quant", "--load_matrix",
               "--flat_matrix_path", "f.pth", "--calib_data", "wikitext", "--nsamples", "8", "--seqlen", "64",
               "--epochs", "2", "--cali_bsz", "2", "--flat_lr", "1e-3", "--max_layers", "3", "--device", "cpu",
               "--ppl_seqlen", "128", "--ppl_data", "p.txt", "--ppl_max_windows", "4", "--no_ppl", "--no_resume",
               "--seed", "7", "--dtype", "bf16", "--activation_dir", "acts", "--keep_original", "--no_memory_check",
               "--algorithm", "quarot", "--weight_rounding", "gptq", "--baselines", "rtn,quarot", "--distributed",
               "--compute_dtype", "fp32", "--no_rtn")
    assert o == QuantizeOptions(
        model_path="/m/llama-7b/", config_file="c.json", skip_layers="lm_head,layers.0.", use_down_quant=False,
        use_o_quant=True, use_kcache_quant=True, use_vcache_quant=True, load_matrix=True, flat_matrix_path="f.pth",
        calib_data="wikitext", nsamples=8, seqlen=64, epochs=2, cali_bsz=2, flat_lr=1e-3, max_layers=3,
        device="cpu", ppl_seqlen=128, ppl_data="p.txt", ppl_max_windows=4, skip_ppl=True, resume=False, seed=7,
        dtype="bf16", activation_dir="acts", keep_original=True, check_memory=False, algorithm="quarot",
        weight_rounding="gptq", baselines="rtn,quarot", distributed=True, compute_dtype="fp32", skip_rtn=True,
        output_dir="outputs/llama-7b")
    assert _parse("--use_o_quant", "--no_use_o_quant", "--no_keep_original").use_o_quant is False
    assert _parse("--no_keep_original").keep_original is False
    # the evaluation flags stay the `evaluate` command's own (shared, not added twice)
    args = cli.build_parser().parse_args(["quantize", "--eval", "acc", "--limit", "2", "--no_time_diff"])
    assert args.eval == ["acc"] and args.limit == 2 and args.time_diff is False


def test_cli_defaults_are_the_fields_defaults_except_where_marked():
    parsed = vars(cli.build_parser().parse_args(["quantize"]))
    for f, opt in described_fields(QuantizeOptions):
        if opt.internal:
            continue
        assert parsed[f.name] == cli_default(f, opt), f.name
        if opt.cli_default is UNSET:
            assert parsed[f.name] == f.default, f.name
    marked = {f.name for f, opt in described_fields(QuantizeOptions) if opt.cli_default is not UNSET}
    assert marked == {"keep_original", "output_dir"}  # in place by default; outputs/<model name>


def test_choices_come_from_the_registries(monkeypatch):
    fields = {f.name: opt for f, opt in described_fields(QuantizeOptions)}
    assert choices_of(fields["algorithm"]) == sorted(ALGORITHMS)
    assert choices_of(fields["weight_rounding"]) == list(WEIGHT_ROUNDINGS)
    assert choices_of(fields["baselines"]) == list(BASELINES)
    # a newly registered name shows up in the parser's help and in the GUI form without another edit
    monkeypatch.setitem(ALGORITHMS, "spinquant", ALGORITHMS["quarot"])
    monkeypatch.setitem(BASELINES, "gptq_only", BASELINES["rtn"])
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps --help at the terminal's width
    text = _quantize_parser().format_help()
    assert "{flatquant,quarot,rtn,spinquant}" in text and "rtn, quarot, gptq_only" in text
    from flatgui.settings import _form_fields

    form = {ff.name: ff for ff in _form_fields()}
    assert "spinquant" in form["algorithm"].choices and "gptq_only" in form["baselines"].choices


@pytest.mark.parametrize("argv, needle", [
    (["--algorithm", "spinquant"], "--algorithm must be one of flatquant, quarot, rtn"),
    (["--weight_rounding", "awq"], "--weight_rounding must be one of rtn, gptq"),
    (["--baselines", "rtn,nope"], "--baselines must name some of rtn, quarot"),
    (["--dtype", "int8"], "--dtype must be auto, bf16, fp16 or fp32"),
])
def test_a_bad_choice_is_one_error_line(argv, needle, tmp_path, capsys, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("core.pipeline.load_model", refuse)
    code = cli.main(["quantize", *argv, "--no_ppl", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


# --- the GUI form --------------------------------------------------------------------------------------------------


def test_gui_form_is_generated_from_the_option_metadata():
    exposed = {(opt.gui.name or f.name) for f, opt in described_fields(QuantizeOptions) if opt.gui}
    form_only = {f.name for f in dataclasses.fields(FormOnly)}
    assert set(GuiSettings.field_names()) == exposed | form_only
    assert {"algorithm", "weight_rounding", "baselines"} <= exposed
    defaults = GuiSettings()
    for ff in FORM_FIELDS:
        assert getattr(defaults, ff.name) == ff.default
        for key in (ff.control.label, ff.control.info):  # every label and help line in both languages
            if key:
                assert set(STRINGS[key]) == set(LANGS), key
        if ff.control.choice_label:
            for choice in ff.choices:
                assert set(STRINGS[ff.control.choice_label.format(choice)]) == set(LANGS), (ff.name, choice)


def test_gui_controls_offer_the_registries(tmp_path):
    from flatgui.app import build_app

    _, ctx = build_app(str(tmp_path / "runs"))
    mgr = ctx.mgr

    def values(name):
        return [c[1] if isinstance(c, tuple) else c for c in mgr[name].choices]

    assert values("algorithm") == sorted(ALGORITHMS) and mgr["algorithm"].value == "flatquant"
    assert values("weight_rounding") == list(WEIGHT_ROUNDINGS) and mgr["weight_rounding"].value == "rtn"
    assert values("baselines") == list(BASELINES) and mgr["baselines"].value == ["rtn"]
    zh = dict(zip(mgr.translatable(), mgr.relabel("zh")))
    assert zh["algorithm"]["label"] == STRINGS["algorithm"]["zh"]
    assert (STRINGS["algo_quarot"]["zh"], "quarot") in zh["algorithm"]["choices"]
    assert (STRINGS["quarot"]["zh"], "quarot") in zh["baselines"]["choices"]


FORMS = [
    {},
    {"algorithm": "quarot", "weight_rounding": "gptq", "baselines": ["rtn", "quarot"]},
    {"algorithm": "rtn", "baselines": []},
    {"skip_layers": "lm_head, layers.0.", "kv_quant": True, "o_proj_quant": True, "max_layers": 3, "ppl_windows": 0},
    {"use_down_quant": False, "w_bits": 8, "a_bits": 8, "epochs": 3, "flat_lr": 1e-3, "device": "cpu",
     "baselines": ["quarot"]},
    {"kv_quant": True, "kv_bits": 8, "calib_data": "wikitext", "skip_layers": ""},
]


@pytest.mark.parametrize("changes", FORMS)
def test_gui_form_and_its_command_line_are_the_same_job(changes, tmp_path):
    """The form's QuantizeOptions and the QuantizeOptions the CLI builds from the form's command line agree on
    every field (as the command line writes it) and on the resolved config."""
    s = GuiSettings(**changes)
    out = str(tmp_path)
    (tmp_path / "flatquant_config.json").write_text(json.dumps(s.config_dict()))  # what the job writes
    argv = shlex.split(s.cli_command(out))
    assert argv[:4] == ["python", "-m", "core", "quantize"]
    from_cli = quantize_options_from_args(cli.build_parser().parse_args(argv[3:]))
    from_gui = QuantizeOptions(**s.quantize_kwargs(out))
    a, b = canonical_values(from_cli), canonical_values(from_gui)
    # config/config_file: the form hands a dict, the command a file (only when the bit widths need one), and a
    # config-key option is on the command line only where it differs from that config: both compare through
    # the resolved config below. keep_original: the form keeps the original when it fits, the CLI's default is
    # in place (its cli_default).
    config_keys = {f.name for f, opt in described_fields(QuantizeOptions) if opt.config_key}
    for name in {"config", "config_file", "keep_original"} | config_keys:
        a.pop(name), b.pop(name)
    assert a == b
    assert from_cli.resolved_config() == from_gui.resolved_config()
    assert from_cli.baselines_to_run() == from_gui.baselines_to_run() == s.baseline_names()
    assert ("--config" in argv) == s.needs_config_file()


def test_command_line_of_a_form_the_job_would_refuse_still_shows():
    s = GuiSettings(skip_layers="--", w_bits=8)
    assert "--skip_layers=--" in s.cli_command()
    with pytest.raises(Exception, match="no letter or digit"):
        s.validate()


def test_gui_settings_round_trip_through_values_and_json():
    s = GuiSettings(algorithm="quarot", weight_rounding="gptq", baselines=["quarot", "rtn"])
    assert GuiSettings.from_values(*s.values()) == s
    assert GuiSettings.from_json(s.to_json()) == s
    assert GuiSettings.from_dict({"baselines": "rtn, quarot"}).baselines == ["rtn", "quarot"]
    with pytest.raises(Exception, match="algorithm must be one of flatquant, quarot, rtn"):
        GuiSettings(algorithm="nope").validate()
    with pytest.raises(Exception, match="baselines must be some of rtn, quarot"):
        GuiSettings(baselines=["rtn", "nope"]).validate()


def test_option_metadata_is_on_every_field_of_the_form_only_controls():
    for f in dataclasses.fields(FormOnly):
        opt = option_of(f)
        assert opt is not None and opt.internal and opt.gui is not None, f.name
