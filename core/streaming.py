"""Moving decoder layers between the host and the device one at a time.

The model lives on the host in its storage dtype. ``to_device`` brings one layer to the compute device (optionally
upcast, e.g. to fp32 for training), ``to_host`` sends it back in the storage dtype (the FlatQuant parameters it
gained stay fp32). ``LayerStreamer`` does the same around every layer's forward, so perplexity, generation and
evaluation run a model larger than the device: only the embeddings, final norm, head and one layer are resident."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .models import decoder_layers


def base_weight_modules(layer: nn.Module):
    """The model's own weight-holding modules in a layer (linears and norms), not FlatQuant's transforms and
    quantizers: the ones whose storage dtype is the checkpoint's."""
    for m in layer.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__.endswith("RMSNorm"):
            yield m


def storage_dtype(layer: nn.Module) -> torch.dtype:
    for m in base_weight_modules(layer):
        for p in m.parameters(recurse=False):
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def to_device(layer: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> nn.Module:
    layer.to(device=device)
    if dtype is not None:
        for m in base_weight_modules(layer):
            m.to(dtype=dtype)
    return layer


@torch.no_grad()
def to_host(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    layer.to(device="cpu")
    if dtype is not None:
        for m in base_weight_modules(layer):
            m.to(dtype=dtype)
    return layer


def _non_layer_modules(model: nn.Module) -> list[nn.Module]:
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    out = []
    for m in model.modules():
        if id(m) in inside or m is model:
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            out.append(m)
    return out


class LayerStreamer:
    """Context manager: run ``model`` (on the host) on ``device`` with one decoder layer resident at a time.

    Non-layer modules (embeddings, rotary tables, final norm, head) move to the device for the duration; each
    layer moves there (cast to ``compute_dtype`` when given) right before its forward and back right after.
    Nothing is copied: on exit every tensor is back on the host in its original dtype."""

    def __init__(self, model: nn.Module, device: torch.device, compute_dtype: Optional[torch.dtype] = None):
        self.model, self.device, self.compute_dtype = model, torch.device(device), compute_dtype
        self._handles: list = []
        self._storage: dict[int, torch.dtype] = {}
        self._others = _non_layer_modules(model)
        self._other_dtypes = {id(m): storage_dtype(m) for m in self._others}

    def _pre(self, layer, args, kwargs):
        self._storage[id(layer)] = storage_dtype(layer)
        to_device(layer, self.device, self.compute_dtype)
        return None

    def _post(self, layer, args, kwargs, output):
        to_host(layer, self._storage.get(id(layer)) if self.compute_dtype is not None else None)
        return None

    def __enter__(self) -> "LayerStreamer":
        for m in self._others:
            to_device(m, self.device, self.compute_dtype)
        for layer in decoder_layers(self.model):
            self._handles.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._others:
            to_host(m, self._other_dtypes[id(m)] if self.compute_dtype is not None else None)
        for layer in decoder_layers(self.model):  # a forward that raised may have left one on the device
            if model_device(layer).type != "cpu":
                to_host(layer, self._storage.get(id(layer)) if self.compute_dtype is not None else None)


def needs_streaming(model: nn.Module, device: Optional[torch.device]) -> bool:
    """True when the model is on the host and the work is meant for another device."""
    return device is not None and torch.device(device).type != model_device(model).type
