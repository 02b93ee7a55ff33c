"""A test double of torch_npu: the four ops core.realquant.npu.NpuBackend calls, written from torch_npu's
documentation alone. It imports nothing from ``core``: a packing, layout or scale bug in the backend cannot be
mirrored here, so the tests that run the backend through it compare two independent readings of the documents.

Semantics implemented (torch_npu API pages, CANN aclnn pages, op-plugin's sources):

- ``npu_convert_weight_to_int4pack(weight, inner_k_tiles=0)``: ``weight`` int32, 2-D, contiguous, last dim a multiple
  of 8, values in [-8, 7]; returns int32 [d0, d1 / 8]. Word j of a row holds elements 8j..8j+7, element 8j + i in bits
  4i..4i+3 as a two's complement nibble (op-plugin's convert_to_int4_pack: ``(a & 0xF) | (b & 0xF) << 4 | ... |
  (h & 0xF) << 28``). ``inner_k_tiles`` is documented as reserved, unused.
- ``npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None)``: per-token symmetric,
  ``scale = rowMax(|x|) / DTYPE_MAX`` (127 for int8, 7 for ``torch.quint4x2``), ``y = round(x / scale)``; ``scale``
  float32 of shape ``x.shape[:-1]``; x float16/bfloat16; with ``quint4x2`` the last dim is a multiple of 8 and y comes
  packed 8 per int32 as above.
- ``npu_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio=1.0, dst_dtype=torch.int32)`` (aclnnFlatQuant):
  x [K, M, N] float16/bfloat16, P1 [M, M] and P2 [N, N] of x's dtype, M, N <= 256, N a multiple of 8, K <= 262144;
  ``x'' = P1 @ (x @ P2)``, ``quantScale[k] = max|x''[k]| / (7 / clip_ratio)`` (the CANN 8.5 / ops-nn page; older
  pages print ``7 * clipRatio``, but only this form narrows the range for a ratio in (0, 1], which is what a FlatQuant
  clip ratio means and what vllm-ascend passes; ``variant(CLIP_OLD)`` computes the older form), ``out = x'' /
  quantScale`` rounded and saturated to int4 [-8, 7], packed 8 per int32 along N: (int32 [K, M, N / 8], float32 [K]).
- ``npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None)``: int8 x1
  [m, k] and x2 [k, n]; or int32 (int4, 8 per word) x1 [m, k / 8] contiguous and x2 either [k, n / 8] contiguous or
  [k / 8, n] as the transpose of a contiguous [n, k / 8]. ``out = (x1 @ x2) * scale * pertoken_scale[:, None]
  (+ bias)`` with exact integer sums, cast to ``output_dtype`` (None: int8). The int4 row of the documented dtype table
  with ``pertoken_scale``: float32 scale, no bias, bfloat16/float16 output.

Rounding is round-half-to-even (``torch.round``) wherever the documents say "round".
"""
from __future__ import annotations

import types
from typing import Optional

import torch

INT4_PER_WORD = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # element i of a word sits in bits 4i..4i+3
KRON_LIMITS = {"tokens": 262144, "factor": 256}
# npu_kronecker_quant's activation scale from the per-token peak and clip_ratio: the current page's form, and the
# form older (CANN 8.1/8.2) pages print; an older kernel's range check on clip_ratio is not modelled (any ratio > 0)
CLIP_CURRENT, CLIP_OLD = "clip * max / 7", "max / (7 * clip)"
CLIP_CONVENTIONS = {CLIP_CURRENT: lambda peak, ratio: peak / (7 / ratio),
                    CLIP_OLD: lambda peak, ratio: peak / (7 * ratio)}
OPS = ("npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_kronecker_quant", "npu_quant_matmul")


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """Integer values in [-8, 7], [..., 8n] -> int32 [..., n] in the documented word layout."""
    nibbles = (codes.to(torch.int64) & 0xF).reshape(*codes.shape[:-1], -1, INT4_PER_WORD)
    words = (nibbles << _SHIFTS).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> int64 values in [-8, 7], [..., 8n]."""
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).reshape(*words.shape[:-1], -1)


def _check(ok: bool, op: str, what: str) -> None:
    if not ok:
        raise RuntimeError(f"{op}: {what}")


def _half_input(x: torch.Tensor, op: str) -> None:
    _check(x.dtype in (torch.float16, torch.bfloat16), op, f"x must be float16/bfloat16, got {x.dtype}")


class TorchNpuDouble:
    """The four ops, as static methods (``NpuBackend(ops=TorchNpuDouble())``, or ``module()`` for sys.modules);
    ``variant()`` gives one with another kronecker clip convention or token limit."""

    CLIP_CONVENTION = CLIP_CURRENT
    MAX_TOKENS = KRON_LIMITS["tokens"]

    @staticmethod
    def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
        op = "npu_convert_weight_to_int4pack"
        _check(weight.dtype == torch.int32 and weight.dim() == 2, op, "weight must be a 2-D int32 tensor")
        _check(weight.is_contiguous(), op, "weight must be contiguous")
        _check(weight.shape[-1] % INT4_PER_WORD == 0, op, "the last dim must be a multiple of 8")
        _check(int(weight.min()) >= -8 and int(weight.max()) <= 7, op, "values must lie in [-8, 7]")
        return pack_words(weight)

    @staticmethod
    def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
        op = "npu_dynamic_quant"
        _half_input(x, op)
        if smooth_scales is not None or group_index is not None:
            raise NotImplementedError(f"{op}: smooth_scales/group_index are outside this double")
        int4 = dst_type == torch.quint4x2
        _check(int4 or dst_type in (None, torch.int8), op, f"dst_type {dst_type} is not int8 or quint4x2")
        _check(not int4 or x.shape[-1] % INT4_PER_WORD == 0, op, "int4 needs the last dim a multiple of 8")
        xf = x.float()
        scale = xf.abs().amax(-1) / (7 if int4 else 127)
        y = torch.round(xf / scale.unsqueeze(-1))
        return (pack_words(y) if int4 else y.to(torch.int8)), scale

    @classmethod
    def npu_kronecker_quant(cls, x: torch.Tensor, kronecker_p1: torch.Tensor, kronecker_p2: torch.Tensor,
                            clip_ratio: Optional[float] = 1.0, dst_dtype=torch.int32):
        op = "npu_kronecker_quant"
        _half_input(x, op)
        _check(x.dim() == 3, op, "x must be [K, M, N]")
        k, m, n = x.shape
        _check(kronecker_p1.shape == (m, m) and kronecker_p2.shape == (n, n), op, "P1 must be [M, M], P2 [N, N]")
        _check(kronecker_p1.dtype == x.dtype == kronecker_p2.dtype, op, "P1 and P2 must have x's dtype")
        _check(k <= cls.MAX_TOKENS and max(m, n) <= KRON_LIMITS["factor"] and n % INT4_PER_WORD == 0, op,
               f"[{k}, {m}, {n}] is outside the kernel's limits")
        _check(dst_dtype in (None, torch.int32), op, "dst_dtype must be torch.int32 for int32-packed int4")
        ratio = 1.0 if clip_ratio is None else float(clip_ratio)
        _check(0 < ratio and (ratio <= 1 or cls.CLIP_CONVENTION == CLIP_OLD), op, "clip_ratio must lie in (0, 1]")
        y = kronecker_p1.float() @ (x.float() @ kronecker_p2.float())
        scale = CLIP_CONVENTIONS[cls.CLIP_CONVENTION](y.abs().amax(dim=(1, 2)), ratio)
        codes = torch.clamp(torch.round(y / scale[:, None, None]), -8, 7)
        return pack_words(codes), scale

    @staticmethod
    def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset=None,
                         pertoken_scale=None, bias=None, output_dtype=None) -> torch.Tensor:
        op = "npu_quant_matmul"
        _check(x1.dtype == x2.dtype and x1.dtype in (torch.int8, torch.int32), op, "x1, x2: both int8 or int32")
        if offset is not None:
            raise NotImplementedError(f"{op}: offset is outside this double")
        if x1.dtype == torch.int32:
            _check(x1.is_contiguous(), op, "int4 x1 must be a contiguous [m, k/8]")
            _check(pertoken_scale is None or (bias is None and output_dtype in (torch.bfloat16, torch.float16)),
                   op, "int4 with pertoken_scale takes no bias and writes bfloat16/float16")
            a = unpack_words(x1)
            if x2.is_contiguous():  # [k, n/8]
                b = unpack_words(x2)
            else:
                _check(x2.t().is_contiguous(), op, "x2 must be a contiguous [k, n/8] or the transpose of [n, k/8]")
                b = unpack_words(x2.t()).t()
        else:
            a, b = x1, x2
        _check(a.shape[-1] == b.shape[0], op, f"k mismatch: x1 {tuple(a.shape)} vs x2 {tuple(b.shape)}")
        n = b.shape[1]
        _check(scale.dim() == 1 and scale.numel() in (1, n), op, "scale must be [1] or [n]")
        out = (a.double() @ b.double()).float() * scale.float()  # exact sums of int4/int8 products
        if pertoken_scale is not None:
            _check(pertoken_scale.shape == (a.shape[0],), op, "pertoken_scale must be [m]")
            out = out * pertoken_scale.float()[:, None]
        if bias is not None:
            out = out + bias.float()
        return out.to(output_dtype or torch.int8)


def variant(clip_convention: str = CLIP_CURRENT, max_tokens: int = KRON_LIMITS["tokens"]) -> type:
    """A TorchNpuDouble whose npu_kronecker_quant computes its scale as ``clip_convention`` (CLIP_CURRENT or CLIP_OLD)
    and takes at most ``max_tokens`` tokens (older kernels: 8192)."""
    return type("TorchNpuDoubleVariant", (TorchNpuDouble,),
                {"CLIP_CONVENTION": clip_convention, "MAX_TOKENS": max_tokens})


def module(double: type = TorchNpuDouble, version: str = "2.7.1.double") -> types.ModuleType:
    """A ``torch_npu`` module exposing ``double``'s ops (for ``sys.modules``)."""
    fake = types.ModuleType("torch_npu")
    fake.__version__ = version
    for name in OPS:
        setattr(fake, name, getattr(double, name))
    return fake
