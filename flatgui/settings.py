"""The GUI's settings form, generated from QuantizeOptions' field metadata (core/options.py), plus the few controls
that map to the config dict or to several options (``FormOnly``). The same metadata maps the form to
QuantizeOptions, to the config dict and to the equivalent `python -m core quantize` command line, so an option
marked ``gui=GuiControl(...)`` in core appears in the form, in the job and in the command with that one edit (plus
its label in flatgui/i18n.py).

Defaults are a small budget on purpose (``GuiControl.default``): a newcomer presses Calibrate with the embedded
SmolLM2 and sees the whole flow finish on a CPU in a few minutes. The paper-scale values (128 samples, 2048 tokens,
15 epochs) are a few clicks away.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional

from core.config import default_config_dict, normalize_skip_layers, parse_config
from core.errors import ConfigError, DataError, ModelLoadError
from core.models import DEFAULT_MODEL, read_architecture, resolve_model_path
from core.options import UNSET, GuiControl, choices_of, cli_args, described_fields, option, value_type
from core.pipeline import QuantizeOptions

BITS_CHOICES = (4, 8, 16)
CONFIG_FILE = "flatquant_config.json"  # the run's AMCT-style config, written into every GUI run folder
# The form's rows, in page order (flatgui/form.py renders one row per section; the tabs place them).
SECTIONS = ("model", "skip", "bits", "toggles", "budget", "data", "quick", "algorithm")


@dataclass
class FormOnly:
    """Form controls that are not one QuantizeOptions field: bit widths (config only), one toggle for both caches,
    and the perplexity budget (ppl_max_windows, skip_ppl and ppl_seqlen together)."""
    w_bits: int = field(default=4, metadata=option(
        "weight bits (the config's quant_cfg.weights.type)", internal=True, choices=lambda: BITS_CHOICES,
        gui=GuiControl("bits", "dropdown", "w_bits")))
    a_bits: int = field(default=4, metadata=option(
        "activation bits (the config's quant_cfg.inputs.type)", internal=True, choices=lambda: BITS_CHOICES,
        gui=GuiControl("bits", "dropdown", "a_bits")))
    kv_quant: bool = field(default=False, metadata=option(
        "fake-quantize the k and v caches (use_kcache_quant, use_vcache_quant)", internal=True,
        gui=GuiControl("toggles", "checkbox", "kv_quant")))
    kv_bits: int = field(default=4, metadata=option(
        "k and v cache bits", internal=True, choices=lambda: (4, 8), gui=GuiControl("toggles", "dropdown", "kv_bits")))
    ppl_windows: int = field(default=16, metadata=option(
        "WikiText-2 windows for the perplexity after calibration (at the calibration seqlen); 0 = skip",
        internal=True, gui=GuiControl("quick", "number", "ppl_windows", minimum=0)))


@dataclass(frozen=True)
class FormField:
    name: str  # the form's (and the saved settings file's) name
    option: Optional[str]  # the QuantizeOptions field it sets; None for FormOnly controls
    kind: type  # bool | int | float | str | list
    default: Any
    control: GuiControl
    choices: Optional[list]
    config_key: bool  # a key of the config dict as well (core.config.FlatQuantConfig)


def _form_fields() -> list[FormField]:
    out = []
    for order, cls in enumerate((QuantizeOptions, FormOnly)):
        for f, opt in described_fields(cls):
            c = opt.gui
            if c is None:
                continue
            default = c.default if c.default is not UNSET else f.default
            if default is None and c.none_value is not UNSET:
                default = c.none_value  # e.g. max_layers None (every layer) is 0 in the form
            kind = str if c.widget == "text" else value_type(cls, f.name)  # skip_layers: typed as text
            out.append((SECTIONS.index(c.section), order, FormField(
                c.name or f.name, f.name if cls is QuantizeOptions else None, kind, default, c, choices_of(opt),
                opt.config_key)))
    return [ff for *_, ff in sorted(out, key=lambda x: x[:2])]  # by section, QuantizeOptions' fields first


FORM_FIELDS: list[FormField] = _form_fields()
_BY_NAME = {ff.name: ff for ff in FORM_FIELDS}


def _coerce(ff: FormField, value: Any) -> Any:
    """What gradio (or a settings file) hands over, as the field's type; ValueError when it cannot be."""
    if ff.kind is int:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    if ff.kind is float:
        return float(value)
    if ff.kind is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if ff.kind is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ValueError
        return [v.strip() for v in items if v.strip()]
    return str(value).strip()


class _Form:
    """Methods of the generated GuiSettings dataclass."""

    # -- conversions ----------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        """Order of the settings components in the UI and of the positional inputs of the API endpoints."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, *values):
        """Build from the UI components' values (in field order), coercing what gradio hands over."""
        names = cls.field_names()
        if len(values) != len(names):
            raise ConfigError(f"Expected {len(names)} settings values, got {len(values)}.")
        return cls.from_dict(dict(zip(names, values)))

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError("A settings file must hold a JSON object.")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown}; known: {cls.field_names()}.")
        out = cls()
        for name, value in data.items():
            if value is None:
                continue
            ff = _BY_NAME[name]
            try:
                value = _coerce(ff, value)
            except (TypeError, ValueError):
                raise ConfigError(f"Setting {name!r} must be {ff.kind.__name__}, got {value!r}.") from None
            setattr(out, name, value)
        return out

    def values(self) -> list:
        """The form's values; numbers picked from a dropdown (bit widths) as the dropdown's strings (the API
        advertises them as strings)."""
        return [str(v) if ff.control.widget == "dropdown" and ff.kind is int else v
                for ff, v in ((_BY_NAME[n], getattr(self, n)) for n in self.field_names())]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"The settings file is not valid JSON: {exc}.") from None
        return cls.from_dict(data)

    def config_dict(self) -> dict:
        """The AMCT-shaped config (INT4_FLAT_QUANT_CFG with this form's values)."""
        cfg = default_config_dict()
        cfg["quant_cfg"]["weights"]["type"] = f"int{self.w_bits}"
        cfg["quant_cfg"]["inputs"]["type"] = f"int{self.a_bits}"
        algo = cfg["algorithm"]["flatquant"]
        for key, value in self._option_values().items():
            if _BY_NAME_OPTION[key].config_key and key != "skip_layers":
                algo[key] = value
        algo.update(use_kcache_quant=self.kv_quant, use_vcache_quant=self.kv_quant,
                    k_bits=self.kv_bits if self.kv_quant else 16, v_bits=self.kv_bits if self.kv_quant else 16)
        cfg["skip_layers"] = normalize_skip_layers(self.skip_layers)
        return cfg

    def validate(self) -> None:
        """Fail fast with core's own message (same checks the engine runs) before any job starts."""
        if not self.model_path:
            raise ModelLoadError("Model path is empty: type a local model folder or pick 'smollm2'.")
        if self.model_path != DEFAULT_MODEL:  # cheap checks (folder, config.json, architecture); no weights read
            read_architecture(resolve_model_path(self.model_path))
        if (self.calib_data and self.calib_data.startswith((".", "/", "~"))
                and not Path(self.calib_data).expanduser().exists()):  # other values may name a cached dataset
            raise DataError(f"Calibration data path {self.calib_data!r} does not exist; leave it empty for the "
                            "default text.")
        for ff in FORM_FIELDS:
            value = getattr(self, ff.name)
            if ff.control.minimum is not None and value < ff.control.minimum:
                raise ConfigError(f"{ff.name} must be >= {ff.control.minimum:g}, got {value}.")
            picked = value if ff.kind is list else [value]
            wrong = [v for v in picked if ff.choices is not None and v not in ff.choices]
            if wrong:
                raise ConfigError(f"{ff.name} must be {'some' if ff.kind is list else 'one'} of "
                                  f"{', '.join(map(str, ff.choices))}, got {', '.join(map(str, wrong))}.")
        cfg = parse_config(self.config_dict())
        if self.model_path != DEFAULT_MODEL:  # the model's own limits, from config.json (no weights read)
            from core.models import read_model_folder
            from core.validate import check_seqlen, check_skip_layers

            _, model_cfg = read_model_folder(self.model_path)
            check_seqlen(model_cfg, self.seqlen, "seqlen")
            check_skip_layers(model_cfg, cfg, self.max_layers or None)

    # -- what the engine and the shell see ------------------------------------------------------------------

    def _option_values(self) -> dict:
        """{QuantizeOptions field: value} of the controls that are one option each (none_value -> None)."""
        out = {}
        for ff in FORM_FIELDS:
            if ff.option is None:
                continue
            value = getattr(self, ff.name)
            none = ff.control.none_value
            out[ff.option] = None if none is not UNSET and value == none else value
        return out

    def _job_kwargs(self, output_dir: Optional[str], flat_matrix_path: Optional[str]) -> dict:
        """QuantizeOptions keyword arguments but the config dict."""
        kw: dict[str, Any] = dict(self._option_values(), output_dir=output_dir,
                                  use_kcache_quant=self.kv_quant, use_vcache_quant=self.kv_quant,
                                  ppl_max_windows=self.ppl_windows or None, ppl_seqlen=self.seqlen,
                                  skip_ppl=self.ppl_windows == 0)
        if flat_matrix_path:
            kw.update(load_matrix=True, flat_matrix_path=flat_matrix_path)
        return kw

    def quantize_kwargs(self, output_dir: Optional[str] = None, flat_matrix_path: Optional[str] = None) -> dict:
        """Keyword arguments for core.pipeline.QuantizeOptions."""
        return dict(self._job_kwargs(output_dir, flat_matrix_path), config=self.config_dict())

    def baseline_names(self) -> list[str]:
        """The baselines the job measures next to the quantized model (the form's multi-select)."""
        return QuantizeOptions(**self._job_kwargs(None, None)).baselines_to_run()

    def needs_config_file(self) -> bool:
        """Bit widths have no CLI flag: a run with non-default ones passes its config as a file."""
        return self.w_bits != 4 or self.a_bits != 4 or (self.kv_quant and self.kv_bits != 4)

    def cli_command(self, output_dir: str = "runs/<timestamp>", flat_matrix_path: Optional[str] = None) -> str:
        """The `python -m core quantize ...` line that runs the same job without the GUI, generated from the same
        option metadata as the parser (tests parse it with core.cli's own parser). A config-key option is written
        only where it differs from the config the command reads (the default one, or the run's config file)."""
        args = ["python", "-m", "core", "quantize"]
        base = parse_config(None)
        if self.needs_config_file():
            args += ["--config", f"{output_dir}/{CONFIG_FILE}"]
            try:
                base = parse_config(self.config_dict())
            except ConfigError:  # e.g. skip_layers '--': the preview shows it, validate() says what is wrong
                pass
        implicit = {f.name: getattr(base, f.name) for f, opt in described_fields(QuantizeOptions) if opt.config_key}
        args += cli_args(QuantizeOptions, self._job_kwargs(output_dir, flat_matrix_path), implicit)
        return " ".join(a if "<" in a else shlex.quote(a) for a in args)


_BY_NAME_OPTION = {ff.option: ff for ff in FORM_FIELDS if ff.option}

GuiSettings = make_dataclass(
    "GuiSettings",
    [(ff.name, ff.kind, field(default_factory=lambda d=ff.default: list(d)) if ff.kind is list
      else field(default=ff.default)) for ff in FORM_FIELDS],
    bases=(_Form,), namespace={"__module__": __name__,
                               "__doc__": "The settings form (flatgui.settings.FORM_FIELDS), one field per control."})
