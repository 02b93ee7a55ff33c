"""GPTQ weight rounding (Frantar et al.): quantize a linear's weight column by column, feeding each column's rounding
error forward into the columns not yet quantized through the inverse of the layer-input Hessian H = 2/N·Σ xᵀx.

It runs under any algorithm: on the folded (transformed) weight and with the inputs the weight actually sees (after
the module's own online transform), so FlatQuant+GPTQ and QuaRot+GPTQ are the same call.

The grid is the project's (core.quantizer): symmetric, one scale per output channel, scale = clip·absmax / qmax.
Codes are restricted to [-qmax, qmax] (int4: [-7, 7]) and each row's largest-magnitude weight is pinned to ±qmax,
so every row's stored absmax is exactly qmax·scale. The folded model's quantizer (no clip: GPTQ has already applied
it) then re-quantizes the rounded weight to the very same codes, with the same scale up to float rounding: the
deployable model keeps GPTQ's rounding and real == fake still holds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .quantizer import qmax, sym_scale


@dataclass
class GPTQConfig:
    bits: int = 4
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # quantize columns in order of decreasing H diagonal


@torch.no_grad()
def rtn_codes(weight: torch.Tensor, bits: int, clip: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same restricted grid rounded to nearest (the baseline GPTQ is measured against)."""
    w = weight.float()
    scale = _scale(w, bits, clip)
    return _round(w, scale, bits), scale


def _scale(w: torch.Tensor, bits: int, clip: Optional[torch.Tensor]) -> torch.Tensor:
    max_abs = w.abs().amax(dim=1, keepdim=True)
    if clip is not None:
        max_abs = max_abs * clip.float().reshape(-1, 1)
    return sym_scale(max_abs, bits)


def _round(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), -qmax(bits), qmax(bits))


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: Optional[GPTQConfig] = None,
                  clip: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-rounded integer codes (float, in [-qmax, qmax]) and fp32 per-row scales for an [out, in] weight, given
    the [in, in] Hessian of its inputs. ``clip``: per-row clip ratios (LWC), folded into the scales."""
    cfg = cfg or GPTQConfig()
    bits = cfg.bits
    w0 = weight.float()
    rows, cols = w0.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight with {cols} inputs")
    scale = _scale(w0, bits, clip)
    s64 = scale.double()
    pin_col = w0.abs().argmax(dim=1)  # each row's absmax weight: its code is pinned to ±qmax
    pin_code = torch.sign(w0.gather(1, pin_col[:, None]).squeeze(1)).double() * qmax(bits)

    w = w0.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs that were always zero: their weights never matter on this data
    perm = torch.argsort(torch.diagonal(h), descending=True) if cfg.act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    pin_pos = torch.argsort(perm)[pin_col]  # the pinned column's position after the permutation
    h += cfg.damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros_like(w)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s64[:, 0]), -qmax(bits), qmax(bits))
            pinned = pin_pos == i1 + i
            q = torch.where(pinned, pin_code, q)
            err = (col - q * s64[:, 0]) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
            codes[:, i1 + i] = q
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].float(), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float()).to(dtype)


# --- modules and Hessians ---------------------------------------------------------------------------------------


def _weight_holder(module: nn.Module) -> nn.Linear:
    """The nn.Linear whose weight is rounded: the module itself, or the linear inside a FlatQuantLinear."""
    return module if isinstance(module, nn.Linear) else module.linear


@torch.no_grad()
def gptq_linear(module: nn.Module, hessian: torch.Tensor, cfg: Optional[GPTQConfig] = None) -> dict:
    """Replace a linear's weight by its GPTQ rounding, in place. ``module``: an nn.Linear (weight-only rounding at
    cfg.bits) or a folded FlatQuantLinear (its bits, its clip ratio; the clip is then dropped, being in the grid).
    Returns the rounding's proxy losses: tr((W-Q)·H·(W-Q)ᵀ) for GPTQ and for round-to-nearest on the same grid,
    and (``codes`` int8, ``scale`` fp32) the rounding itself, which set_rounded_weight puts back exactly."""
    cfg = cfg or GPTQConfig()
    clip = None
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None:
        if getattr(module, "weight_trans", None) is not None or not getattr(module, "folded", True):
            raise ValueError("GPTQ rounds the folded weight: fold the layer (core.flat.fold_layer) first")
        if quantizer.bits >= 16:
            return {}
        cfg = GPTQConfig(quantizer.bits, cfg.damp, cfg.block_size, cfg.act_order)
        clip = quantizer.clip_ratio()
    w = _weight_holder(module).weight.detach()
    codes, scale = gptq_quantize(w, hessian, cfg, clip)
    rtn, _ = rtn_codes(w, cfg.bits, clip)
    h = hessian.double()

    def proxy(c):
        d = w.double() - c.double() * scale.double()
        return float(((d @ h) * d).sum())

    losses = {"gptq": proxy(codes), "rtn": proxy(rtn)}
    set_rounded_weight(module, codes, scale)
    return dict(losses, codes=codes.to(torch.int8), scale=scale.float())


@torch.no_grad()
def set_rounded_weight(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Put a rounding (integer codes, per-row scales) in as the module's weight and drop its weight clip (it is in
    the scales already; re-quantizing with it again would change the codes)."""
    linear = _weight_holder(module)
    linear.weight.data = dequantize(codes, scale, linear.weight.dtype).to(linear.weight.device)
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.clip is not None:
        quantizer.clip = None


class HessianCollector:
    """Forward hooks that accumulate H = 2/N·Σ xᵀx of each module's input while a layer runs over calibration data,
    the input taken as the weight sees it: after the module's own online transform (``in_trans``), if any.

        with HessianCollector({"q": layer.self_attn.q_proj, ...}) as hc:
            run the layer over the calibration inputs
        hessians = hc.hessians
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def fn(module, args):
            x = args[0].detach()
            trans = getattr(module, "in_trans", None)
            if trans is not None:
                x = trans(x)
            x = x.reshape(-1, x.shape[-1]).double()
            n = x.shape[0]
            prev = self.counts.get(name, 0)
            total = prev + n
            with torch.autocast(x.device.type, enabled=False):  # the layer may run under autocast (bf16)
                xtx = x.t() @ x
            h = self.hessians.get(name)
            self.hessians[name] = xtx * (2.0 / total) if h is None else h * (prev / total) + xtx * (2.0 / total)
            self.counts[name] = total
        return fn

    def __enter__(self) -> "HessianCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def quantized_linears(layer: nn.Module, linear_paths: tuple[str, ...]) -> dict[str, nn.Module]:
    """The layer's linears (by the adapter's paths) whose weights are quantized: FlatQuantLinears with w_bits < 16."""
    found = {}
    for path in linear_paths:
        m = layer.get_submodule(path)
        q = getattr(m, "weight_quantizer", None)
        if q is not None and q.bits < 16:
            found[path] = m
    return found


@torch.no_grad()
def gptq_layer(layer: nn.Module, run: Callable[[], None], linear_paths: tuple[str, ...],
               cfg: Optional[GPTQConfig] = None) -> dict[str, dict]:
    """GPTQ for one folded layer: ``run()`` runs the layer over the calibration inputs (quantization as the caller
    set it) while Hessians are collected, then each quantized linear is rounded. Returns the proxy losses."""
    targets = quantized_linears(layer, linear_paths)
    with HessianCollector(targets) as hc:
        run()
    return {path: gptq_linear(m, hc.hessians[path], cfg) for path, m in targets.items() if path in hc.hessians}


# --- GPTQ as the weight rounding of the layer-wise pipeline (core.calibrate) ------------------------------------

STATE_PREFIX = "gptq."


def split_rounding_state(state: dict) -> tuple[dict, dict]:
    """(the algorithm's own tensors, the GPTQ rounding's) of a saved layer state."""
    own = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    return own, {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}


@torch.no_grad()
def gptq_layer_state(layer: nn.Module, run: Callable[[], None], linear_paths: tuple[str, ...],
                     cfg: Optional[GPTQConfig] = None) -> tuple[dict, dict]:
    """gptq_layer, returning also the state that reproduces the rounding: ``gptq.<path>.codes`` (int8) and
    ``gptq.<path>.scale`` (fp32) per rounded linear. Returns (state, proxy losses per path)."""
    losses = gptq_layer(layer, run, linear_paths, cfg)
    state, proxies = {}, {}
    for path, res in losses.items():
        if "codes" in res:
            state[f"{STATE_PREFIX}{path}.codes"] = res.pop("codes").cpu()
            state[f"{STATE_PREFIX}{path}.scale"] = res.pop("scale").cpu()
        proxies[path] = res
    return state, proxies


@torch.no_grad()
def apply_rounding_state(layer: nn.Module, state: dict) -> None:
    """Inverse of gptq_layer_state on the same folded layer: every saved linear gets its saved rounding."""
    paths = {k[len(STATE_PREFIX):-len(".codes")] for k in state if k.endswith(".codes")}
    for path in sorted(paths):
        module = layer.get_submodule(path)
        codes, scale = state[f"{STATE_PREFIX}{path}.codes"], state[f"{STATE_PREFIX}{path}.scale"]
        w = _weight_holder(module).weight
        if tuple(codes.shape) != tuple(w.shape) or scale.shape[0] != w.shape[0]:
            raise KeyError(f"{STATE_PREFIX}{path}: shape {tuple(codes.shape)} does not match the weight's "
                           f"{tuple(w.shape)}")
        set_rounded_weight(module, codes, scale)
