"""One adapter per model family (see base.py). Adding a family: one file here that registers a ModelAdapter, its
import below, and a test on a small random model of it (tests/test_adapters.py)."""
from . import llama, mistral, qwen2, qwen3  # noqa: F401  (each registers its adapter)
from .base import (LinearGroup, ModelAdapter, adapter_for, adapter_for_architecture, register,
                   supported_architectures, unsupported)

__all__ = ["LinearGroup", "ModelAdapter", "adapter_for", "adapter_for_architecture", "register",
           "supported_architectures", "unsupported"]
