"""The quantization config: AMCT's INT4_FLAT_QUANT_CFG dict, validated into a small dataclass."""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError

INT4_FLAT_QUANT_CFG: dict = {
    "quant_cfg": {
        "inputs": {"type": "int4", "symmetric": True, "strategy": "token"},
        "weights": {"type": "int4", "symmetric": True, "strategy": "channel"},
    },
    "algorithm": {
        "flatquant": {
            "use_kcache_quant": False,
            "k_bits": 16,
            "k_sym": False,
            "use_vcache_quant": False,
            "v_bits": 16,
            "v_sym": False,
            "use_o_quant": False,
            "use_down_quant": True,
            "add_diag": True,
            "lac": False,
            "lwc": True,
            "diag_alpha": 0.3,
            "epochs": 15,
            "cali_bsz": 4,
            "flat_lr": 5e-3,
            "cali_trans": True,
        }
    },
    "skip_layers": {"lm_head"},
}

_TYPES = {"int4": 4, "int8": 8, "int16": 16, "fp16": 16, "bf16": 16}
_BITS = (4, 8, 16)
_ALGO_SCHEMA: dict[str, type | tuple] = {
    "use_kcache_quant": bool, "k_bits": int, "k_sym": bool,
    "use_vcache_quant": bool, "v_bits": int, "v_sym": bool,
    "use_o_quant": bool, "use_down_quant": bool, "add_diag": bool, "lac": bool, "lwc": bool,
    "diag_alpha": (int, float), "epochs": int, "cali_bsz": int, "flat_lr": (int, float), "cali_trans": bool,
}
_TENSOR_SCHEMA = {"type": str, "symmetric": bool, "strategy": str}
_STRATEGIES = {"inputs": ("token",), "weights": ("channel",)}


@dataclass
class FlatQuantConfig:
    w_bits: int = 4
    a_bits: int = 4
    use_kcache_quant: bool = False
    k_bits: int = 16
    k_sym: bool = False
    use_vcache_quant: bool = False
    v_bits: int = 16
    v_sym: bool = False
    use_o_quant: bool = False
    use_down_quant: bool = True
    add_diag: bool = True
    lac: bool = False
    lwc: bool = True
    diag_alpha: float = 0.3
    epochs: int = 15
    cali_bsz: int = 4
    flat_lr: float = 5e-3
    cali_trans: bool = True
    skip_layers: list[str] = field(default_factory=lambda: ["lm_head"])

    def is_skipped(self, module_name: str) -> bool:
        return any(s == module_name or s in module_name for s in self.skip_layers)

    def to_amct_dict(self) -> dict:
        """Back to the AMCT-shaped dict (JSON-safe: skip_layers as a sorted list)."""
        d = asdict(self)
        algo = {k: d[k] for k in _ALGO_SCHEMA}
        return {
            "quant_cfg": {
                "inputs": {"type": f"int{self.a_bits}", "symmetric": True, "strategy": "token"},
                "weights": {"type": f"int{self.w_bits}", "symmetric": True, "strategy": "channel"},
            },
            "algorithm": {"flatquant": algo},
            "skip_layers": sorted(self.skip_layers),
        }


def _check_keys(section: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}.")


def _check_type(value: Any, expected, where: str) -> None:
    # bool is an int in Python; reject it where a number is expected and vice versa.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool and bool not in
                                              (expected if isinstance(expected, tuple) else (expected,)))
    if not ok:
        name = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise ConfigError(f"{where} must be {name}, got {type(value).__name__} {value!r}.")


def normalize_skip_layers(value: Any, where: str = "skip_layers") -> list[str]:
    """A set/list/tuple of names, or a comma-separated string; each entry must contain a letter or digit."""
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, (set, list, tuple, frozenset)):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a set or list of layer-name substrings, got {type(value).__name__}.")
    out = []
    for s in items:
        if not isinstance(s, str):
            raise ConfigError(f"{where} entries must be strings, got {s!r}.")
        s = s.strip()
        if not re.search(r"[A-Za-z0-9]", s):
            raise ConfigError(
                f"{where} entry {s!r} has no letter or digit; give a layer name or part of one, e.g. 'lm_head' "
                "or 'layers.0.mlp.down_proj'."
            )
        out.append(s)
    return sorted(set(out))


def _bits_of(type_name: Any, where: str) -> int:
    if type_name not in _TYPES:
        raise ConfigError(f"{where} must be one of {sorted(_TYPES)}, got {type_name!r}.")
    return _TYPES[type_name]


def parse_config(cfg: dict | None = None) -> FlatQuantConfig:
    """Validate an AMCT-style dict (see INT4_FLAT_QUANT_CFG). Missing keys take the defaults."""
    if cfg is None:
        cfg = INT4_FLAT_QUANT_CFG
    if not isinstance(cfg, dict):
        raise ConfigError(f"The config must be a dict like INT4_FLAT_QUANT_CFG, got {type(cfg).__name__}.")
    _check_keys(cfg, ("quant_cfg", "algorithm", "skip_layers"), "the config")
    out = FlatQuantConfig()

    quant_cfg = cfg.get("quant_cfg", {})
    _check_type(quant_cfg, dict, "quant_cfg")
    _check_keys(quant_cfg, ("inputs", "weights"), "quant_cfg")
    for kind in ("inputs", "weights"):
        section = quant_cfg.get(kind, {})
        _check_type(section, dict, f"quant_cfg.{kind}")
        _check_keys(section, _TENSOR_SCHEMA, f"quant_cfg.{kind}")
        for key, typ in _TENSOR_SCHEMA.items():
            if key in section:
                _check_type(section[key], typ, f"quant_cfg.{kind}.{key}")
        if section.get("symmetric", True) is not True:
            raise ConfigError(f"quant_cfg.{kind}.symmetric must be True: FlatQuant W4A4 quantizes symmetrically.")
        strategy = section.get("strategy", _STRATEGIES[kind][0])
        if strategy not in _STRATEGIES[kind]:
            raise ConfigError(f"quant_cfg.{kind}.strategy must be {_STRATEGIES[kind][0]!r}, got {strategy!r}.")
        bits = _bits_of(section.get("type", "int4"), f"quant_cfg.{kind}.type")
        if kind == "inputs":
            out.a_bits = bits
        else:
            out.w_bits = bits

    algorithm = cfg.get("algorithm", {})
    _check_type(algorithm, dict, "algorithm")
    _check_keys(algorithm, ("flatquant",), "algorithm")
    algo = algorithm.get("flatquant", {})
    _check_type(algo, dict, "algorithm.flatquant")
    _check_keys(algo, _ALGO_SCHEMA, "algorithm.flatquant")
    for key, typ in _ALGO_SCHEMA.items():
        if key in algo:
            _check_type(algo[key], typ, f"algorithm.flatquant.{key}")
            setattr(out, key, algo[key])
    for key in ("k_bits", "v_bits"):
        if getattr(out, key) not in _BITS:
            raise ConfigError(f"algorithm.flatquant.{key} must be one of {_BITS}, got {getattr(out, key)!r}.")
    for key in ("epochs", "cali_bsz"):
        minimum = 0 if key == "epochs" else 1
        if getattr(out, key) < minimum:
            raise ConfigError(f"algorithm.flatquant.{key} must be >= {minimum}, got {getattr(out, key)!r}.")
    for key in ("flat_lr", "diag_alpha"):
        if not math.isfinite(getattr(out, key)):
            raise ConfigError(f"algorithm.flatquant.{key} must be a finite number, got {getattr(out, key)!r}.")
    if not out.flat_lr > 0:
        raise ConfigError(f"algorithm.flatquant.flat_lr must be > 0, got {out.flat_lr!r}.")
    if not 0.0 <= out.diag_alpha <= 1.0:
        raise ConfigError(f"algorithm.flatquant.diag_alpha must be in [0, 1], got {out.diag_alpha!r}.")
    out.diag_alpha = float(out.diag_alpha)
    out.flat_lr = float(out.flat_lr)

    if "skip_layers" in cfg:
        out.skip_layers = normalize_skip_layers(cfg["skip_layers"])
    return out


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or YAML config file into the AMCT-shaped dict (validated later by parse_config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path.name!r} is not UTF-8 text; save it as UTF-8 JSON or YAML.") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {path.name!r} cannot be read: {exc.strerror}.") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"Config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path.name!r} must hold a mapping like INT4_FLAT_QUANT_CFG, "
                          f"not a {type(data).__name__}.")
    return data


def default_config_dict() -> dict:
    return copy.deepcopy(INT4_FLAT_QUANT_CFG)
