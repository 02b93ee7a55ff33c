"""Native CPU kernels: int4 weights in memory (half a byte per weight), fused per-token quantization, an integer
GEMM with the rescale in its epilogue, and the serial online Kronecker transform for few tokens (see fq_kernels.c).

This module sits below both users: ``core.transforms`` (the few-row transform) and the real-quant ``cpu`` backend
(``core.realquant.backends``); it imports neither.

The C file is compiled on first use with the system C compiler (no Python headers, no build tools beyond
``cc``) into ``$FLATQUANT_CACHE/kernels/`` (default ~/.cache/flatquant_studio/kernels) and loaded with ctypes. It
runs on its own small pthread pool, sized by ``torch.get_num_threads()`` at each call (see the C file for why not
OpenMP).

One library holds every code path; the one that runs is picked from the CPU's flags (/proc/cpuinfo): ``avx512``
(AVX-512 VNNI), ``avxvnni`` (AVX2 + AVX-VNNI), ``avx2`` (AVX2 + FMA, maddubs), ``neon`` (aarch64 dot product,
where the compiler targets it) or ``portable`` (plain C, any CPU). ``FLATQUANT_NATIVE_ISA=<name>`` forces one (an
ISA this CPU lacks is an error); every path gives bit-identical results. ``FLATQUANT_NATIVE=0`` turns the native
kernels off (the backend then uses the ``cpu-torch`` path).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..device import cpu_flags
from ..errors import ConfigError
from ..models import cache_dir
from ..quantizer import fp32_exact_k

_SOURCE = Path(__file__).with_name("fq_kernels.c")
# No -m flags: the x86 paths carry target attributes, and dispatch happens at run time. No contraction of a * b + c
# into fused multiply-adds behind the code's back: every path must round exactly where the PyTorch reference does.
_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-ffp-contract=off"]
_ABI = 3
ISA_ENV = "FLATQUANT_NATIVE_ISA"
# name -> (id in the C file, CPU flags it needs)
ISAS = {"portable": (0, ()), "avx2": (1, ("avx2", "fma")), "avxvnni": (2, ("avx2", "fma", "avx_vnni")),
        "avx512": (3, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")), "neon": (4, ("asimddp",))}
_PREFERENCE = ("avx512", "avxvnni", "avx2", "neon", "portable")
# 8-bit weights as two int4 planes: each plane's sums (4-bit by up to 8-bit codes) must stay exact in fp32
INT8_PLANES_MAX_K = fp32_exact_k(8, 4)
_lock = threading.Lock()
_loaded: dict[str, object] = {}


@dataclass
class QuantizedInput:
    """Per-token quantized activations in a backend's own form; ``scale`` is fp32 [M, 1] (or [M] where noted)."""

    q: torch.Tensor
    scale: torch.Tensor
    extra: Optional[dict] = None


def _machine() -> str:
    return platform.machine().lower()


def _extra_flags() -> list[str]:
    # aarch64: the dot-product path is compiled only where the compiler may emit sdot, i.e. where the CPU has it
    if _machine() in ("aarch64", "arm64") and "asimddp" in cpu_flags():
        return ["-march=armv8.2-a+dotprod"]
    return []


def unsupported_reason() -> Optional[str]:
    """Why the native kernels cannot run here (None when they can)."""
    if os.environ.get("FLATQUANT_NATIVE", "1") == "0":
        return "disabled by FLATQUANT_NATIVE=0"
    if sys.platform != "linux":
        return f"needs Linux (POSIX threads and a C compiler), this is {sys.platform}"
    if _compiler() is None:
        return "no C compiler (cc/gcc) on PATH"
    return None


def cpu_isas() -> list[str]:
    """The code paths this CPU can run, fastest first (``portable`` always)."""
    flags = cpu_flags()
    x86 = _machine() in ("x86_64", "amd64", "i686")
    out = []
    for name in _PREFERENCE:
        needs = ISAS[name][1]
        if name == "portable" or (all(f in flags for f in needs) and (x86 == (name != "neon"))):
            out.append(name)
    return out


def requested_isa() -> str:
    """The path to run: FLATQUANT_NATIVE_ISA when set (checked against the CPU), else the fastest one."""
    name = os.environ.get(ISA_ENV, "").strip().lower() or "auto"
    if name == "auto":
        return cpu_isas()[0]
    if name not in ISAS:
        raise ConfigError(f"{ISA_ENV} must be one of auto, {', '.join(ISAS)}; got {name!r}.")
    if name not in cpu_isas():
        raise ConfigError(f"{ISA_ENV}={name}: this CPU lacks {', '.join(f for f in ISAS[name][1] if f not in cpu_flags())}"
                          f"; it can run {', '.join(cpu_isas())}.")
    return name


def enabled() -> bool:
    return unsupported_reason() is None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _build(cc: str) -> Path:
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + " ".join([cc, *version, *_FLAGS, *_extra_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fq_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a unique temp name, then rename: concurrent first builds never load half a file.
    fd, tmp = tempfile.mkstemp(prefix=".fq_kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, *_extra_flags(), str(_SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> Optional["NativeKernels"]:
    """The compiled kernels, or None (with one warning saying why) when they cannot be built or loaded."""
    with _lock:
        if "kernels" in _loaded:
            return _loaded["kernels"]
        kernels = None
        reason = unsupported_reason()
        if reason is None:
            try:
                kernels = NativeKernels(ctypes.CDLL(str(_build(_compiler()))))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                reason = f"build failed: {exc}"
            if kernels is not None:
                kernels.set_isa(requested_isa())
        if kernels is None and os.environ.get("FLATQUANT_NATIVE", "1") != "0":
            warnings.warn(f"FlatQuant native int4 kernels unavailable ({reason}); using the cpu-torch path.",
                          RuntimeWarning, stacklevel=2)
        _loaded["kernels"] = kernels
        return kernels


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


_i64, _int, _f32, _vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> uint8 [ceil(N/16), ceil(K/8), 64]: the kernel's block layout (see the C
    file): biased codes (w + 8), 16 channels x 8 inputs per 64 bytes, inputs 4..7 of a step in the high nibbles."""
    n, k = codes.shape
    nb, kb = -(-n // 16), -(-k // 8)
    w = torch.zeros(nb * 16, kb * 8, dtype=torch.int16, device=codes.device)
    w[:n, :k] = codes.to(torch.int16)
    w = (w + 8).to(torch.uint8).reshape(nb, 16, kb, 2, 4)  # block, lane, step, half, byte
    w = w.permute(0, 2, 1, 4, 3)  # block, step, lane, byte, half
    return (w[..., 0] | (w[..., 1] << 4)).reshape(nb, kb, 64).contiguous()


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb, kb, _ = packed.shape
    p = packed.reshape(nb, kb, 16, 4)
    halves = torch.stack((p & 0xF, p >> 4), dim=-1)  # block, step, lane, byte, half
    w = halves.permute(0, 2, 1, 4, 3).reshape(nb * 16, kb * 8).to(torch.int16) - 8
    return w[:n, :k].to(torch.int8).contiguous()


class NativeKernels:
    """Typed wrappers around the C entry points; every pointer handed over is checked here first."""

    def __init__(self, lib: ctypes.CDLL):
        if lib.fq_abi_version() != _ABI:
            raise RuntimeError("stale kernel library (ABI mismatch)")
        self.lib = lib
        lib.fq_quantize.argtypes = [_vp, _int, _i64, _i64, _i64, _int, _f32, _int, _vp, _i64, _vp, _vp, _int]
        lib.fq_quantize.restype = None
        lib.fq_gemm.argtypes = [_vp, _i64, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _i64, _vp, _i64, _int, _int]
        lib.fq_gemm.restype = None
        lib.fq_kron.argtypes = [_vp, _int, _i64, _i64, _i64, _vp, _vp, _vp, _vp]
        lib.fq_kron.restype = None
        lib.fq_linear.argtypes = [_vp, _int, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp, _int, _f32, _int, _vp, _i64,
                                  _vp, _vp, _vp, _vp, _vp, _i64, _i64, _vp, _int, _int]
        lib.fq_linear.restype = None
        lib.fq_set_isa.argtypes = [_int]
        self.isa = "portable"

    # code path ---------------------------------------------------------------------------------------------------
    def set_isa(self, name: str) -> str:
        """Run ``name``'s code path from now on (``auto``: the fastest this CPU has); returns the previous one."""
        name = cpu_isas()[0] if name == "auto" else name
        if name not in ISAS or name not in cpu_isas():
            raise ConfigError(f"native code path {name!r} cannot run here; this CPU can run {', '.join(cpu_isas())}.")
        if not self.lib.fq_isa_compiled(ISAS[name][0]) or self.lib.fq_set_isa(ISAS[name][0]) < 0:
            raise ConfigError(f"native code path {name!r} is not in this build (compiler or CPU check refused it).")
        previous, self.isa = self.isa, name
        return previous

    def compiled_isas(self) -> list[str]:
        """The paths of ``cpu_isas()`` that this build holds (neon needs a compiler targeting the dot product)."""
        return [n for n in cpu_isas() if self.lib.fq_isa_compiled(ISAS[n][0])]

    # weights -----------------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_weight(codes: torch.Tensor) -> dict[str, torch.Tensor]:
        if codes.device.type != "cpu":
            raise ValueError("native kernels run on cpu tensors")
        return {"qweight_vnni": pack_weight(codes)}

    @staticmethod
    def weight_codes(tensors: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
        if "qweight_vnni_hi" in tensors:
            hi, lo = unpack_weight(tensors["qweight_vnni_hi"], n, k), unpack_weight(tensors["qweight_vnni_lo"], n, k)
            return (hi.to(torch.int16) * 16 + lo + 8).to(torch.int8)
        return unpack_weight(tensors["qweight_vnni"], n, k)

    @staticmethod
    def prepare_weight8(codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """8-bit codes as two int4 planes in the int4 block layout: w = 16·hi + (lo + 8), hi and lo in [-8, 7].
        Half a byte each: the GEMM reads one byte per weight, as an int8 kernel would, on the int4 kernels."""
        if codes.device.type != "cpu":
            raise ValueError("native kernels run on cpu tensors")
        if codes.shape[1] > INT8_PLANES_MAX_K:
            raise ValueError(f"8-bit weights with K = {codes.shape[1]} > {INT8_PLANES_MAX_K}: plane sums not exact")
        w = codes.to(torch.int16)
        hi = torch.div(w, 16, rounding_mode="floor")
        return {"qweight_vnni_hi": pack_weight(hi.to(torch.int8)), "qweight_vnni_lo": pack_weight((w - 16 * hi - 8)
                                                                                                   .to(torch.int8))}

    # activations -------------------------------------------------------------------------------------------------
    @staticmethod
    def _activation_buffers(x: torch.Tensor, what: str):
        """(x as contiguous fp32/bf16 [M, K], K, K rounded up to 8, codes [M, Kp], scales [M, 1], code sums [M])."""
        if x.dim() != 2:
            raise ValueError(f"{what} expects a 2-D [tokens, features] tensor")
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        m, k = x.shape
        kp = -(-k // 8) * 8
        return (x, k, kp, torch.empty(m, kp, dtype=torch.int8), torch.empty(m, 1, dtype=torch.float32),
                torch.empty(m, dtype=torch.int32))

    def quantize(self, x: torch.Tensor, bits: int, clip: Optional[float]) -> QuantizedInput:
        x, k, kp, q, scale, rowsum = self._activation_buffers(x, "quantize")
        m = x.shape[0]
        self.lib.fq_quantize(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, k, 2 ** (bits - 1) - 1,
                             1.0 if clip is None else float(clip), int(clip is not None), q.data_ptr(), kp,
                             scale.data_ptr(), rowsum.data_ptr(), torch.get_num_threads())
        return QuantizedInput(q, scale, {"rowsum": rowsum, "k": k})

    # online transform (few tokens) -------------------------------------------------------------------------------
    def kron(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """leftᵀ·X·right per row of x [M, a*b] (fp32 or bf16), output in x's dtype."""
        a, b = left.shape[0], right.shape[0]
        if x.dim() != 2 or x.shape[1] != a * b or left.shape != (a, a) or right.shape != (b, b):
            raise ValueError(f"kron: x {tuple(x.shape)} does not match factors {a}x{a} and {b}x{b}")
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"kron reads fp32 or bf16, got {x.dtype}")
        x = x.contiguous()
        lf, rf = left.float().contiguous(), right.float().contiguous()
        y = torch.empty_like(x)
        work = torch.empty(a * b + b, dtype=torch.float32)
        self.lib.fq_kron(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], a, b, lf.data_ptr(),
                         rf.data_ptr(), y.data_ptr(), work.data_ptr())
        return y

    # GEMM ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _gemm_operands(w: torch.Tensor, m: int, kp: int, n: int, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                       out_dtype: torch.dtype):
        nb, kb, _ = w.shape
        if kb * 8 != kp or nb * 16 < n or w.dtype != torch.uint8 or not w.is_contiguous():
            raise ValueError(f"weight blocks {tuple(w.shape)} do not match activations [{m}, {kp}] -> {n}")
        ws = w_scale.float().contiguous()
        if ws.numel() != n:
            raise ValueError(f"{ws.numel()} weight scales for {n} outputs")
        b = None if bias is None else bias.float().contiguous()
        if b is not None and b.numel() != n:
            raise ValueError(f"bias of {b.numel()} for {n} outputs")
        bf16 = out_dtype == torch.bfloat16
        out = torch.empty(m, n, dtype=torch.bfloat16 if bf16 else torch.float32)
        return kb, ws, b, bf16, out

    def matmul(self, qx: QuantizedInput, tensors: dict[str, torch.Tensor], n: int, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        w = tensors["qweight_vnni"]
        q, rowsum = qx.q, qx.extra["rowsum"]
        m, kp = q.shape
        kb, ws, b, bf16, out = self._gemm_operands(w, m, kp, n, w_scale, bias, out_dtype)
        if q.dtype != torch.int8 or not q.is_contiguous() or rowsum.dtype != torch.int32 or rowsum.numel() != m:
            raise ValueError("activation codes must come from NativeKernels.quantize")
        xs = qx.scale.float().contiguous()
        if xs.numel() != m:
            raise ValueError(f"{xs.numel()} token scales for {m} tokens")
        self.lib.fq_gemm(q.data_ptr(), kp, rowsum.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), _ptr(b),
                         m, n, kb, out.data_ptr(), n, int(bf16), torch.get_num_threads())
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def matmul8(self, qx: QuantizedInput, tensors: dict[str, torch.Tensor], n: int, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """``matmul`` for 8-bit weights held as two int4 planes (``prepare_weight8``): each plane's GEMM with unit
        scales gives its exact integer sums (below 2^24 for K <= INT8_PLANES_MAX_K), combined in int32 as
        16·hi + lo + 8·Σx, then the same epilogue as the reference (``core.realquant.backends.rescale`` order)."""
        m = qx.q.shape[0]
        unit = QuantizedInput(qx.q, torch.ones(m, 1), qx.extra)
        ones = torch.ones(n)
        hi = self.matmul(unit, {"qweight_vnni": tensors["qweight_vnni_hi"]}, n, ones, None, torch.float32)
        lo = self.matmul(unit, {"qweight_vnni": tensors["qweight_vnni_lo"]}, n, ones, None, torch.float32)
        acc = hi.to(torch.int32).mul_(16).add_(lo.to(torch.int32)).add_(qx.extra["rowsum"].reshape(-1, 1) * 8)
        out = torch.mul(acc, w_scale.float().reshape(-1))
        out.mul_(qx.scale.float())
        if bias is not None:
            out.add_(bias.float())
        return out.to(out_dtype)

    # transform + quantize + GEMM in one call -----------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bits: int, clip: Optional[float], left: Optional[torch.Tensor],
               right: Optional[torch.Tensor], tensors: dict[str, torch.Tensor], n: int, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """``matmul(quantize(kron(x)))`` in one native call (identical results): the decode-step path."""
        x, k, kp, q, scale, rowsum = self._activation_buffers(x, "linear")
        m = x.shape[0]
        w = tensors["qweight_vnni"]
        kb, ws, b, bf16, out = self._gemm_operands(w, m, kp, n, w_scale, bias, out_dtype)
        lp = rp = xt = work = None
        a = bb = 0
        if left is not None:
            a, bb = left.shape[0], right.shape[0]
            if a * bb != k or left.shape != (a, a) or right.shape != (bb, bb):
                raise ValueError(f"linear: x {tuple(x.shape)} does not match factors {a}x{a} and {bb}x{bb}")
            lp, rp = left.float().contiguous(), right.float().contiguous()
            xt = torch.empty_like(x)
            work = torch.empty(a * bb + bb, dtype=torch.float32)
        self.lib.fq_linear(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, _ptr(lp), _ptr(rp), a, bb, _ptr(xt),
                           _ptr(work), 2 ** (bits - 1) - 1, 1.0 if clip is None else float(clip),
                           int(clip is not None), q.data_ptr(), kp, scale.data_ptr(), rowsum.data_ptr(),
                           w.data_ptr(), ws.data_ptr(), _ptr(b), n, kb, out.data_ptr(), int(bf16),
                           torch.get_num_threads())
        return out if out.dtype == out_dtype else out.to(out_dtype)
