"""flat_matrices.pth: per-layer calibrated tensors + config + model identity. Written atomically, read with
torch.load(weights_only=True) so a pickle payload cannot run code."""
from __future__ import annotations

import copy
import io
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .algorithms import ALGORITHMS, LayerAlgorithm, apply_flat_structure, get_algorithm, prepare_model, rebuild_layer
from .config import FlatQuantConfig, parse_config
from .errors import CalibrationError, MatrixFileError
from .flat import flat_state, iter_transforms
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


def calibrated_on(payload: dict) -> Optional[str]:
    """The calibration text a matrix file records (meta ``calib_source``, core.data.recorded_source); None for a
    file from before it was recorded."""
    return (payload.get("meta") or {}).get("calib_source")


def check_identity(payload: dict, model: nn.Module, path: str = "") -> None:
    want, have = payload["identity"], model_identity(model)
    diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
    if diff:
        details = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
        raise MatrixFileError(f"Matrix file {path!r} was calibrated for another model ({details}); "
                              "load it with the model it was made for, or recalibrate.")


def matrix_algorithm(payload: dict, path: str = "") -> LayerAlgorithm:
    """The algorithm (with its saved settings) that wrote a matrix payload: meta's ``algorithm`` (FlatQuant when a
    file predates it), configured from the payload's config."""
    cfg = parse_config(payload["config"])
    name = (payload.get("meta") or {}).get("algorithm", "flatquant")
    states = sorted((int(i), s) for i, s in payload["layers"].items())
    try:
        settings = ALGORITHMS[name].settings_from_state(states[0][1]) if states and name in ALGORITHMS else None
        return get_algorithm(name, cfg, settings)
    except (KeyError, ValueError, TypeError) as exc:
        raise MatrixFileError(f"Matrix file {path!r} lacks or garbles the {name!r} algorithm's settings ({exc}).") \
            from exc


def _check_layer_index(layers: nn.ModuleList, i: int, path: str) -> None:
    if not 0 <= i < len(layers):
        source = f"Matrix file {path!r}" if path else "The layer states"
        raise MatrixFileError(f"{source} holds a state for layer {i}, but the model has {len(layers)} layers.")


def check_layer_indices(layers: nn.ModuleList, states, path: str = "") -> None:
    """Refuse layer states for layers the model does not have, before anything changes (``states``: their
    indices, or a dict keyed by them)."""
    for i in states:
        _check_layer_index(layers, int(i), path)


def apply_layer_matrices(layers: nn.ModuleList, i: int, algo: LayerAlgorithm, state: dict, path: str = "") -> None:
    """Rebuild and fold decoder layer ``i`` alone from its saved state (exporters stream a model layer by layer with
    it); after core.algorithms.prepare_model when the algorithm changes the model as a whole."""
    _check_layer_index(layers, i, path)
    try:
        rebuild_layer(algo, layers[i], i, state)
    except KeyError as exc:
        raise MatrixFileError(f"Matrix file {path!r} does not match this model's layer {i} ({exc}); "
                              "it was made with another config or another model.") from exc


def apply_matrices(model: nn.Module, payload: dict, path: str = "", copy_layers: bool = False) -> FlatQuantConfig:
    """Rebuild every saved layer on a float model with the algorithm that wrote the payload and fold it: the same
    model as the calibration made. ``copy_layers``: the model shares its tensors with a float original that must
    survive (core.models.shared_copy), so each layer is copied before it changes."""
    check_identity(payload, model, path)
    algo = matrix_algorithm(payload, path)
    states = sorted((int(i), s) for i, s in payload["layers"].items())
    layers = decoder_layers(model)
    check_layer_indices(layers, [i for i, _ in states], path)
    prepare_model(algo, model, unshare=copy_layers)
    for i, state in states:
        if copy_layers:
            layers[i] = copy.deepcopy(layers[i])
        apply_layer_matrices(layers, i, algo, state, path)
    return algo.cfg


def read_complete_matrices(path: str | os.PathLike) -> dict:
    """read_matrices, refusing a partial (resume) checkpoint: what every loader of a finished file reads."""
    payload = read_matrices(path)
    if not payload.get("complete", True):
        raise MatrixFileError(f"Matrix file {str(path)!r} is a partial (resume) checkpoint; finish the calibration "
                              "with the same --output_dir first.")
    return payload


def load_matrices(path: str | os.PathLike, model: nn.Module, copy_layers: bool = False) -> FlatQuantConfig:
    """Read a finished matrix file and apply it to ``model`` in place (quantize --load_matrix, the GUI's load)."""
    return apply_matrices(model, read_complete_matrices(path), str(path), copy_layers)


__all__ = ["MATRIX_FILE", "RESUME_FILE", "build_payload", "calibrated_on", "non_finite_tensors", "save_matrices",
           "read_matrices",
           "read_complete_matrices",
           "load_matrices", "apply_matrices", "apply_layer_matrices", "check_layer_indices", "matrix_algorithm",
           "uncalibrated_states", "check_identity"]
