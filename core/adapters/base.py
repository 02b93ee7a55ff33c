"""What FlatQuant needs to know about one model family's decoder layer, in one place.

Every module that touches model structure (wrapping, folding, rotations, GPTQ, identity of matrix files) asks an
adapter instead of naming attributes itself. A family is one ``ModelAdapter`` in its own file under core/adapters/,
registered by architecture (the ``*ForCausalLM`` class name) and by decoder-layer class name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..errors import UnsupportedModelError, shown


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the output of one RMSNorm: they share one input transform and one activation quantizer.
    ``norm`` is the norm's attribute in the decoder layer, ``parent`` the module that holds the linears."""

    name: str  # "qkv" / "up_gate": the key used by activation statistics
    norm: str
    parent: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ModelAdapter:
    """Structure of one family. Attribute paths are dotted, relative to the model (``*_path``) or to one decoder
    layer (the rest)."""

    architecture: str  # the *ForCausalLM class name in config.json's "architectures"
    layer_class: str  # the decoder-layer class name, so a lone layer finds its adapter
    family: str  # short label: "llama", "qwen3", ...
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    qkv: LinearGroup = LinearGroup("qkv", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"))
    up_gate: LinearGroup = LinearGroup("up_gate", "post_attention_layernorm", "mlp", ("gate_proj", "up_proj"))
    o_proj: str = "self_attn.o_proj"  # writes the attention output into the residual stream
    down_proj: str = "mlp.down_proj"  # writes the MLP output into the residual stream
    up_proj: str = "mlp.up_proj"  # down_proj's input is act(gate)·up: a per-channel scale folds into up's rows
    qkv_bias: bool = False  # q/k/v carry a bias (Qwen2)
    head_norms: tuple[str, ...] = ()  # per-head norms after q/k (Qwen3 q_norm/k_norm): not on the residual stream

    # --- navigation -------------------------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[LinearGroup, LinearGroup]:
        return (self.qkv, self.up_gate)

    @staticmethod
    def get(root: nn.Module, path: str) -> nn.Module:
        return root.get_submodule(path)

    @staticmethod
    def put(root: nn.Module, path: str, module: nn.Module) -> None:
        root.set_submodule(path, module)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def readers(self) -> tuple[str, ...]:
        """Linears of a layer that read the residual stream (through a norm), as layer-relative paths."""
        return tuple(f"{g.parent}.{m}" for g in self.groups for m in g.members)

    def writers(self) -> tuple[str, ...]:
        """Linears of a layer that write into the residual stream."""
        return (self.o_proj, self.down_proj)

    def linears(self) -> tuple[str, ...]:
        """All seven quantizable linears of a layer, in execution order."""
        return self.readers()[:3] + (self.o_proj,) + self.readers()[3:] + (self.down_proj,)

    def identity(self, model: nn.Module) -> dict:
        """What a matrix file must match: a file for another model is refused."""
        return self.config_identity(model.config)

    def config_identity(self, cfg) -> dict:
        """The identity from a config object (a model's, or config.json's fields read before loading)."""
        return {
            "architecture": self.architecture,
            "hidden_size": int(cfg.hidden_size),
            "intermediate_size": int(cfg.intermediate_size),
            "num_hidden_layers": int(cfg.num_hidden_layers),
            "num_attention_heads": int(cfg.num_attention_heads),
            "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        }


_BY_ARCH: dict[str, ModelAdapter] = {}
_BY_LAYER: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    _BY_ARCH[adapter.architecture] = adapter
    _BY_LAYER[adapter.layer_class] = adapter
    return adapter


def supported_architectures() -> tuple[str, ...]:
    return tuple(_BY_ARCH)


def unsupported(arch: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"Architecture {shown(arch)} is not supported; supported: "
                                 f"{', '.join(supported_architectures())}.")


def adapter_for_architecture(arch: str) -> ModelAdapter:
    if arch not in _BY_ARCH:
        raise unsupported(arch)
    return _BY_ARCH[arch]


def adapter_for(model_or_layer: nn.Module) -> ModelAdapter:
    """The adapter of a whole model (by its class) or of one decoder layer (by the layer's class)."""
    name = type(model_or_layer).__name__
    found: Optional[ModelAdapter] = _BY_ARCH.get(name) or _BY_LAYER.get(name)
    if found is None:
        raise unsupported(name)
    return found
