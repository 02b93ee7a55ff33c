"""Issue 21: every progress event is a key of core's catalogue (core/events.py) with parameters; the GUI renders
its log from key and parameters in English and Chinese (flatgui/i18n.py), so no core message can drop out of the
Chinese log."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from core.events import EVENTS, render, template_fields
from flatgui.i18n import EVENTS_ZH, STRINGS
from gui_server import english_words

ROOT = Path(__file__).resolve().parents[1]

# Words a Chinese log line may still show: product, model, format, unit and option names (as the browser test).
NAMES = {"flatquant", "smollm", "instruct", "rtn", "ppl", "token", "tokens", "gib", "cpu", "cuda", "npu", "int",
         "lm", "eval", "gptq", "quarot", "python", "float", "bfloat", "w4a4", "vllm", "ascend", "flat_lr", "fp",
         "checkpoint"}  # the export's folder name


# --- (a) the catalogue and its translations ------------------------------------------------------------------------


def test_every_event_has_english_and_chinese_templates_with_the_same_parameters():
    assert set(EVENTS_ZH) == set(EVENTS), "flatgui.i18n.EVENTS_ZH and core.events.EVENTS name other keys"
    for key, kind in EVENTS.items():
        entry = STRINGS[f"event_{key}"]
        assert entry["en"] == kind.template and entry["zh"], key
        assert template_fields(entry["zh"]) == template_fields(kind.template), key
        assert "path" not in template_fields(kind.template), key  # gradio_client would fetch {"path": ...} as a file
        assert not english_words(re.sub(r"\{[^}]*\}", "", entry["zh"]), NAMES), (key, entry["zh"])


def test_reporter_refuses_a_key_outside_the_catalogue_and_renders_english():
    from core.progress import Reporter

    events = []
    rep = Reporter(events.append)
    with pytest.raises(KeyError):
        rep.emit("calibrate", {"anything": 1})  # a stage is not a key
    with pytest.raises(KeyError):
        Reporter().emit("no such event")  # refused without a listener too
    rep.emit("layer_done", {"i": 2, "n": 30, "first": 0.1515, "last": 0.13612, "change": "-10.2%"}, layer=1)
    ev = events[-1]
    assert (ev.stage, ev.key, ev.layer) == ("layer_done", "layer_done", 1)
    assert ev.message == "layer 2/30 done, loss 0.1515 -> 0.1361 (-10.2%)" == render(ev.key, ev.params)


# --- (b) every emit call site uses a catalogue key ----------------------------------------------------------------


def _emit_calls():
    """(file, line, call) for every `<something>.emit(...)` in core/ and flatgui/."""
    for folder in ("core", "flatgui"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "emit":
                    yield path.relative_to(ROOT), node.lineno, node


def test_every_emit_call_site_uses_a_catalogue_key():
    calls = list(_emit_calls())
    assert len(calls) > 30  # the scan sees the call sites (core's and the GUI's jobs)
    used = set()
    for path, line, call in calls:
        where = f"{path}:{line}"
        assert call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str), \
            f"{where}: emit's first argument must be a key of core.events.EVENTS, written out"
        key = call.args[0].value
        assert key in EVENTS, f"{where}: {key!r} is not in core.events.EVENTS"
        used.add(key)
        params = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "params"),
                                                              None)
        if isinstance(params, ast.Dict) and all(isinstance(k, ast.Constant) for k in params.keys):
            names = {k.value for k in params.keys}
            assert names == template_fields(EVENTS[key].template), f"{where}: {key} gets {sorted(names)}"
        elif params is None:
            assert not template_fields(EVENTS[key].template), f"{where}: {key} needs parameters"
    unused = set(EVENTS) - used
    assert not unused, f"catalogue keys no code emits: {sorted(unused)}"


def test_only_the_reporter_builds_progress_events():
    for folder in ("core", "flatgui"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "progress.py":
                assert "ProgressEvent(" not in path.read_text(), path


# --- (c) a real short job through the GUI's jobs: every event has a Chinese line --------------------------------


@pytest.fixture(scope="module")
def gui_jobs(tmp_path_factory, tiny_qwen3_dir):
    """A calibration, a generation, an evaluation (perplexity, latency) and an export of the tiny Qwen3 through
    flatgui.jobs, as the buttons start them; returns (ctx, every job's snapshot)."""
    from flatgui import jobs
    from flatgui.app import build_app
    from flatgui.settings import GuiSettings

    _, ctx = build_app(str(tmp_path_factory.mktemp("event_runs") / "runs"))
    snaps = []

    def finish(job):
        ctx.runner.wait(300)
        snap = ctx.runner.snapshot()
        assert snap["status"] == "done", snap["error"]
        snaps.append(snap)

    s = GuiSettings(model_path=str(tiny_qwen3_dir), nsamples=2, seqlen=32, epochs=1, ppl_windows=1,
                    skip_layers="lm_head")
    s.validate()
    finish(jobs.start_quantize(ctx, s))
    finish(jobs.start_generate(ctx, "Hello", 4)[0])
    finish(jobs.start_evaluate(ctx, ["ppl", "latency"], 32, 1, 0))
    finish(jobs.start_export(ctx, "native"))
    return ctx, snaps


def test_a_real_job_gives_a_chinese_line_for_every_event(gui_jobs, tiny_qwen3_dir):
    from flatgui.joblog import event_text, format_entry

    ctx, snaps = gui_jobs
    server_paths = (str(ctx.store.root), str(tiny_qwen3_dir))
    events = [e for snap in snaps for e in snap["events"] + snap["step_events"]]
    keys = {e["key"] for e in events}
    assert {"load_model", "calib_data", "capture", "layer_step", "layer_done", "saved", "ppl_window", "ppl_value",
            "report_written", "generate", "ppl_start", "ppl_value_seqlen", "latency_timing", "eval_done",
            "export_start", "export_done"} <= keys, keys
    assert "real_int4_failed" not in keys  # the CPU runs the real int4 model
    for ev in events:
        assert ev["key"] in EVENTS, ev
        zh, en = event_text(ev, "zh"), event_text(ev, "en")
        assert zh and en, ev
        assert not english_words(zh, NAMES), (ev["key"], zh)
        assert not any(p in line for p in server_paths for line in (zh, en)), (zh, en)  # paths show their names
        # English is core's message, but for the names the page shows instead of paths and labels
        assert en == ev["message"] or ev["params"].keys() & {"file_path", "folder_path", "zip_path", "model_path", "source"}, en
    # the runner's log lines too: every line of every job has a translated message
    for snap in snaps:
        for entry in snap["log_entries"]:
            line = format_entry(entry, "zh")
            assert not english_words(line.split("]", 1)[1], NAMES), line
