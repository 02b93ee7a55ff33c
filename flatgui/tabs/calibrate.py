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
from ..i18n import lang_code, t
from ..settings import GuiSettings
from .common import OK, fail


def fmt_seconds(s) -> str:
    if s is None:
        return "—"
    s = int(round(float(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(snap: dict, lang: str) -> str:
    """Status line + a bar. data-* attributes let the browser test read the state without parsing text."""
    status = snap.get("status", "idle")
    if status == "idle":
        return f'<div id="fq-status" data-status="idle">{html.escape(t("idle", lang))}</div>'
    ev = snap.get("last_event") or {}
    parts = [f"<b>{html.escape(t('status_' + status, lang))}</b>: {html.escape(snap.get('title') or '')}"]
    frac = None
    if ev.get("layer") is not None and ev.get("num_layers"):
        parts.append(html.escape(t("layer_of", lang, i=ev["layer"] + 1, n=ev["num_layers"])))
        epochs, steps = ev.get("epochs") or 1, ev.get("steps") or 1
        within = ((ev.get("epoch") or 0) + ((ev.get("step") or 0) + 1) / steps) / epochs if ev.get("step") is not None \
            else (1.0 if ev.get("stage") == "layer_done" else 0.0)
        frac = min(1.0, (ev["layer"] + within) / ev["num_layers"])
    if ev.get("epoch") is not None and ev.get("epochs"):
        parts.append(html.escape(t("epoch_of", lang, i=ev["epoch"] + 1, n=ev["epochs"])))
    if ev.get("loss") is not None:
        parts.append(f"{t('loss', lang)} {ev['loss']:.4e}")
    parts.append(f"{t('elapsed', lang)} {fmt_seconds(snap.get('elapsed_s'))}")
    if status == "running" and ev.get("eta_s") is not None:
        parts.append(f"{t('eta', lang)} {fmt_seconds(ev['eta_s'])}")
    if status == "done":
        frac = 1.0
    line = " · ".join(parts)
    stage = html.escape(str(ev.get("stage") or ""))
    msg = html.escape(str(ev.get("message") or ""))
    err = f'<div class="fq-error">✖ {html.escape(snap["error"])}</div>' if snap.get("error") else ""
    bar = ""
    if frac is not None:
        bar = (f'<div class="fq-bar"><div class="fq-bar-fill" style="width:{100 * frac:.1f}%"></div></div>')
    return (f'<div id="fq-status" data-status="{status}" data-job="{snap.get("id")}" data-seq="{snap.get("seq")}" '
            f'data-layer="{ev.get("layer") if ev.get("layer") is not None else ""}" data-stage="{stage}">'
            f"{line}{bar}<div class='fq-stage'>{stage}: {msg}</div>{err}</div>")


def poll(ctx: AppContext, seen: str, lang_value: str):
    """Timer tick: re-render only when the runner's job changed since this page last looked."""
    lang = lang_code(lang_value)
    snap = ctx.runner.snapshot()
    key = f"{snap.get('id')}:{snap.get('seq')}:{lang}"
    if key == seen:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    finished = snap["id"] if snap.get("status") not in ("running", "idle") else gr.skip()
    return (progress_html(snap, lang), loss_figure(snap["events"], snap["step_events"], lang),
            "\n".join(snap["log"][-400:]), key, finished)


def job_status(ctx: AppContext) -> dict:
    """API: the current job without the step-level events (for scripts and tests)."""
    snap = ctx.runner.snapshot()
    snap.pop("step_events", None)
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
                                                 height=90, elem_id="matrix_upload"), label="matrix_upload")
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
    timer.tick(bind(poll, ctx), inputs=[mgr["seen"], lang], outputs=outputs, show_progress="hidden",
               api_visibility="private", concurrency_limit=None)
    gr.api(bind(job_status, ctx), api_name="job_status", concurrency_limit=None)
