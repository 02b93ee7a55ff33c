"""Layer-major ("layer-streamed") perplexity of a baseline: an algorithm's uncalibrated build (core.algorithms: RTN,
QuaRot) of a float model, measured without building a second whole model.

Every perplexity window goes through decoder layer i before any goes through layer i+1, as calibration runs its
samples (core.calibrate.capture_layer_inputs gives layer 0's inputs and the layers' keyword arguments):

1. A module tree sharing every tensor with the original (core.models.shared_copy) gets the algorithm's change
   outside the decoder layers (prepare_outside with unshare: QuaRot's rotated embeddings and lm_head and fused final
   norm become copies of just those modules; RTN copies nothing) and lm_head's quantization.
2. For each decoder layer i: a copy of the original's layer i gets the algorithm's per-layer hooks
   (prepare_model_layer, prepare_layer among the first ``num_layers``, fold_layer), runs every window, and is
   dropped.
3. The final norm and the head give the summed NLL, window by window (core.perplexity.head_nll).

The same module calls in the same order on the same batches as core.perplexity.perplexity_from_ids on the whole
build: the result is the same number (equal on CPU; tests/test_layer_major.py). Peak extra memory: one decoder
layer (its copy, quantized and folded) + the changed outside modules (QuaRot: embedding and lm_head) + the windows'
hidden states, one buffer of ``W x seqlen x hidden`` in the hidden states' dtype (the storage dtype; fp32 at
most, 4 bytes), W = the number of windows (--ppl_max_windows)."""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

from .adapters import adapter_for
from .algorithms import LayerAlgorithm
from .algorithms.base import build_layer_uncalibrated, prepare_outside, run_layer
from .calibrate import capture_layer_inputs
from .models import decoder_layers, outside_layers, shared_copy
from .perplexity import autocast_for, head_nll, perplexity_windows
from .progress import Reporter
from .streaming import model_device, needs_streaming, to_device, to_host


def baseline_layer(algo: LayerAlgorithm, source: nn.Module, index: int, carry: Any,
                   num_layers: Optional[int] = None) -> nn.Module:
    """Decoder layer ``index`` of the algorithm's uncalibrated, folded build, as a copy of ``source`` (the float
    original's layer, left alone)."""
    layer = copy.deepcopy(source)
    build_layer_uncalibrated(algo, layer, index, carry, num_layers)
    algo.fold_layer(layer)
    return layer


def _through_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, device: torch.device,
                   batch_size: int, dtype) -> torch.Tensor:
    """Every window's hidden states through one layer, batch by batch, written over its inputs (a batch's outputs
    depend on its own inputs only); a new buffer only where the layer's output dtype differs."""
    layer.to(device)
    out = hidden
    for s in range(0, hidden.shape[0], batch_size):
        with autocast_for(layer, dtype):
            y = run_layer(layer, hidden[s:s + batch_size].to(device), layer_kwargs)
        if y.dtype != out.dtype:
            out = torch.empty(hidden.shape, dtype=y.dtype)
        out[s:s + batch_size] = y
    return out


def _final_nll(shell: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, device: torch.device,
               batch_size: int, dtype) -> float:
    norm = shell.get_submodule(adapter_for(shell).final_norm_path)
    head = shell.get_output_embeddings()
    total = 0.0
    for s in range(0, windows.shape[0], batch_size):
        with autocast_for(head, dtype):
            total += head_nll(head, norm(hidden[s:s + batch_size].to(device)), windows[s:s + batch_size].to(device))
    return total


@torch.no_grad()
def layer_major_perplexity(original: nn.Module, algo: LayerAlgorithm, ids: torch.Tensor, seqlen: int = 512,
                           batch_size: int = 4, max_windows: Optional[int] = None, num_layers: Optional[int] = None,
                           reporter: Optional[Reporter] = None, dtype: Optional[torch.dtype | str] = "auto",
                           label: str = "", device: Optional[torch.device] = None) -> float:
    """Perplexity of ``build_uncalibrated(algo, copy of original, num_layers)`` folded, as
    core.perplexity.perplexity_from_ids gives it, without that copy (see the module docstring). ``original`` stays
    on the host (or where it is); ``device``: where to compute (the embeddings, final norm and head go there for the
    duration, each built layer in turn)."""
    windows = perplexity_windows(ids, seqlen, max_windows)
    target = torch.device(device) if device is not None else model_device(original)
    shell = shared_copy(original)  # a module tree only: every tensor is the original's
    carry = prepare_outside(algo, shell, unshare=True)
    outside = outside_layers(shell) if needs_streaming(shell, target) else []  # a model on the host, work elsewhere
    homes = [to_device(m, target) for m in outside]
    try:
        hidden, layer_kwargs = capture_layer_inputs(shell, windows, target, upcast=False)
        sources = decoder_layers(original)
        for i, source in enumerate(sources):
            if reporter is not None:
                reporter.check()
                reporter.emit("ppl_layer", {"model": label, "i": i + 1, "n": len(sources)}, step=i,
                              steps=len(sources))
            layer = baseline_layer(algo, source, i, carry, num_layers)
            hidden = _through_layer(layer, hidden, layer_kwargs, target, batch_size, dtype)
            del layer
        nll = _final_nll(shell, hidden, windows, target, batch_size, dtype)
    finally:
        for m, home in zip(outside, homes):
            to_host(m, None, home, changed=False)
    return math.exp(nll / windows[:, 1:].numel())
