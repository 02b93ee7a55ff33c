"""The GUI through its HTTP API (gradio_client) against a real `python app.py` on a free 127.0.0.1 port.

Every endpoint used here is the one a button in the page calls, with the same inputs.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AuthenticationError  # noqa: E402
from gui_server import running_app  # noqa: E402

from flatgui.i18n import t  # noqa: E402
from flatgui.settings import GuiSettings  # noqa: E402

LANG = "English"
# A few samples, one epoch, two layers: the whole job takes seconds on a CPU.
QUICK = dict(nsamples=4, seqlen=64, epochs=1, max_layers=2, ppl_windows=2)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("gui_api")
    with running_app(root / "runs", root / "app.log") as url:
        yield url, root / "runs"


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False, download_files=str(app[1].parent / "downloads"))


def value(out):
    """gradio_client hands gr.update(...) outputs back as dicts; the value is what the page shows."""
    return out["value"] if isinstance(out, dict) and out.get("__type__") == "update" else out


def start(client, **changes) -> str:
    s = GuiSettings(**{**QUICK, **changes})
    return client.predict(*s.values(), LANG, api_name="/start_calibration")


def status(client) -> dict:
    return client.predict(api_name="/job_status")


def wait_finished(client, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(client)
        if st["status"] != "running":
            return st
        time.sleep(0.5)
    raise AssertionError(f"job still running after {timeout} s: {st}")


def wait_for(client, predicate, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(client)
        if predicate(st):
            return st
        assert st["status"] in ("running", "idle"), st
        time.sleep(0.2)
    raise AssertionError(f"condition not reached in {timeout} s: {st}")


def figure(out) -> dict:
    """A gr.Plot output as the page draws it: the plotly figure's {data, layout}."""
    plot = value(out)
    assert plot["type"] == "plotly", plot
    return json.loads(plot["plot"])


def title(fig: dict, axis: str = "") -> str:
    layout = fig["layout"] if not axis else fig["layout"][axis]
    return layout["title"]["text"]


def http_status(url: str, path: Path) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_short_calibration_then_compare_and_download(app, client, smollm2):
    from core.flat import is_wrapped
    from core.matrices import load_matrices
    from core.models import decoder_layers

    msg = start(client)
    assert msg.startswith("✔") and "Started job" in msg
    st = wait_finished(client)
    assert st["status"] == "done", st["error"]
    stages = [e["stage"] for e in st["events"]]
    assert stages[0] == "load" and "done" in stages
    done = [e for e in st["events"] if e["stage"] == "layer_done"]
    assert [e["layer"] for e in done] == [0, 1] and all(e["loss"] > 0 for e in done)
    assert st["step_count"] >= 2  # per-step progress events reached the runner
    run_id = Path(st["output_dir"]).name

    # Artifacts: the run is listed and its files download through the API.
    out = client.predict(run_id, api_name="/artifacts_refresh")
    run_sel, matrices, report, ckpt, files, report_json = map(value, out)
    assert run_sel == run_id and ckpt is None
    assert Path(matrices).name == "flat_matrices.pth" and Path(report).name == "report.json"
    assert json.loads(report_json)["calibration"]["nsamples"] == QUICK["nsamples"]
    fetched = client.predict(run_id, "flat_matrices.pth", api_name="/get_artifact")
    assert Path(fetched).read_bytes() == Path(matrices).read_bytes()
    with pytest.raises(Exception, match="No 'secret.txt'"):
        client.predict(run_id, "secret.txt", api_name="/get_artifact")
    # The file route serves the runs root (allowed_paths) and nothing else of this machine.
    assert http_status(app[0], Path(st["output_dir"]) / "report.json") == 200
    assert http_status(app[0], Path(__file__).resolve().parents[1] / "app.py") == 403
    assert http_status(app[0], Path("/etc/passwd")) == 403

    # The downloaded file loads in core and wraps exactly the calibrated layers.
    model = copy.deepcopy(smollm2.model)
    cfg = load_matrices(matrices, model)
    assert cfg.skip_layers == ["lm_head"] and cfg.epochs == 1
    assert [is_wrapped(layer) for layer in decoder_layers(model)[:3]] == [True, True, False]

    # Compare: both models answer the same prompt, with tokens/s; the FlatQuant box says the real int4 model ran.
    orig, orig_stats, quant_box, quant_stats = client.predict("Name three colors.", 8, LANG, api_name="/generate")
    quant = value(quant_box)
    assert orig and quant and not orig.startswith("✖")
    assert quant_box["label"] == t("quantized_real") and "real int4 failed" not in quant_stats
    assert "tokens/s" in orig_stats and "tokens/s" in quant_stats
    generation = json.loads((Path(st["output_dir"]) / "report.json").read_text())["generation"]
    assert generation["quantized_model"].startswith("real int4") and generation["quantized"]["text"] == quant

    # Compare: the run shows up in the table with its perplexities; the PPL chart plots the report's numbers, one
    # bar per model, on a log axis; accuracy and latency, not measured yet, say so; in both languages.
    ppl = json.loads((Path(st["output_dir"]) / "report.json").read_text())["ppl"]
    models = [k for k in ("original", "quantized", "rtn", "quarot") if ppl.get(k) is not None]
    assert models[:3] == ["original", "quantized", "rtn"]
    for lang_name, lang in ((LANG, "en"), ("中文", "zh")):
        sel, table, ppl_plot, acc_plot, lat_plot = client.predict(run_id, lang_name, api_name="/compare_refresh")
        table = value(table)
        row = dict(zip(table["headers"], table["data"][0]))
        assert value(sel) == run_id and row[t("col_run", lang)] == run_id
        assert row[t("col_ppl_orig", lang)] == round(ppl["original"], 2) and row[t("col_ppl_fq", lang)] == round(
            ppl["quantized"], 2)
        fig = figure(ppl_plot)
        assert title(fig) == t("ppl_chart", lang) and title(fig, "yaxis") == t("ppl_axis", lang)
        assert fig["layout"]["yaxis"]["type"] == "log"
        assert [tr["name"] for tr in fig["data"]] == [t(m, lang) for m in models]
        for trace, model in zip(fig["data"], models):
            assert trace["type"] == "bar" and trace["x"] == [t("seqlen_n", lang, n=ppl["seqlen"])]
            assert trace["y"] == [pytest.approx(ppl[model])] and trace["text"] == [f"{ppl[model]:.2f}"]
        for plot, chart in ((acc_plot, "acc_chart"), (lat_plot, "latency_chart")):
            fig = figure(plot)
            assert fig["data"] == [] and title(fig) == t(chart, lang)
            assert [a["text"] for a in fig["layout"]["annotations"]] == [t("chart_empty_eval", lang)]

    # Export the packed int4 checkpoint of the models in memory; it downloads as a zip that core loads back.
    msg = client.predict(LANG, api_name="/start_export")
    assert msg.startswith("✔"), msg
    st = wait_finished(client)
    assert st["status"] == "done", st["error"]
    ckpt = value(client.predict(run_id, api_name="/artifacts_refresh")[3])
    assert Path(ckpt).name == "quantized_checkpoint.zip"
    unpacked = Path(ckpt).parent / "unzipped"
    shutil.unpack_archive(ckpt, unpacked)
    import torch

    from core.realquant import load_checkpoint

    loaded = load_checkpoint(unpacked / "checkpoint")
    ids = loaded.tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()

    # The vllm-ascend folder of the same models: one zip, a folder that follows the layout.
    from core.realquant.ascend_reference import layout_problems

    msg = client.predict(LANG, api_name="/start_export_ascend")
    assert msg.startswith("✔"), msg
    st = wait_finished(client)
    assert st["status"] == "done", st["error"]
    ascend_zip = value(client.predict(run_id, "ascend_w4a4_flatquant.zip", api_name="/get_artifact"))
    shutil.unpack_archive(ascend_zip, Path(ascend_zip).parent / "ascend_unzipped")
    assert layout_problems(Path(ascend_zip).parent / "ascend_unzipped" / "ascend") == []

    # Load matrices instead of calibrating, from an upload of the downloaded file.
    no_ppl = GuiSettings(**{**QUICK, "ppl_windows": 0})
    msg = client.predict(*no_ppl.values(), handle_file(matrices), "", LANG, api_name="/load_matrices")
    assert msg.startswith("✔"), msg
    st = wait_finished(client)
    assert st["status"] == "done", st["error"]
    assert not any(e["stage"] == "layer_done" for e in st["events"])  # nothing was calibrated
    new_run = Path(st["output_dir"]).name
    _, _, report, _, _, report_json = map(value, client.predict(new_run, api_name="/artifacts_refresh"))
    assert json.loads(report_json)["calibration"]["loaded_from"].endswith("flat_matrices.pth")


def test_bad_inputs_give_messages_and_server_keeps_serving(client, tmp_path):
    msg = start(client, model_path="/no/such/model")
    assert "does not exist" in msg and "/no/such" not in msg  # no absolute server path in what the page shows
    assert "no letter or digit" in start(client, skip_layers="--")
    bad = tmp_path / "flat_matrices.pth"
    bad.write_bytes(b"this is not a torch file")
    msg = client.predict(*GuiSettings(**QUICK).values(), handle_file(str(bad)), "", LANG, api_name="/load_matrices")
    assert msg.startswith("✖") and "corrupt" in msg and "/" not in msg  # neither gradio's temp path nor ours
    msg = client.predict(*GuiSettings(**QUICK).values(), None, "", LANG, api_name="/load_matrices")
    assert msg.startswith("✖") and "flat_matrices.pth" in msg
    assert status(client)["status"] in ("idle", "done")  # still serving, nothing started


def test_second_job_is_busy_and_cancel_stops_the_first(client):
    # Long enough to be running when the second request and the cancel arrive.
    assert start(client, nsamples=8, seqlen=128, epochs=3, max_layers=0, ppl_windows=0).startswith("✔")
    busy = start(client)
    assert busy.startswith("✖ Busy") and "Cancel" in busy
    wait_for(client, lambda s: s["status"] == "running" and (s["last_event"] or {}).get("stage") == "calibrate")
    assert "Cancel requested" in client.predict(LANG, api_name="/cancel")
    t0 = time.monotonic()
    st = wait_finished(client, timeout=60)
    assert st["status"] == "cancelled" and "cancelled" in st["error"]
    assert time.monotonic() - t0 < 30
    assert "No job is running" in client.predict(LANG, api_name="/cancel")
    assert start(client).startswith("✔")  # the runner is free again
    client.predict(LANG, api_name="/cancel")
    assert wait_finished(client)["status"] == "cancelled"


def test_settings_save_and_load_round_trip(client, tmp_path):
    s = GuiSettings(skip_layers="lm_head,down_proj", epochs=2, kv_quant=True)
    path = client.predict(*s.values(), api_name="/save_settings")
    *values, check = client.predict(handle_file(path), api_name="/load_settings")
    assert GuiSettings.from_values(*values) == s and check.startswith("✔")
    bad = tmp_path / "bad.json"
    bad.write_text('{"nsampels": 3}')
    *values, check = client.predict(handle_file(str(bad)), api_name="/load_settings")
    assert check.startswith("✖") and "Unknown setting" in check
    cli, ok = client.predict(*s.values(), LANG, api_name="/check_settings")
    assert ok == "✔ Settings are valid." and "--skip_layers=down_proj,lm_head" in cli
    cli, ok = client.predict(*GuiSettings(skip_layers="--").values(), "中文", api_name="/check_settings")
    assert ok.startswith("✖") and "no letter or digit" in ok


def test_auth_flag_requires_login(tmp_path):
    with running_app(tmp_path / "runs", tmp_path / "app.log", extra_args=("--auth", "alice:s3cret")) as url:
        assert Client(url, auth=("alice", "s3cret"), verbose=False).predict(api_name="/job_status")["status"] == "idle"
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False)
