"""Algorithms registered by name; each one's math lives in its own module, the layer loop in core.calibrate."""
from __future__ import annotations

from typing import Optional

from ..config import FlatQuantConfig
from ..errors import FlatQuantError
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


__all__ = ["ALGORITHMS", "LayerAlgorithm", "LayerContext", "LayerResult", "get_algorithm", "register_algorithm"]
