"""The settings form's gradio components, built from the option metadata (flatgui.settings.FORM_FIELDS): one
component per field, registered with the component manager under the field's name (its elem_id too), with the
i18n keys of its label, help line and choice texts so the language switch relabels it."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from .i18n import t
from .manager import ComponentManager
from .settings import FORM_FIELDS, FormField, GuiSettings


def choice_keys(ff: FormField) -> Optional[list[tuple[str, str]]]:
    """[(i18n key of the shown text, value)] of a field whose choices have texts (algorithms, baselines)."""
    if ff.choices is None or ff.control.choice_label is None:
        return None
    return [(ff.control.choice_label.format(c), str(c)) for c in ff.choices]


def _component(ff: FormField, value, **overrides):
    c = ff.control
    kw = dict(label=t(c.label), elem_id=ff.name)
    if c.info:
        kw["info"] = t(c.info)
    keys = choice_keys(ff)
    choices = [(t(k), v) for k, v in keys] if keys else [str(v) for v in ff.choices or []]
    if c.widget == "dropdown":
        kw.update(choices=choices, value=str(value) if ff.kind is int else value)
        return gr.Dropdown(**{**kw, **overrides})
    if c.widget == "multiselect":
        return gr.CheckboxGroup(**{**kw, "choices": choices, "value": list(value), **overrides})
    if c.widget == "checkbox":
        return gr.Checkbox(**{**kw, "value": value, **overrides})
    if c.widget == "number":
        precision = 0 if ff.kind is int else None
        return gr.Number(**{**kw, "value": value, "precision": precision, "minimum": c.minimum, **overrides})
    if c.widget == "text":
        return gr.Textbox(**{**kw, "value": value, **overrides})
    raise ValueError(f"unknown widget {c.widget!r} of setting {ff.name!r}")


def render_section(mgr: ComponentManager, section: str, **overrides) -> list:
    """The components of one form section, in field order, at the current layout position (wrap the call in a
    gr.Row to lay them out side by side). ``overrides``: {field name: {gradio kwargs}} for the odd one out (the
    model path's list of local folders)."""
    defaults = GuiSettings()
    out = []
    for ff in FORM_FIELDS:
        if ff.control.section != section:
            continue
        comp = _component(ff, getattr(defaults, ff.name), **overrides.get(ff.name, {}))
        mgr.add(ff.name, comp, label=ff.control.label, info=ff.control.info, choices=choice_keys(ff))
        out.append(comp)
    return out
