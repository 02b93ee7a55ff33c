"""Compare tab: one prompt through both models side by side; PPL / accuracy / latency charts; earlier runs."""
from __future__ import annotations

import functools
import time

import gradio as gr

from core.errors import FlatQuantError

from .. import jobs
from ..charts import accuracy_figure, accuracy_table, latency_figure, ppl_figure, ppl_table
from ..context import AppContext
from ..i18n import lang_code, t
from .common import OK, fail

# i18n keys of the runs table's columns
RUN_COLUMNS = ["col_run", "col_model", "col_wa", "col_skip", "col_layers", "col_epochs", "col_nsamples", "col_calib_s",
               "col_ppl_orig", "col_ppl_fq", "col_ppl_rtn", "col_acc_orig", "col_acc_fq", "col_tps_orig", "col_tps_fq"]


def _num(v, digits=2):
    return round(float(v), digits) if isinstance(v, (int, float)) else None


def run_row(run_id: str, report: dict, lang: str = "en") -> list:
    """One table row per run; every cell is read from report.json (missing sections stay empty)."""
    model, cfg, cal = report.get("model") or {}, report.get("config") or {}, report.get("calibration") or {}
    q = cfg.get("quant_cfg") or {}
    wa = f"{(q.get('weights') or {}).get('type', '?')}/{(q.get('inputs') or {}).get('type', '?')}".replace("int", "")
    algo = (cfg.get("algorithm") or {}).get("flatquant") or {}
    ppl = ppl_table(report)
    first = next(iter(ppl.values()), {})
    acc = accuracy_table(report)
    lat = report.get("latency") or {}
    return [
        run_id, model.get("name"), wa if cfg else None, ",".join(cfg.get("skip_layers") or []),
        (cal.get("max_layers") or model.get("num_hidden_layers")) if not cal.get("loaded_from")
        else t("loaded_cell", lang),
        algo.get("epochs"), cal.get("nsamples"), _num(cal.get("seconds"), 1),
        _num(first.get("original")), _num(first.get("quantized")), _num(first.get("rtn")),
        _num((acc.get("original") or {}).get("acc_avg")), _num((acc.get("quantized") or {}).get("acc_avg")),
        _num((lat.get("original") or {}).get("tokens_per_s"), 1),
        _num((lat.get("quantized") or {}).get("tokens_per_s"), 1),
    ]


def run_headers(lang: str) -> list[str]:
    return [t(k, lang) for k in RUN_COLUMNS]


def runs_table(ctx: AppContext, lang: str = "en"):
    """Every run as a row, headers in the page's language."""
    import pandas as pd

    return pd.DataFrame([run_row(r, ctx.store.report(r), lang) for r in ctx.store.list_runs()],
                        columns=run_headers(lang))


def charts_for(ctx: AppContext, run_id, lang_value):
    lang = lang_code(lang_value)
    report = ctx.store.report(run_id)
    return ppl_figure(report, lang), accuracy_figure(report, lang), latency_figure(report, lang)


def refresh(ctx: AppContext, run_id, lang_value):
    """Runs list + table + charts; keeps the selected run if it still exists, else the newest."""
    runs = ctx.store.list_runs()
    if run_id not in runs:
        run_id = runs[0] if runs else None
    return (gr.update(choices=runs, value=run_id), runs_table(ctx, lang_code(lang_value)),
            *charts_for(ctx, run_id, lang_value))


def _side(stats: dict, lang: str = "en") -> str:
    if not stats:
        return ""
    tps = stats.get("tokens_per_s")
    return (t("gen_stats", lang, tps=f"{tps:.1f}", n=stats.get("new_tokens"), s=f"{stats.get('seconds', 0):.2f}")
            if tps is not None else "")


def _quantized_side(live: dict, lang: str) -> tuple:
    """The FlatQuant box (its label says which model ran: real int4, or the fake-quant model and why) and its
    speed line (which repeats the cause when real int4 failed)."""
    stats = _side((live.get("section") or {}).get("quantized"), lang)
    cause = live.get("fallback_cause")
    if live.get("quantized_kind") != "fake":
        return gr.update(value=live["quantized"], label=t("quantized_real", lang)), stats
    stats = " · ".join(s for s in (stats, t("fake_fallback", lang, cause=cause)) if s)
    return gr.update(value=live["quantized"], label=t("quantized_fallback", lang, cause=cause)), stats


def generate(ctx: AppContext, prompt, max_new_tokens, lang_value):
    """Stream both models' answers into the page as they are generated (the FlatQuant side runs the real int4
    model, and its label says which model ran)."""
    lang = lang_code(lang_value)
    try:
        job, live = jobs.start_generate(ctx, prompt, max_new_tokens)
    except Exception as exc:  # a message for the page; the server keeps serving
        yield fail(exc), "", "", ""
        return
    while True:
        running = job.running
        section = live.get("section") or {}
        yield live["original"], _side(section.get("original"), lang), *_quantized_side(live, lang)
        if not running:
            break
        time.sleep(0.25)
    if job.status != "done":
        yield fail(FlatQuantError(job.error or job.status)), "", _quantized_side(live, lang)[0], ""


# Seconds per (example, task) for both models on SmolLM2-135M on a 2-vCPU CPU (issue 13: 2 examples x 6 tasks took
# 58 s); scaled by the model's size until this server has timed an accuracy run of its own.
DEFAULT_ACC_SECONDS = 58.0 / 12
DEFAULT_ACC_PARAMS = 135e6


def acc_seconds_per_example(ctx: AppContext) -> float:
    """The measured rate of the last accuracy evaluation on this server, else the default scaled by model size."""
    for job in reversed(ctx.runner.history):
        rate = (job.result or {}).get("acc_seconds_per_example") if isinstance(job.result, dict) else None
        if rate:
            return float(rate)
    model = (ctx.runner.workspace.get("original") or None)
    params = sum(p.numel() for p in model.model.parameters()) if model is not None else DEFAULT_ACC_PARAMS
    return DEFAULT_ACC_SECONDS * params / DEFAULT_ACC_PARAMS


def accuracy_estimate(ctx: AppContext, sections, limit, lang_value) -> str:
    """Shown before an accuracy run starts: about how long it will take, from the examples per task."""
    lang = lang_code(lang_value)
    if "tasks" not in (sections or []):
        return ""
    from core.accuracy import DEFAULT_TASKS

    n = int(limit or 0) or 100  # 0 = lm-eval's whole validation sets; say "at least" for those
    models = 2 + len(jobs.evaluated_baselines(ctx.runner.workspace))  # original, quantized, baselines
    seconds = acc_seconds_per_example(ctx) * n * len(DEFAULT_TASKS) * models / 2
    key = "acc_estimate_long" if seconds > 300 else "acc_estimate"
    return t(key, lang, n=n, tasks=len(DEFAULT_TASKS), m=models, minutes=max(1, round(seconds / 60)))


def start_evaluate(ctx: AppContext, sections, ppl_seqlen, ppl_windows, limit, lang_value):
    lang = lang_code(lang_value)
    keys = {"ppl": "ppl", "tasks": "acc", "latency": "latency"}
    try:
        job = jobs.start_evaluate(ctx, [keys[s] for s in sections or []], int(ppl_seqlen or 256),
                                  int(ppl_windows or 0), int(limit or 0))
    except Exception as exc:  # a message for the page; the server keeps serving
        return fail(exc)
    estimate = accuracy_estimate(ctx, sections, limit, lang_value)
    return OK + t("started_elsewhere", lang, id=job.id) + (f" {estimate}" if estimate else "")


def build(ctx: AppContext) -> None:
    mgr = ctx.mgr
    with gr.Tab(t("tab_compare"), id="compare") as tab:
        mgr.add("tab_compare", tab, label="tab_compare")
        with gr.Row():
            mgr.add("prompt", gr.Textbox(value=None, placeholder="Give me a short introduction to the Ascend Model "
                                         "Compression Toolkit(AMCT).", label=t("prompt"), lines=2, scale=4,
                                         elem_id="prompt"), label="prompt")
            mgr.add("max_new_tokens", gr.Slider(1, 256, value=48, step=1, label=t("max_new_tokens"), scale=1,
                                                elem_id="max_new_tokens"), label="max_new_tokens")
        mgr.add("generate", gr.Button(t("generate"), variant="primary", elem_id="generate_btn"), value="generate")
        with gr.Row():
            with gr.Column():
                mgr.add("gen_original", gr.Textbox(label=t("original"), lines=6, interactive=False,
                                                   elem_id="gen_original"), label="original")
                mgr.add("gen_original_stats", gr.Markdown(elem_id="gen_original_stats"))
            with gr.Column():
                mgr.add("gen_quantized", gr.Textbox(label=t("quantized_real"), lines=6, interactive=False,
                                                    elem_id="gen_quantized"), label="quantized_real")
                mgr.add("gen_quantized_stats", gr.Markdown(elem_id="gen_quantized_stats"))
        with gr.Row():
            mgr.add("eval_sections", gr.CheckboxGroup(
                choices=[(t("eval_ppl"), "ppl"), (t("eval_tasks"), "tasks"), (t("eval_latency"), "latency")],
                value=["ppl", "latency"], label=t("evaluate"), scale=3, elem_id="eval_sections"), label="evaluate",
                choices=[("eval_ppl", "ppl"), ("eval_tasks", "tasks"), ("eval_latency", "latency")])
            mgr.add("eval_limit", gr.Number(value=50, precision=0, minimum=0, label=t("eval_limit"), scale=1,
                                            elem_id="eval_limit"), label="eval_limit")
            mgr.add("evaluate", gr.Button(t("evaluate"), scale=1, elem_id="evaluate_btn"), value="evaluate")
        mgr.add("eval_msg", gr.Markdown(elem_id="eval_msg"))
        with gr.Row():
            runs = ctx.store.list_runs()
            mgr.add("compare_run", gr.Dropdown(choices=runs, value=runs[0] if runs else None, label=t("run_select"),
                                               allow_custom_value=True, scale=3, elem_id="compare_run"),
                    label="run_select")
            mgr.add("compare_refresh", gr.Button(t("refresh"), scale=1, size="sm"), value="refresh")
        with gr.Row():
            mgr.add("ppl_plot", gr.Plot(label=t("ppl_chart"), elem_id="ppl_plot"), label="ppl_chart")
            mgr.add("acc_plot", gr.Plot(label=t("acc_chart"), elem_id="acc_plot"), label="acc_chart")
        mgr.add("latency_plot", gr.Plot(label=t("latency_chart"), elem_id="latency_plot"), label="latency_chart")
        mgr.add("runs_table", gr.Dataframe(headers=run_headers("en"), value=runs_table(ctx), label=t("runs_table"),
                                           interactive=False, wrap=False, elem_id="runs_table"), label="runs_table")


def wire(ctx: AppContext) -> None:
    mgr, bind, lang = ctx.mgr, functools.partial, ctx.mgr["language"]
    mgr["generate"].click(bind(generate, ctx), inputs=[mgr["prompt"], mgr["max_new_tokens"], lang],
                          outputs=[mgr["gen_original"], mgr["gen_original_stats"], mgr["gen_quantized"],
                                   mgr["gen_quantized_stats"]], api_name="generate", concurrency_limit=None)
    mgr["evaluate"].click(bind(start_evaluate, ctx),
                          inputs=[mgr["eval_sections"], mgr["seqlen"], mgr["ppl_windows"], mgr["eval_limit"], lang],
                          outputs=mgr["eval_msg"], api_name="start_evaluate", concurrency_limit=None)
    for source in (mgr["eval_sections"], mgr["eval_limit"]):  # the estimate shows before the run starts
        source.change(bind(accuracy_estimate, ctx), inputs=[mgr["eval_sections"], mgr["eval_limit"], lang],
                      outputs=mgr["eval_msg"], api_visibility="private", show_progress="hidden")
    outputs = [mgr["compare_run"], mgr["runs_table"], mgr["ppl_plot"], mgr["acc_plot"], mgr["latency_plot"]]
    mgr["compare_refresh"].click(bind(refresh, ctx), inputs=[mgr["compare_run"], lang], outputs=outputs,
                                 api_name="compare_refresh", concurrency_limit=None)
    lang.change(bind(refresh, ctx), inputs=[mgr["compare_run"], lang], outputs=outputs, api_visibility="private",
                show_progress="hidden")
    mgr["compare_run"].input(bind(charts_for, ctx), inputs=[mgr["compare_run"], lang], outputs=outputs[2:],
                             api_visibility="private", concurrency_limit=None)
