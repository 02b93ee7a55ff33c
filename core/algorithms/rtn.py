"""Round-to-nearest W/A quantization: the same quantizers as FlatQuant, no transforms, no learned clipping, no
calibration data. The quantized linears keep (and share) the original weight tensors: quantization happens in
their forward, so an RTN model costs no second copy of the weights."""
from __future__ import annotations

from torch import nn

from ..flat import flat_state, fold_layer, load_flat_state, wrap_layer
from .base import LayerAlgorithm


class RTNAlgorithm(LayerAlgorithm):
    name = "rtn"
    needs_data = False

    def prepare_layer(self, layer: nn.Module, index: int, stats) -> None:
        wrap_layer(layer, index, self.cfg, None, use_transforms=False)

    def restore_layer(self, layer: nn.Module, index: int, state: dict) -> None:
        load_flat_state(layer, state)

    def layer_state(self, layer: nn.Module) -> dict:
        return flat_state(layer)

    def fold_layer(self, layer: nn.Module) -> None:
        fold_layer(layer)
