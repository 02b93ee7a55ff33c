"""The generic layer-wise loop: capture layer 0's inputs, then per decoder layer compute its full-precision outputs
and activation statistics, call the algorithm's hooks (prepare -> calibrate or restore -> freeze -> state -> fold),
hand the state to the caller (checkpoint/resume), and move on with the full-precision outputs as the next inputs
(and, with ``calib_inputs="quant"``, the quantized layer's outputs as the next training inputs).
Before the layers, the algorithm's model-level hooks run once (core.algorithms.prepare_model). With
``weight_rounding="gptq"`` each folded layer's quantized linears are then GPTQ-rounded on the Hessians of their
(transformed) inputs over the calibration inputs, under any algorithm; the rounding (int8 codes + fp32 scales) joins
the layer's state.

Memory policy: the model stays on the host in its storage dtype; only the current layer is on the device, upcast to
``train_dtype``; inputs/outputs of the calibration set live in an ActivationStore (host RAM or disk). With
``copy_layers`` each layer is copied before it is changed, so a float original sharing the other tensors survives.
``layer_range`` (distributed ranks) runs the layers before the range in full precision only and stops after it."""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch
from torch import nn

from .algorithms import LayerAlgorithm, LayerContext, LayerResult, get_algorithm, prepare_model, rebuild_layer
from .adapters import adapter_for
from .algorithms.base import run_layer
from .config import FlatQuantConfig
from .device import freed_host_memory_kept
from .errors import CalibrationError
from .flat import ActivationStats, set_quant_enabled
from .gptq import GPTQConfig, apply_rounding_state, gptq_layer_state, split_rounding_state
from .memory import ActivationStore, trim_host_heap
from .models import decoder_layers
from .perplexity import autocast_for
from .progress import Reporter
from .streaming import storage_dtype, to_device, to_host
from .validate import check_trained_layer, loss_change

SMALL_LAYER_PARAMS = 50_000_000  # a LLaMA-2-7B layer has 202M

WEIGHT_ROUNDINGS = ("rtn", "gptq")
CALIB_INPUTS = ("fp", "quant")

__all__ = ["CALIB_INPUTS", "LayerResult", "WEIGHT_ROUNDINGS", "calibrate_model", "capture_layer_inputs",
           "fp_forward_with_stats", "rebuild_layer", "run_layer"]


class _Captured(Exception):
    pass


@torch.no_grad()
def is_large_layer(layer: nn.Module) -> bool:
    """A layer large enough (a 7B layer, not SmolLM2's) that calibration trades time for memory."""
    return sum(p.numel() for p in layer.parameters()) >= SMALL_LAYER_PARAMS


def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device,
                         store: Optional[ActivationStore] = None, upcast: bool = True) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 for each sample [N, L, H] (fp32, host or disk) and the keyword
    arguments the model passes to its layers (rotary embeddings, mask; on ``device``), captured by a pre-hook that
    stops the forward there. Runs where the embeddings are (the host); the embedding output is upcast to fp32 so
    that the rotary tables are computed in fp32 whatever the storage dtype. ``upcast=False``: the embedding output
    and the tables stay in the model's own dtype, as its forward has them (a layer-major perplexity that must equal
    the whole model's)."""
    store = store or ActivationStore()
    layer0 = decoder_layers(model)[0]
    inps: Optional[torch.Tensor] = None
    kwargs_seen: dict = {}
    emb = model.get_input_embeddings()
    host = next(emb.parameters()).device

    def pre_hook(_module, args, kwargs):
        nonlocal inps
        hidden = args[0] if args else kwargs["hidden_states"]
        if inps is None:
            dtype = torch.float32 if upcast else hidden.dtype
            inps = store.empty((samples.shape[0],) + tuple(hidden.shape[1:]), dtype)
        inps[row[0]] = hidden[0].detach().to(inps.dtype).cpu()
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    row = [0]
    handles = [layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if upcast:
        handles.append(emb.register_forward_hook(lambda _m, _a, out: out.float()))
    try:
        for i in range(samples.shape[0]):
            row[0] = i
            try:
                model(input_ids=samples[i:i + 1].to(host), use_cache=False)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    for name in ("past_key_values", "cache"):  # the cache argument's name differs across transformers versions
        if name in kwargs_seen:
            kwargs_seen[name] = None
    kwargs_seen["use_cache"] = False
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                 tuple(t.to(device) for t in v) if isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v)
                 else v) for k, v in kwargs_seen.items()}
    return inps, moved


def _stat_points(layer: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(stat name, module, use its input) for the SmoothQuant-style diag init, from the family's adapter."""
    ad = adapter_for(layer)
    return [(g.name, ad.get(layer, g.norm), False) for g in ad.groups] + [("down", ad.get(layer, ad.down_proj), True)]


@torch.no_grad()
def fp_forward_with_stats(layer: nn.Module, inps: torch.Tensor, layer_kwargs: dict, device: torch.device,
                          batch_size: int, dtype: Optional[torch.dtype], store: Optional[ActivationStore] = None,
                          with_stats: bool = True) -> tuple[torch.Tensor, ActivationStats]:
    """Full-precision outputs of one layer and the per-channel absmax of each transform group's input."""
    stats = ActivationStats()
    store = store or ActivationStore()

    def absmax_hook(name, use_input):
        def fn(_m, args, output):
            t = args[0] if use_input else output
            cur = t.detach().reshape(-1, t.shape[-1]).abs().amax(0).float()  # stays where the layer is
            prev = getattr(stats, name)
            setattr(stats, name, cur if prev is None else torch.maximum(prev, cur))
        return fn

    handles = [m.register_forward_hook(absmax_hook(name, use_in)) for name, m, use_in in _stat_points(layer)] \
        if with_stats else []
    outs = store.empty(tuple(inps.shape))
    try:
        for s in range(0, inps.shape[0], batch_size):
            with autocast_for(layer, dtype):
                outs[s:s + batch_size] = run_layer(layer, inps[s:s + batch_size].to(device), layer_kwargs).float().cpu()
    finally:
        for h in handles:
            h.remove()
    return outs, stats


@torch.no_grad()
def _gptq_round(layer: nn.Module, inps: torch.Tensor, layer_kwargs: dict, device: torch.device, batch_size: int,
                dtype: Optional[torch.dtype], cfg: GPTQConfig) -> dict:
    """GPTQ on a folded layer: Hessians of its quantized linears' inputs (after their online transforms) while it
    runs over the calibration inputs with quantization off; returns the rounding's state."""
    def run() -> None:
        for s in range(0, inps.shape[0], batch_size):
            with autocast_for(layer, dtype):
                run_layer(layer, inps[s:s + batch_size].to(device), layer_kwargs)

    set_quant_enabled(layer, False)
    try:
        state, _ = gptq_layer_state(layer, run, adapter_for(layer).linears(), cfg)
    finally:
        set_quant_enabled(layer, True)
    return state


def _oom_guard(exc: BaseException) -> None:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        raise CalibrationError("Out of memory during calibration; lower --nsamples, --seqlen or --cali_bsz, "
                               "or use --activation_dir, or a device with more memory.") from exc


def calibrate_model(model: nn.Module, samples: torch.Tensor, cfg: FlatQuantConfig, device: torch.device,
                    reporter: Reporter, dtype: Optional[torch.dtype | str] = "auto",
                    max_layers: Optional[int] = None, done_states: Optional[dict[int, dict]] = None,
                    on_layer_done: Optional[Callable[[int, dict, LayerResult], None]] = None,
                    algorithm: Optional[LayerAlgorithm | str] = None, layer_range: Optional[tuple[int, int]] = None,
                    store: Optional[ActivationStore] = None, copy_layers: bool = False,
                    train_dtype: Optional[torch.dtype] = torch.float32, weight_rounding: str = "rtn",
                    gptq: Optional[GPTQConfig] = None, calib_inputs: str = "fp") -> list[LayerResult]:
    """Calibrate (and fold) decoder layers in place with ``algorithm`` (default: FlatQuant). ``done_states`` holds
    layers finished by an interrupted run (resume): they are rebuilt from their saved tensors instead of retrained.
    ``weight_rounding``: "rtn" (the quantizer's rounding) or "gptq" (see the module docstring).
    ``calib_inputs``: what each layer trains (and GPTQ collects Hessians) on: "fp", the float model's inputs (the
    reference code's choice), or "quant", the outputs of the layers quantized so far; the targets are the float
    layer's outputs on float inputs either way.
    Returns per-layer results of the layers in ``layer_range`` (default: all, or the first ``max_layers``)."""
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise ValueError(f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, got {weight_rounding!r}")
    if calib_inputs not in CALIB_INPUTS:
        raise ValueError(f"calib_inputs must be one of {', '.join(CALIB_INPUTS)}, got {calib_inputs!r}")
    if calib_inputs == "quant" and layer_range is not None and layer_range[0] > 0:
        raise ValueError("calib_inputs='quant' needs the layers before the range quantized: run all layers")
    layers = decoder_layers(model)
    # Small layers keep freed host memory (~10% faster); large ones return it to the OS and recompute weight-sized
    # tensors in training instead of keeping them (core.algorithms.base.LayerContext.large_layer).
    large = is_large_layer(layers[0])
    with freed_host_memory_kept(device.type == "cpu" and not large):
        return _calibrate_layers(model, samples, cfg, device, reporter, dtype, max_layers, done_states, on_layer_done,
                                 algorithm, layer_range, store, copy_layers, train_dtype, weight_rounding, gptq, large,
                                 calib_inputs)


def _calibrate_layers(model: nn.Module, samples: torch.Tensor, cfg: FlatQuantConfig, device: torch.device,
                      reporter: Reporter, dtype, max_layers: Optional[int], done_states: Optional[dict[int, dict]],
                      on_layer_done, algorithm, layer_range: Optional[tuple[int, int]],
                      store: Optional[ActivationStore], copy_layers: bool, train_dtype: Optional[torch.dtype],
                      weight_rounding: str, gptq: Optional[GPTQConfig], large: bool,
                      calib_inputs: str) -> list[LayerResult]:
    algo = get_algorithm(algorithm or "flatquant", cfg) if not isinstance(algorithm, LayerAlgorithm) else algorithm
    layers = decoder_layers(model)
    num = len(layers) if max_layers is None else min(max_layers, len(layers))
    start, end = layer_range if layer_range is not None else (0, num)
    end = min(end, num)
    done_states = done_states or {}
    store = store or ActivationStore()
    results: list[LayerResult] = []
    gptq = gptq or GPTQConfig()
    prepare_model(algo, model, unshare=copy_layers)
    if not algo.needs_data and weight_rounding == "rtn":  # nothing to capture: each layer where it is
        for i in range(start, end):
            reporter.check()
            if copy_layers:
                layers[i] = copy.deepcopy(layers[i])
            if i in done_states:
                state = done_states[i]
                rebuild_layer(algo, layers[i], i, state)
            else:
                algo.prepare_layer(layers[i], i, None)
                algo.freeze_layer(layers[i])
                state = algo.layer_state(layers[i])
                algo.fold_layer(layers[i])
            results.append(LayerResult.untrained(i))
            if on_layer_done is not None:
                on_layer_done(i, state, results[-1])
        return results
    try:
        if store.on_disk:
            reporter.emit("capture_on_disk", {"n": samples.shape[0], "folder_path": str(store.folder)})
        else:
            reporter.emit("capture", {"n": samples.shape[0]})
        inps, layer_kwargs = capture_layer_inputs(model, samples, device, store)
        n_steps_layer = algo.steps_per_layer(samples.shape[0])
        step_times: list[float] = []
        current = [start]

        def eta(remaining_in_layer: int) -> Optional[float]:
            if not step_times:
                return None
            per_step = sum(step_times) / len(step_times)
            return per_step * (remaining_in_layer + n_steps_layer * (end - 1 - current[0]))

        bsz = max(1, cfg.cali_bsz)
        q_inps = inps if calib_inputs == "quant" else None  # inputs through the quantized layers so far
        for i in range(end):
            current[0] = i
            reporter.check()
            if i < start:  # a distributed rank: full-precision forward only, to reach its range's inputs
                reporter.emit("forward_to_range", {"i": i + 1, "n": num, "start": start + 1})
                layer = copy.deepcopy(layers[i]) if copy_layers else layers[i]
                keep = storage_dtype(layer)
                home = to_device(layer, device, train_dtype)
                outs, _ = fp_forward_with_stats(layer, inps, layer_kwargs, device, bsz, dtype, store, False)
                to_host(layer, keep, home, changed=False)
                inps = outs
                continue
            if copy_layers:
                layers[i] = copy.deepcopy(layers[i])
            layer = layers[i]
            keep = storage_dtype(layer)
            home = to_device(layer, device, train_dtype)  # folded weights go back into these host tensors
            fp_outs, stats = fp_forward_with_stats(layer, inps, layer_kwargs, device, bsz, dtype, store)
            train_inps = inps if q_inps is None else q_inps
            algo.prepare_layer(layer, i, stats)
            layer.to(device)  # the parameters the algorithm just added
            saved_rounding: dict = {}
            if i in done_states:
                own, saved_rounding = split_rounding_state(done_states[i])
                algo.restore_layer(layer, i, own)
                result = LayerResult.untrained(i)
                reporter.emit("layer_restored", {"i": i + 1, "n": num}, layer=i, num_layers=num)
            else:
                t0 = time.monotonic()
                ctx = LayerContext(train_inps, fp_outs, layer_kwargs, device, dtype, reporter, num, eta, large)
                result = algo.calibrate_layer(layer, i, ctx)
                if n_steps_layer:
                    step_times.append((time.monotonic() - t0) / n_steps_layer)
                reporter.emit("layer_done", {"i": i + 1, "n": num, "first": result.first_loss, "last": result.last_loss,
                                             "change": loss_change(result.first_loss, result.last_loss)},
                              layer=i, num_layers=num, loss=result.last_loss)
            algo.freeze_layer(layer)
            state = algo.layer_state(layer)
            check_trained_layer(i, state, result.first_loss, result.last_loss, reporter)
            algo.fold_layer(layer)
            if weight_rounding == "gptq":
                if saved_rounding:
                    apply_rounding_state(layer, saved_rounding)
                else:
                    reporter.emit("gptq_layer", {"i": i + 1, "n": num}, layer=i, num_layers=num)
                    reporter.check()
                    saved_rounding = _gptq_round(layer, train_inps, layer_kwargs, device, bsz, dtype, gptq)
                    reporter.check()
                state = {**state, **saved_rounding}
            if q_inps is not None:  # the quantized layer's outputs: the next layer trains on what it will see
                q_inps, _ = fp_forward_with_stats(layer, train_inps, layer_kwargs, device, bsz, dtype, store, False)
            to_host(layer, keep, home)
            results.append(result)
            if on_layer_done is not None:
                on_layer_done(i, state, result)
            inps = fp_outs  # full-precision inputs: the next layer's targets (and its training inputs with "fp")
            trim_host_heap()
        return results
    except RuntimeError as exc:
        _oom_guard(exc)
        raise
