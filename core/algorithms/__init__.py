"""Algorithms registered by name; each one's math lives in its own module, the layer loop in core.calibrate."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import FlatQuantConfig
from ..errors import FlatQuantError
from ..gptq import apply_rounding_state, split_rounding_state
from .base import LayerAlgorithm, LayerContext, LayerResult, build_uncalibrated, prepare_model
from .flatquant import FlatQuantAlgorithm
from .quarot import QuaRotAlgorithm
from .rtn import RTNAlgorithm

ALGORITHMS: dict[str, type[LayerAlgorithm]] = {}


def register_algorithm(cls: type[LayerAlgorithm]) -> type[LayerAlgorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


register_algorithm(FlatQuantAlgorithm)
register_algorithm(RTNAlgorithm)
register_algorithm(QuaRotAlgorithm)


def get_algorithm(name: str, cfg: FlatQuantConfig, settings: Optional[dict] = None) -> LayerAlgorithm:
    if name not in ALGORITHMS:
        raise FlatQuantError(f"--algorithm must be one of {', '.join(sorted(ALGORITHMS))}, got {name!r}.")
    return ALGORITHMS[name](cfg, settings)


def apply_flat_structure(model: nn.Module, cfg: FlatQuantConfig, num_layers: Optional[int] = None,
                         use_transforms: bool = True) -> nn.Module:
    """FlatQuant's modules without calibration (random-orthogonal transforms, unit diag), or with
    ``use_transforms=False`` the RTN baseline's, and lm_head where the config quantizes it. Used to rebuild the
    structure before loading saved matrices, for the RTN baseline, and by benches and tests."""
    algo = FlatQuantAlgorithm(cfg) if use_transforms else RTNAlgorithm(cfg)
    return build_uncalibrated(algo, model, num_layers)


def rebuild_layer(algo: LayerAlgorithm, layer: nn.Module, index: int, state: dict) -> None:
    """A layer from its saved state, without data: the algorithm's modules and tensors, folded, then the saved
    GPTQ rounding when there is one (--load_matrix, export, another rank's layers, resume of a data-free
    algorithm). The one rebuild of a saved layer; core.matrices.apply_matrices runs it over a whole file."""
    own, rounding = split_rounding_state(state)
    algo.prepare_layer(layer, index, None)
    algo.restore_layer(layer, index, own)
    algo.freeze_layer(layer)
    algo.fold_layer(layer)
    apply_rounding_state(layer, rounding)


__all__ = ["ALGORITHMS", "LayerAlgorithm", "LayerContext", "LayerResult", "apply_flat_structure",
           "build_uncalibrated", "get_algorithm", "prepare_model", "rebuild_layer", "register_algorithm"]
