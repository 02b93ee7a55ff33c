"""Assemble the tabs into one gr.Blocks and launch it locally (no share link, no analytics, no CDN)."""
from __future__ import annotations

import functools
import os
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere

import gradio as gr  # noqa: E402

from .context import AppContext  # noqa: E402
from .i18n import DEFAULT_LANG, LANGS, lang_code, t  # noqa: E402
from .runner import JobRunner  # noqa: E402
from .runs import RunStore  # noqa: E402
from .tabs import artifacts, calibrate, compare, model_config  # noqa: E402

TABS = (model_config, calibrate, compare, artifacts)

CSS = """
.fq-bar { height: 10px; background: var(--neutral-200); border-radius: 5px; margin: 8px 0 4px; overflow: hidden; }
.fq-bar-fill { height: 100%; background: #ea580c; transition: width .4s; }
.fq-stage { color: var(--body-text-color-subdued); font-size: .9em; }
.fq-error { color: #b91c1c; font-weight: 600; margin-top: 4px; }
.fq-warning { color: #b45309; margin-top: 4px; }
#fq-status { padding: 8px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
button:disabled, button[disabled] { opacity: .45 !important; cursor: not-allowed !important; filter: grayscale(70%); }
"""


def relabel(ctx: AppContext, lang_value):
    """Every label in the chosen language; the FlatQuant box keeps saying that the fake-quant model answers when
    this run's real int4 conversion failed."""
    cause = ctx.runner.workspace.get("quantized_real_error")
    labels = {"gen_quantized": ("quantized_fallback", {"cause": cause})} if cause else None
    return ctx.mgr.relabel(lang_code(lang_value), labels)


def after_job(ctx: AppContext, finished_job: str, compare_run, artifact_run, lang_value):
    """A job just finished (seen by this page's poll): point the Compare and Artifacts tabs at its run."""
    snap = ctx.runner.snapshot()
    run_id = os.path.basename(snap.get("output_dir") or "") or None
    runs = ctx.store.list_runs()
    pick = run_id if run_id in runs else (runs[0] if runs else None)
    cmp_out = compare.refresh(ctx, pick, lang_value)
    art_out = artifacts.refresh(ctx, pick)
    return (*cmp_out, *art_out)


def build_app(runs_root: str = "runs", runner: Optional[JobRunner] = None, poll_seconds: float = 1.0,
              model_roots: tuple[str, ...] = (".", "models", "~/models")) -> tuple[gr.Blocks, AppContext]:
    ctx = AppContext(runner=runner or JobRunner(), store=RunStore(runs_root), model_roots=model_roots,
                     poll_seconds=poll_seconds)
    mgr = ctx.mgr
    with gr.Blocks(title="FlatQuant Studio", analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            mgr.add("title", gr.Markdown(t("title"), elem_id="title"), value="title")
            mgr.add("language", gr.Radio(choices=list(LANGS.values()), value=LANGS[DEFAULT_LANG],
                                         label=t("language"), scale=0, min_width=200, elem_id="language"),
                    label="language")
        # Per-page state is two short strings, never a model: which job/seq this page last drew, and the id of
        # the last finished job it saw. (States must sit outside gr.Tabs: inside, the frontend duplicates a tab.)
        mgr.add("finished_job", gr.State(""))
        mgr.add("seen", gr.State(""))
        # The form and the language live in the browser's localStorage: a reload keeps them.
        mgr.add("saved_settings", gr.BrowserState(None, storage_key="flatquant_studio_settings"))
        mgr.add("saved_lang", gr.BrowserState(None, storage_key="flatquant_studio_lang"))
        # The job status sits above the tabs: a calibration or evaluation is visible from every tab.
        mgr.add("progress", gr.HTML(calibrate.progress_html(ctx.runner.snapshot(), DEFAULT_LANG), elem_id="progress"))
        with gr.Tabs():
            for tab in TABS:
                tab.build(ctx)
        for tab in TABS:
            tab.wire(ctx)
        lang = mgr["language"]
        lang.change(functools.partial(relabel, ctx), inputs=lang, outputs=mgr.translated_components(),
                    api_visibility="private", show_progress="hidden")
        mgr["finished_job"].change(
            functools.partial(after_job, ctx),
            inputs=[mgr["finished_job"], mgr["compare_run"], mgr["artifact_run"], lang],
            outputs=[mgr["compare_run"], mgr["runs_table"], mgr["ppl_plot"], mgr["acc_plot"], mgr["latency_plot"],
                     mgr["artifact_run"], mgr["dl_matrices"], mgr["dl_report"], mgr["dl_checkpoint"],
                     mgr["run_files"], mgr["report_json"]],
            api_visibility="private", show_progress="hidden")
        lang.change(lambda v: v, inputs=lang, outputs=mgr["saved_lang"], api_visibility="private",
                    show_progress="hidden")
        # Messages of earlier clicks were written in the old language: clear them.
        lang.change(lambda: ("", "", ""), outputs=[mgr["action_msg"], mgr["eval_msg"], mgr["export_msg"]],
                    api_visibility="private", show_progress="hidden")
        demo.load(model_config.restore, inputs=mgr["saved_settings"], outputs=mgr.settings_components(),
                  api_visibility="private", show_progress="hidden")
        demo.load(lambda v: v if v in LANGS.values() else gr.skip(), inputs=mgr["saved_lang"], outputs=lang,
                  api_visibility="private", show_progress="hidden")
        # First paint: charts of the newest run already on disk.
        demo.load(functools.partial(compare.refresh, ctx), inputs=[mgr["compare_run"], lang],
                  outputs=[mgr["compare_run"], mgr["runs_table"], mgr["ppl_plot"], mgr["acc_plot"],
                           mgr["latency_plot"]], api_visibility="private", show_progress="hidden")
        # ... and the Artifacts tab of the newest run, its buttons enabled where the file exists.
        demo.load(functools.partial(artifacts.refresh, ctx), inputs=mgr["artifact_run"],
                  outputs=[mgr["artifact_run"], mgr["dl_matrices"], mgr["dl_report"], mgr["dl_checkpoint"],
                           mgr["run_files"], mgr["report_json"]], api_visibility="private", show_progress="hidden")
    demo.queue(default_concurrency_limit=None)
    return demo, ctx


def launch(demo: gr.Blocks, ctx: AppContext, host: str = "127.0.0.1", port: int = 7860,
           auth: Optional[tuple[str, str]] = None, **kwargs):
    """Serve locally. Files are served only from the runs root (plus gradio's own upload cache)."""
    return demo.launch(server_name=host, server_port=port, share=False, auth=auth, inbrowser=False,
                       allowed_paths=[str(ctx.store.root)], footer_links=["api", "settings"], css=CSS,
                       theme=gr.themes.Default(), show_error=True, ssr_mode=False, pwa=False, mcp_server=False,
                       enable_monitoring=False, **kwargs)
