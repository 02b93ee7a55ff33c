"""The job log in the page's language. Core's progress messages are English one-liners from a small fixed set;
for Chinese each known message shape is rewritten from its numbers and names, and an unknown one shows the
stage's name with the event's numeric fields only (never a half-English line)."""
from __future__ import annotations

import re
from pathlib import PurePath

from core.validate import safe_message

from .i18n import t

# (pattern over core's English message, i18n key of the Chinese template); the groups fill the template.
_MESSAGES = [
    (r"layer (?P<i>\d+)/(?P<n>\d+) epoch (?P<e>\d+)/(?P<E>\d+) loss (?P<loss>\S+)", "log_step"),
    (r"capturing layer-0 inputs for (?P<n>\d+) samples", "log_capture"),
    (r"layer (?P<i>\d+)/(?P<n>\d+) restored from the resume checkpoint", "log_restored"),
    (r"layer (?P<i>\d+)/(?P<n>\d+) done, loss (?P<a>\S+) -> (?P<b>\S+) \((?P<pct>[^)]+)\)", "log_layer_done"),
    (r"perplexity of the (?P<m>\w+) model at seqlen (?P<s>\d+)", "log_ppl_start"),
    (r"PPL (?P<m>\w+)(?: @ \d+)?: (?P<v>\S+)", "log_ppl_value"),
    (r"perplexity (?P<m>\w+) window (?P<a>\d+)/(?P<b>\d+)", "log_ppl_window"),
    (r"timing (?P<ms>.+) interleaved \((?P<r>\d+) repeats\)", "log_latency"),
    (r"evaluation done", "log_eval_done"),
    (r"generating with the (?P<m>\w+) model \((?P<n>\d+) new tokens max\)", "log_generate"),
    (r"lm-eval on (?P<m>\w+): (?P<tasks>.+)", "log_acc_start"),
    (r"(?P<m>\w+) ACC: (?P<acc>.+)", "log_acc_value"),
    (r"lm-eval (?P<m>\w+): (?P<a>\d+)/(?P<b>\d+) requests", "log_acc_progress"),
    (r"loading model (?P<p>.+) on (?P<d>\S+)", "log_load_model"),
    (r"loading calibrated matrices from (?P<p>.+)", "log_load_matrices"),
    (r"rebuilding the quantized model from (?P<p>.+)", "log_load_matrices"),
    (r"calibration data: (?P<p>.+)", "log_data"),
    (r"saved (?P<p>\S+)", "log_saved"),
    (r"report written to (?P<p>.+)", "log_report"),
    (r"resuming: (?P<n>\d+) layer\(s\) restored from (?P<p>.+)", "log_resuming"),
    (r"warning: layer (?P<i>\d+): loss rose from (?P<a>\S+) to (?P<b>\S+) \((?P<pct>[^)]+)\).*", "log_loss_rose"),
    (r"exporting the packed int4 checkpoint to (?P<p>.+)", "log_export"),
    (r"checkpoint written to (?P<p>\S+) and zipped to (?P<z>.+)", "log_exported"),
    (r"cancel requested; stopping after the current step", "log_cancel"),
]
_COMPILED = [(re.compile(p + "$"), key) for p, key in _MESSAGES]
_MODEL_KEYS = {"original": "original", "quantized": "quantized", "rtn": "rtn", "quantized_real": "quantized_real"}


def _name(value: str, lang: str) -> str:
    """A model key as its label, a path as its file name, the embedded text as its label."""
    value = value.strip()
    if value in _MODEL_KEYS:
        return t(_MODEL_KEYS[value], lang)
    if value.startswith("Python's bundled documentation text"):
        return t("embedded_text", lang)
    if value.startswith("smollm2"):
        return "SmolLM2-135M-Instruct"
    return PurePath(value).name if "/" in value else value


def translate_message(message: str, lang: str) -> str:
    """Core's message in the page's language, without the server's absolute paths ("" when unknown in zh)."""
    if lang == "en" or not message:
        return safe_message(message)
    for pattern, key in _COMPILED:
        m = pattern.match(message)
        if m:
            groups = {k: (v or "") for k, v in m.groupdict().items()}
            for k in ("m", "p", "z"):
                if groups.get(k):
                    groups[k] = _name(groups[k], lang)
            if groups.get("ms"):
                groups["ms"] = "、".join(_name(x, lang) for x in groups["ms"].split(","))
            return t(key, lang, **groups)
    return ""


def format_entry(entry: dict, lang: str = "en") -> str:
    """One log line: '[  12.3s] calibrate  layer 3/30 epoch 1/2 loss 0.0123' (stage and message translated)."""
    ev = entry.get("event")
    head = f"[{entry.get('t') or 0.0:7.1f}s]"
    if ev is None:  # a runner line: a key and its fields, or plain text
        if entry.get("key"):
            fields = {k: (t("job_" + v, lang) if k == "kind" else t("status_" + v, lang) if k == "status" else v)
                      for k, v in (entry.get("fields") or {}).items()}
            return f"{head} {t(entry['key'], lang, **fields)}"
        return f"{head} {entry.get('text', '')}"
    stage = ev.get("stage", "")
    stage_text = stage if lang == "en" else t("stage_" + stage, lang)
    message = translate_message(str(ev.get("message") or ""), lang)
    if message:
        return f"{head} {stage_text:<10} {message}"
    parts = [f"{head} {stage_text:<10}"]
    if ev.get("layer") is not None:
        parts.append(t("layer_of", lang, i=ev["layer"] + 1, n=ev.get("num_layers") or "?"))
    if ev.get("epoch") is not None:
        parts.append(t("epoch_of", lang, i=ev["epoch"] + 1, n=ev.get("epochs") or "?"))
    if ev.get("step") is not None:
        parts.append(t("step_of", lang, i=ev["step"] + 1, n=ev.get("steps") or "?"))
    if ev.get("loss") is not None:
        parts.append(f"{t('loss', lang)} {ev['loss']:.4e}")
    return " ".join(parts)
