"""The hook interface every layer-wise algorithm implements; the loop that calls the hooks is core.calibrate.

Once per model, before the layers (and before layer 0's inputs are captured), the model-level change (QuaRot's
fused residual rotation; default: none) in two parts, so that it can also be applied one layer at a time
(core.layer_major builds a baseline layer by layer):
  prepare_outside(model, unshare)  its part outside the decoder layers (embeddings, final norm, head); returns
                                   what every layer's part needs (QuaRot: the rotation), or None
  prepare_model_layer(layer, i, carry, unshare)   its part inside decoder layer i (every layer, trained or not)

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
from typing import Any, Callable, Optional

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

    def prepare_outside(self, model: nn.Module, unshare: bool = False) -> Any:
        """The model-level change outside the decoder layers, before the per-layer loop; returns what
        prepare_model_layer needs. ``unshare``: the model shares its tensors with a float original that must
        survive (core.models.shared_copy), so tensors are replaced, never changed in place."""
        return None

    def prepare_model_layer(self, layer: nn.Module, index: int, carry: Any, unshare: bool = False) -> None:
        """The model-level change inside decoder layer ``index`` (``carry``: what prepare_outside returned)."""

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


def prepare_outside(algo: LayerAlgorithm, model: nn.Module, unshare: bool = False) -> Any:
    """The model-level step outside the decoder layers: the algorithm's own, then lm_head's quantization where the
    config asks for it (core.flat.wrap_lm_head: a module swap, no tensor changed in place). Returns the carry for
    ``algo.prepare_model_layer``."""
    carry = algo.prepare_outside(model, unshare=unshare)
    wrap_lm_head(model, algo.cfg)
    return carry


def prepare_model(algo: LayerAlgorithm, model: nn.Module, unshare: bool = False) -> None:
    """The model-level step before any layer: prepare_outside, then the algorithm's part in every decoder layer
    (QuaRot's fused rotation). Calibration, --load_matrix, export and the uncalibrated builds all start here, so
    each builds the same model."""
    carry = prepare_outside(algo, model, unshare)
    for i, layer in enumerate(decoder_layers(model)):
        algo.prepare_model_layer(layer, i, carry, unshare=unshare)


def build_uncalibrated(algo: LayerAlgorithm, model: nn.Module, num_layers: Optional[int] = None) -> nn.Module:
    """The algorithm's structure on a float model in place, without calibration data: prepare_model, then each
    of the first ``num_layers`` (all by default) layers' modules at their starting values (FlatQuant: random-
    orthogonal transforms, unit diag; RTN: plain quantizers; QuaRot: the rotation, online Hadamard and fixed clips).
    Call core.flat.fold_model next for the deployable form."""
    carry = prepare_outside(algo, model)
    for i, layer in enumerate(decoder_layers(model)):
        build_layer_uncalibrated(algo, layer, i, carry, num_layers)
    return model


def build_layer_uncalibrated(algo: LayerAlgorithm, layer: nn.Module, index: int, carry: Any,
                             num_layers: Optional[int] = None) -> None:
    """Decoder layer ``index`` of build_uncalibrated in place: the model-level change's part in it, then, among
    the first ``num_layers``, the algorithm's modules at their starting values."""
    algo.prepare_model_layer(layer, index, carry)
    if num_layers is None or index < num_layers:
        algo.prepare_layer(layer, index, None)


def run_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """One decoder layer's hidden-state output (HF layers return a tensor or a tuple)."""
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out
