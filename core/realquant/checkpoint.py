"""The real-quant checkpoint: a folder that loads back without recalibration and without the original weights.

  model.safetensors   every tensor: packed int4 codes (``<linear>.qweight``, uint8 [out, ceil(in/2)], two codes per
                      byte, see core.realquant.packing) with fp32 per-channel scales (``<linear>.w_scale``), the
                      online transforms and biases of those linears, and all the other (float) weights as they are
  quant_config.json   format, model identity, the FlatQuant config, and one entry per converted module (kind, widths,
                      bits, activation clip ratio, shared-input group), plus the byte counts of the quantized linears
  config.json, generation_config.json, tokenizer files   as transformers writes them

Loading builds the model skeleton on the meta device (no random init, no original weights), puts the converted
modules in place from the stored codes, and assigns the remaining tensors. Read with safetensors only (no pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import ModelLoadError
from ..flat import ATTN_KEY, KVCacheQuantizer, register_attention
from ..models import LoadedModel, model_identity, read_architecture
from ..quantizer import SharedInputQuant
from ..report import atomic_write_bytes
from .backends import select_backend
from .convert import convert_model, is_real_quant
from .modules import FrozenQuantLinear, RealQuantLinear, TransformedNorm
from .packing import pack_int4, unpack_int4

FORMAT = "flatquant-studio/realquant-checkpoint/1"
TENSORS_FILE = "model.safetensors"
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


@torch.no_grad()
def export_checkpoint(model: nn.Module, tokenizer, output_dir: str | os.PathLike, config=None,
                      backend: str = "auto", dtype: Optional[torch.dtype] = None) -> dict:
    """Convert ``model`` (folded fake-quant, or already converted) in place if needed and write the checkpoint
    folder. ``config``: the FlatQuantConfig (or its dict) recorded in quant_config.json. ``dtype``: the float
    parts' dtype on disk (default: as they are; per-channel scales stay fp32). Returns the summary that is also
    stored there under "sizes" plus the written paths."""
    from safetensors.torch import save

    if not is_real_quant(model):
        model = convert_model(model, backend)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[int, str] = {}
    q_bytes = bf16_bytes = 0
    handled: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, RealQuantLinear):
            group = None
            if m.shared is not None:
                group = groups.setdefault(id(m.shared), name)
            modules[name] = _linear_entry("realquant", m, group)
            own = {"qweight": _pack_codes(m.weight_codes(), m.w_bits), "w_scale": m.w_scale.float().cpu()}
            for key in ("bias", "trans_left", "trans_right"):
                if getattr(m, key) is not None:
                    own[key] = getattr(m, key).cpu()
            q_bytes += sum(t.numel() * t.element_size() for t in own.values())
            bf16_bytes += 2 * m.out_features * (m.in_features + (1 if m.bias is not None else 0))
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in own.items()})
            handled.append(name)
        elif isinstance(m, FrozenQuantLinear):
            modules[name] = _linear_entry("frozen", m, None)
            codes = m.weight_codes()
            own = {"weight": m.weight.cpu()} if codes is None else {"qweight": _pack_codes(codes, m.w_bits),
                                                                    "w_scale": m.w_scale.float().cpu()}
            for key in ("bias", "trans_left", "trans_right"):
                if getattr(m, key) is not None:
                    own[key] = getattr(m, key).cpu()
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in own.items()})
            handled.append(name)
        elif isinstance(m, TransformedNorm):
            modules[name] = {"kind": "norm_transform", "left": m.left.shape[0], "right": m.right.shape[0]}
        elif isinstance(m, KVCacheQuantizer):
            modules[name] = {"kind": "kv_quantizer", "k_bits": m.k_bits, "k_sym": m.k_sym, "v_bits": m.v_bits,
                             "v_sym": m.v_sym, "head_dim": _kv_head_dim(m)}

    prefixes = tuple(n + "." for n in handled)
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (key,)
        if ident in seen:  # tied weights (lm_head = embed_tokens): stored once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()

    if dtype is not None:
        tensors = {n: t.to(dtype) if t.is_floating_point() and not n.endswith(".w_scale") else t
                   for n, t in tensors.items()}
        q_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.rpartition(".")[0] in handled
                      and modules[n.rpartition(".")[0]]["kind"] == "realquant")
    sizes = {"quantized_linear_bytes": q_bytes, "quantized_linear_bf16_bytes": bf16_bytes,
             "ratio_to_bf16": (q_bytes / bf16_bytes) if bf16_bytes else None,
             "file_bytes": None}
    cfg_dict = config.to_amct_dict() if hasattr(config, "to_amct_dict") else config
    dtypes = {t.dtype for n, t in tensors.items() if t.is_floating_point() and not n.endswith(".w_scale")}
    manifest = {"format": FORMAT, "architecture": type(model).__name__, "identity": model_identity(model),
                "flatquant_config": cfg_dict, "dtype": _dtype_name(next(iter(dtypes))) if len(dtypes) == 1 else None,
                "modules": modules, "aliases": aliases, "sizes": sizes,
                "weight_format": "int4 codes packed two per byte (low nibble = even input index, two's complement); "
                                 "8-bit codes stored as int8; fp32 per-output-channel scales"}
    data = save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(out / TENSORS_FILE, data)
    sizes["file_bytes"] = len(data)
    if not getattr(model.config, "architectures", None):  # a model built in code has none; the loader needs it
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except (ValueError, OSError):
            pass  # an invalid generation config is not worth failing the export
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return {"output_dir": str(out), "tensors": str(out / TENSORS_FILE), "manifest": str(out / MANIFEST_FILE),
            **sizes}


def _kv_head_dim(m: nn.Module) -> int:
    for t in (m.k_trans, m.v_trans):
        if t is not None:
            return int(t.dim)
    return 0


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"Checkpoint folder {str(path)!r} does not exist; pass the --output_dir of an export.")
    for name in (MANIFEST_FILE, TENSORS_FILE, "config.json"):
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
    return manifest


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
    try:
        tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(path / TENSORS_FILE)!r} is corrupt or truncated ({exc}); export again.") from exc
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    modules = manifest.get("modules", {})
    if any(e.get("kind") == "kv_quantizer" for e in modules.values()):
        register_attention()
        config._attn_implementation = ATTN_KEY
    dtype = getattr(torch, manifest["dtype"]) if manifest.get("dtype") else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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


__all__ = ["FORMAT", "export_checkpoint", "load_checkpoint", "read_manifest", "quantized_linear_sizes"]
