"""Layer-by-layer FlatQuant calibration: each decoder layer's transforms, diag scales and clip factors are trained
so that its quantized output matches its full-precision output, on full-precision inputs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlatQuantConfig
from .device import keep_freed_host_memory
from .errors import CalibrationError
from .flat import ActivationStats, fold_layer, flat_state, init_weight_clips, iter_transforms, wrap_layer
from .models import decoder_layers
from .perplexity import autocast_for
from .progress import Reporter
from .validate import check_trained_layer, loss_change


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 for each sample [N, L, H] (fp32, cpu) and the keyword arguments the
    model passes to its layers (rotary embeddings, mask), captured by a pre-hook that stops the forward there."""
    layer0 = decoder_layers(model)[0]
    inps: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inps.append(hidden.detach().float().cpu())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(samples.shape[0]):
            try:
                model(input_ids=samples[i:i + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen["past_key_values"] = None
    kwargs_seen["use_cache"] = False
    return torch.cat(inps, 0), kwargs_seen


def run_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def fp_forward_with_stats(layer: nn.Module, inps: torch.Tensor, layer_kwargs: dict, device: torch.device,
                          batch_size: int, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, ActivationStats]:
    """Full-precision outputs of one layer and the per-channel absmax of each transform group's input."""
    stats = ActivationStats()

    def absmax_hook(name, use_input):
        def fn(_m, args, output):
            t = args[0] if use_input else output
            cur = t.detach().reshape(-1, t.shape[-1]).abs().amax(0).float().cpu()
            prev = getattr(stats, name)
            setattr(stats, name, cur if prev is None else torch.maximum(prev, cur))
        return fn

    handles = [layer.input_layernorm.register_forward_hook(absmax_hook("qkv", False)),
               layer.post_attention_layernorm.register_forward_hook(absmax_hook("up_gate", False)),
               layer.mlp.down_proj.register_forward_hook(absmax_hook("down", True))]
    outs = torch.empty_like(inps)
    try:
        for s in range(0, inps.shape[0], batch_size):
            with autocast_for(layer, dtype):
                outs[s:s + batch_size] = run_layer(layer, inps[s:s + batch_size].to(device), layer_kwargs).float().cpu()
    finally:
        for h in handles:
            h.remove()
    return outs, stats


def _param_groups(layer: nn.Module, cfg: FlatQuantConfig) -> list[dict]:
    trans, clips = [], []
    for name, p in layer.named_parameters():
        if ".skew" in name or name.endswith(".s") or name.endswith("trans.diag"):
            if cfg.cali_trans or name.endswith("diag"):
                trans.append(p)
        elif name.endswith("quantizer.clip"):
            clips.append(p)
    groups = []
    if trans:
        groups.append({"params": trans, "lr": cfg.flat_lr})
    if clips:
        groups.append({"params": clips, "lr": cfg.flat_lr * 10})  # clip factors learn 10x faster (paper)
    return groups


@dataclass
class LayerResult:
    index: int
    first_loss: float  # the first batch's loss before the first step
    last_loss: float  # the same batch's loss after the last step
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch


def train_layer(layer: nn.Module, index: int, num_layers: int, inps: torch.Tensor, fp_outs: torch.Tensor,
                layer_kwargs: dict, cfg: FlatQuantConfig, device: torch.device, dtype: Optional[torch.dtype],
                reporter: Reporter, eta: Callable[[int], Optional[float]]) -> LayerResult:
    """Minimize MSE(quantized layer(x), fp layer(x)) over the flat parameters with AdamW + cosine schedule."""
    start = time.monotonic()
    for p in layer.parameters():
        p.requires_grad_(False)
    groups = _param_groups(layer, cfg)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    n = inps.shape[0]
    bsz = max(1, min(cfg.cali_bsz, n))
    steps = max(1, n // bsz)
    losses: list[float] = []
    if not groups or cfg.epochs == 0:
        return LayerResult(index, math.nan, math.nan, 0.0, losses)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    transforms = list(iter_transforms(layer))
    total = cfg.epochs * steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.flat_lr * 1e-3)
    done = 0
    for epoch in range(cfg.epochs):
        epoch_loss = 0.0
        for step in range(steps):
            reporter.check()
            sl = slice(step * bsz, (step + 1) * bsz)
            x, target = inps[sl].to(device), fp_outs[sl].to(device)
            for t in transforms:
                t.cache_matrices(True)
            with autocast_for(layer, dtype):
                out = run_layer(layer, x, layer_kwargs)
            loss = F.mse_loss(out.float(), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise CalibrationError(f"Loss became {value} at layer {index}, epoch {epoch}; lower --flat_lr "
                                       f"(now {cfg.flat_lr:g}) or check the model's weights for NaN/inf.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for t in transforms:
                t.cache_matrices(False)
            epoch_loss += value
            first_loss = value if done == 0 else first_loss
            done += 1
            reporter.emit("calibrate", f"layer {index + 1}/{num_layers} epoch {epoch + 1}/{cfg.epochs} loss {value:.6g}",
                          layer=index, num_layers=num_layers, epoch=epoch, epochs=cfg.epochs, step=step, steps=steps,
                          loss=value, eta_s=eta(total - done))
        losses.append(epoch_loss / steps)
    for p in layer.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), autocast_for(layer, dtype):  # the first batch again, after the last step: the trend
        last_loss = float(F.mse_loss(run_layer(layer, inps[:bsz].to(device), layer_kwargs).float(),
                                     fp_outs[:bsz].to(device)))
    return LayerResult(index, first_loss, last_loss, time.monotonic() - start, losses)


def _oom_guard(exc: BaseException) -> None:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        raise CalibrationError("Out of memory during calibration; lower --nsamples, --seqlen or --cali_bsz, "
                               "or use a device with more memory.") from exc


def calibrate_model(model: nn.Module, samples: torch.Tensor, cfg: FlatQuantConfig, device: torch.device,
                    reporter: Reporter, dtype: Optional[torch.dtype | str] = "auto",
                    max_layers: Optional[int] = None, done_states: Optional[dict[int, dict]] = None,
                    on_layer_done: Optional[Callable[[int, dict, LayerResult], None]] = None) -> list[LayerResult]:
    """Calibrate (and fold) decoder layers in place. ``done_states`` holds layers finished by an interrupted run
    (resume): they are rebuilt from their saved tensors instead of retrained. Returns per-layer results."""
    from .flat import load_flat_state

    if device.type == "cpu":
        keep_freed_host_memory()
    layers = decoder_layers(model)
    num = len(layers) if max_layers is None else min(max_layers, len(layers))
    done_states = done_states or {}
    try:
        reporter.emit("capture", f"capturing layer-0 inputs for {samples.shape[0]} samples")
        inps, layer_kwargs = capture_layer_inputs(model, samples, device)
        n_steps_layer = max(1, samples.shape[0] // max(1, cfg.cali_bsz)) * cfg.epochs
        results: list[LayerResult] = []
        step_times: list[float] = []

        def eta(remaining_in_layer: int) -> Optional[float]:
            if not step_times:
                return None
            per_step = sum(step_times) / len(step_times)
            return per_step * (remaining_in_layer + n_steps_layer * (num - 1 - current[0]))

        current = [0]
        for i in range(num):
            current[0] = i
            reporter.check()
            layer = layers[i]
            fp_outs, stats = fp_forward_with_stats(layer, inps, layer_kwargs, device, max(1, cfg.cali_bsz), dtype)
            wrap_layer(layer, i, cfg, stats)
            layer.to(device)
            if i in done_states:
                load_flat_state(layer, done_states[i])
                result = LayerResult(i, math.nan, math.nan, 0.0)
                reporter.emit("layer_done", f"layer {i + 1}/{num} restored from the resume checkpoint",
                              layer=i, num_layers=num)
            else:
                init_weight_clips(layer)
                t0 = time.monotonic()
                result = train_layer(layer, i, num, inps, fp_outs, layer_kwargs, cfg, device, dtype, reporter, eta)
                if n_steps_layer:
                    step_times.append((time.monotonic() - t0) / n_steps_layer)
                for t in iter_transforms(layer):
                    t.freeze()
                reporter.emit("layer_done", f"layer {i + 1}/{num} done, loss {result.first_loss:.4g} -> "
                              f"{result.last_loss:.4g} ({loss_change(result.first_loss, result.last_loss)})",
                              layer=i, num_layers=num, loss=result.last_loss)
            state = flat_state(layer)
            check_trained_layer(i, state, result.first_loss, result.last_loss, reporter)
            fold_layer(layer)
            results.append(result)
            if on_layer_done is not None:
                on_layer_done(i, state, result)
            inps = fp_outs  # the next layer trains on full-precision inputs
        return results
    except RuntimeError as exc:
        _oom_guard(exc)
        raise
