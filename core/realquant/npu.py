"""Ascend NPU backend, written against the documented torch_npu API (it cannot run on this machine).

- weights: ``npu_convert_weight_to_int4pack(..., inner_k_tiles=1)`` (int32 codes [N, K] -> int32 [N, K/8], 8 int4 per
  word), as vllm-ascend packs them; the matmul
  takes its transpose view, the layout torch_npu documents for x2 of shape (k//8, n).
- activations with an online transform (down_proj): ``npu_kronecker_quant(x[T, a, b], P1, P2, clip_ratio)``
  computes P1·(X·P2) and per-token int4 codes in one kernel (``dst_dtype=torch.int32``, at most 32768 tokens per
  call: larger inputs are split, as vllm-ascend does); our transform is leftᵀ·X·right, so P1 = leftᵀ,
  P2 = right. Without a transform (q/k/v, gate/up: the norm already applied it): ``npu_dynamic_quant(x,
  dst_type=torch.quint4x2)`` when there is no clip ratio, else the same kernel with identity factors.
- GEMM: ``npu_quant_matmul(x1, x2, scale, pertoken_scale=..., output_dtype=bf16|fp16)``, int32-packed int4 inputs,
  per-channel ``scale`` and per-token ``pertoken_scale`` in the epilogue; the bias is added after (the int4
  variant takes none).
- widths that are not multiples of 8 (or 8-bit codes) use the int8 variant of the same ops.

``TorchReferenceOps`` implements those five functions in plain PyTorch from their documentation, so the packing,
shape and scale logic of this backend runs and is tested on any machine: ``NpuBackend(ops=TorchReferenceOps())``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

from ..device import npu_available
from ..kernels import QuantizedInput
from .backends import ActQuant, Backend, quantize_per_token, register_backend, transform_input
from .packing import pack_int4_as_int32, unpack_int4_from_int32

# npu_kronecker_quant limits (CANN FlatQuant op), called as vllm-ascend calls it: factor sizes up to 256, the right
# factor a multiple of 8 (int32 output, dst_dtype=torch.int32), at most 32768 tokens per call (larger inputs are
# split). Older CANN releases also want the right factor a multiple of 16 (warned once). Outside the limits the
# transform runs as two matmuls and the plain quantizer follows.
KRON_MAX_FACTOR = 256
KRON_MAX_TOKENS = 32768
_warned: set = set()


def _kron_fits(left: torch.Tensor, right: torch.Tensor) -> bool:
    a, b = left.shape[0], right.shape[0]
    fits = a <= KRON_MAX_FACTOR and b <= KRON_MAX_FACTOR and b % 8 == 0
    if fits and b % 16 and b not in _warned:
        _warned.add(b)
        warnings.warn(f"npu_kronecker_quant: right factor {b} is not a multiple of 16; CANN releases before "
                      "8.2 may reject it.", stacklevel=3)
    return fits


def kronecker_quant_chunked(ops, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip: float):
    """npu_kronecker_quant over x [T, a, b] in calls of at most KRON_MAX_TOKENS tokens; outputs concatenated."""
    outs = [ops.npu_kronecker_quant(chunk, p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
            for chunk in torch.split(x, KRON_MAX_TOKENS, dim=0)]
    if len(outs) == 1:
        return outs[0]
    return torch.cat([q for q, _ in outs]), torch.cat([s for _, s in outs])


class TorchReferenceOps:
    """The documented semantics of the torch_npu ops this backend calls, in plain PyTorch (any device)."""

    @staticmethod
    def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
        if weight.dtype != torch.int32 or weight.dim() != 2 or weight.shape[-1] % 8:
            raise RuntimeError("npu_convert_weight_to_int4pack: int32 2-D weight with last dim % 8 == 0 expected")
        if int(weight.min()) < -8 or int(weight.max()) > 7:
            raise RuntimeError("npu_convert_weight_to_int4pack: values must lie in [-8, 7]")
        return pack_int4_as_int32(weight)

    @staticmethod
    def npu_kronecker_quant(x: torch.Tensor, kronecker_p1: torch.Tensor, kronecker_p2: torch.Tensor,
                            clip_ratio: Optional[float] = None, dst_dtype=None):
        """x [T, a, b] -> (int32 [T, a, b/8] int4 codes, fp32 [T] scales); scale = clip·absmax/7."""
        t, a, b = x.shape
        if t > KRON_MAX_TOKENS or max(a, b) > KRON_MAX_FACTOR or b % 8:
            raise RuntimeError(f"npu_kronecker_quant: [{t}, {a}, {b}] is outside the kernel's limits")
        if dst_dtype not in (None, torch.int32):
            raise RuntimeError("npu_kronecker_quant: dst_dtype must be torch.int32 for int4 output")
        y = torch.matmul(kronecker_p1, torch.matmul(x, kronecker_p2)).reshape(t, a * b)
        q, s = quantize_per_token(y, 4, 1.0 if clip_ratio is None else float(clip_ratio))
        return pack_int4_as_int32(q).reshape(t, a, b // 8), s.reshape(t)

    @staticmethod
    def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
        if smooth_scales is not None or group_index is not None:
            raise NotImplementedError("smooth_scales/group_index are not used by this backend")
        bits = 4 if dst_type == torch.quint4x2 else 8
        q, s = quantize_per_token(x, bits, None)
        if bits == 4:
            q = pack_int4_as_int32(q)
        return q, s.reshape(x.shape[:-1])

    @staticmethod
    def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset=None,
                         pertoken_scale=None, bias=None, output_dtype=None) -> torch.Tensor:
        if x1.dtype == torch.int32:  # int4 codes, 8 per word; x2 is the (k/8, n) transpose view of (n, k/8)
            if bias is not None:
                raise RuntimeError("npu_quant_matmul: the int4 (int32) variant takes no bias")
            a = unpack_int4_from_int32(x1)
            b = unpack_int4_from_int32(x2.t()).t()
        else:
            a, b = x1, x2
        acc = a.to(torch.int64) @ b.to(torch.int64)
        out = acc.float() * scale.float()
        if pertoken_scale is not None:
            out = out * pertoken_scale.float().reshape(-1, 1)
        if bias is not None:
            out = out + bias.float()
        return out.to(output_dtype or torch.int8)


def _torch_npu():
    return importlib.import_module("torch_npu")


@register_backend
class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"
    description = "torch_npu fused int4 kernels (Ascend)"

    def __init__(self, ops=None):
        self.ops = ops if ops is not None else _torch_npu()

    @classmethod
    def available(cls) -> bool:
        return npu_available()

    @staticmethod
    def _int4(w_bits: int, a_bits: int, in_features: int) -> bool:
        return w_bits <= 4 and a_bits <= 4 and in_features % 8 == 0

    def prepare_weight(self, codes, w_bits, a_bits=4):
        if self._int4(w_bits, a_bits, codes.shape[1]):
            packed = self.ops.npu_convert_weight_to_int4pack(codes.to(torch.int32).contiguous(), inner_k_tiles=1)
            return {"qweight_int4": packed}
        return {"qweight": codes.to(torch.int8).contiguous()}

    def weight_codes(self, tensors, out_features, in_features):
        if "qweight_int4" in tensors:
            return unpack_int4_from_int32(tensors["qweight_int4"])
        return tensors["qweight"]

    def quantize(self, x, act: ActQuant, tensors):
        m, k = x.shape
        if x.dtype not in (torch.float16, torch.bfloat16):
            x = x.to(torch.bfloat16)  # the fused quant kernels read fp16/bf16 only
        if "qweight_int4" in tensors:
            if act.left is not None and _kron_fits(act.left, act.right):
                a, b = act.left.shape[0], act.right.shape[0]
                q, s = kronecker_quant_chunked(self.ops, x.reshape(m, a, b), act.left.t().to(x.dtype),
                                               act.right.to(x.dtype), act.clip or 1.0)
                return QuantizedInput(q.reshape(m, k // 8), s.reshape(m).float())
            x = transform_input(x, act)
            if act.clip is None:
                q, s = self.ops.npu_dynamic_quant(x, dst_type=torch.quint4x2)
                return QuantizedInput(q, s.reshape(m).float())
            q, s = quantize_per_token(x, act.bits, act.clip)
            return QuantizedInput(pack_int4_as_int32(q), s.reshape(m))
        q, s = quantize_per_token(transform_input(x, act), act.bits, act.clip)
        return QuantizedInput(q, s.reshape(m))

    def matmul(self, qx, tensors, out_features, w_scale, bias, out_dtype):
        # The fused epilogue writes bf16/fp16 only; fp32 models get bf16 rounding of each output here.
        kernel_dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
        w = tensors["qweight_int4"] if "qweight_int4" in tensors else tensors["qweight"]
        out = self.ops.npu_quant_matmul(qx.q, w.t(), w_scale.float(), pertoken_scale=qx.scale.float(),
                                        output_dtype=kernel_dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(out_dtype)

