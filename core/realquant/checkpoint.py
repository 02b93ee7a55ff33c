"""The real-quant checkpoint: a folder that loads back without recalibration and without the original weights.

  model.safetensors   every tensor: packed int4 codes (``<linear>.qweight``, uint8 [out, ceil(in/2)], two codes per
                      byte, see core.realquant.packing) with fp32 per-channel scales (``<linear>.w_scale``), the
                      online transforms and biases of those linears, and all the other (float) weights as they are;
                      above the shard size, model-0000i-of-0000n.safetensors + model.safetensors.index.json (the
                      export streams one decoder layer at a time into them)
  quant_config.json   format, model identity, the FlatQuant config, and one entry per converted module (kind, widths,
                      bits, activation clip ratio, shared-input group), plus the byte counts of the quantized linears
  config.json, generation_config.json, tokenizer files   as transformers writes them

Loading builds the model skeleton on the meta device (no random init, no original weights), puts the converted
modules in place from the stored codes, and assigns the remaining tensors. Read with safetensors only (no pickle).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..attention import use_flatquant_attention
from ..errors import FlatQuantError, ModelLoadError
from ..flat import FlatQuantLinear, KVCacheQuantizer
from ..matrices import apply_layer_matrices, check_layer_indices
from ..memory import trim_host_heap
from ..models import LoadedModel, decoder_layers, model_identity, read_architecture
from ..progress import CancelToken
from ..quantizer import SharedInputQuant
from ..report import atomic_write_bytes
from .backends import select_backend
from .convert import convert_model, memory_sizes
from .folder import DEFAULT_SHARD_BYTES, ShardWriter
from .modules import FrozenQuantLinear, RealQuantLinear, TransformedNorm
from .packing import pack_int4, unpack_int4

FORMAT = "flatquant-studio/realquant-checkpoint/1"
TENSORS_STEM = "model"
TENSORS_FILE = TENSORS_STEM + ".safetensors"
INDEX_FILE = TENSORS_FILE + ".index.json"
MANIFEST_FILE = "quant_config.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(codes.cpu()) if bits <= 4 else codes.cpu().to(torch.int8).contiguous()


def _unpack_codes(stored: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_int4(stored, in_features) if bits <= 4 else stored.to(torch.int8)


def _linear_entry(kind: str, m: nn.Module, group: Optional[str]) -> dict:
    return {"kind": kind, "in_features": m.in_features, "out_features": m.out_features, "w_bits": m.w_bits,
            "a_bits": m.a_bits, "a_clip": m.a_clip, "bias": m.bias is not None,
            "transform": m.trans_left is not None, "shared_input": group}


class _Collected:
    """What the export has gathered so far, besides the tensors (those go to the shard writer)."""

    def __init__(self, dtype: Optional[torch.dtype]):
        self.dtype = dtype
        self.modules: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.q_bytes = 0
        self.float_dtypes: set = set()
        self.in_memory = {"in_memory_bytes": 0, "bf16_bytes": 0, "backend": None, "weight_layout": set()}

    def count_in_memory(self, part: nn.Module) -> None:
        sizes = memory_sizes(part)
        for key in ("in_memory_bytes", "bf16_bytes"):
            self.in_memory[key] += sizes[key]
        self.in_memory["backend"] = sizes["backend"] or self.in_memory["backend"]
        self.in_memory["weight_layout"].update(sizes["weight_layout"])

    def add(self, writer: ShardWriter, name: str, t: torch.Tensor, quantized: bool = False) -> None:
        t = t.detach().cpu()
        if t.is_floating_point() and not name.endswith(".w_scale"):
            t = t.to(self.dtype) if self.dtype is not None else t
            self.float_dtypes.add(t.dtype)
        if quantized:
            self.q_bytes += t.numel() * t.element_size()
        writer.add(name, t.contiguous())


def _write_part(module: nn.Module, prefix: str, writer: ShardWriter, got: _Collected, skip: tuple = ()) -> None:
    """Every tensor of ``module`` (names under ``prefix``), its converted modules' manifest entries and packed codes;
    state-dict keys starting with ``skip`` are left to another part."""
    groups: dict[int, str] = {}
    handled: list[str] = []
    dot = prefix + "." if prefix else ""
    for rel, m in module.named_modules():
        name = dot + rel if rel else prefix
        if skip and (name + ".").startswith(skip):
            continue
        if isinstance(m, (RealQuantLinear, FrozenQuantLinear)):
            real = isinstance(m, RealQuantLinear)
            group = groups.setdefault(id(m.shared), name) if real and m.shared is not None else None
            got.modules[name] = _linear_entry("realquant" if real else "frozen", m, group)
            codes = m.weight_codes()
            own = {"weight": m.weight} if codes is None else {"qweight": _pack_codes(codes, m.w_bits),
                                                              "w_scale": m.w_scale.float()}
            for key in ("bias", "trans_left", "trans_right"):
                if getattr(m, key) is not None:
                    own[key] = getattr(m, key)
            for key, t in own.items():
                got.add(writer, f"{name}.{key}", t, quantized=real or codes is not None)
            handled.append(name + ".")
        elif isinstance(m, TransformedNorm):
            got.modules[name] = {"kind": "norm_transform", "left": m.left.shape[0], "right": m.right.shape[0]}
        elif isinstance(m, KVCacheQuantizer):
            got.modules[name] = {"kind": "kv_quantizer", "k_bits": m.k_bits, "k_sym": m.k_sym, "v_bits": m.v_bits,
                                 "v_sym": m.v_sym, "head_dim": _kv_head_dim(m)}
    seen: dict[tuple, str] = {}  # per part: a freed layer's addresses may be reused by the next one
    for key, t in module.state_dict(prefix=dot).items():
        if key.startswith(tuple(handled)) or (skip and key.startswith(skip)):
            continue
        ident = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (key,)
        if ident in seen:  # tied weights (lm_head = embed_tokens): stored once
            got.aliases[key] = seen[ident]
            continue
        seen[ident] = key
        got.add(writer, key, t)


@torch.no_grad()
def _convert_outside_layers(model: nn.Module, layers_prefix: str, backend: str, keep_model: bool,
                            got: _Collected) -> dict[str, nn.Module]:
    """Convert the quantized linears outside the decoder layers (an int8 lm_head, core.flat.wrap_lm_head) in place
    before the model's own tensors are written, and count them; with ``keep_model`` a copy is converted and the
    originals are returned, to be put back once written."""
    kept = {}
    for name, m in [(n, m) for n, m in model.named_modules()
                    if isinstance(m, FlatQuantLinear) and not n.startswith(layers_prefix)]:
        holder = nn.ModuleDict({"linear": copy.deepcopy(m) if keep_model else m})
        convert_model(holder, backend)
        model.set_submodule(name, holder["linear"])
        if keep_model:
            kept[name] = m
    for name, m in model.named_modules():
        if isinstance(m, (RealQuantLinear, FrozenQuantLinear)) and not name.startswith(layers_prefix):
            got.count_in_memory(m)
    return kept


def export_checkpoint(model: nn.Module, tokenizer, output_dir: str | os.PathLike, config=None,
                      backend: str = "auto", dtype: Optional[torch.dtype] = None, *,
                      layer_states: Optional[dict] = None, algorithm=None, consume: bool = False,
                      keep_model: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                      cancel: Optional[CancelToken] = None) -> dict:
    """Write the checkpoint folder, streaming one decoder layer at a time into safetensors shards of at most
    ``shard_bytes`` (one ``model.safetensors`` when it fits, else ``model-0000i-of-0000n.safetensors`` + an index).

    ``model``: a folded fake-quant model (each layer converted in place on ``backend``; with ``keep_model`` a copy of
    each layer is converted instead, one at a time, and the model is left as it was), an already converted one, or a
    float model plus ``layer_states`` (a matrix file's ``payload["layers"]``) that ``algorithm`` rebuilds and folds
    here layer by layer; with ``consume`` each layer is released (to the meta device) once written, so the extra
    memory is one converted layer plus one shard. ``config``: the FlatQuantConfig (or its dict) recorded in
    quant_config.json. ``dtype``: the float parts' dtype on disk (default: as they are; per-channel scales stay fp32).
    ``cancel``: checked once per layer (JobCancelled; write into a StagedFolder so that nothing half-written stays).
    Returns the summary also stored under "sizes", the in-memory sizes of the converted linears and the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = decoder_layers(model)
    check_layer_indices(layers, layer_states or {})
    layers_name = next(n for n, m in model.named_modules() if m is layers)
    writer = ShardWriter(out, shard_bytes, TENSORS_STEM)
    got = _Collected(dtype)
    if layer_states is None and not any(isinstance(m, (FlatQuantLinear, RealQuantLinear, FrozenQuantLinear))
                                         for m in model.modules()):
        raise FlatQuantError("The model has no FlatQuant layers to export; calibrate it (quantize) or load a "
                             "flat_matrices.pth first.")
    kept = _convert_outside_layers(model, layers_name + ".", backend, keep_model, got)
    _write_part(model, "", writer, got, skip=(layers_name + ".",))
    for name, m in kept.items():  # keep_model: the model gets its own modules back
        model.set_submodule(name, m)
    for i in range(len(layers)):
        if cancel is not None:
            cancel.check()
        if layer_states is not None and i in layer_states:
            apply_layer_matrices(layers, i, algorithm, layer_states[i])
        part = copy.deepcopy(layers[i]) if keep_model else layers[i]
        if any(isinstance(m, FlatQuantLinear) for m in part.modules()):
            convert_model(part, backend)
        got.count_in_memory(part)
        _write_part(part, f"{layers_name}.{i}", writer, got)
        del part
        if consume:
            layers[i].to("meta")
            trim_host_heap()
    files = writer.finish()
    bf16_bytes = got.in_memory["bf16_bytes"]  # the converted linears' bytes in bf16 (memory_sizes)
    sizes = {"quantized_linear_bytes": got.q_bytes, "quantized_linear_bf16_bytes": bf16_bytes,
             "ratio_to_bf16": (got.q_bytes / bf16_bytes) if bf16_bytes else None,
             "file_bytes": sum((out / f).stat().st_size for f in files), "files": files}
    cfg_dict = config.to_amct_dict() if hasattr(config, "to_amct_dict") else config
    manifest = {"format": FORMAT, "architecture": type(model).__name__, "identity": model_identity(model),
                "flatquant_config": cfg_dict,
                "dtype": _dtype_name(next(iter(got.float_dtypes))) if len(got.float_dtypes) == 1 else None,
                "modules": got.modules, "aliases": got.aliases, "sizes": sizes,
                "weight_format": "int4 codes packed two per byte (low nibble = even input index, two's complement); "
                                 "8-bit codes stored as int8; fp32 per-output-channel scales"}
    if not getattr(model.config, "architectures", None):  # a model built in code has none; the loader needs it
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except ValueError:
            pass  # an invalid generation config is not worth failing the export (a failed write is)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    mem = got.in_memory
    in_memory = dict(mem, weight_layout=sorted(mem["weight_layout"]),
                     ratio_to_bf16=(mem["in_memory_bytes"] / mem["bf16_bytes"]) if mem["bf16_bytes"] else None)
    return {"output_dir": str(out), "tensors": [str(out / f) for f in files], "manifest": str(out / MANIFEST_FILE),
            "in_memory": in_memory, **sizes}


def _kv_head_dim(m: nn.Module) -> int:
    for t in (m.k_trans, m.v_trans):
        if t is not None:
            return int(t.dim)
    return 0


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"Checkpoint folder {str(path)!r} does not exist; pass the --output_dir of an export.")
    for name in (MANIFEST_FILE, "config.json"):
        if not (path / name).is_file():
            raise ModelLoadError(f"{str(path)!r} has no {name}; it is not a complete real-quant checkpoint "
                                 "(write one with `python -m core export`).")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{str(path / MANIFEST_FILE)!r} is not valid JSON ({exc}); export again.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{str(path)!r} is not a FlatQuant Studio real-quant checkpoint (format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r}).")
    tensor_files(path)
    return manifest


def tensor_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index names, or the one model.safetensors."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{str(path / INDEX_FILE)!r} is not a valid index ({exc}); export again.") from exc
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{str(path)!r} lacks {missing[0]}, named by {INDEX_FILE}; the checkpoint is "
                                 "incomplete, export again.")
        return files
    if not (path / TENSORS_FILE).is_file():
        raise ModelLoadError(f"{str(path)!r} has no {TENSORS_FILE}; it is not a complete real-quant checkpoint "
                             "(write one with `python -m core export`).")
    return [path / TENSORS_FILE]


def _take(tensors: dict, prefix: str, key: str, device) -> Optional[torch.Tensor]:
    t = tensors.pop(f"{prefix}.{key}", None)
    return None if t is None else t.to(device)


def _build_linear(name: str, entry: dict, tensors: dict, backend, shared: dict, device,
                  dtype: torch.dtype) -> nn.Module:
    k, n, bits = entry["in_features"], entry["out_features"], entry["w_bits"]
    bias = _take(tensors, name, "bias", device)
    left, right = _take(tensors, name, "trans_left", device), _take(tensors, name, "trans_right", device)
    if entry["kind"] == "realquant":
        codes = _unpack_codes(tensors.pop(f"{name}.qweight"), bits, k).to(device)
        scale = tensors.pop(f"{name}.w_scale").to(device)
        group = entry.get("shared_input")
        share = None
        if group is not None:
            share = shared.setdefault(group, SharedInputQuant(0))
            share.members += 1
        return RealQuantLinear(k, n, codes, scale, bias, bits, entry["a_bits"], entry["a_clip"], left, right,
                               backend, share)
    if f"{name}.qweight" in tensors:
        codes = _unpack_codes(tensors.pop(f"{name}.qweight"), bits, k).to(device)
        scale = tensors.pop(f"{name}.w_scale").to(device)
        return FrozenQuantLinear(codes, bias, bits, entry["a_bits"], entry["a_clip"], left, right, scale)
    weight = tensors.pop(f"{name}.weight").to(device)
    return FrozenQuantLinear(weight, bias, bits, entry["a_bits"], entry["a_clip"], left, right, None)


@torch.no_grad()
def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    backend: str = "auto") -> LoadedModel:
    """Load an exported real-quant checkpoint as a ready model (eval mode) with its tokenizer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    arch = read_architecture(path)
    device = torch.device(device)
    tensors: dict = {}
    for file in tensor_files(path):
        try:
            tensors.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{str(file)!r} is corrupt or truncated ({exc}); export again.") from exc
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    modules = manifest.get("modules", {})
    if any(e.get("kind") == "kv_quantizer" for e in modules.values()):
        use_flatquant_attention(config, force=True)
    dtype = getattr(torch, manifest["dtype"]) if manifest.get("dtype") else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    use_flatquant_attention(model)
    be = select_backend(backend, device)

    shared: dict[str, SharedInputQuant] = {}
    try:
        for name, entry in modules.items():
            kind = entry.get("kind")
            if kind in ("realquant", "frozen"):
                model.set_submodule(name, _build_linear(name, entry, tensors, be, shared, device, dtype))
            elif kind == "norm_transform":
                norm = model.get_submodule(name)
                model.set_submodule(name, TransformedNorm(norm, tensors[f"{name}.left"], tensors[f"{name}.right"]))
            elif kind == "kv_quantizer":
                kvq = KVCacheQuantizer(entry["head_dim"], entry["k_bits"], entry["k_sym"], entry["v_bits"],
                                       entry["v_sym"], seed=0)
                for t in (kvq.k_trans, kvq.v_trans):
                    if t is not None:
                        t.freeze()  # frozen buffers, overwritten by the stored ones below
                model.set_submodule(name, kvq)
            else:
                raise ModelLoadError(f"{MANIFEST_FILE} names an unknown module kind {kind!r} for {name}.")
    except KeyError as exc:
        raise ModelLoadError(f"{str(path)!r} lacks tensor {exc}; the checkpoint is incomplete, export again.") from exc

    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelLoadError(f"{str(path)!r} holds tensors this model does not have "
                             f"({result.unexpected_keys[:3]}); it was written for another architecture.")
    for dst, src in manifest.get("aliases", {}).items():
        mod_name, _, attr = dst.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_mod), src_attr))
    _rebuild_meta_buffers(model, config, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{str(path)!r} lacks tensors for {left[:3]}; the checkpoint is incomplete, export again.")
    model.to(device).eval().requires_grad_(False)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        pass  # exported without a tokenizer
    return LoadedModel(model, tokenizer, path.name, str(path), arch)


def _rebuild_meta_buffers(model: nn.Module, config, device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in any checkpoint: recompute them on a real device."""
    for name, m in list(model.named_modules()):
        if any(b.is_meta for b in m.buffers(recurse=False)) and hasattr(m, "inv_freq"):
            with torch.device(device):
                model.set_submodule(name, type(m)(config=config))


def quantized_linear_sizes(path: str | os.PathLike) -> dict:
    return read_manifest(path)["sizes"]


__all__ = ["FORMAT", "export_checkpoint", "load_checkpoint", "read_manifest", "tensor_files", "quantized_linear_sizes"]
