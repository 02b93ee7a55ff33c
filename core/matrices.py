"""flat_matrices.pth: per-layer calibrated tensors + config + model identity. Written atomically, read with
torch.load(weights_only=True) so a pickle payload cannot run code."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import FlatQuantConfig, parse_config
from .errors import CalibrationError, MatrixFileError
from .flat import apply_flat_structure, fold_layer, load_flat_state, wrap_layer
from .models import decoder_layers, model_identity
from .report import atomic_write_bytes

FORMAT = "flatquant-studio/flat_matrices/1"
MATRIX_FILE = "flat_matrices.pth"
RESUME_FILE = "flat_matrices.resume.pth"


def non_finite_tensors(tensors: dict) -> list[str]:
    """Names of the floating tensors in a (nested) dict that hold NaN or inf."""
    bad = []
    for key, value in tensors.items():
        if isinstance(value, dict):
            bad += [f"{key}.{k}" for k in non_finite_tensors(value)]
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(str(key))
    return bad


def build_payload(model: nn.Module, cfg: FlatQuantConfig, layer_states: dict[int, dict], complete: bool,
                  extra: Optional[dict] = None) -> dict:
    return {
        "format": FORMAT,
        "identity": model_identity(model),
        "config": cfg.to_amct_dict(),
        "complete": complete,
        "layers": {int(i): s for i, s in sorted(layer_states.items())},
        "meta": extra or {},
    }


def uncalibrated_states(model: nn.Module, cfg: FlatQuantConfig) -> tuple[nn.Module, dict[int, dict]]:
    """A wrapped copy of ``model`` with its random-orthogonal starting transforms frozen, and its per-layer states:
    a valid, uncalibrated matrix payload (``build_payload(model, cfg, states, True)``) for tests and benches."""
    import copy

    from .flat import flat_state, iter_transforms

    wrapped = copy.deepcopy(model)
    apply_flat_structure(wrapped, cfg)
    states = {}
    for i, layer in enumerate(decoder_layers(wrapped)):
        for t in iter_transforms(layer):
            t.freeze()
        states[i] = flat_state(layer)
    return wrapped, states


def save_matrices(path: str | os.PathLike, payload: dict) -> Path:
    """Write atomically; a payload marked complete is refused when any tensor is NaN/inf (never a 'complete' file
    of garbage)."""
    bad = non_finite_tensors(payload.get("layers", {}))
    if bad and payload.get("complete"):
        raise CalibrationError(f"Calibration produced NaN/inf values ({', '.join(bad[:3])}); nothing was saved. "
                               "Lower --flat_lr or --epochs, or check the model's weights.")
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def read_matrices(path: str | os.PathLike) -> dict:
    """Load and sanity-check a matrix file (not yet against a model)."""
    path = Path(path)
    if not path.is_file():
        raise MatrixFileError(f"Matrix file {str(path)!r} does not exist; check --flat_matrix_path.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on garbage (RuntimeError, IndexError, BadZipFile, ...)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):
            raise MatrixFileError(f"Matrix file {path.name!r} holds objects other than tensors and plain values and "
                                  "was refused (unsafe pickle); use a file written by FlatQuant Studio.") from exc
        raise MatrixFileError(f"Matrix file {path.name!r} is corrupt or truncated (not a file torch.save wrote); "
                              "recalibrate or copy the file again.") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MatrixFileError(f"Matrix file {path.name!r} is not a FlatQuant Studio matrix file (format "
                              f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}).")
    for key in ("identity", "config", "layers"):
        if key not in payload:
            raise MatrixFileError(f"Matrix file {path.name!r} lacks its {key!r} entry; it is incomplete.")
    if not isinstance(payload["layers"], dict) or not isinstance(payload["identity"], dict):
        raise MatrixFileError(f"Matrix file {path.name!r} is corrupt (its layers or identity are not a mapping).")
    bad = non_finite_tensors(payload["layers"])
    if bad:
        raise MatrixFileError(f"Matrix file {path.name!r} is corrupt: {len(bad)} tensor(s) hold NaN/inf (e.g. "
                              f"{bad[0]}); recalibrate with a lower --flat_lr.")
    return payload


def check_identity(payload: dict, model: nn.Module, path: str = "") -> None:
    want, have = payload["identity"], model_identity(model)
    diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
    if diff:
        details = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
        raise MatrixFileError(f"Matrix file {path!r} was calibrated for another model ({details}); "
                              "load it with the model it was made for, or recalibrate.")


def apply_matrices(model: nn.Module, payload: dict, path: str = "") -> FlatQuantConfig:
    """Rebuild the FlatQuant structure on a float model from a payload and fold it: same result as calibrating."""
    check_identity(payload, model, path)
    cfg = parse_config(payload["config"])
    layers = decoder_layers(model)
    for i, state in payload["layers"].items():
        apply_layer_matrices(layers, int(i), cfg, state, path)
    return cfg


def apply_layer_matrices(layers: nn.ModuleList, i: int, cfg: FlatQuantConfig, state: dict, path: str = "") -> None:
    """Wrap, load and fold decoder layer ``i`` alone (exporters stream a model layer by layer with it)."""
    if not 0 <= i < len(layers):
        raise MatrixFileError(f"Matrix file {path!r} names layer {i}, but the model has {len(layers)} layers.")
    wrap_layer(layers[i], i, cfg, None)
    try:
        load_flat_state(layers[i], state)
    except KeyError as exc:
        raise MatrixFileError(f"Matrix file {path!r} does not match this model's layer {i} ({exc}); "
                              "it was made with another config or another model.") from exc
    fold_layer(layers[i])


def read_complete_matrices(path: str | os.PathLike) -> dict:
    """read_matrices, refusing a partial (resume) checkpoint: what every loader of a finished file reads."""
    payload = read_matrices(path)
    if not payload.get("complete", True):
        raise MatrixFileError(f"Matrix file {str(path)!r} is a partial (resume) checkpoint; finish the calibration "
                              "with the same --output_dir first.")
    return payload


def load_matrices(path: str | os.PathLike, model: nn.Module) -> FlatQuantConfig:
    """Read a matrix file and apply it to ``model`` in place (the GUI and CLI entry point)."""
    return apply_matrices(model, read_complete_matrices(path), str(path))


__all__ = ["MATRIX_FILE", "RESUME_FILE", "build_payload", "non_finite_tensors", "save_matrices", "read_matrices",
           "read_complete_matrices",
           "load_matrices", "apply_matrices", "apply_layer_matrices", "uncalibrated_states", "check_identity",
           "apply_flat_structure"]
