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

Self-check: on first use of each op (per process and torch_npu module) the backend runs it on small tensors and
compares with the exact CPU math (``quantize_per_token``, ``pack_int4_as_int32``, integer GEMM): it detects the clip
convention of the installed ``npu_kronecker_quant`` (clip_ratio * max / 7 as documented now, or max / (7 *
clip_ratio) as CANN 8.1/8.2 pages print: then it passes 1 / clip) and its token limit (32768, or 8192 on older
kernels: calls are chunked to it). An op that raises or mismatches is replaced by the portable torch path on the
same tensors, with one warning naming the op, the torch_npu and CANN versions and what was seen.

The tests run this backend on any machine through ``tests/torch_npu_double.py``, a double of those ops written from
torch_npu's documentation alone (``NpuBackend(ops=TorchNpuDouble())``).
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..device import npu_available
from ..kernels import QuantizedInput
from ..quantizer import code_matmul
from .backends import ActQuant, Backend, quantize_per_token, register_backend, rescale, transform_input
from .packing import pack_int4_as_int32, unpack_int4_from_int32

log = logging.getLogger(__name__)

# npu_kronecker_quant limits (CANN FlatQuant op), called as vllm-ascend calls it: factor sizes up to 256, the right
# factor a multiple of 8 (int32 output, dst_dtype=torch.int32), at most 32768 tokens per call (larger inputs are
# split; older kernels take 8192, found by the self-check). Older CANN releases also want the right factor a multiple
# of 16 (warned once). Outside the limits the transform runs as two matmuls and the plain quantizer follows.
KRON_MAX_FACTOR = 256
KRON_MAX_TOKENS = 32768
KRON_OLD_MAX_TOKENS = 8192
CHECKED_OPS = ("npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_kronecker_quant", "npu_quant_matmul")
CLIP_CURRENT, CLIP_OLD = "clip * max / 7", "max / (7 * clip)"
_PROBE_CLIP = 0.5
_warned: set = set()


def _kron_fits(left: torch.Tensor, right: torch.Tensor) -> bool:
    a, b = left.shape[0], right.shape[0]
    fits = a <= KRON_MAX_FACTOR and b <= KRON_MAX_FACTOR and b % 8 == 0
    if fits and b % 16 and b not in _warned:
        _warned.add(b)
        warnings.warn(f"npu_kronecker_quant: right factor {b} is not a multiple of 16; CANN releases before "
                      "8.2 may reject it.", stacklevel=3)
    return fits


def kronecker_quant_chunked(ops, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip: float,
                            max_tokens: int = KRON_MAX_TOKENS):
    """npu_kronecker_quant over x [T, a, b] in calls of at most ``max_tokens`` tokens; outputs concatenated."""
    outs = [ops.npu_kronecker_quant(chunk, p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
            for chunk in torch.split(x, max_tokens, dim=0)]
    if len(outs) == 1:
        return outs[0]
    return torch.cat([q for q, _ in outs]), torch.cat([s for _, s in outs])


def _torch_npu():
    return importlib.import_module("torch_npu")


# --- self-check ---------------------------------------------------------------------------------------------------


@dataclass
class OpCheck:
    """One op's self-check: ``ok`` (the backend calls it) and what was observed; for npu_kronecker_quant also the
    clip convention found and the token limit to chunk to."""

    op: str
    ok: bool
    observed: str
    clip_convention: Optional[str] = None
    max_tokens: int = KRON_MAX_TOKENS

    def kernel_clip(self, clip: Optional[float]) -> float:
        """The clip_ratio to pass so that the kernel's scale is clip * max / 7."""
        clip = clip or 1.0
        return 1.0 / clip if self.clip_convention == CLIP_OLD else clip

    @property
    def line(self) -> str:
        return f"{self.op}: {'ok' if self.ok else 'portable torch path'} ({self.observed})"


_CHECKS: dict = {}  # (ops, op name) -> OpCheck, once per process


def cann_version(ops=None) -> str:
    """The CANN version as torch_npu or the toolkit folder says it, else 'unknown'."""
    version = getattr(getattr(ops, "version", None), "cann", None)
    if version:
        return str(version)
    roots = [os.environ.get(v) for v in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")]
    for path in (Path(r) / name for r in roots if r for name in ("version.cfg", "compiler/version.info")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.lower().startswith("version="):
                return line.split("=", 1)[1].strip()
    return "unknown"


def _probe_codes(shape, seed: int) -> torch.Tensor:
    return torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def _probe_x(shape, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-2) -> bool:
    got, want = got.detach().float().cpu().reshape(want.shape), want.float()
    return bool(((got - want).abs() <= rtol * want.abs().clamp(min=1e-6)).all())


def _codes_match(words: torch.Tensor, want: torch.Tensor) -> bool:
    """int32-packed int4 codes within one step of ``want`` (rounding of a value at a tie, computed in another order)."""
    got = unpack_int4_from_int32(words.detach().cpu().reshape(want.shape[0], -1)).int()
    return bool((got - want.int()).abs().max() <= 1)


def _check_pack(ops, device) -> OpCheck:
    codes = _probe_codes((8, 16), 1)
    got = ops.npu_convert_weight_to_int4pack(codes.to(torch.int32).to(device).contiguous(), inner_k_tiles=1)
    ok = torch.equal(got.cpu(), pack_int4_as_int32(codes))
    return OpCheck("npu_convert_weight_to_int4pack", ok, "words equal the documented layout" if ok
                   else "packed words differ from the documented layout")


def _check_dynamic(ops, device) -> OpCheck:
    x = _probe_x((4, 16), 2)
    q, s = ops.npu_dynamic_quant(x.to(device), dst_type=torch.quint4x2)
    codes, scale = quantize_per_token(x.float(), 4, None)
    ok = _close(s, scale.reshape(-1)) and _codes_match(q, codes)
    return OpCheck("npu_dynamic_quant", ok, "scales and codes equal max / 7 per token" if ok
                   else "scales or codes differ from max / 7 per token")


def _kron_probe(ops, device, tokens: int, clip: float):
    x = _probe_x((tokens, 2, 8), 3)
    p1, p2 = _probe_x((2, 2), 4), _probe_x((8, 8), 5)
    q, s = ops.npu_kronecker_quant(x.to(device), p1.to(device), p2.to(device), clip_ratio=clip,
                                   dst_dtype=torch.int32)
    y = (p1.float() @ (x.float() @ p2.float())).reshape(tokens, -1)
    return q, s, y


def _kron_convention(ops, device) -> tuple[Optional[str], str]:
    """(convention, observation) from one call with clip_ratio 0.5, whose two readings differ 4x."""
    q, s, y = _kron_probe(ops, device, 4, _PROBE_CLIP)
    peak = y.abs().amax(-1)
    for convention, scale in ((CLIP_CURRENT, peak * _PROBE_CLIP / 7), (CLIP_OLD, peak / (7 * _PROBE_CLIP))):
        if _close(s, scale):
            return convention, f"scale = {convention}"
    return None, "its scale matches neither clip * max / 7 nor max / (7 * clip)"


def _kron_token_limit(ops, device) -> int:
    for tokens in (KRON_MAX_TOKENS, KRON_OLD_MAX_TOKENS):
        try:
            _kron_probe(ops, device, tokens, 1.0)
            return tokens
        except RuntimeError:
            continue
    raise RuntimeError(f"refused {KRON_OLD_MAX_TOKENS} tokens")


def _check_kron(ops, device) -> OpCheck:
    op = "npu_kronecker_quant"
    convention, seen = _kron_convention(ops, device)
    if convention is None:
        return OpCheck(op, False, seen)
    check = OpCheck(op, True, seen, convention, _kron_token_limit(ops, device))
    q, _, y = _kron_probe(ops, device, 4, check.kernel_clip(_PROBE_CLIP))  # the adapted call gives the intended codes
    if not _codes_match(q, quantize_per_token(y, 4, _PROBE_CLIP)[0]):
        return OpCheck(op, False, f"{seen}, but its codes differ from the CPU quantizer's")
    check.observed += f"; at most {check.max_tokens} tokens per call"
    return check


def _check_matmul(ops, device) -> OpCheck:
    a, w = _probe_codes((4, 16), 6), _probe_codes((8, 16), 7)
    g = torch.Generator().manual_seed(8)
    s_w, s_t = torch.rand(8, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5
    out = ops.npu_quant_matmul(pack_int4_as_int32(a).to(device), pack_int4_as_int32(w).to(device).t(),
                               s_w.to(device), pertoken_scale=s_t.to(device), output_dtype=torch.bfloat16)
    want = (a.double() @ w.double().t()).float() * s_w * s_t[:, None]
    ok = _close(out, want)
    return OpCheck("npu_quant_matmul", ok, "equals the exact integer GEMM and rescale" if ok
                   else "differs from the exact integer GEMM and rescale")


_PROBES = {"npu_convert_weight_to_int4pack": _check_pack, "npu_dynamic_quant": _check_dynamic,
           "npu_kronecker_quant": _check_kron, "npu_quant_matmul": _check_matmul}


def check_op(ops, op: str, device="cpu") -> OpCheck:
    """``op``'s self-check, run once per process and ``ops`` (a failure logs one warning line)."""
    key = (ops, op)
    if key not in _CHECKS:
        try:
            result = _PROBES[op](ops, device)
        except Exception as exc:  # an op missing, refusing its documented arguments, or a broken CANN kernel
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            result = OpCheck(op, False, f"raised {type(exc).__name__}: {first}")
        if not result.ok:
            log.warning("torch_npu self-check: %s %s (torch_npu %s, CANN %s); using the portable torch path for it.",
                        op, result.observed, getattr(ops, "__version__", "unknown"), cann_version(ops))
        _CHECKS[key] = result
    return _CHECKS[key]


def self_check(ops=None, device="npu") -> list[OpCheck]:
    """Every op's self-check (``python -m core doctor``)."""
    ops = ops if ops is not None else _torch_npu()
    return [check_op(ops, op, device) for op in CHECKED_OPS]


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

    def _check(self, op: str, device) -> OpCheck:
        return check_op(self.ops, op, device)

    @staticmethod
    def _int4(w_bits: int, a_bits: int, in_features: int) -> bool:
        return w_bits <= 4 and a_bits <= 4 and in_features % 8 == 0

    def prepare_weight(self, codes, w_bits, a_bits=4):
        if not self._int4(w_bits, a_bits, codes.shape[1]):
            return {"qweight": codes.to(torch.int8).contiguous()}
        if self._check("npu_convert_weight_to_int4pack", codes.device).ok:
            packed = self.ops.npu_convert_weight_to_int4pack(codes.to(torch.int32).contiguous(), inner_k_tiles=1)
        else:
            packed = pack_int4_as_int32(codes.to(torch.int8))
        return {"qweight_int4": packed}

    def weight_codes(self, tensors, out_features, in_features):
        if "qweight_int4" in tensors:
            return unpack_int4_from_int32(tensors["qweight_int4"])
        return tensors["qweight"]

    def quantize(self, x, act: ActQuant, tensors):
        m, k = x.shape
        if x.dtype not in (torch.float16, torch.bfloat16):
            x = x.to(torch.bfloat16)  # the fused quant kernels read fp16/bf16 only
        if "qweight_int4" not in tensors:
            q, s = quantize_per_token(transform_input(x, act), act.bits, act.clip)
            return QuantizedInput(q, s.reshape(m))
        if act.left is not None and _kron_fits(act.left, act.right):
            kron = self._check("npu_kronecker_quant", x.device)
            if kron.ok:
                a, b = act.left.shape[0], act.right.shape[0]
                q, s = kronecker_quant_chunked(self.ops, x.reshape(m, a, b), act.left.t().to(x.dtype),
                                               act.right.to(x.dtype), kron.kernel_clip(act.clip), kron.max_tokens)
                return QuantizedInput(q.reshape(m, k // 8), s.reshape(m).float())
            return self._kronecker_quant_portable(x, act)
        x = transform_input(x, act)
        if act.clip is None and self._check("npu_dynamic_quant", x.device).ok:
            q, s = self.ops.npu_dynamic_quant(x, dst_type=torch.quint4x2)
            return QuantizedInput(q, s.reshape(m).float())
        q, s = quantize_per_token(x, act.bits, act.clip)
        return QuantizedInput(pack_int4_as_int32(q), s.reshape(m))

    @staticmethod
    def _kronecker_quant_portable(x, act: ActQuant) -> QuantizedInput:
        """npu_kronecker_quant's math in torch: factors in x's dtype (as the kernel gets them), the rest in fp32."""
        half = ActQuant(act.bits, act.clip, act.left.to(x.dtype).float(), act.right.to(x.dtype).float())
        q, s = quantize_per_token(transform_input(x.float(), half), act.bits, act.clip)
        return QuantizedInput(pack_int4_as_int32(q), s.reshape(x.shape[0]))

    def matmul(self, qx, tensors, out_features, w_scale, bias, out_dtype):
        int4 = "qweight_int4" in tensors
        if not self._check("npu_quant_matmul", qx.q.device).ok:  # the portable path: exact sums of the codes
            a = unpack_int4_from_int32(qx.q) if qx.q.dtype == torch.int32 else qx.q
            acc = code_matmul(a, self.weight_codes(tensors, out_features, a.shape[-1]), 4 if int4 else 8, 8)
            return rescale(acc, qx.scale.float().reshape(-1, 1), w_scale.float(), bias, out_dtype)
        # The fused epilogue writes bf16/fp16 only; fp32 models get bf16 rounding of each output here.
        kernel_dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
        w = tensors["qweight_int4"] if int4 else tensors["qweight"]
        out = self.ops.npu_quant_matmul(qx.q, w.t(), w_scale.float(), pertoken_scale=qx.scale.float(),
                                        output_dtype=kernel_dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(out_dtype)
