"""Device selection: npu when torch_npu imports and a device exists, else cuda, else cpu."""
from __future__ import annotations

import ctypes
import importlib
import sys

import torch

from .errors import FlatQuantError

SUPPORTED_DEVICES = ("auto", "cpu", "cuda", "npu")


def npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
    except Exception:  # ImportError, or a broken CANN install
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name not in SUPPORTED_DEVICES:
        raise FlatQuantError(f"--device must be one of {', '.join(SUPPORTED_DEVICES)}, got {name!r}.")
    if name == "auto":
        if npu_available():
            return torch.device("npu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "npu" and not npu_available():
        raise FlatQuantError("--device npu needs torch_npu and an Ascend device; neither was found. Use --device auto.")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlatQuantError("--device cuda was asked for but no CUDA device is visible. Use --device auto or cpu.")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """Matmul dtype for calibration and evaluation: bf16 everywhere it is fast (this includes AVX-512 BF16 CPUs)."""
    return torch.bfloat16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()


_HEAP_TUNED = False


def keep_freed_host_memory() -> None:
    """Keep freed host memory in the process heap (glibc only; idempotent).

    By default glibc hands every freed block above its mmap threshold back to the OS, and the next allocation of
    that size page-faults it in again: activation-sized temporaries cost a few ms each, about 10% of CPU
    calibration time here. The price is that RSS stays at its peak, which the report states anyway."""
    global _HEAP_TUNED
    if _HEAP_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
    libc.mallopt(m_top_pad, 64 << 20)
    _HEAP_TUNED = True
