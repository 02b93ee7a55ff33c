"""End to end in headless Chromium (Debian's `chromium`, driven by Playwright through executable_path).

Open the page, set skip_layers, start a calibration, watch progress move, reload mid-job and see the same job
still progressing, generate and evaluate, see the charts render, download flat_matrices.pth, switch to Chinese.
Screenshots go to docs/screenshots/ (the README shows them). Every request the page makes must stay on
127.0.0.1: no CDN, no analytics. Run it with `pytest -m slow tests/e2e` (after .ci/install_browser.sh).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
from gui_server import REPO, running_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# FLATQUANT_SCREENSHOT_DIR keeps a CI run from rewriting the committed screenshots.
SHOTS = Path(os.environ.get("FLATQUANT_SCREENSHOT_DIR") or REPO / "docs" / "screenshots")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (.ci/install_browser.sh)"),
]


def status_attrs(page) -> dict:
    el = page.locator("#fq-status")
    return {k: el.get_attribute(f"data-{k}") for k in ("status", "job", "seq", "layer", "stage")}


def wait_status(page, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    attrs = {}
    while time.monotonic() < deadline:
        if page.locator("#fq-status").count():
            attrs = status_attrs(page)
            if predicate(attrs):
                return attrs
        page.wait_for_timeout(250)
    raise AssertionError(f"{what}: not reached in {timeout_s} s, last status {attrs}")


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # gradio commits a textbox/number on blur


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(300)


def plot_traces(page, elem_id: str) -> int:
    """Number of drawn plotly traces (bars or lines) inside a gr.Plot."""
    return page.locator(f"#{elem_id} .js-plotly-plot g.trace").count()


def test_browser_flow(tmp_path, smollm2):
    from core.matrices import load_matrices

    SHOTS.mkdir(parents=True, exist_ok=True)
    with running_app(tmp_path / "runs", tmp_path / "app.log") as url, playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        external = []
        context.on("request", lambda r: external.append(r.url) if urlparse(r.url).hostname not in (
            "127.0.0.1", "localhost", None) and not r.url.startswith(("data:", "blob:")) else None)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(url)
        page.get_by_role("tab", name="Model & config").wait_for()

        # Model & config: a budget that runs for a while (so the reload lands mid-job) and skip_layers.
        fill(page, "skip_layers", "lm_head, layers.1.mlp.down_proj")
        for elem_id, value in (("nsamples", 8), ("seqlen", 128), ("epochs", 2), ("max_layers", 8),
                               ("ppl_windows", 8)):
            fill(page, elem_id, value)
        cli = page.locator("#cli_preview")
        page.wait_for_function("() => document.querySelector('#cli_preview').innerText.includes('--max_layers 8')")
        assert "--skip_layers=layers.1.mlp.down_proj,lm_head" in cli.inner_text()
        page.screenshot(path=str(SHOTS / "model_config.png"), full_page=True)

        # Calibrate: start, see progress move.
        open_tab(page, "Calibrate")
        page.locator("#start_btn").click()
        first = wait_status(page, lambda a: a["status"] == "running" and a["stage"] == "calibrate", 120,
                            "calibration running")
        moved = wait_status(page, lambda a: a["job"] == first["job"] and int(a["seq"]) > int(first["seq"]) + 3,
                            60, "progress moving")
        assert page.locator("#job_log textarea").input_value().strip()

        # Reload mid-job: the new page reconnects to the same running job, which keeps progressing, and the
        # form comes back from the browser's storage.
        page.reload()
        open_tab(page, "Model & config")
        page.wait_for_function("() => document.querySelector('#skip_layers textarea, #skip_layers input').value"
                               ".includes('layers.1.mlp.down_proj')", timeout=30_000)
        open_tab(page, "Calibrate")
        after = wait_status(page, lambda a: a["job"] == first["job"], 30, "same job after reload")
        assert after["status"] == "running" and int(after["seq"]) >= int(moved["seq"])
        wait_status(page, lambda a: a["status"] != "running" or int(a["seq"]) > int(after["seq"]), 60,
                    "progress after reload")
        page.wait_for_function("() => document.querySelectorAll('#loss_plot .js-plotly-plot g.trace').length > 0",
                               timeout=30_000)
        page.screenshot(path=str(SHOTS / "calibrate_running.png"), full_page=True)
        done = wait_status(page, lambda a: a["status"] != "running", 300, "calibration finished")
        assert done["status"] == "done", page.locator("#fq-status").inner_text()
        assert plot_traces(page, "loss_plot") >= 2  # per-layer line and the last layer's steps
        page.screenshot(path=str(SHOTS / "calibrate_done.png"), full_page=True)

        # Compare: generation side by side, then an evaluation that fills the PPL and latency charts.
        open_tab(page, "Compare")
        fill(page, "prompt", "Name three colors.")
        fill(page, "max_new_tokens", 12)
        page.locator("#generate_btn").click()
        page.wait_for_function(
            "() => document.querySelector('#gen_quantized textarea').value.length > 0"
            " && document.querySelector('#gen_original textarea').value.length > 0", timeout=120_000)
        assert "tokens/s" in page.locator("#gen_quantized_stats").inner_text()
        before = status_attrs(page)["job"]  # the generation job; the evaluation is a new one
        page.locator("#evaluate_btn").click()
        page.wait_for_function("() => document.querySelector('#eval_msg').innerText.includes('Started')",
                               timeout=30_000)
        wait_status(page, lambda a: a["job"] != before and a["status"] != "running", 400, "evaluation finished")
        assert status_attrs(page)["status"] == "done", page.locator("#fq-status").inner_text()
        page.wait_for_function("() => document.querySelectorAll('#latency_plot .js-plotly-plot g.trace').length > 0",
                               timeout=30_000)
        assert plot_traces(page, "ppl_plot") >= 3  # original, FlatQuant, RTN
        assert plot_traces(page, "latency_plot") >= 2
        page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)

        # Artifacts: the finished run is selected; the download is the real matrix file.
        open_tab(page, "Artifacts")
        with page.expect_download(timeout=30_000) as info:
            page.locator("#dl_matrices").click()
        download = info.value
        assert download.suggested_filename == "flat_matrices.pth"
        saved = tmp_path / "downloaded_flat_matrices.pth"
        download.save_as(saved)
        cfg = load_matrices(saved, copy.deepcopy(smollm2.model))
        assert cfg.skip_layers == ["layers.1.mlp.down_proj", "lm_head"]
        page.screenshot(path=str(SHOTS / "artifacts.png"), full_page=True)

        # Chinese labels, switchable in the page.
        page.get_by_label("中文").check()
        page.get_by_role("tab", name="模型与配置").click()
        page.get_by_text("跳过的层 (skip_layers)").first.wait_for()
        page.screenshot(path=str(SHOTS / "model_config_zh.png"), full_page=True)

        context.close()
        assert not external, f"the page contacted other hosts: {sorted(set(external))}"
