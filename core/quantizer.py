"""Symmetric integer quantization math (fake-quant with straight-through rounding) and learnable clipping."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# sigmoid(4.0) = 0.982: the clip factors start just inside the absmax, as in the FlatQuant paper.
CLIP_INIT = 4.0


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return (x.round() - x).detach() + x


def sym_scale(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    return (max_abs / qmax(bits)).clamp(min=1e-8)


def quantize_sym(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) in [-2^(b-1), 2^(b-1)-1]; differentiable through round_ste."""
    return torch.clamp(round_ste(x / scale), -qmax(bits) - 1, qmax(bits))


def fake_quant_sym(x: torch.Tensor, bits: int, dim: int = -1, clip_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize with one scale per slice along ``dim`` (per token: dim=-1 of activations; per output
    channel: dim=1 of an [out, in] weight). Computed in fp32 whatever the input dtype."""
    if bits >= 16:
        return x
    xf = x.float()
    max_abs = xf.abs().amax(dim=dim, keepdim=True)
    if clip_ratio is not None:
        max_abs = max_abs * clip_ratio
    scale = sym_scale(max_abs, bits)
    return (quantize_sym(xf, scale, bits) * scale).to(x.dtype)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer with learnable weight clipping (LWC)."""

    def __init__(self, out_features: int, bits: int, lwc: bool):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.full((out_features, 1), CLIP_INIT)) if (lwc and bits < 16) else None

    def clip_ratio(self) -> Optional[torch.Tensor]:
        return torch.sigmoid(self.clip) if self.clip is not None else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_sym(weight, self.bits, dim=1, clip_ratio=self.clip_ratio())

    @torch.no_grad()
    def init_clip_mse(self, weight: torch.Tensor, grid: int = 20, low: float = 0.5) -> None:
        """Start each channel's clip at the ratio (of a grid in [low, 1]) with the smallest quantization error:
        with only a few dozen training steps, a good start matters more than the learning rate."""
        if self.clip is None:
            return
        w = weight.detach().float()
        best_err = torch.full((w.shape[0], 1), float("inf"))
        best = torch.ones(w.shape[0], 1)
        for r in torch.linspace(low, 1.0, grid + 1).tolist():
            err = ((fake_quant_sym(w, self.bits, dim=1, clip_ratio=torch.tensor(r)) - w) ** 2).sum(1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
        # logit of the ratio, capped where sigmoid would saturate
        self.clip.data = torch.logit(best.clamp(max=0.995)).to(self.clip)


class ActQuantizer(nn.Module):
    """Per-token dynamic symmetric activation quantizer with an optional learnable clip (LAC, one per layer)."""

    def __init__(self, bits: int, lac: bool):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.tensor(CLIP_INIT)) if (lac and bits < 16) else None

    def clip_ratio(self) -> Optional[torch.Tensor]:
        return torch.sigmoid(self.clip) if self.clip is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_sym(x, self.bits, dim=-1, clip_ratio=self.clip_ratio())


def fake_quant_asym(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize, used for the kv-cache when k_sym/v_sym is False."""
    if bits >= 16:
        return x
    xf = x.float()
    lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(round_ste(xf / scale) + zero, 0, levels)
    return ((q - zero) * scale).to(x.dtype)
