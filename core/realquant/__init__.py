"""Real W4A4 inference: packed int4 weights, per-token int4 activations and integer GEMMs on CPU, CUDA and NPU.

    from core.realquant import convert_model, export_checkpoint, load_checkpoint
    real = convert_model(folded_fake_quant_model, backend="auto")   # in place; returns the model
"""
# Layers, lowest first: backends (the cpu and cuda ones; core.kernels below them) < npu, modules < convert <
# timing (the time diff), checkpoint (load/export) < ascend. Importing npu here registers its backend for every user
# of the package.
from . import npu  # noqa: F401
from .backends import available_backends, backend_names, select_backend
from .checkpoint import export_checkpoint, load_checkpoint, read_manifest
from .convert import convert_model, is_real_quant, memory_sizes, model_backend
from .modules import FrozenQuantLinear, RealQuantLinear, TransformedNorm
from .timing import OriginalParts, report_time_diff, time_diff

__all__ = ["available_backends", "backend_names", "select_backend", "convert_model", "is_real_quant",
           "model_backend", "memory_sizes", "OriginalParts", "time_diff", "report_time_diff", "export_checkpoint",
           "load_checkpoint", "read_manifest", "RealQuantLinear", "FrozenQuantLinear", "TransformedNorm"]
