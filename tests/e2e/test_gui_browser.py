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
from gui_server import REPO, english_words, running_app  # noqa: E402

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
        # the text streams in first; the speed line comes when the answer is complete
        page.wait_for_function("() => document.querySelector('#gen_quantized_stats').innerText.includes('tokens/s')",
                               timeout=120_000)
        # the status line shows the finished generation job (the page polls: wait for it); the evaluation is new
        before = wait_status(page, lambda a: a["job"] != done["job"] and a["status"] == "done", 30,
                             "generation job shown")["job"]
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


# Words the Chinese page may still show: product, model, format and unit names.
NAMES = {"flatquant", "studio", "smollm", "instruct", "hugging", "face", "llamaforcausallm", "qwen3forcausallm", "rtn",
         "ppl", "token", "tokens", "json", "zip", "mib", "ms", "kv", "mlp", "auto", "npu", "cuda", "cpu", "python",
         "wikitext", "lm", "eval", "int", "pth", "txt", "raw", "api", "gradio", "w4a4", "amct",
         "quarot", "gptq", "hadamard",  # algorithm names (the Calibrate tab's algorithm and rounding choices)
         "english",  # the language switch names each language in itself
         "core", "quantize"}  # the equivalent command line (`python -m core quantize ...`) is code


def _finished_run(runs_root: Path, matrix_file: Path) -> str:
    """A run folder as an earlier calibration leaves it (matrix file and report), so a fresh page has artifacts."""
    run = runs_root / "20260101-000000"
    run.mkdir(parents=True)
    shutil.copy(matrix_file, run / "flat_matrices.pth")
    (run / "report.json").write_text('{"model": {"name": "SmolLM2-135M-Instruct"}, "ppl": {"seqlen": 512, '
                                     '"original": 20.5, "quantized": 22.0, "rtn": 900.0}}')
    return run.name


def test_progress_cancel_artifacts_and_chinese(tmp_path):
    """Issue 13, acceptance 2: elapsed time advances without new events, the job-wide bar moves during perplexity,
    a cancel during perplexity lands within 5 s and keeps the finished numbers, Artifacts is enabled on a fresh
    page, and the Chinese page shows no English words other than names."""
    import json

    from core import cli

    calibrated = tmp_path / "calibrated"
    assert cli.main(["quantize", "--max_layers", "1", "--nsamples", "2", "--seqlen", "64", "--epochs", "1",
                     "--no_ppl", "--no_time_diff", "--output_dir", str(calibrated)]) == 0
    runs = tmp_path / "runs"
    _finished_run(runs, calibrated / "flat_matrices.pth")
    with running_app(runs, tmp_path / "app.log") as url, playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True, locale="zh-CN",
            viewport={"width": 1400, "height": 1000})
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(url)
        page.get_by_role("tab", name="Model & config").wait_for()

        # Artifacts on a fresh page: the earlier run is selected and its downloads are enabled, no Refresh needed.
        open_tab(page, "Artifacts")
        page.wait_for_function("() => { const b = document.querySelector('#dl_matrices');"
                               " return b && !b.disabled && !b.querySelector('button:disabled'); }", timeout=30_000)
        assert page.locator("#dl_report").is_enabled()
        assert page.locator("#dl_checkpoint").is_disabled()  # no checkpoint exported in that run

        # A calibration whose perplexity runs long enough to watch and to cancel.
        open_tab(page, "Model & config")
        for elem_id, value in (("nsamples", 4), ("seqlen", 512), ("epochs", 1), ("max_layers", 1),
                               ("ppl_windows", 64)):
            fill(page, elem_id, value)
        page.wait_for_function("() => document.querySelector('#cli_preview').innerText.includes('--max_layers 1')")
        open_tab(page, "Calibrate")
        page.locator("#start_btn").click()
        wait_status(page, lambda a: a["status"] == "running", 60, "job running")
        page.wait_for_function("() => document.querySelector('#start_btn').disabled", timeout=10_000)

        # Sample the status line: elapsed must advance between two samples with the same event count (seq), and
        # the job-wide fraction must grow while the stage is perplexity.
        samples = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            el = page.locator("#fq-status")
            samples.append((el.get_attribute("data-seq"), float(el.get_attribute("data-elapsed") or 0),
                            el.get_attribute("data-stage"), float(el.get_attribute("data-frac") or 0),
                            el.inner_text()))
            if "quantized window" in samples[-1][4]:  # the original model's PPL is finished
                break
            page.wait_for_timeout(250)
        else:
            raise AssertionError(f"perplexity of the quantized model never started: {samples[-1]}")
        same_seq = [(a[1], b[1]) for a, b in zip(samples, samples[1:]) if a[0] == b[0] and b[1] > a[1]]
        assert same_seq, "elapsed time did not advance between events"
        ppl_fracs = [s[3] for s in samples if s[2] == "ppl"]
        assert len(set(ppl_fracs)) >= 3 and ppl_fracs == sorted(ppl_fracs) and 0 < ppl_fracs[-1] < 1

        t0 = time.monotonic()
        page.locator("#cancel_btn").click()
        wait_status(page, lambda a: a["status"] == "cancelled", 10, "cancelled")
        assert time.monotonic() - t0 <= 5.0
        assert not page.locator("#start_btn").is_disabled()
        # The finished original-model perplexity is kept in the run's report and shows in the runs table.
        run_dir = sorted(p for p in runs.iterdir() if p.name != "20260101-000000")[-1]
        report = json.loads((run_dir / "report.json").read_text())
        assert report["ppl"]["original"] > 1 and report["ppl"].get("quantized") is None
        assert (run_dir / "flat_matrices.pth").exists()
        open_tab(page, "Compare")
        page.wait_for_function(f"() => document.querySelector('#runs_table').innerText.includes('{run_dir.name}')",
                               timeout=30_000)
        page.screenshot(path=str(tmp_path / "cancelled.png"), full_page=True)

        # Chinese: every tab's rendered text, with the finished job's status line and the charts. Gradio's own
        # transient queue/timer indicator ("queue: 1/1 | 0.1s", shown while an event waits on a loaded machine) is
        # the framework's chrome, not the app's strings: hidden before reading.
        page.add_style_tag(content=".progress-text, .meta-text, .meta-text-center { display: none !important; }")
        page.get_by_label("中文").check()
        page.get_by_role("tab", name="模型与配置").wait_for()
        for tab in ("模型与配置", "校准", "对比", "产物下载"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1500)
            text = page.locator("body").inner_text()
            # a file's content and a file list are names and data, not the page's words
            for code in ("#report_json", "#run_files"):
                if page.locator(code).is_visible():
                    text = text.replace(page.locator(code).inner_text(), "")
            assert not english_words(text, NAMES), (tab, sorted(set(english_words(text, NAMES))))
        context.close()
