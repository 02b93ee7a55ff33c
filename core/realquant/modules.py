"""Modules of a real-quant model: the W4A4 linear on an integer GEMM, and the frozen float parts around it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizer import SharedInputQuant, fake_quant_sym, integer_linear
from ..transforms import kronecker_matmul
from .backends import ActQuant, Backend
from .packing import dequantize_weight, quantize_weight

def _apply_keeping_fp32(module: nn.Module, fn, recurse: bool, names) -> nn.Module:
    """nn.Module._apply, except that the named fp32 buffers keep their exact values: a dtype cast of the module
    (``.to(torch.bfloat16)``) would round them; they follow ``fn`` only in device."""
    kept = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    nn.Module._apply(module, fn, recurse)
    for n, t in kept.items():
        module._buffers[n] = t.to(device=fn(t[:0]).device)
    return module


class RealQuantLinear(nn.Module):
    """y = (s_x ⊗ s_w) · (q_x @ q_wᵀ) + b with int4 (or int8) codes: the integer form of a folded FlatQuantLinear.

    Input: optional online Kronecker transform (down_proj), per-token dynamic quantization with the calibrated clip
    ratio, integer GEMM, per-token × per-channel rescale. The weight tensors are in the backend's own layout;
    ``weight_codes()`` gives the canonical int8 codes back (for export)."""

    _fp32_buffers = ("w_scale",)

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], w_bits: int, a_bits: int, a_clip: Optional[float],
                 trans_left: Optional[torch.Tensor], trans_right: Optional[torch.Tensor], backend: Backend,
                 shared: Optional[SharedInputQuant] = None):
        super().__init__()
        if codes.shape != (out_features, in_features):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a {in_features}->{out_features} linear")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.a_clip = int(w_bits), int(a_bits), None if a_clip is None else float(a_clip)
        self.backend = backend
        self.shared = shared
        tensors = backend.prepare_weight(codes, self.w_bits, self.a_bits)
        self._weight_names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("trans_left", None if trans_left is None else trans_left.detach().clone())
        self.register_buffer("trans_right", None if trans_right is None else trans_right.detach().clone())

    @classmethod
    def from_export_state(cls, state: dict, backend: Backend, shared: Optional[SharedInputQuant] = None,
                          dtype: Optional[torch.dtype] = None) -> "RealQuantLinear":
        """From ``FlatQuantLinear.export_state()``: quantize the folded weight exactly as the fake model does."""
        weight = state["weight"]
        codes, scale = quantize_weight(weight, state["w_bits"], state["w_clip"])
        dtype = dtype or weight.dtype
        bias = None if state["bias"] is None else state["bias"].to(dtype)
        left = None if state["trans_left"] is None else state["trans_left"].to(dtype)
        right = None if state["trans_right"] is None else state["trans_right"].to(dtype)
        return cls(weight.shape[1], weight.shape[0], codes, scale, bias, state["w_bits"], state["a_bits"],
                   state["a_clip"], left, right, backend, shared)

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._weight_names}

    def weight_codes(self) -> torch.Tensor:
        """Canonical int8 codes [out, in]."""
        return self.backend.weight_codes(self.weight_tensors(), self.out_features, self.in_features)

    def act_quant(self) -> ActQuant:
        return ActQuant(self.a_bits, self.a_clip, self.trans_left, self.trans_right)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) must not round the per-channel scales: they keep their fp32 values (only the device moves).
        return _apply_keeping_fp32(self, fn, recurse, self._fp32_buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        tensors = self.weight_tensors()
        out = self.backend.fused_linear(x2, self.act_quant(), tensors, self.out_features, self.w_scale, self.bias,
                                        x.dtype)
        if out is not None:  # few tokens: one kernel call (each member of a shared group quantizes for itself)
            return out.reshape(*shape[:-1], self.out_features)

        def compute():
            return self.backend.quantize(x2, self.act_quant(), tensors)

        qx = self.shared.get(x, compute) if self.shared is not None else compute()
        out = self.backend.matmul(qx, tensors, self.out_features, self.w_scale, self.bias, x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"a_clip={self.a_clip}, transform={self.trans_left is not None}, backend={self.backend.name}")


class FrozenQuantLinear(nn.Module):
    """A FlatQuantLinear that stays fake-quant (weights or activations alone quantized, e.g. a W4A16 config): its
    weight codes are computed once instead of at every forward, and with quantized
    activations it runs the same integer math as the folded fake model (``core.quantizer.integer_linear``)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int, a_bits: int,
                 a_clip: Optional[float], trans_left: Optional[torch.Tensor], trans_right: Optional[torch.Tensor],
                 w_scale: Optional[torch.Tensor] = None):
        """``weight``: the float weight, or with ``w_scale`` the int8 codes."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.w_bits, self.a_bits, self.a_clip = int(w_bits), int(a_bits), None if a_clip is None else float(a_clip)
        if w_scale is None:  # a float weight
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.register_buffer("w_codes", None)
        else:  # int8 codes [out, in] with per-channel scales
            if weight.dtype != torch.int8:
                raise TypeError(f"a quantized FrozenQuantLinear takes int8 codes, got {weight.dtype}")
            self.weight = None
            self.register_buffer("w_codes", weight.detach().clone())
        self.register_buffer("w_scale", None if w_scale is None else w_scale.detach().float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("trans_left", None if trans_left is None else trans_left.detach().clone())
        self.register_buffer("trans_right", None if trans_right is None else trans_right.detach().clone())

    @classmethod
    def from_export_state(cls, state: dict, dtype: Optional[torch.dtype] = None) -> "FrozenQuantLinear":
        weight = state["weight"]
        dtype = dtype or weight.dtype
        w_scale = None
        if state["w_bits"] < 16:
            weight, w_scale = quantize_weight(weight, state["w_bits"], state["w_clip"])
        else:
            weight = weight.to(dtype)
        conv = (lambda t: None if t is None else t.to(dtype))
        return cls(weight, conv(state["bias"]), state["w_bits"], state["a_bits"], state["a_clip"],
                   conv(state["trans_left"]), conv(state["trans_right"]), w_scale)

    def weight_codes(self) -> Optional[torch.Tensor]:
        """int8 codes of the quantized weight (None for a float weight)."""
        return self.w_codes

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp32(self, fn, recurse, ("w_scale",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trans_left is not None:
            x = kronecker_matmul(x, self.trans_left.to(x.dtype), self.trans_right.to(x.dtype))
        clip = None if self.a_clip is None else torch.tensor(self.a_clip, dtype=torch.float32, device=x.device)
        if self.w_codes is not None and self.a_bits < 16:
            return integer_linear(x, self.w_codes, self.w_scale, self.bias, self.a_bits, clip, self.w_bits)
        if self.a_bits < 16:
            x = fake_quant_sym(x, self.a_bits, dim=-1, clip_ratio=clip)
        weight = self.weight if self.w_codes is None else dequantize_weight(self.w_codes, self.w_scale)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"transform={self.trans_left is not None}, fake-quant")


class TransformedNorm(nn.Module):
    """RMSNorm followed by the group's frozen Kronecker transform (a folded FlatNormTransform), computed by
    ``kronecker_matmul`` exactly as in the fake model."""

    def __init__(self, norm: nn.Module, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("left", left.detach().clone())
        self.register_buffer("right", right.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return kronecker_matmul(y, self.left.to(y.dtype), self.right.to(y.dtype))
