"""The catalogue of progress events: every event core (or the GUI's jobs) reports has a key, the stage it belongs to
and an English template. ``Reporter.emit(key, params)`` renders the English message from the template (what the CLI
prints and quantize.log keeps) and sends the key and the parameters along, so a front end renders its own language
from them and never parses English (flatgui/i18n.py holds the Chinese templates, keyed the same).

Parameters are JSON-able: numbers, strings, lists (shown comma-separated) and dicts (shown as "name value" pairs,
or as Python's repr with ``!r``). By name: ``model`` holds a model key (original, quantized, rtn, ...), ``models`` a
list of them, ``model_path`` a model folder or 'smollm2', ``source`` a data label, and any other name ending in
``_path`` a file system path (a front end shows only its last part). No parameter is named ``path``: API clients
(gradio_client) take a dict with a "path" key for a file to download."""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EventKind:
    stage: str  # load data capture calibrate layer_done warning fold ppl eval latency convert done
    template: str  # English, str.format fields named after the event's parameters


EVENTS: dict[str, EventKind] = {
    # loading
    "distributed": EventKind("load", "distributed: rank {rank} of {world} ({backend})"),
    "memory_estimate": EventKind("load", "memory estimate: host {host_gib:.2f} GiB ({host_parts}); float original "
                                         "kept for comparisons"),
    "memory_estimate_in_place": EventKind("load", "memory estimate: host {host_gib:.2f} GiB ({host_parts}); float "
                                                  "original not kept (evaluated first, then quantized in place)"),
    "memory_estimate_device": EventKind("load", "memory estimate: {device} {device_gib:.2f} GiB ({device_parts})"),
    "load_model": EventKind("load", "loading model {model_path} on the host ({dtype}); layers go to {device} one at "
                                    "a time"),
    "load_original": EventKind("load", "loading {model_path}"),
    "load_matrices": EventKind("load", "loading calibrated matrices from {file_path}"),
    "rebuild_quantized": EventKind("load", "rebuilding the quantized model from {file_path}"),
    "resuming": EventKind("load", "resuming: {n} layer(s) restored from {file_path}"),
    # calibration
    "calib_data": EventKind("data", "calibration data: {source}"),
    "capture": EventKind("capture", "capturing layer-0 inputs for {n} samples"),
    "capture_on_disk": EventKind("capture", "capturing layer-0 inputs for {n} samples (activations on disk in "
                                            "{folder_path})"),
    "forward_to_range": EventKind("capture", "layer {i}/{n}: full-precision forward to reach layer {start}"),
    "layer_step": EventKind("calibrate", "layer {i}/{n} epoch {epoch}/{epochs} loss {loss:.6g}"),
    "gptq_layer": EventKind("calibrate", "layer {i}/{n}: GPTQ weight rounding"),
    "layer_done": EventKind("layer_done", "layer {i}/{n} done, loss {first:.4g} -> {last:.4g} ({change})"),
    "layer_restored": EventKind("layer_done", "layer {i}/{n} restored from the resume checkpoint"),
    "loss_rose": EventKind("warning", "layer {i}: loss rose from {first:.4g} to {last:.4g} ({change}); the learning "
                                      "rate may be too high (--flat_lr)"),
    "saved": EventKind("fold", "saved {file_path}"),
    # evaluation
    "ppl_start": EventKind("ppl", "perplexity of the {model} model at seqlen {seqlen}"),
    "ppl_streaming": EventKind("ppl", "perplexity {model}: streaming decoder layers to {device} one at a time"),
    "ppl_window": EventKind("ppl", "perplexity {model} window {start}/{n}"),
    "ppl_layer": EventKind("ppl", "perplexity {model}, all windows layer by layer: decoder layer {i}/{n}"),
    "ppl_value": EventKind("ppl", "PPL {model}: {value:.3f}"),
    "ppl_value_seqlen": EventKind("ppl", "PPL {model} @ {seqlen}: {value:.3f}"),
    "acc_start": EventKind("eval", "lm-eval on {model}: {tasks}"),
    "acc_start_limit": EventKind("eval", "lm-eval on {model}: {tasks} (limit {limit})"),
    "acc_requests": EventKind("eval", "lm-eval {model}: {done}/{total} requests"),
    "acc_value": EventKind("eval", "{model} ACC: {acc!r}"),
    "latency_timing": EventKind("latency", "timing {models} interleaved ({repeats} repeats)"),
    "generate": EventKind("eval", "generating with the {model} model ({max_new_tokens} new tokens max)"),
    "generate_streaming": EventKind("eval", "generating with the {model} model ({max_new_tokens} new tokens max), "
                                            "streaming its layers to {device}"),
    "eval_done": EventKind("eval", "evaluation done"),
    "real_int4_failed": EventKind("convert", "real int4 conversion failed ({cause}); the fake-quant model answers "
                                             "instead"),
    # the end of a job
    "models_on_device": EventKind("done", "models moved to {device} ({gib:.2f} GiB)"),
    "models_on_host": EventKind("done", "models stay on the host ({gib:.2f} GiB does not fit {device}); evaluation "
                                        "streams their decoder layers to the device one at a time"),
    "report_written": EventKind("done", "report written to {file_path}"),
    # export
    "export_start": EventKind("convert", "exporting the {format} W4A4 folder to {folder_path}"),
    "export_not_float": EventKind("convert", "note: the run's quantization of {parts} is not part of the exported "
                                             "model (vllm-ascend's W4A4 FlatQuant method has none for them): exported "
                                             "FLOAT, in the original basis."),
    "export_done": EventKind("done", "{format} export written to {folder_path} and zipped to {zip_path}"),
}


class _Formatter(string.Formatter):
    """str.format with lists as 'a, b' and dicts as 'name value, ...' (``!r`` still gives the repr)."""

    def format_field(self, value, format_spec):
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        return super().format_field(value, format_spec)


_FORMATTER = _Formatter()


def format_template(template: str, params: dict) -> str:
    return _FORMATTER.vformat(template, (), params)


def render(key: str, params: Optional[dict] = None) -> str:
    """The English message of an event (KeyError for a key that is not in the catalogue)."""
    return format_template(EVENTS[key].template, params or {})


def template_fields(template: str) -> set[str]:
    """The parameter names a template uses."""
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in _FORMATTER.parse(template) if field}


def is_path_param(name: str) -> bool:
    return name.endswith("_path") and name != "model_path"


__all__ = ["EventKind", "EVENTS", "format_template", "render", "template_fields", "is_path_param"]
