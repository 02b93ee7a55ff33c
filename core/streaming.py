"""Moving decoder layers between the host and the device one at a time.

The model lives on the host in its storage dtype. ``to_device`` brings one layer to the compute device (optionally
upcast, e.g. to fp32 for training), ``to_host`` sends it back in the storage dtype (the FlatQuant parameters it
gained stay fp32). ``LayerStreamer`` does the same around every layer's forward, so perplexity, generation and
evaluation run a model larger than the device: only the embeddings, final norm, head and one layer are resident.

A layer comes back into the host tensors it left (``HostHome``), not into new ones: a checkpoint loaded by
safetensors lives in a private file mapping whose pages stay mapped (and counted in RSS) as long as the file is,
so a fresh host copy of every calibrated or streamed layer would add a second copy of the model to the process
(~25 MB per SmolLM2 layer, 0.4 GB per LLaMA-2-7B layer). Values that changed are written in place (the written
pages turn from file to anonymous memory, the total stays); unchanged ones are not written at all."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .models import decoder_layers, outside_layers


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


class HostHome:
    """The host tensors of a module's own weights (``base_weight_modules``), taken before it goes to the device
    or is upcast, so that ``restore`` puts it back into the same storage."""

    def __init__(self, module: nn.Module):
        self._homes = [(p, p.data) for m in base_weight_modules(module) for p in m.parameters(recurse=False)
                       if p.device.type == "cpu"]

    @torch.no_grad()
    def restore(self, changed: bool = True) -> None:
        """Point every weight at its host tensor again. ``changed``: the values may differ from the host's (a
        calibrated, folded layer): they are written into it where they differ (after a cast to its dtype), and
        kept as new tensors only where the shape or dtype changed. Not ``changed`` (a forward only): nothing is
        copied back at all."""
        for p, host in self._homes:
            now = p.data
            if now.device == host.device and now.data_ptr() == host.data_ptr() and now.dtype == host.dtype \
                    and now.shape == host.shape and now.stride() == host.stride():
                continue
            if changed:
                if now.shape != host.shape:
                    continue
                new = now.to(device=host.device, dtype=host.dtype)
                if not torch.equal(new, host):
                    host.copy_(new)
                del new
            p.data = host
        self._homes.clear()


@torch.no_grad()
def to_device(layer: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> HostHome:
    """Move ``layer`` to ``device`` (its own weights cast to ``dtype`` when given); returns its host home for
    ``to_host``."""
    home = HostHome(layer)
    layer.to(device=device)
    if dtype is not None:
        for m in base_weight_modules(layer):
            m.to(dtype=dtype)
    return home


@torch.no_grad()
def to_host(layer: nn.Module, dtype: Optional[torch.dtype] = None, home: Optional[HostHome] = None,
            changed: bool = True) -> nn.Module:
    """Bring ``layer`` back to the host: its own weights into ``home`` (see HostHome.restore), anything else (new
    FlatQuant tensors, weights without a home) moved, and those weights cast to ``dtype`` when given."""
    if home is not None:
        home.restore(changed)
    layer.to(device="cpu")
    if dtype is not None:
        for m in base_weight_modules(layer):
            m.to(dtype=dtype)
    return layer


class LayerStreamer:
    """Context manager: run ``model`` (on the host) on ``device`` with one decoder layer resident at a time.

    Non-layer modules (embeddings, rotary tables, final norm, head) move to the device for the duration; each
    layer moves there (cast to ``compute_dtype`` when given) right before its forward and back right after.
    Nothing is copied: on exit every tensor is back on the host in its original dtype."""

    def __init__(self, model: nn.Module, device: torch.device, compute_dtype: Optional[torch.dtype] = None):
        self.model, self.device, self.compute_dtype = model, torch.device(device), compute_dtype
        self._handles: list = []
        self._storage: dict[int, torch.dtype] = {}
        self._homes: dict[int, HostHome] = {}
        self._others = outside_layers(model)
        self._other_dtypes = {id(m): storage_dtype(m) for m in self._others}

    def _pre(self, layer, args, kwargs):
        self._storage[id(layer)] = storage_dtype(layer)
        self._homes[id(layer)] = to_device(layer, self.device, self.compute_dtype)
        return None

    def _post(self, layer, args, kwargs, output):
        self._back(layer)
        return None

    def _back(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
        """A forward changes no weight: they return to their host tensors without a copy."""
        dtype = dtype or self._storage.get(id(module))
        to_host(module, dtype if self.compute_dtype is not None else None, self._homes.pop(id(module), None),
                changed=False)

    def __enter__(self) -> "LayerStreamer":
        for m in self._others:
            self._homes[id(m)] = to_device(m, self.device, self.compute_dtype)
        for layer in decoder_layers(self.model):
            self._handles.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._others:
            self._back(m, self._other_dtypes[id(m)])
        for layer in decoder_layers(self.model):  # a forward that raised may have left one on the device
            if id(layer) in self._homes or model_device(layer).type != "cpu":
                self._back(layer)


def needs_streaming(model: nn.Module, device: Optional[torch.device]) -> bool:
    """True when the model is on the host and the work is meant for another device."""
    return device is not None and torch.device(device).type != model_device(model).type
