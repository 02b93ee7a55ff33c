"""Export a FlatQuant W4A4 model in the layout vllm-ascend serves (msModelSlim's W4A4_FLATQUANT_DYNAMIC).

The layout and the serving math are defined in ``core.realquant.ascend_reference`` (the executable spec); this
module writes it. It streams: one decoder layer at a time is wrapped, loaded from the matrix file and folded (or, for
a model folded in memory, read), turned into its export tensors and appended to the current shard, so the largest
extra memory is one layer in fp32 plus one shard (``shard_bytes``).

What maps where (FlatQuant's folded form is exactly the server's form):
- q/k/v and gate/up: their norm's transform P1 ⊗ P2 becomes each member's left_trans / right_trans (identical in a
  group, as the server fuses the group into one kernel input); the group's per-channel scale is already folded into
  the RMSNorm weight (FLOAT); weights are the int4 codes of W·P⁻ᵀ with the learned per-channel clip in weight_scale.
- down_proj: its own online transform; its scale is folded into up_proj's rows.
- o_proj (use_o_quant) and the kv-cache quantizer have no FlatQuant serving method there: exported FLOAT in the
  original basis, with one note.
- Everything else (embeddings, norms, lm_head, skipped layers, layers not calibrated) FLOAT, in the model's dtype.

The folder is written under a temp name beside the target, validated against the layout, then renamed: a failure
(disk full, a bug) leaves nothing that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..algorithms import get_algorithm
from ..errors import ExportError
from ..events import render as render_event
from ..flat import FlatNormTransform, FlatQuantLinear, KVCacheQuantizer, is_wrapped
from ..matrices import apply_layer_matrices, check_layer_indices
from ..models import decoder_layers, resolve_model_path
from ..progress import Reporter
from ..transforms import kronecker_matmul
from .ascend_reference import (CONFIG_QUANTIZE, DESCRIPTION_FILE, FLOAT_TYPE, FUSED_GROUPS, KRONECKER_MAX_FACTOR,
                               METADATA_KEY, QUANT_TYPE, WEIGHTS_STEM, layout_problems, server_factors)
from .ascend_serving import README_FILE, metadata, readme_text
from .checkpoint import export_checkpoint
from .folder import DEFAULT_SHARD_BYTES, ShardWriter, StagedFolder, check_target, serving_dtype, source_dtype
from .packing import quantize_weight

LAYER_PREFIX = "model.layers"
GROUP_PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp",
                 "up_proj": "mlp"}

# --- skip_layers vs vLLM's fused layers -------------------------------------------------------------------------


def mixed_groups(cfg, layers: Iterable[int]) -> list[tuple[int, tuple[str, ...], list[str]]]:
    """(layer, group, skipped members) for every fused group that ``cfg.skip_layers`` skips only in part."""
    out = []
    for i in layers:
        for group in FUSED_GROUPS:
            names = [f"{LAYER_PREFIX}.{i}.{GROUP_PARENTS[m]}.{m}" for m in group]
            skipped = [n for n in names if cfg.is_skipped(n)]
            if skipped and len(skipped) < len(names):
                out.append((i, group, skipped))
    return out


def check_fused_skips(cfg, layers: Iterable[int]) -> None:
    mixed = mixed_groups(cfg, layers)
    if mixed:
        i, group, skipped = mixed[0]
        raise ExportError(f"skip_layers keeps {', '.join(skipped)} in float but not the rest of "
                          f"{'/'.join(group)} in layer {i}; vllm-ascend fuses them into one layer that must be all "
                          f"quantized or all float ({len(mixed)} such group(s)). Recalibrate with the whole group in "
                          "--skip_layers (quantize --export ascend widens it for you).")


def widen_skip_layers(cfg, layers: Iterable[int]) -> tuple[list[str], list[str]]:
    """skip_layers with every partly skipped fused group completed, and one message per widened group."""
    skip, messages = list(cfg.skip_layers), []
    for i, group, skipped in mixed_groups(cfg, layers):
        names = [f"{LAYER_PREFIX}.{i}.{GROUP_PARENTS[m]}.{m}" for m in group]
        skip += [n for n in names if n not in skipped]
        messages.append(f"note: skip_layers widened to all of {'/'.join(group)} in layer {i} (vllm-ascend fuses "
                        f"them; {', '.join(s.rsplit('.', 1)[1] for s in skipped)} was skipped alone).")
    return skip, messages


def check_config(cfg) -> None:
    if cfg.w_bits != 4 or cfg.a_bits != 4:
        raise ExportError(f"the ascend format holds W4A4 models only; this one is W{cfg.w_bits}A{cfg.a_bits} "
                          "(use --format native).")


# --- per-layer export tensors -----------------------------------------------------------------------------------


@dataclass
class ExportStats:
    quantized_linears: int = 0
    quantized_bytes: int = 0
    quantized_bf16_bytes: int = 0
    not_exported: set = field(default_factory=set)
    factors: set = field(default_factory=set)  # (left, right) Kronecker factor sizes of the quantized linears

    @property
    def note_params(self) -> dict:
        """The 'export_not_float' event's parameters (core.events)."""
        return {"parts": sorted(self.not_exported)}

    @property
    def notes(self) -> list[str]:
        return [render_event("export_not_float", self.note_params)] if self.not_exported else []


def _group_transform(layer: nn.Module, member: str):

    norm = layer.input_layernorm if GROUP_PARENTS[member] == "self_attn" else layer.post_attention_layernorm
    if isinstance(norm, FlatNormTransform):
        left, right, _, _ = norm.trans.matrices()
        return left, right
    return None


def _check_factors(name: str, n: int, left: torch.Tensor, right: torch.Tensor) -> None:
    if n % 8:
        raise ExportError(f"{name}: input width {n} is not a multiple of 8, which the ascend int4 format needs.")
    a, b = server_factors(n) if n % 4 != 2 else (0, 0)
    if (left.shape[0], right.shape[0]) != (a, b):
        raise ExportError(f"{name}: FlatQuant factored its width {n} as {left.shape[0]}x{right.shape[0]}, but "
                          f"vllm-ascend expects {a}x{b}; this model cannot be served in that layout.")
    if max(a, b) > KRONECKER_MAX_FACTOR:
        raise ExportError(f"{name}: transform factor {max(a, b)} exceeds the CANN kernel limit "
                          f"{KRONECKER_MAX_FACTOR}.")


def _linear_tensors(name: str, m: nn.Module, layer: nn.Module, member: str, dtype: torch.dtype,
                    stats: ExportStats) -> tuple[dict, str]:
    """(tensors, type) of one wrapped, folded FlatQuantLinear."""

    state = m.export_state()
    if m.ascend_served and state["w_bits"] == 4 and state["a_bits"] == 4:
        if state["trans_left"] is not None:
            left, right = state["trans_left"], state["trans_right"]
        else:
            trans = _group_transform(layer, member) if member in GROUP_PARENTS else None
            a, b = server_factors(m.in_features) if m.in_features % 4 != 2 else (1, m.in_features)
            left, right = trans if trans is not None else (torch.eye(a), torch.eye(b))
        _check_factors(name, m.in_features, left, right)
        stats.factors.add((left.shape[0], right.shape[0]))
        codes, scale = quantize_weight(state["weight"], 4, state["w_clip"])
        own = {"weight": codes.cpu().contiguous(), "weight_scale": scale.float().reshape(-1, 1).cpu(),
               "weight_offset": torch.zeros(m.out_features, 1),
               "left_trans": left.detach().to(dtype).cpu().clone(),  # one copy per shard of a fused group
               "right_trans": right.detach().to(dtype).cpu().clone(),
               "clip_ratio": torch.tensor([1.0 if state["a_clip"] is None else float(state["a_clip"])])}
        if state["bias"] is not None:
            own["bias"] = state["bias"].to(dtype).cpu()
        stats.quantized_linears += 1
        stats.quantized_bf16_bytes += 2 * m.out_features * (m.in_features + (state["bias"] is not None))
        return own, QUANT_TYPE
    weight = state["weight"]
    if state["trans_left"] is not None:  # o_proj with use_o_quant: undo the online transform, W = W'·(P1 ⊗ P2)ᵀ
        weight = kronecker_matmul(weight.double(), state["trans_left"].double().t(),
                                  state["trans_right"].double().t())
        stats.not_exported.add("o_proj (use_o_quant)")
    own = {"weight": weight.to(dtype).cpu()}
    if state["bias"] is not None:
        own["bias"] = state["bias"].to(dtype).cpu()
    return own, FLOAT_TYPE


def layer_tensors(layer: nn.Module, prefix: str, dtype: torch.dtype, stats: ExportStats
                  ) -> list[tuple[str, torch.Tensor, str]]:
    """(name, tensor, type) of one decoder layer: folded FlatQuant modules, or a plain layer (all FLOAT)."""

    out: list[tuple[str, torch.Tensor, str]] = []
    done: list[str] = []
    kinds: dict[str, str] = {}
    for name, m in layer.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(m, FlatQuantLinear):
            member = name.rsplit(".", 1)[-1]
            own, kind = _linear_tensors(f"{prefix}.{name}", m, layer, member, dtype, stats)
            out += [(f"{prefix}.{name}.{k}", t.contiguous(), kind) for k, t in own.items()]
            kinds[name] = kind
            done.append(name)
        elif isinstance(m, FlatNormTransform):
            out += [(f"{prefix}.{name}.{k}", t.detach().to(dtype).cpu().contiguous(), FLOAT_TYPE)
                    for k, t in m.norm.state_dict().items()]
            done.append(name)
        elif isinstance(m, KVCacheQuantizer):
            stats.not_exported.add("kv-cache (use_kcache_quant/use_vcache_quant)")
            done.append(name)
    for key, t in layer.state_dict().items():
        if not any(key.startswith(d + ".") for d in done):
            out.append((f"{prefix}.{key}", t.detach().to(dtype).cpu().contiguous(), FLOAT_TYPE))
    for group in FUSED_GROUPS:
        types = {kinds.get(f"{GROUP_PARENTS[m]}.{m}", FLOAT_TYPE) for m in group}
        if len(types) > 1:
            raise ExportError(f"{prefix}: {'/'.join(group)} are partly quantized (skip_layers skipped only some of "
                              "them); vllm-ascend fuses them into one layer. Recalibrate with the whole group "
                              "skipped (quantize --export ascend widens it for you).")
    return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _write_description(folder: Path, description: dict, dtype: torch.dtype, stats: ExportStats) -> None:
    """quant_model_description.json, with what the folder needs from the server under METADATA_KEY, and README.md
    saying the same."""
    meta = metadata(description, str(dtype).replace("torch.", ""), stats.factors, stats.notes)
    (folder / DESCRIPTION_FILE).write_text(json.dumps({**description, METADATA_KEY: meta}, indent=2))
    (folder / README_FILE).write_text(readme_text(meta))


def _write_config(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantize"] = CONFIG_QUANTIZE
    name = str(dtype).replace("torch.", "")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    path.write_text(json.dumps(config, indent=2))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except ValueError:
            pass  # an invalid generation config is not worth failing the export
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@torch.no_grad()
def export_ascend(model: nn.Module, cfg, tokenizer, output_dir: str | os.PathLike, *,
                  layer_states: Optional[dict] = None, consume: bool = False, overwrite: bool = False,
                  source_dir: Optional[str | os.PathLike] = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  dtype: Optional[torch.dtype] = None, say: Callable[[str], None] = print,
                  reporter: Optional[Reporter] = None) -> dict:
    """Write ``model`` in the vllm-ascend layout to ``output_dir``.

    ``model``: a float model plus ``layer_states`` (a matrix file's ``payload["layers"]``, applied here one layer
    at a time; with ``consume`` each layer's storage is released once written), or a model already wrapped and
    folded in memory (``layer_states=None``; not modified). ``cfg``: its FlatQuantConfig. Float parts are written
    in ``dtype`` (default: the model's). Returns sizes and paths; notes (o_proj / kv-cache) go to ``reporter`` as
    events (default: their English text to ``say``), whose cancel token is checked once per layer (a cancelled
    export leaves no folder behind)."""
    reporter = reporter or Reporter(lambda event: say(event.message))

    check_config(cfg)
    layers = decoder_layers(model)
    algo = get_algorithm("flatquant", cfg)  # the layout is FlatQuant's (W4A4_FLATQUANT_DYNAMIC); no model-level step
    if layer_states is not None:
        check_layer_indices(layers, layer_states)
        calibrated = sorted(int(i) for i in layer_states)
    else:
        calibrated = [i for i, layer in enumerate(layers) if is_wrapped(layer)]
    check_fused_skips(cfg, calibrated)
    target = check_target(output_dir, [("--model_path", source_dir)], overwrite)
    dtype = dtype or _model_dtype(model)
    stats = ExportStats()
    with StagedFolder(target) as staged:
        writer = ShardWriter(staged.path, shard_bytes, WEIGHTS_STEM)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        rest = {k: t for k, t in model.state_dict().items() if not k.startswith(LAYER_PREFIX + ".")}
        if not cfg.is_skipped("lm_head"):  # an int8 lm_head (core.flat.wrap_lm_head): served float
            stats.not_exported.add("lm_head (not in skip_layers)")
            head = model.get_submodule("lm_head")
            if isinstance(head, FlatQuantLinear):
                rest = {k: t for k, t in rest.items() if not k.startswith("lm_head.")}
                rest["lm_head.weight"] = head.linear.weight
        if tied and "lm_head.weight" in rest:
            del rest["lm_head.weight"]  # one tensor with the embeddings; typed below for the server's lookup
        for key, t in rest.items():
            writer.add(key, t.detach().to(dtype).cpu().contiguous(), FLOAT_TYPE)
        for i, layer in enumerate(layers):
            reporter.check()
            if consume:
                layer.float()  # fold and quantize this layer in fp32 (one layer at a time)
            if layer_states is not None and i in layer_states:
                apply_layer_matrices(layers, i, algo, layer_states[i])
            for name, t, kind in layer_tensors(layers[i], f"{LAYER_PREFIX}.{i}", dtype, stats):
                writer.add(name, t, kind)
            if consume:
                layers[i].to("meta")
        files = writer.finish()
        description = {"model_quant_type": QUANT_TYPE, **writer.types, **({"lm_head.weight": FLOAT_TYPE} if tied else {})}
        _write_description(staged.path, description, dtype, stats)
        stats.quantized_bytes = writer.bytes_by_type.get(QUANT_TYPE, 0)
        _write_config(model, tokenizer, staged.path, dtype)
        problems = layout_problems(staged.path)
        if problems:
            raise ExportError("the written folder does not follow the layout (a bug; nothing was kept): "
                              + "; ".join(problems[:3]))
        staged.commit()
    if stats.not_exported:
        reporter.emit("export_not_float", stats.note_params)
    ratio = stats.quantized_bytes / stats.quantized_bf16_bytes if stats.quantized_bf16_bytes else None
    return {"output_dir": str(target), "files": files, "quantized_linears": stats.quantized_linears,
            "quantized_linear_bytes": stats.quantized_bytes, "quantized_linear_bf16_bytes": stats.quantized_bf16_bytes,
            "ratio_to_bf16": ratio, "weights_bytes": writer.total, "dtype": str(dtype).replace("torch.", ""),
            "notes": stats.notes}


def export_matrix_file(model_path: Optional[str], matrix_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                       dtype: Optional[torch.dtype] = None, **kwargs) -> dict:
    """``export --format ascend`` from Python: the model loaded on the host in its own dtype, each layer rebuilt from
    the matrix file and folded in turn. ``dtype`` may be float32 here (an exact comparison with the reference loader
    needs it; the CLI refuses it, as vllm-ascend serves bf16/fp16). ``kwargs``: export_ascend's."""
    from ..config import parse_config
    from ..matrices import check_identity, read_complete_matrices
    from ..models import load_model

    payload = read_complete_matrices(matrix_path)
    source = resolve_model_path(model_path)
    loaded = load_model(model_path, dtype=source_dtype(source))
    check_identity(payload, loaded.model, str(matrix_path))
    layers = {int(i): s for i, s in payload["layers"].items()}
    return export_ascend(loaded.model, parse_config(payload["config"]), loaded.tokenizer, output_dir,
                         layer_states=layers, consume=True, source_dir=source, dtype=dtype, **kwargs)


# --- straight from a quantize run (CLI `quantize --export`, GUI) ------------------------------------------------


def prepare_quantize(options, say: Callable[[str], None] = print) -> None:
    """Before calibrating for an ascend export: refuse non-W4A4 configs and widen skip_layers entries that split a
    fused group (q/k/v, gate/up) to the whole group, with one note per group. ``options``: QuantizeOptions."""
    if options.load_matrix:
        return  # the matrix file's config decides; the exporter refuses a split group with a message
    from ..models import read_model_folder

    cfg = options.resolved_config()
    check_config(cfg)
    n = read_model_folder(options.model_path)[1]["num_hidden_layers"]  # config.json's sizes checked
    skip, messages = widen_skip_layers(cfg, range(min(n, options.max_layers or n)))
    if messages:
        options.skip_layers = skip
        for line in messages:
            say(line)


def export_quantized(quantized: nn.Module, cfg, tokenizer, source: str, output_dir: str | os.PathLike, fmt: str,
                     say: Callable[[str], None] = print, reporter: Optional[Reporter] = None) -> dict:
    """Write a folded fake-quant model held in memory (a quantize run's result; not modified) to ``output_dir``
    in ``fmt`` (ascend | native), replacing an earlier export there. ``source``: the model's path (or 'smollm2'),
    refused as a target; its config.json dtype decides the float parts' dtype (see serving_dtype). ``reporter``:
    notes as events, and its cancel token, checked once per layer (a cancel leaves no folder and the earlier
    export as it was)."""

    source_dir = resolve_model_path(source)
    dtype = serving_dtype(source_dtype(source_dir))
    if fmt == "ascend":
        return export_ascend(quantized, cfg, tokenizer, output_dir, overwrite=True, source_dir=source_dir,
                             dtype=dtype, say=say, reporter=reporter)
    target = check_target(output_dir, [("--model_path", source_dir)], overwrite=True)
    with StagedFolder(target) as staged:  # each layer copied and converted in turn: the model stays as it is
        info = export_checkpoint(quantized, tokenizer, staged.path, cfg, dtype=dtype, keep_model=True,
                                 cancel=reporter.cancel if reporter is not None else None)
        staged.commit()
    return dict(info, output_dir=str(target))
