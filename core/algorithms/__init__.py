"""Algorithms registered by name; each one's math lives in its own module, the layer loop in core.calibrate."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import FlatQuantConfig
from ..errors import FlatQuantError
from ..flat import wrap_lm_head
from ..gptq import apply_rounding_state, split_rounding_state
from .base import LayerAlgorithm, LayerContext, LayerResult
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


def prepare_model(algo: LayerAlgorithm, model: nn.Module, unshare: bool = False) -> None:
    """The model-level step before any layer: the algorithm's own (QuaRot's fused rotation), then lm_head's
    quantization where the config asks for it (core.flat.wrap_lm_head: a module swap, no tensor changed in place).
    Calibration, --load_matrix and export all start here, so each builds the same model."""
    algo.prepare_model(model, unshare=unshare)
    wrap_lm_head(model, algo.cfg)


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


__all__ = ["ALGORITHMS", "LayerAlgorithm", "LayerContext", "LayerResult", "get_algorithm", "prepare_model",
           "rebuild_layer", "register_algorithm"]
