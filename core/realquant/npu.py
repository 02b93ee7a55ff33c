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

The tests run this backend on any machine through ``tests/torch_npu_double.py``, a double of those ops written from
torch_npu's documentation alone (``NpuBackend(ops=TorchNpuDouble())``).
"""
from __future__ import annotations

import importlib
import warnings

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

