"""Calibrate tab: start/cancel, load matrices instead, live progress, per-layer loss chart, streaming log.

Nothing here blocks: the buttons start a runner job and return; a gr.Timer polls the runner, so a reloaded page
(or a second browser) shows the same job.
"""
from __future__ import annotations

import functools
import html
import os

import gradio as gr

from core.errors import FlatQuantError

from .. import jobs
from ..charts import loss_figure
from ..context import AppContext
from ..form import render_section
from ..i18n import lang_code, t
from ..joblog import event_text, format_entry
from ..jobprogress import job_eta, job_fraction
from ..settings import GuiSettings
from .common import OK, fail


def fmt_seconds(s) -> str:
    if s is None:
        return "—"
    s = int(round(float(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(snap: dict, lang: str) -> str:
    """Status line, the job-wide bar (all stages) and the current stage. data-* attributes let the browser test
    read the state without parsing text (data-frac: the job-wide fraction, data-elapsed: seconds)."""
    status = snap.get("status", "idle")
    if status == "idle":
        return f'<div id="fq-status" data-status="idle">{html.escape(t("idle", lang))}</div>'
    ev = snap.get("last_event") or {}
    title = snap.get("kind") and t("job_" + snap["kind"], lang)
    parts = [f"<b>{html.escape(t('status_' + status, lang))}</b>: {html.escape(title or snap.get('title') or '')}"]
    if ev.get("layer") is not None and ev.get("num_layers") and ev.get("stage") in ("calibrate", "layer_done"):
        parts.append(html.escape(t("layer_of", lang, i=ev["layer"] + 1, n=ev["num_layers"])))
        if ev.get("epoch") is not None and ev.get("epochs"):
            parts.append(html.escape(t("epoch_of", lang, i=ev["epoch"] + 1, n=ev["epochs"])))
        if ev.get("loss") is not None:
            parts.append(f"{t('loss', lang)} {ev['loss']:.5g}")
    frac = job_fraction(snap)
    eta = job_eta(snap, frac)
    parts.append(f"{t('elapsed', lang)} {fmt_seconds(snap.get('elapsed_s'))}")
    if eta is not None:
        parts.append(f"{t('eta', lang)} {fmt_seconds(eta)}")
    if frac is not None:
        parts.append(f"{100 * frac:.0f}%")
    line = " · ".join(parts)
    stage = html.escape(str(ev.get("stage") or ""))
    stage_text = html.escape(t("stage_" + str(ev.get("stage") or ""), lang)) if ev.get("stage") else ""
    detail = html.escape(event_text(ev, lang))
    rose = [str((e.get("layer") or 0) + 1) for e in snap.get("events") or [] if e.get("stage") == "warning"]
    warn = ""
    if rose:  # layers whose loss ended higher than it started (core.validate.check_trained_layer)
        text = t("loss_rose_layers", lang, n=len(rose), layers=", ".join(rose))
        warn = f'<div class="fq-warning">⚠ {html.escape(text)}</div>'

    error = t("cancelled_kept", lang) if status == "cancelled" else snap.get("error")
    err = f'<div class="fq-error">✖ {html.escape(error)}</div>' if error else ""
    bar = ""
    if frac is not None:
        bar = f'<div class="fq-bar"><div class="fq-bar-fill" style="width:{100 * frac:.1f}%"></div></div>'
    layer = ev.get("layer") if ev.get("layer") is not None else ""
    frac_attr = "" if frac is None else f"{frac:.4f}"
    elapsed = float(snap.get("elapsed_s") or 0.0)
    return (f'<div id="fq-status" data-status="{status}" data-job="{snap.get("id")}" data-seq="{snap.get("seq")}" '
            f'data-layer="{layer}" data-stage="{stage}" data-frac="{frac_attr}" data-elapsed="{elapsed:.1f}">'
            f"{line}{bar}<div class='fq-stage'>{stage_text}{': ' + detail if detail else ''}</div>{warn}{err}</div>")


BUTTONS = ("start", "load_matrices", "generate", "evaluate", "export", "export_ascend")  # disabled while a job runs


def poll(ctx: AppContext, seen: str, lang_value: str):
    """Timer tick. The status line is redrawn on every tick while a job runs (elapsed time and ETA move even
    when no event arrives); the chart, the log and the buttons only when the job changed."""
    lang = lang_code(lang_value)
    snap = ctx.runner.snapshot()
    running = snap.get("status") == "running"
    key = f"{snap.get('id')}:{snap.get('seq')}:{lang}"
    status = progress_html(snap, lang) if running or key != seen else gr.skip()
    if key == seen:
        return (status, gr.skip(), gr.skip(), gr.skip(), gr.skip(), *(gr.skip() for _ in BUTTONS))
    finished = snap["id"] if snap.get("status") not in ("running", "idle") else gr.skip()
    buttons = [gr.update(interactive=not running) for _ in BUTTONS]
    log = "\n".join(format_entry(e, lang) for e in snap["log_entries"][-400:])
    return (status, loss_figure(snap["events"], snap["step_events"], lang), log, key, finished, *buttons)


def job_status(ctx: AppContext) -> dict:
    """API: the current job without the step-level events (for scripts and tests)."""
    snap = ctx.runner.snapshot()
    snap.pop("step_events", None)
    snap.pop("log_entries", None)
    snap["log"] = snap["log"][-50:]
    return snap


def _started(job, lang) -> str:
    return OK + t("started", lang, id=job.id)


def start_calibration(ctx: AppContext, *args):
    *values, lang_value = args
    lang = lang_code(lang_value)
    try:
        s = GuiSettings.from_values(*values)
        s.validate()
        job = jobs.start_quantize(ctx, s)
    except Exception as exc:  # a message for the page; the server keeps serving
        return fail(exc)
    return _started(job, lang)


def start_load_matrices(ctx: AppContext, *args):
    *values, upload, typed_path, lang_value = args
    lang = lang_code(lang_value)
    path = upload or (typed_path or "").strip()
    try:
        if not path:
            raise FlatQuantError(t("no_matrix", lang))
        s = GuiSettings.from_values(*values)
        s.validate()
        jobs.check_matrix_file(os.path.expanduser(path))
        job = jobs.start_quantize(ctx, s, matrix_path=os.path.expanduser(path))
    except Exception as exc:  # a message for the page; the server keeps serving
        return fail(exc)
    return _started(job, lang)


def cancel_job(ctx: AppContext, lang_value):
    lang = lang_code(lang_value)
    return ("■ " + t("cancel_sent", lang)) if ctx.runner.cancel() else t("nothing_to_cancel", lang)


def build(ctx: AppContext) -> None:
    mgr = ctx.mgr
    with gr.Tab(t("tab_calibrate"), id="calibrate") as tab:
        mgr.add("tab_calibrate", tab, label="tab_calibrate")
        with gr.Row():  # algorithm, weight rounding, baselines: settings of the job (flatgui/form.py)
            render_section(mgr, "algorithm")
        with gr.Row():
            mgr.add("start", gr.Button(t("start"), variant="primary", elem_id="start_btn"), value="start")
            mgr.add("cancel", gr.Button(t("cancel"), variant="stop", elem_id="cancel_btn"), value="cancel")
        mgr.add("action_msg", gr.Markdown("", elem_id="action_msg"))
        mgr.add("loss_plot", gr.Plot(label=t("loss_chart"), elem_id="loss_plot"), label="loss_chart")
        mgr.add("log", gr.Textbox(label=t("log"), lines=10, max_lines=10, autoscroll=True, interactive=False,
                                  elem_id="job_log"), label="log")
        with gr.Accordion(t("load_matrices_title"), open=False) as acc:
            mgr.add("acc_load", acc, label="load_matrices_title")
            with gr.Row():
                mgr.add("matrix_upload", gr.File(label=t("matrix_upload"), file_types=[".pth"], type="filepath",
                                                 height=140, elem_id="matrix_upload"), label="matrix_upload")
                mgr.add("matrix_path", gr.Textbox(label=t("matrix_path"), elem_id="matrix_path"),
                        label="matrix_path")
            mgr.add("load_matrices", gr.Button(t("load_matrices"), elem_id="load_matrices_btn"),
                    value="load_matrices")


def wire(ctx: AppContext) -> None:
    mgr = ctx.mgr
    settings, lang = mgr.settings_components(), mgr["language"]
    bind = functools.partial
    mgr["start"].click(bind(start_calibration, ctx), inputs=settings + [lang], outputs=mgr["action_msg"],
                       api_name="start_calibration", concurrency_limit=None)
    mgr["cancel"].click(bind(cancel_job, ctx), inputs=lang, outputs=mgr["action_msg"], api_name="cancel",
                        concurrency_limit=None)
    mgr["load_matrices"].click(bind(start_load_matrices, ctx),
                               inputs=settings + [mgr["matrix_upload"], mgr["matrix_path"], lang],
                               outputs=mgr["action_msg"], api_name="load_matrices", concurrency_limit=None)
    timer = gr.Timer(ctx.poll_seconds)
    outputs = [mgr["progress"], mgr["loss_plot"], mgr["log"], mgr["seen"], mgr["finished_job"]]
    outputs += [mgr[name] for name in BUTTONS]
    timer.tick(bind(poll, ctx), inputs=[mgr["seen"], lang], outputs=outputs, show_progress="hidden",
               api_visibility="private", concurrency_limit=None)
    # The log follows its newest line.
    mgr["log"].change(None, js="() => { const t = document.querySelector('#job_log textarea'); "
                               "if (t) t.scrollTop = t.scrollHeight; }", api_visibility="private")
    gr.api(bind(job_status, ctx), api_name="job_status", concurrency_limit=None)
