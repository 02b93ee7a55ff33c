"""Native CPU kernels for the ``cpu`` backend: int4 weights in memory (half a byte per weight), fused per-token
quantization, and a VNNI integer GEMM with the rescale in its epilogue (see fq_kernels.c).

The C file is compiled on first use with the system C compiler (no Python headers, no build tools beyond
``cc``) into ``$FLATQUANT_CACHE/kernels/`` (default ~/.cache/flatquant_studio/kernels) and loaded with ctypes. It
runs on its own small pthread pool, sized by ``torch.get_num_threads()`` at each call (see the C file for why not
OpenMP).
Needs Linux x86-64 with AVX-512 F/BW/VL and VNNI. Anything missing -> ``load()`` returns None and the backend uses
``torch._int_mm`` instead; ``FLATQUANT_NATIVE=0`` turns the native path off.
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
from pathlib import Path
from typing import Optional

import torch

from ...device import cpu_flags
from ..backends import QuantizedInput

_SOURCE = Path(__file__).with_name("fq_kernels.c")
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512vnni", "-mfma", "-fvisibility=hidden"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
_ABI = 2
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def unsupported_reason() -> Optional[str]:
    """Why the native kernels cannot run here (None when they can)."""
    if os.environ.get("FLATQUANT_NATIVE", "1") == "0":
        return "disabled by FLATQUANT_NATIVE=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux x86-64, this is {sys.platform} {platform.machine()}"
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (cc/gcc) on PATH"
    return None


def enabled() -> bool:
    return unsupported_reason() is None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    from ...models import cache_dir

    return cache_dir() / "kernels"


def _build(cc: str) -> Path:
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + " ".join([cc, *version, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fq_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a unique temp name, then rename: concurrent first builds never load half a file.
    fd, tmp = tempfile.mkstemp(prefix=".fq_kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
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
        if kernels is None and os.environ.get("FLATQUANT_NATIVE", "1") != "0":
            warnings.warn(f"FlatQuant native int4 kernels unavailable ({reason}); using torch._int_mm.",
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

    # weights -----------------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_weight(codes: torch.Tensor) -> dict[str, torch.Tensor]:
        if codes.device.type != "cpu":
            raise ValueError("native kernels run on cpu tensors")
        return {"qweight_vnni": pack_weight(codes)}

    @staticmethod
    def weight_codes(tensors: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
        return unpack_weight(tensors["qweight_vnni"], n, k)

    # activations -------------------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, bits: int, clip: Optional[float]) -> QuantizedInput:
        if x.dim() != 2:
            raise ValueError("quantize expects a 2-D [tokens, features] tensor")
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        m, k = x.shape
        kp = -(-k // 8) * 8
        q = torch.empty(m, kp, dtype=torch.int8)
        scale = torch.empty(m, 1, dtype=torch.float32)
        rowsum = torch.empty(m, dtype=torch.int32)
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
        work = torch.empty(a * b, dtype=torch.float32)
        self.lib.fq_kron(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], a, b, lf.data_ptr(),
                         rf.data_ptr(), y.data_ptr(), work.data_ptr())
        return y

    # GEMM ----------------------------------------------------------------------------------------------------------
    def matmul(self, qx: QuantizedInput, tensors: dict[str, torch.Tensor], n: int, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        w = tensors["qweight_vnni"]
        q, rowsum = qx.q, qx.extra["rowsum"]
        m, kp = q.shape
        nb, kb, _ = w.shape
        if kb * 8 != kp or nb * 16 < n or w.dtype != torch.uint8 or not w.is_contiguous():
            raise ValueError(f"weight blocks {tuple(w.shape)} do not match activations [{m}, {kp}] -> {n}")
        if q.dtype != torch.int8 or not q.is_contiguous() or rowsum.dtype != torch.int32 or rowsum.numel() != m:
            raise ValueError("activation codes must come from NativeKernels.quantize")
        ws = w_scale.float().contiguous()
        if ws.numel() != n:
            raise ValueError(f"{ws.numel()} weight scales for {n} outputs")
        b = None if bias is None else bias.float().contiguous()
        if b is not None and b.numel() != n:
            raise ValueError(f"bias of {b.numel()} for {n} outputs")
        bf16 = out_dtype == torch.bfloat16
        out = torch.empty(m, n, dtype=torch.bfloat16 if bf16 else torch.float32)
        xs = qx.scale.float().contiguous()
        if xs.numel() != m:
            raise ValueError(f"{xs.numel()} token scales for {m} tokens")
        self.lib.fq_gemm(q.data_ptr(), kp, rowsum.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), _ptr(b),
                         m, n, kb, out.data_ptr(), n, int(bf16), torch.get_num_threads())
        return out if out.dtype == out_dtype else out.to(out_dtype)
