"""GUI pieces that need no server: runner, settings, run store, charts, i18n, component manager."""
from __future__ import annotations

import json
import threading
import time

import pytest

from core.errors import ConfigError, DataError, FlatQuantError, ModelLoadError
from core.progress import Reporter
from flatgui import charts
from flatgui.i18n import LANGS, STRINGS, lang_code, t
from flatgui.runner import BusyError, JobRunner, format_event, readable_error
from flatgui.runs import ARTIFACT_NAMES, ASCEND_ZIP, CHECKPOINT_ZIP, MATRIX_NAME, REPORT_NAME, RunStore
from flatgui.settings import GuiSettings

# --- runner --------------------------------------------------------------------------------------------------------


def _stepping_job(runner: JobRunner, steps: int, gate: threading.Event | None = None):
    """A device-free job that reports like core does and honours its cancel token."""

    def target(job):
        rep = Reporter(runner.callback(job), job.cancel)
        for i in range(steps):
            if gate is not None:
                gate.wait(5)
            rep.check()
            rep.emit("layer_step", {"i": 1, "n": 1, "epoch": 1, "epochs": 1, "loss": 1.0 / (i + 1)}, layer=0,
                     num_layers=1, epoch=0, epochs=1, step=i, steps=steps, loss=1.0 / (i + 1))
            time.sleep(0.01)
        rep.emit("layer_done", {"i": 1, "n": 1, "first": 1.0, "last": 1.0 / steps, "change": "n/a"}, layer=0,
                 num_layers=1, loss=1.0 / steps)
        return {"steps": steps}

    return target


@pytest.fixture()
def runner():
    r = JobRunner()
    yield r
    r.cancel()
    r.wait(10)


def test_runner_buffers_events_and_finishes(runner):
    job = runner.start("calibrate", _stepping_job(runner, 5), "five steps")
    runner.wait(10)
    snap = runner.snapshot()
    assert snap["status"] == "done" and snap["id"] == job.id
    assert [e["step"] for e in snap["step_events"]] == [0, 1, 2, 3, 4]
    assert [e["stage"] for e in snap["events"]] == ["layer_done"]
    assert snap["result"] == {"steps": 5}
    assert any("loss 0.2" in line for line in snap["log"])  # the fifth step's
    # a reconnecting page reads the same buffer again
    assert runner.snapshot()["step_events"] == snap["step_events"]


def test_second_job_is_refused_while_one_runs(runner):
    gate = threading.Event()
    runner.start("calibrate", _stepping_job(runner, 3, gate), "gated")
    with pytest.raises(BusyError, match="Busy: a calibrate job"):
        runner.start("generate", _stepping_job(runner, 1), "second")
    gate.set()
    runner.wait(10)
    assert runner.snapshot()["status"] == "done"
    runner.start("generate", _stepping_job(runner, 1), "after")  # free again
    runner.wait(10)


def test_cancel_stops_the_job(runner):
    gate = threading.Event()
    runner.start("calibrate", _stepping_job(runner, 1000, gate), "long")
    assert runner.cancel()
    gate.set()
    runner.wait(10)
    snap = runner.snapshot()
    assert snap["status"] == "cancelled"
    assert "cancelled" in snap["error"]
    assert not runner.cancel()  # nothing left to cancel


def test_errors_become_readable_messages_and_runner_survives(runner):
    def bad_input(job):
        raise ConfigError("skip_layers entry '--' has no letter or digit")

    def crash(job):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner.start("calibrate", bad_input)
    runner.wait(10)
    assert runner.snapshot()["error"] == "skip_layers entry '--' has no letter or digit"
    runner.start("calibrate", crash)
    runner.wait(10)
    snap = runner.snapshot()
    assert snap["status"] == "failed" and snap["error"].startswith("Out of memory")
    with pytest.raises(FlatQuantError, match="letter or digit"):
        runner.run_sync("generate", bad_input)
    assert readable_error(ValueError("x\ny")) == "Unexpected error ValueError: x (details in the server log)."


def test_format_event_renders_the_key_and_falls_back_to_the_fields():
    ev = {"stage": "calibrate", "elapsed_s": 1.5, "layer": 2, "num_layers": 30, "loss": 0.5, "key": "layer_step",
          "params": {"i": 3, "n": 30, "epoch": 1, "epochs": 2, "loss": 0.5}, "message": "ignored by the page"}
    assert format_event(ev).endswith("calibrate  layer 3/30 epoch 1/2 loss 0.5")
    assert format_event(ev, "zh").endswith("第 3/30 层 第 1/2 轮 损失 0.5")
    ev.update(key="", params={})  # not one of core's events: the stage and the numeric fields
    assert "layer 3 of 30" in format_event(ev) and "loss 5.0000e-01" in format_event(ev)
    assert "第 3 / 30 层" in format_event(ev, "zh") and "calibrate" not in format_event(ev, "zh")


def test_log_lines_in_chinese_keep_numbers_and_drop_english():
    import re

    from flatgui.joblog import event_text

    events = [("layer_step", {"i": 3, "n": 30, "epoch": 1, "epochs": 2, "loss": 0.0123}),
              ("layer_done", {"i": 2, "n": 30, "first": 0.1515, "last": 0.1361, "change": "-10.2%"}),
              ("ppl_window", {"model": "original", "start": 8, "n": 32}),
              ("ppl_value", {"model": "quantized", "value": 21.5}),
              ("ppl_value_seqlen", {"model": "rtn", "seqlen": 512, "value": 80.1}),
              ("load_model", {"model_path": "smollm2", "dtype": "float32", "device": "cpu"}),
              ("saved", {"file_path": "/srv/runs/20260101-000000/flat_matrices.pth"}),
              ("calib_data", {"source": "Python's bundled documentation text (pydoc_data.topics, ships with CPython), "
                                        "first half"}),
              ("latency_timing", {"models": ["original", "quantized", "quantized_real"], "repeats": 3}),
              ("loss_rose", {"i": 1, "first": 0.1515, "last": 3.831, "change": "+2428.6%"}),
              ("memory_estimate", {"host_gib": 1.5, "host_parts": {"weights": 0.5, "activations": 0.25}}),
              ("acc_value", {"model": "original", "acc": {"piqa": 60.0, "acc_avg": 60.0}}),
              ("export_done", {"format": "native", "folder_path": "/srv/runs/1/checkpoint",
                               "zip_path": "/srv/runs/1/quantized_checkpoint.zip"})]
    for key, params in events:
        zh = event_text({"key": key, "params": params}, "zh")
        assert zh and "/srv" not in zh, key
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z_]+", zh)
                 if w not in ("PPL", "FlatQuant", "RTN", "int", "token", "flat_lr", "SmolLM", "Instruct", "Python",
                              "flat_matrices", "pth", "cpu", "float", "GiB", "piqa", "quantized_checkpoint", "zip",
                              "checkpoint")]
        assert not words, (key, zh)
    assert "0.1515 → 0.1361（-10.2%）" in event_text({"key": events[1][0], "params": events[1][1]}, "zh")
    assert event_text({"key": "something_new", "message": "something new"}, "zh") == ""


# --- settings ------------------------------------------------------------------------------------------------------


def test_settings_defaults_are_a_small_budget_and_valid():
    s = GuiSettings()
    s.validate()
    assert s.model_path == "smollm2" and s.nsamples <= 32 and s.seqlen <= 512 and s.epochs <= 2
    cfg = s.config_dict()
    assert cfg["skip_layers"] == ["lm_head"] and cfg["algorithm"]["flatquant"]["epochs"] == s.epochs


def test_settings_from_ui_values_coerce_and_round_trip():
    names = GuiSettings.field_names()
    values = GuiSettings().values()
    values[names.index("epochs")] = 2.0  # gr.Number may hand over floats
    values[names.index("skip_layers")] = " lm_head , down_proj "
    s = GuiSettings.from_values(*values)
    assert s.epochs == 2 and isinstance(s.epochs, int)
    assert s.config_dict()["skip_layers"] == ["down_proj", "lm_head"]
    assert GuiSettings.from_json(s.to_json()) == s
    with pytest.raises(ConfigError, match="Unknown setting"):
        GuiSettings.from_json(json.dumps({"nsampels": 3}))
    with pytest.raises(ConfigError, match="not valid JSON"):
        GuiSettings.from_json("{nope")
    with pytest.raises(ConfigError, match="epochs"):
        GuiSettings.from_dict({"epochs": 1.5})


@pytest.mark.parametrize("change, error, match", [
    ({"skip_layers": "--"}, ConfigError, "no letter or digit"),
    ({"model_path": "/nonexistent/model"}, ModelLoadError, "does not exist"),
    ({"model_path": ""}, ModelLoadError, "empty"),
    ({"nsamples": 0}, ConfigError, "nsamples"),
    ({"w_bits": 3}, ConfigError, "w_bits"),
    ({"calib_data": "/nonexistent/text.txt"}, DataError, "does not exist"),
])
def test_settings_validation_messages(change, error, match):
    s = GuiSettings(**change)
    with pytest.raises(error, match=match):
        s.validate()


def test_settings_reject_folder_without_supported_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(FlatQuantError, match="not supported"):
        GuiSettings(model_path=str(tmp_path)).validate()


def test_settings_map_to_quantize_options():
    from core.pipeline import QuantizeOptions

    s = GuiSettings(skip_layers="lm_head,layers.0.", kv_quant=True, o_proj_quant=True, max_layers=3, ppl_windows=0)
    opts = QuantizeOptions(**s.quantize_kwargs("out", None))
    cfg = opts.resolved_config()
    assert cfg.use_kcache_quant and cfg.k_bits == 4 and cfg.use_o_quant
    assert cfg.skip_layers == ["layers.0.", "lm_head"] and opts.max_layers == 3 and opts.skip_ppl
    opts = QuantizeOptions(**s.quantize_kwargs("out", "/x/flat_matrices.pth"))
    assert opts.load_matrix and opts.flat_matrix_path == "/x/flat_matrices.pth"


@pytest.mark.parametrize("changes", [
    {},
    {"skip_layers": "lm_head,layers.0.", "kv_quant": True, "o_proj_quant": True, "max_layers": 3, "ppl_windows": 0},
    {"use_down_quant": False, "w_bits": 8, "a_bits": 8, "epochs": 3, "flat_lr": 1e-3, "device": "cpu"},
    {"kv_quant": True, "kv_bits": 8, "calib_data": "wikitext"},
])
def test_cli_preview_parses_to_the_same_job(changes, tmp_path):
    """The command the GUI shows, parsed by core's own CLI parser, resolves to the GUI's config and budget."""
    import shlex

    from core.cli import build_parser
    from core.commands.quantize import quantize_options_from_args
    from core.pipeline import QuantizeOptions

    s = GuiSettings(**changes)
    out = str(tmp_path)
    (tmp_path / "flatquant_config.json").write_text(json.dumps(s.config_dict()))  # what the job writes
    argv = shlex.split(s.cli_command(out))
    assert argv[:4] == ["python", "-m", "core", "quantize"]
    # the mapping core/commands/quantize.py's run() makes from its arguments
    cli = quantize_options_from_args(build_parser().parse_args(argv[3:]))
    gui = QuantizeOptions(**s.quantize_kwargs(out))
    assert cli.resolved_config() == gui.resolved_config()
    for key in ("nsamples", "seqlen", "calib_data", "device", "max_layers", "ppl_max_windows", "skip_ppl",
                "output_dir"):
        assert getattr(cli, key) == getattr(gui, key), key
    if not gui.skip_ppl:
        assert cli.ppl_seqlen == gui.ppl_seqlen
    assert ("--config" in argv) == s.needs_config_file()


# --- run store -----------------------------------------------------------------------------------------------------


def test_run_store_serves_only_known_files_inside_runs(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.new_run()
    (run / MATRIX_NAME).write_bytes(b"x")
    (run / REPORT_NAME).write_text("{}")
    (run / "secret.txt").write_text("no")
    (tmp_path / "outside.json").write_text("{}")
    assert store.list_runs() == [run.name]
    assert store.artifact(run.name, MATRIX_NAME) == str((run / MATRIX_NAME).resolve())
    assert store.artifact(run.name, "secret.txt") is None
    assert store.artifact("..", REPORT_NAME) is None
    assert store.artifact(f"{run.name}/..", REPORT_NAME) is None
    assert store.artifact(run.name, "../outside.json") is None
    assert store.artifact(run.name, CHECKPOINT_ZIP) is None  # not exported yet
    assert set(store.files(run.name)) == {str((run / n).resolve()) for n in (MATRIX_NAME, REPORT_NAME)}
    assert set(ARTIFACT_NAMES) == {MATRIX_NAME, REPORT_NAME, CHECKPOINT_ZIP, ASCEND_ZIP}
    second = store.new_run()  # same second: a suffix keeps both
    assert second != run and store.list_runs()[0] in (second.name, run.name)


def test_zip_checkpoint(tmp_path):
    import zipfile

    store = RunStore(tmp_path)
    run = store.new_run()
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "config.json").write_text("{}")
    path = store.zip_checkpoint(run.name)
    assert path == store.artifact(run.name, CHECKPOINT_ZIP)
    assert zipfile.ZipFile(path).namelist() == ["checkpoint/config.json"]


# --- charts --------------------------------------------------------------------------------------------------------

REPORT = {  # the shapes core.pipeline and core.evaluate write
    "ppl": {"seqlen": 512, "original": 20.5, "quantized": 22.0, "rtn": 80.0, "seqlens": [512, 2048],
            "by_seqlen": {"512": {"original": 20.5, "quantized": 22.0, "rtn": 80.0},
                          "2048": {"original": 18.0, "quantized": 19.5, "rtn": None}}},
    "accuracy": {"acc": {"original": {"arc_easy": 60.0, "piqa": 70.0, "acc_avg": 65.0},
                         "quantized": {"arc_easy": 58.0, "piqa": 69.0, "acc_avg": 63.5}}},
    "latency": {"original": {"prefill_ms": 40.0, "decode_ms_per_token": 12.0, "tokens_per_s": 83.3,
                             "peak_memory_mb": 900.0, "weights_mb": 513.0},
                "quantized": {"prefill_ms": 90.0, "decode_ms_per_token": 30.0, "tokens_per_s": 33.3,
                              "peak_memory_mb": 1400.0, "weights_mb": 520.0}},
}


def _bars(fig):
    return {tr.name: list(tr.y) for tr in fig.data}


def test_ppl_chart_groups_by_seqlen_and_model():
    assert charts.ppl_table(REPORT)["seqlen 2048"] == {"original": 18.0, "quantized": 19.5}
    fig = charts.ppl_figure(REPORT)
    assert list(fig.data[0].x) == [t("seqlen_n", n=512), t("seqlen_n", n=2048)]
    assert fig.layout.yaxis.type == "log"  # RTN's tall bar must not flatten the others
    assert _bars(fig)[t("original")] == [20.5, 18.0] and _bars(fig)[t("rtn")] == [80.0, None]
    assert fig.data[0].text[0] == "20.50"
    # the quantize pipeline's own shape (no by_seqlen)
    flat = {"ppl": {"seqlen": 256, "original": 30.0, "quantized": 31.0}}
    assert charts.ppl_table(flat) == {"seqlen 256": {"original": 30.0, "quantized": 31.0}}


def test_accuracy_and_latency_charts():
    fig = charts.accuracy_figure(REPORT)
    assert list(fig.data[0].x) == ["arc_easy", "piqa", t("acc_avg")]
    assert fig.data[0].textposition == "inside" and fig.data[0].textangle == -90
    assert _bars(fig)[t("quantized")] == [58.0, 69.0, 63.5]
    fig = charts.latency_figure(REPORT)
    assert len(fig.data) == 2 * len(charts.LATENCY_METRICS)
    assert [tr.y[0] for tr in fig.data[:2]] == [40.0, 90.0]


def test_empty_report_gives_placeholder_figures():
    for build in (charts.ppl_figure, charts.accuracy_figure, charts.latency_figure):
        fig = build({}, "zh")
        assert not fig.data and fig.layout.annotations[0].text == t("chart_empty_eval", "zh")


def test_loss_chart_grows_with_layers():
    events = [{"stage": "layer_done", "layer": i, "loss": 1.0 / (i + 1)} for i in range(3)]
    steps = [{"stage": "calibrate", "layer": 3, "epoch": e, "steps": 2, "step": s, "loss": 0.1}
             for e in range(2) for s in range(2)]
    fig = charts.loss_figure(events, steps)
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[1].x) == [1, 2, 3, 4]
    assert not charts.loss_figure([], []).data


# --- i18n and manager ----------------------------------------------------------------------------------------------


def test_every_string_has_english_and_chinese():
    missing = [k for k, v in STRINGS.items() if set(v) != set(LANGS)]
    assert not missing
    assert lang_code("中文") == "zh" and lang_code("English") == "en" and lang_code(None) == "en"
    assert t("layer_of", "zh", i=1, n=2) == "第 1 / 2 层"


def test_app_builds_and_relabels_every_registered_component(tmp_path):
    from flatgui.app import build_app

    demo, ctx = build_app(str(tmp_path / "runs"))
    mgr = ctx.mgr
    assert [c.label for c in mgr.settings_components()][:3] == [t("model_path"), t("device"), t("skip_layers")]
    updates = mgr.relabel("zh")
    assert len(updates) == len(mgr.translated_components())
    by_name = dict(zip(mgr.translatable(), updates))
    assert by_name["skip_layers"]["label"] == STRINGS["skip_layers"]["zh"]
    assert by_name["start"]["value"] == STRINGS["start"]["zh"]
    assert by_name["tab_compare"]["label"] == STRINGS["tab_compare"]["zh"]
    assert by_name["eval_sections"]["choices"][0] == (STRINGS["eval_ppl"]["zh"], "ppl")
    api = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"start_calibration", "cancel", "load_matrices", "job_status", "generate", "start_evaluate",
            "artifacts_refresh", "get_artifact", "save_settings", "load_settings"} <= api


def test_job_wide_progress_moves_through_stages_and_during_perplexity():
    from flatgui.jobprogress import job_eta, job_fraction, plan_for

    plan = plan_for("calibrate", ppl_parts=3)
    snap = {"status": "running", "plan": plan, "elapsed_s": 100.0, "events": [], "last_event": None}
    assert job_fraction(snap) == 0.0
    load = {"stage": "load", "key": "load_model", "params": {"model_path": "smollm2", "dtype": "float32",
                                                             "device": "cpu"}}
    snap.update(events=[load], last_event=load)
    steps = {"stage": "calibrate", "layer": 1, "num_layers": 2, "epoch": 0, "epochs": 1, "step": 0, "steps": 2}
    snap.update(last_event=steps)
    mid_calib = job_fraction(snap)
    assert 0.05 < mid_calib < 0.75
    fracs = []
    events = [load, {"stage": "layer_done", "layer": 1, "num_layers": 2}]
    for model in ("original", "quantized", "rtn"):
        for step in (0, 4):
            ev = {"stage": "ppl", "key": "ppl_window", "params": {"model": model, "start": step, "n": 8},
                  "step": step, "steps": 8}
            snap.update(events=events + [ev], last_event=ev)
            fracs.append(job_fraction(snap))
        events.append({"stage": "ppl", "key": "ppl_value", "params": {"model": model, "value": 20.0}})
    assert fracs == sorted(fracs) and fracs[0] > mid_calib and fracs[-1] < 1.0 and len(set(fracs)) == len(fracs)
    assert job_eta(snap, fracs[-1]) == pytest.approx(100.0 * (1 - fracs[-1]) / fracs[-1])
    assert job_fraction(dict(snap, status="done")) == 1.0


def test_accuracy_estimate_before_a_long_run(tmp_path):
    from flatgui.app import build_app
    from flatgui.tabs.compare import accuracy_estimate

    _, ctx = build_app(str(tmp_path / "runs"))
    assert accuracy_estimate(ctx, ["ppl"], 50, "English") == ""
    long = accuracy_estimate(ctx, ["tasks"], 50, "English")
    assert long.startswith("⚠") and "50 examples × 6 tasks" in long and "min" in long
    assert not accuracy_estimate(ctx, ["tasks"], 2, "English").startswith("⚠")
    assert "分钟" in accuracy_estimate(ctx, ["tasks"], 50, "中文")


def test_gui_job_failing_before_the_model_loads_leaves_no_run(tmp_path):
    from flatgui import jobs
    from flatgui.app import build_app

    _, ctx = build_app(str(tmp_path / "runs"))
    jobs.start_quantize(ctx, GuiSettings(seqlen=100000))
    ctx.runner.wait(60)
    snap = ctx.runner.snapshot()
    assert snap["status"] == "failed" and "max_position_embeddings" in snap["error"]
    assert ctx.store.list_runs() == []


def test_bit_fields_are_advertised_and_accepted_as_strings(tmp_path):
    from flatgui.app import build_app

    _, ctx = build_app(str(tmp_path / "runs"))
    for name in ("w_bits", "a_bits", "kv_bits"):
        info = ctx.mgr[name].api_info()
        assert info["type"] == "string" and all(isinstance(v, str) for v in info["enum"]), info
        # what an API client sends, straight from the advertised enum, passes the component and the settings
        assert ctx.mgr[name].preprocess(info["enum"][0]) == info["enum"][0]
    values = GuiSettings().values()
    assert GuiSettings.from_values(*values) == GuiSettings()


def test_status_line_shows_loss_warnings_and_cancel_text():
    from flatgui.tabs.calibrate import progress_html

    snap = {"id": "j1", "kind": "calibrate", "status": "cancelled", "seq": 3, "elapsed_s": 12.0, "error": "x",
            "events": [{"stage": "warning", "layer": 1, "key": "loss_rose",
                        "params": {"i": 2, "first": 0.1, "last": 0.2, "change": "+100.0%"}}],
            "last_event": {"stage": "ppl", "key": "ppl_window", "params": {"model": "quantized", "start": 4, "n": 8},
                           "step": 4, "steps": 8},
            "plan": []}
    out = progress_html(snap, "zh")
    assert "第 2 层" in out and t("cancelled_kept", "zh") in out and "perplexity" not in out
    assert 'data-elapsed="12.0"' in out


def test_form_checks_the_models_own_limits(tiny_qwen3_dir):
    with pytest.raises(ConfigError, match="matches no layer"):
        GuiSettings(model_path=str(tiny_qwen3_dir), skip_layers="lm_head,layers.999").validate()
    with pytest.raises(ConfigError, match="skips every layer"):
        GuiSettings(model_path=str(tiny_qwen3_dir), skip_layers="layers.0.", max_layers=1).validate()
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        GuiSettings(model_path=str(tiny_qwen3_dir), seqlen=100000).validate()
    GuiSettings(model_path=str(tiny_qwen3_dir), skip_layers="lm_head,layers.1.").validate()


def test_log_and_status_hide_server_paths():
    from flatgui.joblog import format_entry
    from flatgui.tabs.calibrate import progress_html

    ev = {"stage": "fold", "elapsed_s": 3.0, "key": "saved",
          "params": {"file_path": "/srv/flatquant/runs/20260101-000000/flat_matrices.pth"}}
    for lang in ("en", "zh"):
        line = format_entry({"t": 3.0, "event": ev}, lang)
        assert "flat_matrices.pth" in line and "/srv" not in line
        html_out = progress_html({"id": "j", "kind": "calibrate", "status": "running", "seq": 1, "elapsed_s": 3.0,
                                  "events": [ev], "last_event": ev, "plan": []}, lang)
        assert "/srv" not in html_out


def test_job_fraction_after_calibration_stays_at_the_calibrated_share():
    from flatgui.jobprogress import job_fraction, plan_for

    events = [{"stage": "load"}] + [{"stage": "layer_done", "layer": i, "num_layers": 4} for i in range(4)]
    warning = {"stage": "warning", "layer": 3}
    fold = {"stage": "fold", "message": "saved x"}
    snap = {"status": "running", "plan": plan_for("calibrate", ppl_parts=3), "events": events + [warning],
            "last_event": warning}
    assert job_fraction(snap) == pytest.approx(0.75)
    snap.update(events=events + [fold], last_event=fold)
    assert job_fraction(snap) == pytest.approx(0.75)


def test_ppl_chart_shows_every_baseline_of_the_report():
    from core.pipeline import BASELINES

    report = {"ppl": {"seqlen": 512, "original": 20.5, "quantized": 22.0, "rtn": 80.0, "quarot": 30.0}}
    bars = _bars(charts.ppl_figure(report))
    assert bars[t("rtn")] == [80.0] and bars[t("quarot")] == [30.0] and bars[t("quantized")] == [22.0]
    assert set(BASELINES) <= {key for key, _, _ in charts.SERIES}  # a new baseline needs its series
    assert charts.ppl_figure(report).layout.yaxis.type == "log"


def test_accuracy_chart_shows_every_baseline_of_the_report():
    acc = {"original": {"piqa": 60.0, "acc_avg": 60.0}, "quantized": {"piqa": 58.0, "acc_avg": 58.0},
           "rtn": {"piqa": 50.0, "acc_avg": 50.0}, "quarot": {"piqa": 55.0, "acc_avg": 55.0}}
    bars = _bars(charts.accuracy_figure({"accuracy": {"acc": acc}}))
    assert bars[t("rtn")] == [50.0, 50.0] and bars[t("quarot")] == [55.0, 55.0]
    assert bars[t("original")] == [60.0, 60.0] and bars[t("quantized")] == [58.0, 58.0]


def test_gui_run_with_baselines_evaluates_them_in_both_charts(tmp_path, tiny_qwen3_dir, shared_data):
    """Calibrate tab's algorithm / baselines controls through the runner into QuantizeOptions, then the Compare
    tab's evaluation: each baseline of the run has a PPL bar and an accuracy bar."""
    from flatgui import jobs
    from flatgui.app import build_app

    _, ctx = build_app(str(tmp_path / "runs"))
    s = GuiSettings(model_path=str(tiny_qwen3_dir), nsamples=2, seqlen=32, epochs=1, ppl_windows=1,
                    algorithm="quarot", weight_rounding="gptq", baselines=["rtn", "quarot"], skip_layers="lm_head")
    s.validate()
    jobs.start_quantize(ctx, s)
    job = ctx.runner.wait(300)
    assert job.status == "done", job.error
    report = ctx.store.report(job.result["run_id"])
    assert report["calibration"]["algorithm"] == "quarot" and report["calibration"]["weight_rounding"] == "gptq"
    assert {"original", "quantized", "rtn", "quarot"} <= set(report["ppl"])
    assert ctx.runner.workspace["baseline_names"] == ["rtn", "quarot"]
    jobs.start_evaluate(ctx, ["ppl", "acc"], 32, 1, 1)
    job = ctx.runner.wait(300)
    assert job.status == "done", job.error
    report = ctx.store.report(job.result["run_id"])
    assert set(report["accuracy"]["acc"]) == {"original", "quantized", "rtn", "quarot"}
    for figure in (charts.ppl_figure(report), charts.accuracy_figure(report)):
        assert {t("original"), t("quantized"), t("rtn"), t("quarot")} <= set(_bars(figure))


# --- issue 21: what ran, export cancel, buttons while a job runs --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ctx(tmp_path_factory, tiny_qwen3_dir):
    """An app whose runner holds a calibrated tiny Qwen3 (one epoch, no perplexity)."""
    from flatgui import jobs
    from flatgui.app import build_app

    _, ctx = build_app(str(tmp_path_factory.mktemp("tiny_ctx") / "runs"))
    jobs.start_quantize(ctx, GuiSettings(model_path=str(tiny_qwen3_dir), nsamples=2, seqlen=32, epochs=1,
                                         ppl_windows=0, skip_layers="lm_head"))
    job = ctx.runner.wait(300)
    assert job.status == "done", job.error
    return ctx


def test_failed_real_int4_is_labelled_with_its_cause(tiny_ctx, monkeypatch):
    """A failing real int4 conversion: the fake-quant model answers, and the box's label, the speed line, the log
    and the report say so, with the cause (without the server's paths), in both languages."""
    import core.realquant.convert
    from flatgui.joblog import event_text, format_entry
    from flatgui.tabs.compare import generate

    def broken(model, backend="auto"):
        raise RuntimeError("no int4 kernel in /srv/secret/kernels.so\nmore detail")

    monkeypatch.setattr(core.realquant.convert, "convert_model", broken)
    monkeypatch.setitem(tiny_ctx.runner.workspace, "quantized_real", None)
    monkeypatch.setitem(tiny_ctx.runner.workspace, "quantized_real_error", None)  # both gone after the test
    cause = "RuntimeError: no int4 kernel in kernels.so"
    for lang, name in (("en", "English"), ("zh", "中文")):
        *_, (original, _, box, stats) = list(generate(tiny_ctx, "Hello", 3, name))
        assert original and box["value"]
        assert box["label"] == t("quantized_fallback", lang, cause=cause)
        assert t("fake_fallback", lang, cause=cause) in stats and t("lat_tps", lang) in stats  # and the speed
        log = [format_entry(e, lang) for e in tiny_ctx.runner.snapshot()["log_entries"]]
        line = event_text({"key": "real_int4_failed", "params": {"cause": cause}}, lang)
        assert any(entry.endswith(line) for entry in log), log  # every generation says what ran
    assert box["label"] == "FlatQuant（伪量化，真实 int4 失败：RuntimeError: no int4 kernel in kernels.so）"
    from flatgui.app import relabel

    for lang, name in (("en", "English"), ("zh", "中文")):  # the language switch keeps saying what answers
        labels = dict(zip(tiny_ctx.mgr.translatable(), relabel(tiny_ctx, name)))
        assert labels["gen_quantized"]["label"] == t("quantized_fallback", lang, cause=cause)
        assert labels["tab_compare"]["label"] == t("tab_compare", lang)
    report = tiny_ctx.store.report(tiny_ctx.runner.workspace["run_id"])
    assert report["generation"]["quantized_model"] == f"fake quant (real int4 failed: {cause})"


def test_export_job_is_cancelled_and_leaves_no_folder(tiny_ctx, monkeypatch):
    """Cancel pressed while an export runs (here: as it starts): the job ends cancelled within a layer and the run
    has no export folder, no staged folder and no zip."""
    from pathlib import Path

    from flatgui import jobs
    from flatgui.runs import ASCEND_DIR, CHECKPOINT_DIR

    record = tiny_ctx.runner.record

    def cancel_as_export_starts(job, event):
        record(job, event)
        if event.key == "export_start":
            assert tiny_ctx.runner.cancel()

    monkeypatch.setattr(tiny_ctx.runner, "record", cancel_as_export_starts)
    run = Path(tiny_ctx.runner.workspace["output_dir"])
    for fmt, folder in (("native", CHECKPOINT_DIR), ("ascend", ASCEND_DIR)):
        jobs.start_export(tiny_ctx, fmt)
        job = tiny_ctx.runner.wait(120)
        assert job.status == "cancelled", job.error
        left = [p.name for p in run.iterdir() if folder in p.name or p.suffix == ".zip"]
        assert left == [], left
        assert not any("export_done" == e.get("key") for e in tiny_ctx.runner.snapshot()["events"])


def test_export_buttons_are_disabled_while_a_job_runs(tmp_path):
    from flatgui.app import build_app
    from flatgui.tabs.calibrate import BUTTONS, poll

    _, ctx = build_app(str(tmp_path / "runs"))
    gate = threading.Event()
    ctx.runner.start("calibrate", _stepping_job(ctx.runner, 2, gate), "gated")
    status, _, _, seen, _, *buttons = poll(ctx, "", "English")
    running = dict(zip(BUTTONS, buttons))
    assert {"start", "export", "export_ascend"} <= set(running)
    assert all(b["interactive"] is False for b in running.values()), running
    gate.set()
    ctx.runner.wait(10)
    buttons = poll(ctx, seen, "English")[5:]
    assert len(buttons) == len(BUTTONS) and all(b["interactive"] is True for b in buttons)
