"""Device selection: npu when torch_npu imports and a device exists, else cuda, else cpu."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
import sys
from typing import Optional

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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, aarch64 ``Features``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU model name of /proc/cpuinfo, with its family/model/stepping where given (e.g. "AMD EPYC (family 26
    model 2 stepping 1)": family 26 is Zen 5), else platform.processor()."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping", "CPU implementer", "CPU part"):
                    fields.setdefault(key, value.strip())
                if not line.strip() and fields:
                    break  # first processor only
    except OSError:
        pass
    if "model name" in fields:
        ids = " ".join(f"{k.replace('cpu ', '')} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
        return f"{fields['model name']} ({ids})" if ids else fields["model name"]
    if "CPU part" in fields:  # aarch64
        return f"ARM implementer {fields.get('CPU implementer')} part {fields['CPU part']}"
    import platform

    return platform.processor() or platform.machine()


# the flags that decide this project's code paths, for benchmark records (x86 and aarch64)
KEY_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_bf16", "amx_int8", "asimddp", "sve")


def machine_summary() -> dict:
    """What every benchmark records about the CPU it ran on: model, architecture, vCPUs, key flags, whether bf16 is
    native, and the load average at the time."""
    import platform

    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "machine": platform.machine(), "vcpus": os.cpu_count(),
            "key_flags": [f for f in KEY_CPU_FLAGS if f in flags], "native_bf16": native_bf16("cpu"),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def machine_line(info: Optional[dict] = None) -> str:
    """machine_summary() as one printable line."""
    m = info or machine_summary()
    return (f"CPU: {m['cpu_model']} ({m['machine']}, {m['vcpus']} vCPUs), flags {' '.join(m['key_flags']) or 'none'}, "
            f"bf16 {'native' if m['native_bf16'] else 'emulated'}; load average "
            f"{' '.join(f'{v:.2f}' for v in m['loadavg'])}")


# x86 flags that mean bf16 matmuls run natively (oneDNN uses them); without them torch emulates bf16 in fp32
# software loops, 5-10x slower than an fp32 matmul.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
COMPUTE_DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
COMPUTE_DTYPE_ENV = "FLATQUANT_COMPUTE_DTYPE"


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls are native on ``device``: always on cuda/npu, on a CPU only with AVX512-BF16 or AMX."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind != "cpu":
        return True
    flags = cpu_flags()
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def compute_dtype(device: torch.device | str = "cpu", override: Optional[str | torch.dtype] = None) -> torch.dtype:
    """Matmul dtype for calibration, evaluation and the float latency baseline: bf16 where it is native (an
    accelerator, or a CPU with AVX512-BF16 / AMX), else fp32. ``override`` (auto | bf16 | fp16 | fp32, or a
    torch.dtype) wins, then the FLATQUANT_COMPUTE_DTYPE environment variable."""
    if isinstance(override, torch.dtype):
        return override
    name = (override or "auto").lower()
    if name == "auto":
        name = (os.environ.get(COMPUTE_DTYPE_ENV) or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in COMPUTE_DTYPES:
        raise FlatQuantError(f"--compute_dtype must be one of {', '.join(COMPUTE_DTYPE_CHOICES)}, got {name!r}.")
    return COMPUTE_DTYPES[name]


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
_GLIBC_DEFAULT = 128 * 1024  # the three thresholds' defaults (mallopt(3))
_heap_depth = 0


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs: nothing to tune
        return None


@contextlib.contextmanager
def freed_host_memory_kept(enabled: bool = True):
    """Within: keep freed host memory in the process heap (glibc only; nests).

    By default glibc hands every freed block above its mmap threshold back to the OS, and the next allocation of
    that size page-faults it in again: activation-sized temporaries cost a few ms each, about 10% of CPU
    calibration time here. The price is that RSS stays at its peak while it lasts, so on exit glibc's defaults
    come back and the heap's free pages are returned to the OS: evaluation after calibration would otherwise keep
    its largest temporaries resident too (+0.4 GB over SmolLM2's perplexity)."""
    global _heap_depth
    libc = _libc() if enabled else None
    if libc is None:
        yield
        return
    if _heap_depth == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    _heap_depth += 1
    try:
        yield
    finally:
        _heap_depth -= 1
        if _heap_depth == 0:
            for key in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD):
                libc.mallopt(key, _GLIBC_DEFAULT)
            libc.malloc_trim(0)
