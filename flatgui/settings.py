"""The GUI's settings: one small dataclass, mapped to core's config dict, QuantizeOptions and the CLI command.

Defaults are a small budget on purpose: a newcomer presses Calibrate with the embedded SmolLM2 and sees the whole
flow finish on a CPU in a few minutes. The paper-scale values (128 samples, 2048 tokens, 15 epochs) are a few
clicks away.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from core.config import default_config_dict, normalize_skip_layers, parse_config
from core.errors import ConfigError, DataError, ModelLoadError
from core.models import DEFAULT_MODEL, read_architecture, resolve_model_path

BITS_CHOICES = (4, 8, 16)
BIT_FIELDS = ("w_bits", "a_bits", "kv_bits")
CONFIG_FILE = "flatquant_config.json"  # the run's AMCT-style config, written into every GUI run folder
DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")


@dataclass
class GuiSettings:
    model_path: str = DEFAULT_MODEL
    device: str = "auto"
    skip_layers: str = "lm_head"
    w_bits: int = 4
    a_bits: int = 4
    use_down_quant: bool = True
    o_proj_quant: bool = False
    kv_quant: bool = False
    kv_bits: int = 4
    epochs: int = 1
    nsamples: int = 16
    seqlen: int = 256
    flat_lr: float = 5e-3
    cali_bsz: int = 4
    calib_data: str = ""
    max_layers: int = 0  # 0 = every decoder layer
    ppl_windows: int = 16  # WikiText-2 windows for the PPL after calibration; 0 = skip

    # -- conversions ----------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        """Order of the settings components in the UI and of the positional inputs of the API endpoints."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, *values) -> "GuiSettings":
        """Build from the UI components' values (in field order), coercing what gradio hands over."""
        names = cls.field_names()
        if len(values) != len(names):
            raise ConfigError(f"Expected {len(names)} settings values, got {len(values)}.")
        return cls.from_dict(dict(zip(names, values)))

    @classmethod
    def from_dict(cls, data: dict) -> "GuiSettings":
        if not isinstance(data, dict):
            raise ConfigError("A settings file must hold a JSON object.")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown}; known: {cls.field_names()}.")
        out = cls()
        for f in fields(cls):
            if f.name not in data or data[f.name] is None:
                continue
            value = data[f.name]
            try:
                if f.type in ("int", int):
                    if isinstance(value, bool) or float(value) != int(float(value)):
                        raise ValueError
                    value = int(float(value))
                elif f.type in ("float", float):
                    value = float(value)
                elif f.type in ("bool", bool):
                    if not isinstance(value, bool):
                        raise ValueError
                else:
                    value = str(value).strip()
            except (TypeError, ValueError):
                raise ConfigError(f"Setting {f.name!r} must be {f.type}, got {value!r}.") from None
            setattr(out, f.name, value)
        return out

    def values(self) -> list:
        """The form's values; bit widths as the dropdowns' strings (the API advertises them as strings)."""
        return [str(getattr(self, n)) if n in BIT_FIELDS else getattr(self, n) for n in self.field_names()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "GuiSettings":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"The settings file is not valid JSON: {exc}.") from None
        return cls.from_dict(data)

    def config_dict(self) -> dict:
        """The AMCT-shaped config (INT4_FLAT_QUANT_CFG with this form's toggles)."""
        cfg = default_config_dict()
        cfg["quant_cfg"]["weights"]["type"] = f"int{self.w_bits}"
        cfg["quant_cfg"]["inputs"]["type"] = f"int{self.a_bits}"
        algo = cfg["algorithm"]["flatquant"]
        algo.update(use_down_quant=self.use_down_quant, use_o_quant=self.o_proj_quant,
                    use_kcache_quant=self.kv_quant, use_vcache_quant=self.kv_quant,
                    k_bits=self.kv_bits if self.kv_quant else 16, v_bits=self.kv_bits if self.kv_quant else 16,
                    epochs=self.epochs, cali_bsz=self.cali_bsz, flat_lr=self.flat_lr)
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
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"Device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}.")
        for name, low in (("nsamples", 1), ("seqlen", 8), ("epochs", 0), ("cali_bsz", 1), ("max_layers", 0),
                          ("ppl_windows", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}.")
        for name in ("w_bits", "a_bits", "kv_bits"):
            if getattr(self, name) not in BITS_CHOICES:
                raise ConfigError(f"{name} must be one of {BITS_CHOICES}, got {getattr(self, name)}.")
        cfg = parse_config(self.config_dict())
        if self.model_path != DEFAULT_MODEL:  # the model's own limits, from config.json (no weights read)
            from core.validate import check_seqlen, check_skip_layers, read_model_config

            _, model_cfg = read_model_config(self.model_path)
            check_seqlen(model_cfg, self.seqlen, "seqlen")
            check_skip_layers(model_cfg, cfg, self.max_layers or None)

    # -- what the engine and the shell see ------------------------------------------------------------------

    def quantize_kwargs(self, output_dir: Optional[str] = None, flat_matrix_path: Optional[str] = None) -> dict:
        """Keyword arguments for core.pipeline.QuantizeOptions."""
        kw: dict[str, Any] = dict(
            model_path=self.model_path or None,
            config=self.config_dict(),
            device=self.device,
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            calib_data=self.calib_data or None,
            output_dir=output_dir,
            max_layers=self.max_layers or None,
            ppl_max_windows=self.ppl_windows or None,
            ppl_seqlen=self.seqlen,
            skip_ppl=self.ppl_windows == 0,
        )
        if flat_matrix_path:
            kw.update(load_matrix=True, flat_matrix_path=flat_matrix_path)
        return kw

    def needs_config_file(self) -> bool:
        """Bit widths have no CLI flag: a run with non-default ones passes its config as a file."""
        return self.w_bits != 4 or self.a_bits != 4 or (self.kv_quant and self.kv_bits != 4)

    def cli_command(self, output_dir: str = "runs/<timestamp>", flat_matrix_path: Optional[str] = None) -> str:
        """The `python -m core quantize ...` line that runs the same job without the GUI (same QuantizeOptions:
        tests parse it with core.cli's own parser)."""
        args = ["python", "-m", "core", "quantize", "--model_path", self.model_path or DEFAULT_MODEL]
        if self.needs_config_file():
            args += ["--config", f"{output_dir}/{CONFIG_FILE}"]
        if self.device != "auto":
            args += ["--device", self.device]
        try:
            skip = ",".join(normalize_skip_layers(self.skip_layers))
        except ConfigError:
            skip = self.skip_layers
        args += [f"--skip_layers={skip}"]  # '=' form: a value starting with '-' stays a value
        if not self.use_down_quant:
            args += ["--no_down_quant"]
        if self.o_proj_quant:
            args += ["--use_o_quant"]
        if self.kv_quant:
            args += ["--use_kcache_quant", "--use_vcache_quant"]
        args += ["--epochs", str(self.epochs), "--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen),
                 "--cali_bsz", str(self.cali_bsz), "--flat_lr", f"{self.flat_lr:g}"]
        if self.calib_data:
            args += ["--calib_data", self.calib_data]
        if self.max_layers:
            args += ["--max_layers", str(self.max_layers)]
        if self.ppl_windows:
            args += ["--ppl_seqlen", str(self.seqlen), "--ppl_max_windows", str(self.ppl_windows)]
        else:
            args += ["--no_ppl"]
        if flat_matrix_path:
            args += ["--load_matrix", "--flat_matrix_path", flat_matrix_path]
        args += ["--output_dir", output_dir]
        return " ".join(a if "<" in a else shlex.quote(a) for a in args)
