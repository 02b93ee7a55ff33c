"""The device jobs the GUI can start. Each is a thin call into core, run by the JobRunner in its thread."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

from core.errors import FlatQuantError
from core.progress import Reporter
from core.outputs import remove_if_only_logs
from core.validate import safe_message

from .context import AppContext
from .jobprogress import plan_for
from .runner import Job, log
from .runs import ASCEND_DIR, ASCEND_ZIP, CHECKPOINT_DIR, CHECKPOINT_ZIP
from .settings import CONFIG_FILE, GuiSettings

GUI_SETTINGS_FILE = "gui_settings.json"
# The GUI's latency budget: enough rounds for a stable median on a CPU, short enough to wait for in a page.
GUI_LATENCY = dict(latency_seqlen=128, decode_tokens=32, latency_repeats=3)


def check_matrix_file(path: str) -> None:
    """Refuse a missing, corrupt or foreign-format matrix file before a job starts (weights_only load, cheap)."""
    from core.errors import MatrixFileError
    from core.matrices import read_matrices

    try:
        read_matrices(path)
    except FlatQuantError:
        raise
    except Exception as exc:  # torch's unpickler raises assorted errors on garbage bytes
        raise MatrixFileError(f"Matrix file {Path(path).name!r} is corrupt or not a FlatQuant Studio matrix file "
                              f"({type(exc).__name__}); upload the flat_matrices.pth a calibration wrote.") from exc


@contextlib.contextmanager
def cancel_inside_forward(cancel):
    """While this thread runs a job, check its cancel token before every module's forward (a global hook that
    acts only in this thread, only once the token is set): a cancel lands within one layer's forward in any stage
    (calibration, perplexity windows, lm-eval requests, latency runs, generation, export)."""
    import threading

    import torch

    thread = threading.get_ident()

    def hook(_module, _args):
        if cancel.cancelled and threading.get_ident() == thread:
            cancel.check()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def start_quantize(ctx: AppContext, settings: GuiSettings, matrix_path: Optional[str] = None) -> Job:
    """Calibrate (or load matrices) into a new run folder; the models stay in ctx.runner.workspace."""

    def target(job: Job) -> dict:
        from core.pipeline import QuantizeOptions, run_quantize

        ctx.runner.release_models()
        run_dir = ctx.store.new_run()
        job.output_dir = str(run_dir)
        # The run folder holds what reproduces it: the form, the config file and the equivalent command.
        (run_dir / GUI_SETTINGS_FILE).write_text(settings.to_json())
        (run_dir / CONFIG_FILE).write_text(json.dumps(settings.config_dict(), indent=2))
        (run_dir / "command.txt").write_text(settings.cli_command(str(run_dir), matrix_path) + "\n")
        options = QuantizeOptions(**settings.quantize_kwargs(str(run_dir), matrix_path))
        try:
            with cancel_inside_forward(job.cancel):
                result = run_quantize(options, on_event=ctx.runner.callback(job), cancel=job.cancel)
        except BaseException:
            # nothing measured or saved yet (an early error, a cancel during calibration): no empty run is left
            remove_if_only_logs(run_dir, also=(GUI_SETTINGS_FILE, CONFIG_FILE, "command.txt"))
            raise
        ctx.runner.workspace = {
            "original": result.original, "quantized": result.quantized, "rtn": result.rtn,
            # the run's baselines (QuantizeOptions.baselines): built ones are reused by the Compare tab's
            # evaluations, the others are built there from the original
            "baselines": dict(result.extras.get("baselines") or {}), "baseline_names": options.baselines_to_run(),
            "tokenizer": result.tokenizer, "config": result.config, "run_id": run_dir.name,
            "output_dir": str(run_dir),
        }
        return {"run_id": run_dir.name, "output_dir": str(run_dir), "matrix_path": str(result.matrix_path)}

    title = "load matrices" if matrix_path else f"calibrate {settings.model_path}"
    kind = "load_matrices" if matrix_path else "calibrate"
    ppl_parts = 2 + len(settings.baseline_names()) if settings.ppl_windows else 0  # original, quantized, baselines
    return ctx.runner.start(kind, target, title, plan=plan_for(kind, ppl_parts=ppl_parts))


def _workspace(ctx: AppContext) -> dict:
    ws = ctx.runner.workspace
    if not ws.get("quantized"):
        raise FlatQuantError("No models in memory yet: run a calibration or load matrices first.")
    return ws


def failure_cause(exc: BaseException) -> str:
    """An exception as one short line for the page: core's message, else its type and first line (no paths)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not isinstance(exc, FlatQuantError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return safe_message(text)


def real_int4_model(ws: dict, reporter: Reporter):
    """The quantized model as real int4 (packed weights, integer GEMMs), converted once per run and kept in the
    workspace: (model, None); or, when the conversion fails (e.g. no int4 kernel on this device), the fake-quant
    model and the failure's cause, reported as a 'real_int4_failed' event on every use (the log says what ran)."""
    if ws.get("quantized_real") is None:
        import copy

        from core.realquant.convert import convert_model

        try:
            ws["quantized_real"] = convert_model(copy.deepcopy(ws["quantized"]))
            ws.pop("quantized_real_error", None)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the fake-quant model answers and the page says why
            log.exception("real int4 conversion failed; generating with the fake-quant model")
            ws["quantized_real"], ws["quantized_real_error"] = False, failure_cause(exc)
    if ws["quantized_real"] is False:
        reporter.emit("real_int4_failed", {"cause": ws["quantized_real_error"]})
        return ws["quantized"], ws["quantized_real_error"]
    return ws["quantized_real"], None


class _LiveText:
    """A transformers streamer that appends finished text pieces to one entry of a shared dict."""

    def __new__(cls, tokenizer, live: dict, key: str):
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                live[key] = live.get(key, "") + text

        return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def start_generate(ctx: AppContext, prompt: str, max_new_tokens: int) -> tuple[Job, dict]:
    """Both models on one prompt, streamed: the original, then the real int4 model (labelled). Returns the job and
    the live dict ({original, quantized, quantized_kind, fallback_cause, section}) the page reads while it runs
    (quantized_kind "fake" with the cause when real int4 failed); the section also goes into the run's report."""
    ws = _workspace(ctx)
    live: dict = {"original": "", "quantized": "", "quantized_kind": None, "fallback_cause": None, "section": None}

    def target(job: Job) -> dict:
        from core.generation import GenerationOptions, compare_generation
        from core.report import update_report

        job.output_dir = ws["output_dir"]
        reporter = Reporter(ctx.runner.callback(job), job.cancel)
        quantized, cause = real_int4_model(ws, reporter)
        kind = "fake" if cause else "real"
        live["quantized_kind"], live["fallback_cause"] = kind, cause
        with cancel_inside_forward(job.cancel):
            section = compare_generation(ws["original"].model, quantized, ws["tokenizer"],
                                         GenerationOptions(prompt=prompt or None, max_new_tokens=int(max_new_tokens)),
                                         reporter, streamer_for=lambda label: _LiveText(ws["tokenizer"], live, label))
        section["quantized_model"] = ("real int4 (core.realquant)" if kind == "real"
                                      else f"fake quant (real int4 failed: {cause})")
        update_report(ws["output_dir"], {"generation": section})
        live["section"] = section
        return {"run_id": ws["run_id"], "output_dir": ws["output_dir"], "quantized_model": kind}

    return ctx.runner.start("generate", target, "generate"), live


def evaluated_baselines(ws: dict) -> list[str]:
    """The baselines the Compare tab's evaluations put next to the original and the quantized model: the run's
    (a workspace from before baselines were recorded: RTN, as it always had)."""
    return list(ws.get("baseline_names", ["rtn"]))


def start_evaluate(ctx: AppContext, sections: list[str], ppl_seqlen: int, ppl_windows: Optional[int],
                   limit: Optional[int]) -> Job:
    """PPL / lm-eval accuracy / latency on the models in memory; each section lands in report.json as it ends."""
    ws = _workspace(ctx)
    if not sections:
        raise FlatQuantError("Pick at least one of Perplexity, Six-task accuracy or Latency.")
    ws.setdefault("baselines", {})
    names = evaluated_baselines(ws)
    models = 2 + len(names)  # original, quantized and the run's baselines, in perplexity and accuracy

    def target(job: Job) -> dict:
        from core.data import shared_data_dir
        from core.evaluate import EvalOptions, evaluate_pair

        job.output_dir = ws["output_dir"]
        data = shared_data_dir()
        tasks_dir = data / "eval" if data is not None and (data / "eval").is_dir() else None
        options = EvalOptions(sections=tuple(sections), output_dir=ws["output_dir"], ppl_seqlens=(int(ppl_seqlen),),
                              ppl_max_windows=ppl_windows or None, limit=limit or None,
                              ppl_rtn=False, baselines=tuple(names),
                              tasks_data_dir=str(tasks_dir) if tasks_dir else None,
                              quant_config=ws["config"].to_amct_dict() if ws.get("config") is not None else None,
                              **GUI_LATENCY)
        out = {"run_id": ws["run_id"], "output_dir": ws["output_dir"], "sections": list(sections)}
        reporter = Reporter(ctx.runner.callback(job), job.cancel)
        with cancel_inside_forward(job.cancel):
            for section in options.sections:  # one at a time: the accuracy section is timed for the next estimate
                started = time.monotonic()
                evaluate_pair(ws["original"].model, ws["quantized"], ws["tokenizer"],
                              dataclasses.replace(options, sections=(section,)), reporter, baselines=ws["baselines"])
                if section == "acc" and options.limit:
                    out["acc_seconds_per_example"] = (time.monotonic() - started) / (
                        options.limit * len(options.tasks) * models / 2)
        return out

    return ctx.runner.start("evaluate", target, "evaluate " + ", ".join(sections),
                            plan=plan_for("evaluate", ppl_parts=models, acc_parts=models, sections=tuple(sections)))


def start_export(ctx: AppContext, fmt: str = "native") -> Job:
    """Write the quantized model into <run>/checkpoint/ (native packed int4) or <run>/ascend/ (vllm-ascend's
    W4A4_FLATQUANT_DYNAMIC layout) and zip it. Cancel is checked once per layer while the folder is written (a
    cancelled export removes its staged folder; an earlier export and its zip stay as they were); once the folder
    is in place, the zip is written too."""
    ws = _workspace(ctx)

    def target(job: Job) -> dict:
        from core.realquant.ascend import export_quantized

        job.output_dir = ws["output_dir"]
        reporter = Reporter(ctx.runner.callback(job), job.cancel)
        subdir, name = (ASCEND_DIR, ASCEND_ZIP) if fmt == "ascend" else (CHECKPOINT_DIR, CHECKPOINT_ZIP)
        out = Path(ws["output_dir"]) / subdir
        reporter.emit("export_start", {"format": fmt, "folder_path": str(out)})
        # the fake-quant model stays as it is for the Compare tab (the exporters copy or only read it)
        export_quantized(ws["quantized"], ws["config"], ws["tokenizer"], ws["original"].path, out, fmt,
                         reporter=reporter)
        zipped = ctx.store.zip_checkpoint(ws["run_id"], subdir, name)
        reporter.emit("export_done", {"format": fmt, "folder_path": str(out), "zip_path": str(zipped)})
        return {"run_id": ws["run_id"], "output_dir": ws["output_dir"], "checkpoint": zipped}

    return ctx.runner.start("export", target, f"export {fmt}")
