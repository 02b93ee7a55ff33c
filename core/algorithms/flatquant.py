"""FlatQuant's per-layer math: learnable Kronecker transforms, diag scales and clip factors trained with AdamW +
cosine schedule to minimize MSE(quantized layer(x), fp layer(x)) on full-precision inputs; then frozen and folded.
The modules themselves are in core.flat."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError
from ..flat import (flat_state, fold_layer, init_weight_clips, iter_transforms, load_flat_state,
                    set_weight_recompute, wrap_layer)
from ..perplexity import autocast_for
from .base import LayerAlgorithm, LayerContext, LayerResult, run_layer


def trainable_groups(layer: nn.Module, cfg) -> list[dict]:
    """AdamW parameter groups of a wrapped layer: transforms and diag scales at flat_lr, clip factors at 10x."""
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


class FlatQuantAlgorithm(LayerAlgorithm):
    name = "flatquant"
    needs_data = True

    def steps_per_layer(self, nsamples: int) -> int:
        return max(1, nsamples // max(1, min(self.cfg.cali_bsz, nsamples))) * self.cfg.epochs

    def prepare_layer(self, layer: nn.Module, index: int, stats) -> None:
        wrap_layer(layer, index, self.cfg, stats)

    def calibrate_layer(self, layer: nn.Module, index: int, ctx: LayerContext) -> LayerResult:
        init_weight_clips(layer)
        return train_layer(layer, index, ctx, self.cfg)

    def restore_layer(self, layer: nn.Module, index: int, state: dict) -> None:
        load_flat_state(layer, state)

    def freeze_layer(self, layer: nn.Module) -> None:
        for t in iter_transforms(layer):
            t.freeze()

    def layer_state(self, layer: nn.Module) -> dict:
        return flat_state(layer)

    def fold_layer(self, layer: nn.Module) -> None:
        fold_layer(layer)


def enable_training(layer: nn.Module, cfg) -> list[dict]:
    """Freeze the layer except its trainable groups (trainable_groups), which it returns."""
    for p in layer.parameters():
        p.requires_grad_(False)
    groups = trainable_groups(layer, cfg)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def training_loss(layer: nn.Module, transforms: list, x: torch.Tensor, target: torch.Tensor, layer_kwargs: dict,
                  dtype) -> torch.Tensor:
    """One step's MSE(quantized layer(x), target), each transform's matrices computed once for the step. The caller
    drops them (``cache_matrices(False)``) after backward: a large layer's backward recomputes its weights from them."""
    for t in transforms:
        t.cache_matrices(True)
    with autocast_for(layer, dtype):
        out = run_layer(layer, x, layer_kwargs)
    return F.mse_loss(out.float(), target)


def train_layer(layer: nn.Module, index: int, ctx: LayerContext, cfg) -> LayerResult:
    """Minimize MSE(quantized layer(x), fp layer(x)) over the flat parameters with AdamW + cosine schedule."""
    start = time.monotonic()
    reporter, device, num_layers = ctx.reporter, ctx.device, ctx.num_layers
    groups = enable_training(layer, cfg)
    n = ctx.inps.shape[0]
    bsz = max(1, min(cfg.cali_bsz, n))
    steps = max(1, n // bsz)
    losses: list[float] = []
    if not groups or cfg.epochs == 0:
        return LayerResult(index, math.nan, math.nan, 0.0, losses)
    set_weight_recompute(layer, ctx.large_layer)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    transforms = list(iter_transforms(layer))
    total = cfg.epochs * steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.flat_lr * 1e-3)
    done, first_loss = 0, math.nan
    for epoch in range(cfg.epochs):
        epoch_loss = 0.0
        for step in range(steps):
            reporter.check()
            sl = slice(step * bsz, (step + 1) * bsz)
            x, target = ctx.inps[sl].to(device), ctx.fp_outs[sl].to(device)
            loss = training_loss(layer, transforms, x, target, ctx.layer_kwargs, ctx.dtype)
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
            if done == 0:
                first_loss = value  # the first batch's loss before the first step
            done += 1
            reporter.emit("layer_step", {"i": index + 1, "n": num_layers, "epoch": epoch + 1, "epochs": cfg.epochs,
                                         "loss": value},
                          layer=index, num_layers=num_layers, epoch=epoch, epochs=cfg.epochs, step=step, steps=steps,
                          loss=value, eta_s=ctx.eta(total - done))
        losses.append(epoch_loss / steps)
    for p in layer.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), autocast_for(layer, ctx.dtype):  # the first batch again, after the last step: the trend
        last_loss = float(F.mse_loss(run_layer(layer, ctx.inps[:bsz].to(device), ctx.layer_kwargs).float(),
                                     ctx.fp_outs[:bsz].to(device)))
    return LayerResult(index, first_loss, last_loss, time.monotonic() - start, losses)
