"""The quantization config: AMCT's INT4_FLAT_QUANT_CFG dict, validated into a small dataclass."""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, one_line, shown

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
CONFIG_FILE_LIMIT = 2**20  # bytes of a config file (INT4_FLAT_QUANT_CFG is under 1 KiB)
_MAX_DEPTH = 16  # nesting levels of a YAML config (INT4_FLAT_QUANT_CFG has 4)


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
    unknown = sorted(set(section) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"Unknown key(s) {shown(unknown)} in {where}; allowed: {sorted(allowed)}.")


def _check_type(value: Any, expected, where: str) -> None:
    # bool is an int in Python; reject it where a number is expected and vice versa.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool and bool not in
                                              (expected if isinstance(expected, tuple) else (expected,)))
    if not ok:
        name = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise ConfigError(f"{where} must be {name}, got {type(value).__name__} {shown(value)}.")


def normalize_skip_layers(value: Any, where: str = "skip_layers") -> list[str]:
    """A set/list/tuple of names, or a comma-separated string; each entry must contain a letter or digit, so text
    of separators or blanks only (',', ' ', 'a,,b') is refused. An empty string or list skips nothing (lm_head is
    then quantized int8). Every path (CLI, config file, API, GUI) goes through here."""
    if isinstance(value, str):
        items = value.split(",") if value else []
    elif isinstance(value, (set, list, tuple, frozenset)):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a set or list of layer-name substrings, got {type(value).__name__}.")
    out = []
    for s in items:
        if not isinstance(s, str):
            raise ConfigError(f"{where} entries must be strings, got {shown(s)}.")
        s = s.strip()
        if not re.search(r"[A-Za-z0-9]", s):
            what = (f"entry {shown(s)} has no letter or digit" if s
                    else f"{shown(value)} has an empty entry (a stray comma or a blank)")
            raise ConfigError(f"{where} {what}; give layer names or parts of them, e.g. 'lm_head' or "
                              "'lm_head,layers.0.mlp.down_proj' (an empty value skips nothing).")
        out.append(s)
    return sorted(set(out))


def _bits_of(type_name: Any, where: str) -> int:
    if type_name not in _TYPES:
        raise ConfigError(f"{where} must be one of {sorted(_TYPES)}, got {shown(type_name)}.")
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
            raise ConfigError(f"quant_cfg.{kind}.strategy must be {_STRATEGIES[kind][0]!r}, "
                              f"got {shown(strategy)}.")
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
    """Read a JSON or YAML config file into the AMCT-shaped dict (validated later by parse_config). Bounded: at most
    CONFIG_FILE_LIMIT bytes, and YAML aliases are refused, so a small hostile file cannot expand into billions of
    values."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"Config file {str(path)!r} {what}.")
    try:
        if path.stat().st_size > CONFIG_FILE_LIMIT:
            raise ConfigError(f"Config file {path.name!r} is larger than {CONFIG_FILE_LIMIT // 1024} KiB; a config "
                              "is a small dict like INT4_FLAT_QUANT_CFG.")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path.name!r} is not UTF-8 text; save it as UTF-8 JSON or YAML.") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {path.name!r} cannot be read: {exc.strerror}.") from exc
    try:
        data = _load_yaml(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, RecursionError (deep nesting)
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"Config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{one_line(detail, 200)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path.name!r} must hold a mapping like INT4_FLAT_QUANT_CFG, "
                          f"not a {type(data).__name__}.")
    return data


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing aliases (*name) and deep nesting: a config needs neither, and nested aliases (a
    "billion laughs" file) expand a few hundred bytes into billions of values."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                raise yaml.YAMLError(f"it uses the YAML alias *{anchor[:40]}; write the values out instead")
            if self.depth >= _MAX_DEPTH:
                raise yaml.YAMLError(f"it nests deeper than {_MAX_DEPTH} levels")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return yaml.load(text, Loader=BoundedLoader)


def default_config_dict() -> dict:
    return copy.deepcopy(INT4_FLAT_QUANT_CFG)
