"""`python -m core doctor`: what this machine supports (CPU flags, native int4 kernels, compute dtype, CUDA, NPU and
its kernel self-check) and what an Ascend export needs from the server. Prints only; exit 0."""
from __future__ import annotations

import argparse
import importlib
import platform

# the CPU flags that decide this project's paths, by architecture (core.device reads them, core.kernels picks from them)
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
             "amx_int8")
ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "sve": "sve"}
NPU_DEVICE = "npu"  # where the kernel self-check runs


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("doctor", help="print what this machine supports (CPU kernels, CUDA, NPU) and what an "
                                             "Ascend export needs from the server",
                              description="Print the CPU model and flags, the native int4 kernel path, the compute "
                                          "dtype, CUDA and NPU support (with torch_npu's kernel self-check), and the "
                                          "versions and conventions a vllm-ascend server needs. Changes nothing.")
    p.set_defaults(func=run)
    return p


def cpu_lines() -> list[str]:
    from ..device import compute_dtype, cpu_flags, dtype_name, machine_line, native_bf16

    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        shown = [f"{label} ({f}) {'yes' if f in flags else 'no'}" for f, label in ARM_FLAGS.items()]
    else:
        shown = [f"{f} {'yes' if f in flags else 'no'}" for f in X86_FLAGS]
    amx = [f for f in sorted(flags) if f.startswith("amx")]
    return [machine_line(), "ISA flags: " + ", ".join(shown) + (f"; amx: {' '.join(amx)}" if amx else ""),
            f"compute dtype (auto) on cpu: {dtype_name(compute_dtype('cpu'))} (bf16 "
            f"{'native' if native_bf16('cpu') else 'emulated, so fp32'})"]


def kernel_lines() -> list[str]:
    from .. import kernels as native
    from ..errors import ConfigError
    from ..realquant import select_backend

    reason = native.unsupported_reason()
    if reason is not None:
        line = f"native int4 kernels: not available ({reason}); the cpu backend uses the cpu-torch path"
    else:
        try:
            kernels = native.load()
        except ConfigError as exc:
            kernels, reason = None, str(exc)
        if kernels is None:
            line = f"native int4 kernels: did not load ({reason or 'build failed'}); cpu-torch path"
        else:
            line = (f"native int4 kernels: compiled and loaded, {kernels.isa} path (this CPU can run "
                    f"{', '.join(native.cpu_isas())}; this build holds {', '.join(kernels.compiled_isas())})")
    backend = select_backend("auto", "cpu")
    return [line, f"real-quant backend for a model on the cpu: {backend.name} ({backend.description})"]


def _int_mm_usable(device) -> str:
    import torch

    from ..quantizer import int_mm

    try:
        a = torch.randint(-8, 8, (32, 64), dtype=torch.int8, device=device)
        w = torch.randint(-8, 8, (16, 64), dtype=torch.int8, device=device)
        ok = torch.equal(int_mm(a, w).cpu().long(), a.cpu().long() @ w.cpu().long().t())
    except RuntimeError as exc:
        return f"not usable ({str(exc).splitlines()[0][:120]})"
    return "usable (exact)" if ok else "not exact here"


def cuda_lines() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"CUDA: no CUDA device (torch built with CUDA {torch.version.cuda or 'none'})"]
    return [f"CUDA: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s), CUDA "
            f"{torch.version.cuda}); int8 torch._int_mm: {_int_mm_usable('cuda')}"]


def npu_lines() -> list[str]:
    import torch

    from ..realquant.npu import cann_version, self_check

    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError:
        return ["NPU: torch_npu not installed"]
    except Exception as exc:  # a broken CANN install
        return [f"NPU: torch_npu fails to import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"]
    head = f"NPU: torch_npu {getattr(torch_npu, '__version__', 'unknown')}, CANN {cann_version(torch_npu)}"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return [f"{head}; no NPU device (kernel self-check skipped)"]
    lines = [f"{head}; {npu.device_count()} device(s)", "NPU kernel self-check (against the CPU math):"]
    return lines + [f"  {check.line}" for check in self_check(torch_npu, NPU_DEVICE)]


def ascend_lines() -> list[str]:
    from ..realquant.ascend_serving import requirement_lines

    return ["An Ascend export (--format ascend) needs on the server:"] + [f"  {s}" for s in requirement_lines()]


def run(args: argparse.Namespace) -> int:
    import torch

    print("FlatQuant Studio doctor: what this machine supports")
    for line in cpu_lines() + kernel_lines() + [f"torch {torch.__version__}"] + cuda_lines() + npu_lines():
        print(line)
    for line in ascend_lines():
        print(line)
    print("All done!")
    return 0
