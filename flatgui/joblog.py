"""The job log in the page's language. Every core event carries its key and parameters (core.events); a line is
rendered from them with flatgui.i18n's template for the page's language, so no English is parsed. Parameters are
shown by name: a path as its last part (never the server's folders), a model key as its label, a list in the
language's own separator. An event without a key (none of core's) shows its stage and numeric fields only."""
from __future__ import annotations

from pathlib import PurePath

from core.data import EMBEDDED_TEXT_LABEL
from core.events import EVENTS, format_template, is_path_param
from core.validate import safe_message

from .i18n import STRINGS, t

MODEL_KEYS = ("original", "quantized", "rtn", "quarot", "quantized_real")
_SEPARATOR = {"en": ", ", "zh": "、"}


def _path_name(value) -> str:
    return PurePath(str(value)).name or str(value)


def _label(value, lang: str) -> str:
    """A model key (or an accuracy column, a memory part) as the page's label; en keeps core's own words."""
    if lang == "en":
        return str(value)
    if value in MODEL_KEYS or value == "acc_avg":
        return t(value, lang)
    return t("mem_" + value, lang) if "mem_" + str(value) in STRINGS else str(value)


def _param(name: str, value, lang: str):
    """One parameter as the page shows it."""
    sep = _SEPARATOR.get(lang, ", ")
    if value is None:
        return ""
    if is_path_param(name):
        return _path_name(value)
    if name == "model_path":
        return "SmolLM2-135M-Instruct" if value in ("", "smollm2") else _path_name(value)
    if name == "source":
        if str(value).startswith(EMBEDDED_TEXT_LABEL):
            return t("embedded_text", lang)
        return _path_name(value) if "/" in str(value) else safe_message(str(value))
    if name == "format":
        return t("export_format_" + str(value), lang)
    if isinstance(value, dict):
        if lang == "en":
            return value  # core's own rendering (e.g. the accuracy line as the sample prints it)
        return sep.join(f"{_label(k, lang)} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sep.join(_label(v, lang) if name == "models" else safe_message(str(v)) for v in value)
    if name == "model":
        return _label(value, lang)
    if isinstance(value, str):
        return safe_message(value)
    return value


def event_text(ev: dict, lang: str = "en") -> str:
    """An event's message in the page's language ("" for an event without a known key)."""
    key = ev.get("key")
    if key not in EVENTS:
        return ""
    params = {name: _param(name, value, lang) for name, value in (ev.get("params") or {}).items()}
    try:
        return format_template(t("event_" + key, lang), params)
    except (KeyError, IndexError, ValueError):  # an event from an older core with other parameters
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
    message = event_text(ev, lang)
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
