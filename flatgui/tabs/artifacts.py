"""Artifacts tab: download flat_matrices.pth, report.json, the quantized checkpoint and the vllm-ascend folder of
one run.

Only RunStore.artifact() turns a run id into a file path, and it only returns known names inside that run's
folder; launch() gets allowed_paths=[runs root] and nothing else.
"""
from __future__ import annotations

import functools
import json

import gradio as gr

from .. import jobs
from ..context import AppContext
from ..i18n import lang_code, t
from ..runs import ASCEND_ZIP, CHECKPOINT_ZIP, MATRIX_NAME, REPORT_NAME
from .common import OK, fail


def _button(path):
    return gr.update(value=path, interactive=path is not None)


def show_run(ctx: AppContext, run_id):
    """(matrices button, report button, checkpoint button, all files, report json) for one run."""
    store = ctx.store
    m, r, c = (store.artifact(run_id, n) for n in (MATRIX_NAME, REPORT_NAME, CHECKPOINT_ZIP))
    report = store.report(run_id)
    # Shown as text: a JSON component would make API clients take the report's {"path": ...} entries for files.
    text = json.dumps(report, indent=2, ensure_ascii=False) if report else ""
    return _button(m), _button(r), _button(c), store.files(run_id) or None, text


def refresh(ctx: AppContext, run_id):
    runs = ctx.store.list_runs()
    if run_id not in runs:
        run_id = runs[0] if runs else None
    return (gr.update(choices=runs, value=run_id), *show_run(ctx, run_id))


def get_artifact(ctx: AppContext, run_id: str, name: str):
    """API: one artifact of one run, or a readable error (unknown run, unknown name, not written yet)."""
    path = ctx.store.artifact(run_id, name)
    if path is None:
        raise gr.Error(f"No {name!r} in run {run_id!r}; known files: {', '.join(ctx.store.files(run_id)) or 'none'}.")
    return path


def ascend_button(ctx: AppContext, run_id):
    """The vllm-ascend zip of one run (its own events keep show_run's outputs as the API knows them)."""
    return _button(ctx.store.artifact(run_id, ASCEND_ZIP))


def finished_ascend_button(ctx: AppContext, _finished):
    """After a job: the zip of that job's run (as app.after_job picks it)."""
    import os

    run_id = os.path.basename(ctx.runner.snapshot().get("output_dir") or "") or None
    runs = ctx.store.list_runs()
    return ascend_button(ctx, run_id if run_id in runs else (runs[0] if runs else None))


def start_export(ctx: AppContext, lang_value, fmt: str = "native"):
    lang = lang_code(lang_value)
    try:
        job = jobs.start_export(ctx, fmt)
    except Exception as exc:  # a message for the page; the server keeps serving
        return fail(exc)
    return OK + t("started_elsewhere", lang, id=job.id)


def build(ctx: AppContext) -> None:
    mgr = ctx.mgr
    runs = ctx.store.list_runs()
    first = runs[0] if runs else None
    m, r, c, files, report = show_run(ctx, first)
    with gr.Tab(t("tab_artifacts"), id="artifacts") as tab:
        mgr.add("tab_artifacts", tab, label="tab_artifacts")
        mgr.add("artifacts_help", gr.Markdown(t("artifacts_help")), value="artifacts_help")
        with gr.Row():
            # allow_custom_value: a run finished after this page loaded is valid too (RunStore checks every id)
            mgr.add("artifact_run", gr.Dropdown(choices=runs, value=first, label=t("run_select"), scale=3,
                                                allow_custom_value=True, elem_id="artifact_run"), label="run_select")
            mgr.add("artifact_refresh", gr.Button(t("refresh"), scale=1, size="sm", elem_id="artifact_refresh"),
                    value="refresh")
        with gr.Row():
            mgr.add("dl_matrices", gr.DownloadButton(t("dl_matrices"), value=m["value"], interactive=m["interactive"],
                                                     variant="primary", elem_id="dl_matrices"), label="dl_matrices")
            mgr.add("dl_report", gr.DownloadButton(t("dl_report"), value=r["value"], interactive=r["interactive"],
                                                   elem_id="dl_report"), label="dl_report")
            mgr.add("dl_checkpoint", gr.DownloadButton(t("dl_checkpoint"), value=c["value"],
                                                       interactive=c["interactive"], elem_id="dl_checkpoint"),
                    label="dl_checkpoint")
        with gr.Row():
            mgr.add("export", gr.Button(t("export"), elem_id="export_btn"), value="export")
            mgr.add("export_msg", gr.Markdown(elem_id="export_msg"))
        with gr.Row():
            mgr.add("export_ascend", gr.Button(t("export_ascend"), elem_id="export_ascend_btn"), value="export_ascend")
            a = ascend_button(ctx, first)
            mgr.add("dl_ascend", gr.DownloadButton(t("dl_ascend"), value=a["value"], interactive=a["interactive"],
                                                   elem_id="dl_ascend"), label="dl_ascend")
        mgr.add("run_files", gr.File(value=files, file_count="multiple", interactive=False, label=t("run_files"),
                                     elem_id="run_files"), label="run_files")
        mgr.add("report_json", gr.Code(value=report, language="json", label=t("report"), interactive=False,
                                       max_lines=30, elem_id="report_json"), label="report")


def wire(ctx: AppContext) -> None:
    mgr, bind = ctx.mgr, functools.partial
    outs = [mgr["dl_matrices"], mgr["dl_report"], mgr["dl_checkpoint"], mgr["run_files"], mgr["report_json"]]
    mgr["artifact_run"].input(bind(show_run, ctx), inputs=mgr["artifact_run"], outputs=outs,
                              api_visibility="private", concurrency_limit=None)
    mgr["artifact_refresh"].click(bind(refresh, ctx), inputs=mgr["artifact_run"], outputs=[mgr["artifact_run"]] + outs,
                                  api_name="artifacts_refresh", concurrency_limit=None)
    mgr["export"].click(bind(start_export, ctx), inputs=mgr["language"], outputs=mgr["export_msg"],
                        api_name="start_export", concurrency_limit=None)
    mgr["export_ascend"].click(bind(start_export, ctx, fmt="ascend"), inputs=mgr["language"],
                               outputs=mgr["export_msg"], api_name="start_export_ascend", concurrency_limit=None)
    for event in (mgr["artifact_run"].input, mgr["artifact_refresh"].click):
        event(bind(ascend_button, ctx), inputs=mgr["artifact_run"], outputs=mgr["dl_ascend"],
              api_visibility="private", concurrency_limit=None)
    if "finished_job" in mgr:  # after a job (an export included) the newest run's zip becomes downloadable
        mgr["finished_job"].change(bind(finished_ascend_button, ctx), inputs=mgr["finished_job"],
                                   outputs=mgr["dl_ascend"], api_visibility="private", show_progress="hidden")
    # API only (scripts, tests): one named artifact of one run, through the same RunStore gate.
    artifact_file = gr.File(visible=False)
    run_box, name_box, fetch = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Button(visible=False)
    fetch.click(bind(get_artifact, ctx), inputs=[run_box, name_box], outputs=artifact_file,
                api_name="get_artifact", concurrency_limit=None)
