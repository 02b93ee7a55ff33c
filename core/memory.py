"""Memory: what a job will need (estimated before it starts), what the machine has, what the process holds now, and
where captured activations live (host tensors, or files on disk with ``--activation_dir``).

The memory model of a quantize job (see README, "Memory model"):
  weights      the model in its storage dtype, on the host, once (calibration folds the quantized layers in place)
  one layer    the layer being calibrated, on the device, upcast to fp32, with its FlatQuant parameters, optimizer
               state and the autograd graph of one batch
  activations  the full-precision inputs and outputs of that layer for every calibration sample: 2 x nsamples x
               seqlen x hidden fp32, on the host (or on disk)
  original     a second copy of the decoder layers, only when the float original is kept for comparisons
               (``keep_original``: the GUI; the CLI keeps it only when it fits)
  evaluation   one batch of perplexity windows through one layer, and the logits of one window chunk
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import FlatQuantError, OutputError
from .outputs import reserve_file

GIB = 2 ** 30
MIB = 2 ** 20
# Python, torch, transformers and tokenizers before any model: measured ~0.45 GiB here; kept generous.
RUNTIME_OVERHEAD_BYTES = int(0.6 * GIB)
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")  # --dtype: auto = the checkpoint's own
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}


class MemoryBudgetError(FlatQuantError):
    """The job would not fit in host or device memory; the message names the option that makes it fit."""


# --- what the machine has and the process holds ---------------------------------------------------------------


def proc_kb(path: str, key: str) -> Optional[int]:
    """A ``key: N kB`` line of a /proc file (/proc/meminfo, /proc/self/status) in KiB; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_available_bytes() -> Optional[int]:
    """MemAvailable (Linux), else psutil's available memory, else None (unknown: no check)."""
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    if kb is not None:
        return kb * 1024
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def device_free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on a cuda/npu device (None on cpu: the host is the device)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "npu":
            return int(torch.npu.mem_get_info(device)[0])
    except Exception:
        return None
    return None


def current_rss_bytes() -> int:
    kb = proc_kb("/proc/self/status", "VmRSS")
    return kb * 1024 if kb is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_counter(device: torch.device, name: str) -> Optional[int]:
    """torch.cuda / torch.npu ``name`` (memory_allocated, max_memory_allocated) of an accelerator; None on cpu."""
    if device.type in ("cuda", "npu"):
        return int(getattr(getattr(torch, device.type), name)(device))
    return None


def device_allocated_bytes(device: torch.device) -> Optional[int]:
    return _device_counter(device, "memory_allocated")


def device_peak_bytes(device: torch.device) -> Optional[int]:
    return _device_counter(device, "max_memory_allocated")


def resident_mb(device: Optional[torch.device] = None) -> dict:
    """What progress events carry: host RSS now and at peak, and device memory allocated (None on cpu)."""
    dev = device_allocated_bytes(device) if device is not None else None
    return {"rss_mb": round(current_rss_bytes() / MIB, 1), "peak_rss_mb": round(peak_rss_bytes() / MIB, 1),
            "device_mb": None if dev is None else round(dev / MIB, 1)}


def trim_host_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim; no-op elsewhere). Called once per layer: long-
    lived allocations made between layers (copied and folded weights) otherwise pin freed pages under them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- dtypes ---------------------------------------------------------------------------------------------------


def parse_dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """'auto'/None -> None (the checkpoint's own dtype); bf16|fp16|fp32 (or the torch names) -> that dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise FlatQuantError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}.")
    return DTYPE_NAMES[key]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- the estimate ---------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """The few config numbers the estimate needs (read from config.json without loading weights)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(int(get("num_hidden_layers")), hidden, int(get("intermediate_size")), heads,
                   int(get("num_key_value_heads") or heads), int(get("head_dim") or hidden // heads),
                   int(get("vocab_size")), bool(get("tie_word_embeddings", False)))

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        return attn + 3 * h * self.intermediate + 2 * h + 2 * self.head_dim

    def other_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def total_params(self) -> int:
        return self.num_layers * self.layer_params() + self.other_params()


@dataclass
class MemoryEstimate:
    """Peak bytes of a quantize job on the host and on the device, by part."""

    host: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    device_is_host: bool = True

    @property
    def host_total(self) -> int:
        return sum(self.host.values()) + (sum(self.device.values()) if self.device_is_host else 0)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    def summary(self) -> str:
        host, device = (", ".join(f"{k} {v:.2f}" for k, v in parts.items()) for parts in self.parts_gib())
        text = f"host {self.host_total / GIB:.2f} GiB ({host})"
        if not self.device_is_host:
            text += f"; device {self.device_total / GIB:.2f} GiB ({device})"
        return text

    def parts_gib(self) -> tuple[dict, dict]:
        """({part: GiB} on the host (the device's parts too when the device is the host), {part: GiB} on the device),
        as summary() lists them."""
        host = dict(self.host, **({} if not self.device_is_host else self.device))
        return ({k: round(v / GIB, 2) for k, v in host.items() if v},
                {k: round(v / GIB, 2) for k, v in self.device.items() if v})

    def to_dict(self) -> dict:
        return {"host_gib": round(self.host_total / GIB, 3), "device_gib": round(self.device_total / GIB, 3),
                "host_parts_mib": {k: round(v / MIB, 1) for k, v in self.host.items()},
                "device_parts_mib": {k: round(v / MIB, 1) for k, v in self.device.items()},
                "device_is_host": self.device_is_host}


def activation_bytes(shape: ModelShape, nsamples: int, seqlen: int) -> int:
    """The calibration set's captured activations: one layer's fp32 inputs and outputs, nsamples x seqlen x hidden
    each (in RAM, or in files under --activation_dir)."""
    return 2 * nsamples * seqlen * shape.hidden * 4


def estimate_quantize_memory(shape: ModelShape, weight_dtype: torch.dtype, nsamples: int, seqlen: int,
                             cali_bsz: int, device: torch.device, keep_original: bool = False,
                             activations_on_disk: bool = False, calibrate: bool = True, ppl_seqlen: int = 512,
                             ppl_batch: int = 4, layers_trained: Optional[int] = None) -> MemoryEstimate:
    wbytes = dtype_bytes(weight_dtype)
    layer = shape.layer_params()
    est = MemoryEstimate(device_is_host=device.type == "cpu")
    est.host["runtime"] = RUNTIME_OVERHEAD_BYTES
    est.host["weights"] = shape.total_params() * wbytes
    if keep_original:
        trained = shape.num_layers if layers_trained is None else min(layers_trained, shape.num_layers)
        est.host["original_copy"] = trained * layer * wbytes
    act = activation_bytes(shape, nsamples, seqlen) if calibrate else 0
    if activations_on_disk:
        est.host["activations"] = 0
    else:
        est.host["activations"] = act
    bsz = max(1, min(cali_bsz, nsamples))
    tokens = bsz * seqlen
    if calibrate:
        # fp32 layer + its FlatQuant copy of the transformed weights, AdamW state of the small parameters, and the
        # autograd graph of one batch: ~14 hidden-wide and ~6 intermediate-wide fp32 activations per token
        # (SDPA's fused kernels do not hold the seqlen x seqlen scores)
        graph = tokens * 4 * (14 * shape.hidden + 6 * shape.intermediate)
        est.device["layer_fp32"] = 2 * layer * 4
        est.device["train_batch"] = graph + 3 * tokens * shape.hidden * 4
    ptokens = ppl_batch * ppl_seqlen
    est.device["eval_batch"] = ptokens * 4 * (6 * shape.hidden + 3 * shape.intermediate) + \
        ppl_seqlen * shape.vocab * 4 * 3
    if calibrate:
        est.device["eval_batch"] = 0  # calibration's peak dominates; evaluation runs after it, in the same space
    return est


def check_fits(est: MemoryEstimate, device: torch.device, knobs: list[str],
               host_available: Optional[int] = None, device_available: Optional[int] = None,
               already_resident: int = 0) -> None:
    """Refuse (MemoryBudgetError, one line) when the estimate exceeds what is available; ``knobs`` are the options
    that would lower it, named in the message. ``already_resident``: bytes this process holds now that the
    estimate also counts (MemAvailable does not include them)."""
    host_available = host_available_bytes() if host_available is None else host_available
    if host_available is not None:
        have = host_available + already_resident
        if est.host_total > have:
            raise MemoryBudgetError(
                f"this job needs about {est.host_total / GIB:.1f} GiB of host memory but {have / GIB:.1f} GiB is "
                f"available ({est.summary()}); lower it with {', '.join(knobs)}.")
    if not est.device_is_host:
        free = device_free_bytes(device) if device_available is None else device_available
        if free is not None and est.device_total > free:
            raise MemoryBudgetError(
                f"this job needs about {est.device_total / GIB:.1f} GiB on {device} but {free / GIB:.1f} GiB is free "
                f"({est.summary()}); lower it with {', '.join(knobs)}, or use a device with more memory.")


# --- activation storage ---------------------------------------------------------------------------------------


class ActivationStore:
    """Allocates the [nsamples, seqlen, hidden] fp32 activation buffers: plain host tensors, or, with a folder,
    file-backed tensors (torch.from_file, shared mapping) that the OS writes to disk instead of holding in RAM.
    Each file is unlinked as soon as it is mapped, so its space is returned when the tensor is freed and nothing is
    left behind by a crash or a cancel (POSIX; elsewhere the file is removed by close())."""

    def __init__(self, folder: Optional[str | os.PathLike] = None):
        self.folder = Path(folder) if folder else None
        self._kept: list[Path] = []
        self._count = 0
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, no permission, a full disk
                raise OutputError(f"--activation_dir {str(folder)!r} cannot be made a folder ({exc.strerror or exc}); "
                                  "point it at a writable folder.") from exc

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.folder is None:
            return torch.empty(shape, dtype=dtype)
        self._count += 1
        path = self.folder / f"activations.{os.getpid()}.{self._count}.bin"
        # its blocks reserved first: a mapped page on a full disk would be SIGBUS, this is one error line
        reserve_file(path, math.prod(shape) * dtype.itemsize, "--activation_dir", str(self.folder))
        t = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        try:
            path.unlink()
        except OSError:  # a platform that cannot unlink an open file
            self._kept.append(path)
        return t

    def close(self) -> None:
        for path in self._kept:
            path.unlink(missing_ok=True)
        self._kept.clear()
