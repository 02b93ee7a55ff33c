"""The hook interface every layer-wise algorithm implements; the loop that calls the hooks is core.calibrate.

Once per model, before the layers (and before layer 0's inputs are captured):
  prepare_model(model, unshare)    model-level changes (QuaRot's fused residual rotation); default: none

Lifecycle of one decoder layer (the loop owns capture, device placement, resume, progress, cancel and memory):
  prepare_layer(layer, i, stats)   swap the algorithm's modules in (in place), initialized from activation stats
  calibrate_layer(layer, i, ctx)   learn on the layer's full-precision inputs/targets (may do nothing)
  restore_layer(layer, i, state)   instead of calibrating: load a saved state (resume, --load_matrix)
  freeze_layer(layer)              stop learning: learned parameters become fixed buffers
  layer_state(layer)               the tensors to save for this layer (flat_matrices.pth)
  fold_layer(layer)                reparameterize into deployable weights (output unchanged up to rounding)

``settings()`` are the algorithm's own options (plain values) that a reload needs; an algorithm that has any puts
them in its layer state too, and ``settings_from_state`` reads them back (--load_matrix rebuilds the same model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..config import FlatQuantConfig
from ..flat import wrap_lm_head
from ..models import decoder_layers
from ..progress import Reporter


@dataclass
class LayerResult:
    index: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch

    @classmethod
    def untrained(cls, index: int) -> "LayerResult":
        return cls(index, math.nan, math.nan, 0.0)


@dataclass
class LayerContext:
    """What calibrate_layer gets from the loop: the layer's fp32 inputs and full-precision outputs (host or disk
    tensors [N, L, H]; batches are moved to ``device`` by the algorithm), the decoder's keyword arguments (rotary
    embeddings, mask; already on the device), the matmul dtype, progress/cancel and an ETA callback.
    ``large_layer``: the layer is large enough (a 7B layer, not SmolLM2's) that training should trade time for
    memory (e.g. recompute weight-sized tensors in backward instead of keeping them)."""

    inps: torch.Tensor
    fp_outs: torch.Tensor
    layer_kwargs: dict
    device: torch.device
    dtype: Optional[torch.dtype]
    reporter: Reporter
    num_layers: int
    eta: Callable[[int], Optional[float]]
    large_layer: bool = False


class LayerAlgorithm:
    """Base class: an algorithm that needs no calibration data (e.g. RTN) overrides only prepare/fold."""

    name = "base"
    needs_data = True  # whether the loop must capture inputs and full-precision outputs for calibrate_layer

    def __init__(self, cfg: FlatQuantConfig, settings: Optional[dict] = None):
        self.cfg = cfg
        if settings:
            raise ValueError(f"algorithm {self.name!r} has no settings, got {sorted(settings)}")

    def settings(self) -> dict:
        return {}

    @staticmethod
    def settings_from_state(state: dict) -> dict:
        return {}

    def prepare_model(self, model: nn.Module, unshare: bool = False) -> None:
        """Model-level changes before the per-layer loop. ``unshare``: the model shares its tensors with a float
        original that must survive (core.models.shared_copy), so tensors are replaced, never changed in place."""

    def steps_per_layer(self, nsamples: int) -> int:
        return 0

    def prepare_layer(self, layer: nn.Module, index: int, stats) -> None:
        raise NotImplementedError

    def calibrate_layer(self, layer: nn.Module, index: int, ctx: LayerContext) -> LayerResult:
        return LayerResult.untrained(index)

    def restore_layer(self, layer: nn.Module, index: int, state: dict) -> None:
        raise NotImplementedError

    def freeze_layer(self, layer: nn.Module) -> None:
        pass

    def layer_state(self, layer: nn.Module) -> dict:
        raise NotImplementedError

    def fold_layer(self, layer: nn.Module) -> None:
        raise NotImplementedError


def prepare_model(algo: LayerAlgorithm, model: nn.Module, unshare: bool = False) -> None:
    """The model-level step before any layer: the algorithm's own (QuaRot's fused rotation), then lm_head's
    quantization where the config asks for it (core.flat.wrap_lm_head: a module swap, no tensor changed in place).
    Calibration, --load_matrix, export and the uncalibrated builds all start here, so each builds the same model."""
    algo.prepare_model(model, unshare=unshare)
    wrap_lm_head(model, algo.cfg)


def build_uncalibrated(algo: LayerAlgorithm, model: nn.Module, num_layers: Optional[int] = None) -> nn.Module:
    """The algorithm's structure on a float model in place, without calibration data: prepare_model, then each
    of the first ``num_layers`` (all by default) layers' modules at their starting values (FlatQuant: random-
    orthogonal transforms, unit diag; RTN: plain quantizers; QuaRot: the rotation, online Hadamard and fixed clips).
    Call core.flat.fold_model next for the deployable form."""
    prepare_model(algo, model)
    for i, layer in enumerate(decoder_layers(model)):
        if num_layers is not None and i >= num_layers:
            break
        algo.prepare_layer(layer, i, None)
    return model


def run_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """One decoder layer's hidden-state output (HF layers return a tensor or a tuple)."""
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out
