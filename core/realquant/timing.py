"""The sample's "Time diff orig / after real quant": one forward of the same batch through the original and through
the real-quant conversion of the quantized model, timed part by part so that no second model is ever held.

The parts are the decoder layers and the head (final norm + lm_head); the embedding lookup, the same module in both
models, is timed once and added to both. For each part, the original's copy (cast to the compute dtype) and the
quantized part's real-quant conversion exist only while that part is timed, interleaved (A, B, A, B, ...) so that
machine drift hits both, on the hidden states the original produces. The original's parts come from the float
model when it is in memory, else from its safetensors checkpoint (read one layer at a time, never whole): a job
that quantized in place needs no second model for its time diff. The sum over the parts of the medians is the
forward time; the per-part medians are in the result.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..algorithms.base import run_layer
from ..calibrate import capture_layer_inputs
from ..device import compute_dtype, synchronize
from ..flat import FlatQuantLinear
from ..latency import LATENCY_TEXT, latency_input_ids, model_device
from ..models import adapter_for, decoder_layers
from ..report import update_report
from .backends import select_backend
from .convert import convert_model, model_backend

TIMED = ("one forward of a 1 x seqlen batch (no KV cache), as the sum over its parts (the embedding lookup, each "
         "decoder layer, final norm + lm_head) of each part's median; each part copied (original, in the compute "
         "dtype) or converted (real quant) only while it is timed, interleaved with its counterpart")


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


class OriginalParts:
    """The original (float) model's decoder layers and head, one at a time: copies of the model's parts when
    ``original`` is in memory, else built from the checkpoint in ``folder`` (the quantized model gives the
    structure: its layer class and config; the float weights are read from the safetensors files)."""

    def __init__(self, quantized: nn.Module, original: Optional[nn.Module] = None,
                 folder: Optional[str | Path] = None):
        if original is None and folder is None:
            raise ValueError("OriginalParts needs the original model or its checkpoint folder.")
        self.quantized, self.original, self.folder = quantized, original, Path(folder) if folder else None
        self.adapter = adapter_for(quantized)
        self._files: Optional[dict[str, str]] = None

    # -- the checkpoint --------------------------------------------------------------------------------------------

    def _weight_map(self) -> dict[str, str]:
        if self._files is None:
            index = self.folder / "model.safetensors.index.json"
            if index.is_file():
                self._files = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            else:
                from safetensors import safe_open

                self._files = {}
                for f in sorted(self.folder.glob("*.safetensors")):
                    with safe_open(str(f), framework="pt") as fh:
                        self._files.update({k: f.name for k in fh.keys()})
        return self._files

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors under ``prefix`` (prefix removed), copied out of the mapped files."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key, file in self._weight_map().items():
            if key.startswith(prefix):
                by_file.setdefault(file, []).append(key)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                out.update({k[len(prefix):]: fh.get_tensor(k).clone() for k in keys})
        return out

    # -- the parts -------------------------------------------------------------------------------------------------

    def layer(self, i: int) -> nn.Module:
        if self.original is not None:
            return copy.deepcopy(decoder_layers(self.original)[i])
        like = decoder_layers(self.quantized)[i]
        with torch.device("meta"):
            layer = type(like)(self.quantized.config, layer_idx=i)
        state = self._tensors(f"{self.adapter.layers_path}.{i}.")
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval().requires_grad_(False)

    def head(self) -> nn.Module:
        if self.original is not None:
            return copy.deepcopy(_Head(self.adapter.get(self.original, self.adapter.final_norm_path),
                                       self.adapter.get(self.original, self.adapter.lm_head_path)))
        norm = copy.deepcopy(self.adapter.get(self.quantized, self.adapter.final_norm_path))  # never quantized
        head_path = self.adapter.lm_head_path
        weight = self._tensors(f"{head_path}.").get("weight")
        if weight is None:  # tied embeddings: the head is the embedding matrix
            weight = self._tensors(f"{self.adapter.embed_path}.")["weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return _Head(norm, linear).eval()


def _real(module: nn.Module, backend) -> nn.Module:
    """A real-quant copy of one part of the quantized model (a float part is copied as it is)."""
    part = copy.deepcopy(module)
    if any(isinstance(m, FlatQuantLinear) for m in part.modules()):
        part = convert_model(part, backend)
    return part


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _time_once(fn: Callable[[], object], device: torch.device, runs: list[float]) -> None:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    runs.append((time.perf_counter() - t0) * 1e3)


def _interleaved(fns: tuple[Callable, ...], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """The median ms of each function, run in turn (A, B, A, B, ...) after ``warmup`` rounds."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(warmup + repeats):
        for fn, r in zip(fns, runs):
            _time_once(fn, device, r)
    return [statistics.median(r[warmup:]) for r in runs]


@torch.inference_mode()
def time_diff(original: nn.Module | OriginalParts, quantized: nn.Module, input_ids: torch.Tensor,
              backend: str = "auto", dtype: Optional[torch.dtype | str] = "auto", repeats: int = 5,
              warmup: int = 1) -> dict:
    """ms for one forward of the same batch: the original vs the real-quant conversion of the (folded, fake-quant)
    ``quantized`` model, in ``dtype`` (auto: the compute dtype), timed part by part (see the module's doc).
    ``original``: the float model, or an OriginalParts (e.g. reading its checkpoint). Neither model is modified."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    device = model_device(quantized)
    if isinstance(dtype, str):
        dtype = compute_dtype(device, dtype)
    parts = original if isinstance(original, OriginalParts) else OriginalParts(quantized, original=original)
    be = select_backend(backend, device)
    ids = input_ids.to(device)
    embed = quantized.get_input_embeddings()
    embed_ms, = _interleaved((lambda: embed(ids),), device, repeats, warmup)
    hidden, kwargs = capture_layer_inputs(quantized, ids, device)
    hidden = hidden.to(device, dtype)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    layers_ms: list[list[float]] = []
    real_backend = None
    for i, layer in enumerate(decoder_layers(quantized)):
        orig, real = parts.layer(i).to(device, dtype), _real(layer, be).to(dtype)
        real_backend = real_backend or model_backend(real)
        x = hidden
        layers_ms.append(_interleaved((lambda: run_layer(orig, x, kwargs), lambda: run_layer(real, x, kwargs)),
                                      device, repeats, warmup))
        hidden = run_layer(orig, x, kwargs)
        del orig, real
    adapter = parts.adapter
    orig = parts.head().to(device, dtype)
    real = _real(_Head(adapter.get(quantized, adapter.final_norm_path), adapter.get(quantized, adapter.lm_head_path)),
                 be).to(dtype)
    head_ms = _interleaved((lambda: orig(hidden), lambda: real(hidden)), device, repeats, warmup)
    t_orig = embed_ms + sum(o for o, _ in layers_ms) + head_ms[0]
    t_real = embed_ms + sum(r for _, r in layers_ms) + head_ms[1]
    return {"time_orig_ms": t_orig, "time_real_quant_ms": t_real, "speedup": t_orig / t_real,
            "backend": real_backend or model_backend(real) or be.name,
            "dtype": str(dtype).replace("torch.", "") if dtype else None, "batch": list(ids.shape),
            "repeats": repeats, "timed": TIMED, "original_from": "memory" if parts.original is not None else
            "checkpoint", "parts_ms": {"embed": embed_ms, "layers": layers_ms, "head": head_ms}}


def report_time_diff(original: nn.Module | OriginalParts, quantized: nn.Module, tokenizer,
                     output_dir: Optional[str] = None, seqlen: int = 128, backend: str = "auto",
                     repeats: int = 5) -> dict:
    """time_diff on a [1, seqlen] batch of real text tokens; merged into ``output_dir/report.json`` as
    ``{"real_quant": {...}}`` when output_dir is given. The CLI prints ``Time diff orig: X`` and
    ``Time diff after real quant: Y`` from ``time_orig_ms`` / ``time_real_quant_ms``."""
    ids = latency_input_ids(tokenizer, seqlen, text=LATENCY_TEXT)
    result = time_diff(original, quantized, ids, backend=backend, repeats=repeats)
    result["units"] = "ms for one forward (no KV cache) of a 1 x seqlen batch; sum of the parts' medians"
    if output_dir:
        update_report(output_dir, {"real_quant": result})
    return result


__all__ = ["OriginalParts", "TIMED", "report_time_diff", "time_diff"]
