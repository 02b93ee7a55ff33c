"""Model & config tab: model path, device, skip_layers, toggles, budget, settings save/load, CLI preview."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from core.errors import FlatQuantError
from core.models import find_local_models

from ..context import AppContext
from ..i18n import lang_code, t
from ..form import render_section
from ..settings import GuiSettings
from .common import ERR, OK


def _models(ctx: AppContext) -> list[str]:
    try:
        return find_local_models(ctx.model_roots)
    except Exception:  # a broken folder must not break the page
        return ["smollm2"]


def check_settings(*args) -> tuple[str, str]:
    """(CLI preview, validation message) for the current form; never raises."""
    *values, lang_value = args
    try:
        s = GuiSettings.from_values(*values)
    except FlatQuantError as exc:
        return "", f"{ERR} {exc}"
    cli = s.cli_command()
    try:
        s.validate()
    except FlatQuantError as exc:
        return cli, f"{ERR} {exc}"
    return cli, OK + t("settings_ok", lang_code(lang_value))


def remember(*values):
    """The form as a dict for the browser's localStorage, so a page reload keeps it (invalid input: keep old)."""
    try:
        return asdict(GuiSettings.from_values(*values))
    except FlatQuantError:
        return gr.skip()


def restore(saved):
    """Fill the form from localStorage on page load; nothing saved (or unreadable) leaves the defaults."""
    try:
        return GuiSettings.from_dict(saved).values() if isinstance(saved, dict) else gr.skip()
    except FlatQuantError:
        return gr.skip()


def save_settings(*values) -> str:
    s = GuiSettings.from_values(*values)
    folder = Path(tempfile.mkdtemp(prefix="flatquant_settings_"))
    path = folder / "flatquant_gui_settings.json"
    path.write_text(s.to_json())
    return str(path)


def load_settings(path) -> list:
    """Fill the form from an uploaded settings JSON; a bad file leaves the form alone and says why."""
    if not path:
        return [gr.skip()] * len(GuiSettings.field_names()) + [gr.skip()]
    try:
        s = GuiSettings.from_json(Path(path).read_text(errors="replace"))
    except (OSError, FlatQuantError) as exc:
        gr.Warning(str(exc))
        return [gr.skip()] * len(GuiSettings.field_names()) + [f"{ERR} {exc}"]
    return s.values() + [OK + os.path.basename(path)]


def build(ctx: AppContext) -> None:
    """The form's rows (flatgui/form.py builds each control from the option metadata); the algorithm row sits in
    the Calibrate tab, next to Start."""
    mgr = ctx.mgr
    with gr.Tab(t("tab_model"), id="model") as tab:
        mgr.add("tab_model", tab, label="tab_model")
        with gr.Row():
            render_section(mgr, "model", model_path=dict(choices=_models(ctx), allow_custom_value=True, scale=4),
                           device=dict(scale=2))
            mgr.add("rescan", gr.Button(t("rescan"), scale=1, size="sm"), value="rescan")
        render_section(mgr, "skip")
        with gr.Row():
            render_section(mgr, "bits")
            render_section(mgr, "toggles")
        with gr.Row():
            render_section(mgr, "budget")
        render_section(mgr, "data")
        with gr.Accordion(t("quick_limits"), open=True) as acc:
            mgr.add("acc_quick", acc, label="quick_limits")
            with gr.Row():
                render_section(mgr, "quick")
        mgr.add("settings_check", gr.Markdown(OK + t("settings_ok"), elem_id="settings_check"))
        mgr.add("cli_preview", gr.Code(value=GuiSettings().cli_command(), language="shell", label=t("cli_preview"),
                                       lines=2, interactive=False, elem_id="cli_preview"), label="cli_preview")
        with gr.Row():
            mgr.add("save_settings", gr.Button(t("save_settings"), size="sm"), value="save_settings")
            mgr.add("settings_file", gr.File(label=t("settings_file"), file_types=[".json"], type="filepath",
                                             height=140, elem_id="settings_file"), label="settings_file")


def wire(ctx: AppContext) -> None:
    mgr = ctx.mgr
    settings = mgr.settings_components()
    gr.on([c.change for c in settings] + [mgr["language"].change], check_settings,
          inputs=settings + [mgr["language"]], outputs=[mgr["cli_preview"], mgr["settings_check"]],
          show_progress="hidden", api_name="check_settings", concurrency_limit=None)
    gr.on([c.change for c in settings], remember, inputs=settings, outputs=mgr["saved_settings"],
          show_progress="hidden", api_visibility="private", concurrency_limit=None)
    mgr["rescan"].click(lambda: gr.update(choices=_models(ctx)), outputs=mgr["model_path"], api_visibility="private")
    mgr["save_settings"].click(save_settings, inputs=settings, outputs=mgr["settings_file"],
                               api_name="save_settings")
    mgr["settings_file"].upload(load_settings, inputs=mgr["settings_file"],
                                outputs=settings + [mgr["settings_check"]], api_name="load_settings")
