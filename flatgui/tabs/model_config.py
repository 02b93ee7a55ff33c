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
from ..settings import BITS_CHOICES, DEVICE_CHOICES, GuiSettings
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
    mgr, s = ctx.mgr, GuiSettings()
    with gr.Tab(t("tab_model"), id="model") as tab:
        mgr.add("tab_model", tab, label="tab_model")
        with gr.Row():
            mgr.add("model_path", gr.Dropdown(choices=_models(ctx), value=s.model_path, allow_custom_value=True,
                                              label=t("model_path"), info=t("model_path_info"), scale=4,
                                              elem_id="model_path"), label="model_path", info="model_path_info")
            mgr.add("device", gr.Dropdown(choices=list(DEVICE_CHOICES), value=s.device, label=t("device"),
                                          info=t("device_info"), scale=2, elem_id="device"),
                    label="device", info="device_info")
            mgr.add("rescan", gr.Button(t("rescan"), scale=1, size="sm"), value="rescan")
        mgr.add("skip_layers", gr.Textbox(value=s.skip_layers, label=t("skip_layers"), info=t("skip_layers_info"),
                                          elem_id="skip_layers"), label="skip_layers", info="skip_layers_info")
        with gr.Row():
            for name, key in (("w_bits", "w_bits"), ("a_bits", "a_bits")):
                mgr.add(name, gr.Dropdown(choices=[str(b) for b in BITS_CHOICES], value=str(getattr(s, name)),
                                          label=t(key), elem_id=name), label=key)
            mgr.add("use_down_quant", gr.Checkbox(value=s.use_down_quant, label=t("use_down_quant"),
                                                  elem_id="use_down_quant"), label="use_down_quant")
            mgr.add("o_proj_quant", gr.Checkbox(value=s.o_proj_quant, label=t("o_proj_quant"),
                                                elem_id="o_proj_quant"), label="o_proj_quant")
            mgr.add("kv_quant", gr.Checkbox(value=s.kv_quant, label=t("kv_quant"), elem_id="kv_quant"),
                    label="kv_quant")
            mgr.add("kv_bits", gr.Dropdown(choices=["4", "8"], value=str(s.kv_bits), label=t("kv_bits"),
                                           elem_id="kv_bits"),
                    label="kv_bits")
        with gr.Row():
            mgr.add("epochs", gr.Number(value=s.epochs, precision=0, minimum=0, label=t("epochs"),
                                        elem_id="epochs"), label="epochs")
            mgr.add("nsamples", gr.Number(value=s.nsamples, precision=0, minimum=1, label=t("nsamples"),
                                          elem_id="nsamples"), label="nsamples")
            mgr.add("seqlen", gr.Number(value=s.seqlen, precision=0, minimum=8, label=t("seqlen"),
                                        elem_id="seqlen"), label="seqlen")
            mgr.add("flat_lr", gr.Number(value=s.flat_lr, label=t("flat_lr"), elem_id="flat_lr"), label="flat_lr")
            mgr.add("cali_bsz", gr.Number(value=s.cali_bsz, precision=0, minimum=1, label=t("cali_bsz"),
                                          elem_id="cali_bsz"), label="cali_bsz")
        mgr.add("calib_data", gr.Textbox(value=s.calib_data, label=t("calib_data"), info=t("calib_data_info"),
                                         elem_id="calib_data"), label="calib_data", info="calib_data_info")
        with gr.Accordion(t("quick_limits"), open=True) as acc:
            mgr.add("acc_quick", acc, label="quick_limits")
            with gr.Row():
                mgr.add("max_layers", gr.Number(value=s.max_layers, precision=0, minimum=0, label=t("max_layers"),
                                                elem_id="max_layers"), label="max_layers")
                mgr.add("ppl_windows", gr.Number(value=s.ppl_windows, precision=0, minimum=0,
                                                 label=t("ppl_windows"), elem_id="ppl_windows"), label="ppl_windows")
        mgr.add("settings_check", gr.Markdown(OK + t("settings_ok"), elem_id="settings_check"))
        mgr.add("cli_preview", gr.Code(value=s.cli_command(), language="shell", label=t("cli_preview"), lines=2,
                                       interactive=False, elem_id="cli_preview"), label="cli_preview")
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
