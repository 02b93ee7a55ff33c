"""Real-quant kernel backends: one interface, chosen automatically from the model's device, overridable by name.

A backend turns the canonical form of a quantized linear (int8 codes [out, in] holding int4/int8 values, fp32
per-channel scales) into whatever its fastest kernel reads (``prepare_weight``), quantizes activations per token
(after the optional online Kronecker transform, ``quantize``) and runs the integer GEMM with the per-token ×
per-channel rescale (``matmul``). ``weight_codes`` gives the canonical codes back for export.

- ``cpu``: the native kernels of ``core.kernels`` when they build (int4 weights in memory, fused quantize
  and epilogue; AVX-512 VNNI, AVX-VNNI, AVX2, NEON dot product or portable C, picked from the CPU's flags),
  otherwise the ``cpu-torch`` path.
- ``cpu-torch``: PyTorch's int8 GEMM (``torch._int_mm``, oneDNN on x86) on int8-held int4 codes where the CPU has
  VNNI, else an exact fp32 GEMM of the codes (``core.quantizer.code_matmul``); any width.
- ``cuda``: ``torch._int_mm`` (cuBLASLt int8) with the padding its shape rules need.
- ``npu``: torch_npu's fused kernels (see ``core.realquant.npu``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import kernels as native_kernels
from ..device import npu_available
from ..errors import ConfigError
from ..kernels import QuantizedInput
from ..quantizer import code_matmul, int_mm, qmax
from ..transforms import SMALL_ROWS, kronecker_matmul

_EPS = 1e-8  # core.quantizer.sym_scale's floor: an all-zero token gets scale 1e-8 and codes 0
# Up to this many tokens a linear runs as one native call (transform + quantize + GEMM; decode steps): q/k/v then
# quantize their shared input each, which costs less than the two extra calls would.
FUSED_MAX_ROWS = 4


@dataclass
class ActQuant:
    """How a linear's input is quantized: bits, calibrated clip ratio, optional online transform leftᵀ·X·right."""

    bits: int
    clip: Optional[float] = None
    left: Optional[torch.Tensor] = None
    right: Optional[torch.Tensor] = None


def transform_input(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    if act.left is None:
        return x
    return kronecker_matmul(x, act.left.to(x.dtype), act.right.to(x.dtype))


def quantize_per_token(x: torch.Tensor, bits: int, clip: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 [M, 1] scales; the fake-quant formula (``core.quantizer.fake_quant_sym``) in fewer passes."""
    max_abs = x.abs().amax(dim=-1, keepdim=True).float()
    if clip is not None:
        max_abs = max_abs * clip
    scale = (max_abs / qmax(bits)).clamp_(min=_EPS)
    q = torch.div(x, scale).round_().clamp_(-qmax(bits) - 1, qmax(bits)).to(torch.int8)
    return q, scale


def rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
            out_dtype: torch.dtype) -> torch.Tensor:
    """int32 accumulators [M, N] -> out_dtype: acc · s_token · s_channel (+ bias)."""
    out = torch.mul(acc, w_scale)  # int32 × fp32 -> fp32
    out.mul_(x_scale)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out.to(out_dtype)


class Backend:
    """Base class; subclasses register themselves with ``@register_backend``. The backends of other modules
    (``core.realquant.npu``) are registered by the package ``core.realquant``, which imports them: every import
    of this module goes through that package first, so the registry is complete before anyone reads it."""

    name = "base"
    device_type = "cpu"
    description = ""

    @classmethod
    def available(cls) -> bool:
        return True

    def prepare_weight(self, codes: torch.Tensor, w_bits: int, a_bits: int = 4) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weight_codes(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, act: ActQuant, tensors: dict[str, torch.Tensor]) -> QuantizedInput:
        raise NotImplementedError

    def matmul(self, qx: QuantizedInput, tensors: dict[str, torch.Tensor], out_features: int, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def fused_linear(self, x: torch.Tensor, act: ActQuant, tensors: dict[str, torch.Tensor], out_features: int,
                     w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype
                     ) -> Optional[torch.Tensor]:
        """``matmul(quantize(x))`` in one kernel call where the backend has one (few-token calls), else None."""
        return None

    def __deepcopy__(self, memo):
        return self  # stateless apart from loaded kernels: copies of a model share their backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register_backend(cls):
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return list(_REGISTRY)


def available_backends() -> list[str]:
    return [n for n, cls in _REGISTRY.items() if cls.available()]


def select_backend(name: str | Backend = "auto", device: Optional[torch.device | str] = None) -> Backend:
    """``auto``: the backend for ``device`` (npu, cuda or cpu; the fastest cpu one that works). A name forces it."""
    if isinstance(name, Backend):
        return name
    name = (name or "auto").lower()
    device = torch.device(device) if device is not None else None
    if name == "auto":
        if device is None:
            dev = "npu" if npu_available() else ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = device.type
        if dev == "npu":
            name = "npu"
        elif dev == "cuda":
            name = "cuda"
        else:
            name = "cpu"
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown real-quant backend {name!r}; choose from auto, {', '.join(_REGISTRY)}.")
    cls = _REGISTRY[name]
    if not cls.available():
        raise ConfigError(f"Real-quant backend {name!r} is not available here ({cls.description}); use --backend auto.")
    if device is not None and device.type != cls.device_type:
        raise ConfigError(f"Real-quant backend {name!r} runs on {cls.device_type}, but the model is on {device.type}; "
                          f"move the model or pick another backend.")
    return cls()


# --- PyTorch int8 GEMM (CPU) -----------------------------------------------------------------------------------


@register_backend
class TorchCpuBackend(Backend):
    """int8-held codes [N, K] (1 byte per weight in memory) and torch._int_mm (oneDNN s8·s8->s32 on x86)."""

    name = "cpu-torch"
    device_type = "cpu"
    description = "PyTorch int8 GEMM (torch._int_mm) with VNNI, else an exact fp32 GEMM of the codes"

    def prepare_weight(self, codes, w_bits, a_bits=4):
        return {"qweight": codes.to(torch.int8).contiguous()}

    def weight_codes(self, tensors, out_features, in_features):
        return tensors["qweight"]

    def quantize(self, x, act, tensors):
        q, s = quantize_per_token(transform_input(x, act), act.bits, act.clip)
        return QuantizedInput(q, s, {"bits": act.bits})

    def matmul(self, qx, tensors, out_features, w_scale, bias, out_dtype):
        # torch._int_mm where it is fast ([N, K] read as its transpose: oneDNN takes the column-major B directly),
        # else the exact fp32 GEMM of the codes (CPUs without VNNI); the int8-held codes may be 8-bit ones
        acc = code_matmul(qx.q, tensors["qweight"], qx.extra["bits"], 8)
        return rescale(acc, qx.scale, w_scale, bias, out_dtype)


@register_backend
class CpuBackend(TorchCpuBackend):
    """The native kernels (int4 in memory) when they build on this machine, else exactly the cpu-torch path.
    8-bit weights (an int8 lm_head) run on the same kernels as two int4 planes (NativeKernels.prepare_weight8)."""

    name = "cpu"
    description = "native int4 kernels (AVX-512 VNNI / AVX-VNNI / AVX2 / NEON / portable), else cpu-torch"

    def __init__(self):
        self.native = native_kernels.load()

    @property
    def uses_native(self) -> bool:
        return self.native is not None

    def prepare_weight(self, codes, w_bits, a_bits=4):
        if self.native is None or w_bits > 8 or a_bits > 8 or codes.device.type != "cpu":
            return super().prepare_weight(codes, w_bits, a_bits)
        if w_bits <= 4:
            return self.native.prepare_weight(codes)
        if codes.shape[1] <= native_kernels.INT8_PLANES_MAX_K:
            return self.native.prepare_weight8(codes)
        return super().prepare_weight(codes, w_bits, a_bits)

    @staticmethod
    def _native_layout(tensors) -> bool:
        return "qweight_vnni" in tensors or "qweight_vnni_hi" in tensors

    def weight_codes(self, tensors, out_features, in_features):
        if self._native_layout(tensors):
            return self.native.weight_codes(tensors, out_features, in_features)
        return super().weight_codes(tensors, out_features, in_features)

    def quantize(self, x, act, tensors):
        if self._native_layout(tensors) and act.bits <= 8:
            return self.native.quantize(transform_input(x, act), act.bits, act.clip)
        return super().quantize(x, act, tensors)

    def matmul(self, qx, tensors, out_features, w_scale, bias, out_dtype):
        if "qweight_vnni_hi" in tensors:
            return self.native.matmul8(qx, tensors, out_features, w_scale, bias, out_dtype)
        if "qweight_vnni" in tensors:
            return self.native.matmul(qx, tensors, out_features, w_scale, bias, out_dtype)
        return super().matmul(qx, tensors, out_features, w_scale, bias, out_dtype)

    def fused_linear(self, x, act, tensors, out_features, w_scale, bias, out_dtype):
        # the transform runs natively, as kronecker_matmul does for this few rows (SMALL_ROWS), on factors in x's
        # dtype as transform_input casts them: the same numbers as the separate calls
        if "qweight_vnni" not in tensors or act.bits > 8 or x.shape[0] > min(FUSED_MAX_ROWS, SMALL_ROWS) \
                or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        left = None if act.left is None else act.left.to(x.dtype)
        right = None if act.right is None else act.right.to(x.dtype)
        return self.native.linear(x, act.bits, act.clip, left, right, tensors, out_features, w_scale, bias, out_dtype)


# --- CUDA ---------------------------------------------------------------------------------------------------------


@register_backend
class CudaBackend(Backend):
    """torch._int_mm on cuBLASLt. Its rules (M > 16, K and N multiples of 8) are met by zero padding (the weight
    once here, the tokens in ``core.quantizer.int_mm``): zero codes add nothing, so results are exact for any width."""

    name = "cuda"
    device_type = "cuda"
    description = "CUDA int8 GEMM (torch._int_mm / cuBLASLt)"

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    def prepare_weight(self, codes, w_bits, a_bits=4):
        n, k = codes.shape
        padded = torch.nn.functional.pad(codes.to(torch.int8), (0, -k % 8, 0, -n % 8))
        return {"qweight": padded.contiguous()}

    def weight_codes(self, tensors, out_features, in_features):
        return tensors["qweight"][:out_features, :in_features]

    def quantize(self, x, act, tensors):
        q, s = quantize_per_token(transform_input(x, act), act.bits, act.clip)
        return QuantizedInput(q, s)

    def matmul(self, qx, tensors, out_features, w_scale, bias, out_dtype):
        acc = int_mm(qx.q, tensors["qweight"])[:, :out_features]
        return rescale(acc, qx.scale, w_scale, bias, out_dtype)
