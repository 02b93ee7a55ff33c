"""Component manager: tabs register their components by name, with the i18n keys of their visible text.

It gives the app three things without tabs importing each other: lookup by name (``mgr["skip_layers"]``), the
settings components in GuiSettings field order, and one relabel handler that switches every label to a language.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gradio as gr

from .i18n import t
from .settings import GuiSettings


@dataclass
class _Entry:
    component: gr.components.Component | gr.blocks.BlockContext
    label: Optional[str] = None  # i18n key for `label`
    info: Optional[str] = None  # i18n key for `info`
    value: Optional[str] = None  # i18n key for `value` (Markdown text, Button caption)
    choices: Optional[list[tuple[str, str]]] = None  # [(i18n key of the shown text, value)]


class ComponentManager:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add(self, name: str, component, *, label: Optional[str] = None, info: Optional[str] = None,
            value: Optional[str] = None, choices: Optional[list[tuple[str, str]]] = None):
        if name in self._entries:
            raise KeyError(f"component {name!r} registered twice")
        self._entries[name] = _Entry(component, label, info, value, choices)
        return component

    def __getitem__(self, name: str):
        return self._entries[name].component

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def settings_components(self) -> list:
        """The components holding GuiSettings fields, in field order (the inputs of every job endpoint)."""
        missing = [n for n in GuiSettings.field_names() if n not in self._entries]
        if missing:
            raise KeyError(f"settings components not registered: {missing}")
        return [self[n] for n in GuiSettings.field_names()]

    def translatable(self) -> list[str]:
        return [n for n, e in self._entries.items() if e.label or e.info or e.value or e.choices]

    def translated_components(self) -> list:
        return [self[n] for n in self.translatable()]

    def relabel(self, lang: str, labels: Optional[dict[str, tuple[str, dict]]] = None) -> list:
        """gr.update()s for translated_components(), in the same order. ``labels``: a component's label for now, as
        (i18n key, its parameters), in place of the registered one (e.g. the FlatQuant box after real int4 failed)."""
        updates = []
        for name in self.translatable():
            e = self._entries[name]
            kw = {}
            if name in (labels or {}):
                key, params = labels[name]
                kw["label"] = t(key, lang, **params)
            elif e.label:
                kw["label"] = t(e.label, lang)
            if e.info:
                kw["info"] = t(e.info, lang)
            if e.value:
                kw["value"] = t(e.value, lang)
            if e.choices:
                kw["choices"] = [(t(k, lang), v) for k, v in e.choices]
            updates.append(gr.update(**kw))
        return updates
