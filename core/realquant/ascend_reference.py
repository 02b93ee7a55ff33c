"""The vllm-ascend W4A4_FLATQUANT_DYNAMIC layout as an executable spec: file names, a validator, and a reference
loader that computes every quantized linear the way the server describes it, in fp32 on the CPU.

Written from the layout facts only (msModelSlim's folder as vllm-ascend reads it), not from this project's kernels,
so that comparing its logits with the project's own real-quant model checks the exporter end to end.

The folder:
  config.json                      the model's config plus ``"quantize": "w4a4_flatquant_dynamic"``
  quant_model_description.json     one flat object: ``"model_quant_type": "W4A4_FLATQUANT_DYNAMIC"`` and, for every
                                   tensor name in the weights, ``"W4A4_FLATQUANT_DYNAMIC"`` or ``"FLOAT"`` (plus this
                                   project's metadata under METADATA_KEY, which is no tensor name: ignored)
  quant_model_weight_w4a4_flatquant_dynamic.safetensors   (or ``-0000i-of-0000n.safetensors`` shards with
                                   ``quant_model_weight_w4a4_flatquant_dynamic.safetensors.index.json``)
  tokenizer files

Per quantized linear ``<p>`` with input width n = a·b:
  <p>.weight int8 [out, n] int4 codes (-8..7); <p>.weight_scale fp32 [out, 1]; <p>.weight_offset fp32 [out, 1]
  (zeros); <p>.left_trans [a, a], <p>.right_trans [b, b] in the model's dtype; <p>.clip_ratio fp32 [1]; an
  optional <p>.bias. The server picks (a, b) itself from n: the divisor pair nearest to a square among the pairs
  whose sum is even (it writes n as a difference of two squares); n % 8 == 0 (int4 packing into int32 words).

What the server computes for x [tokens, n]: X = x.view(tokens, a, b); X'' = left_transᵀ · X · right_trans;
s = max|X''| · clip_ratio / 7 per token; codes = clamp(round(X'' / s), -8, 7); y = (codes · weightᵀ) ·
weight_scale · s, then + bias. vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the shards of a fused
layer must all have the same type (and, being one kernel input, the same left/right/clip).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

QUANT_TYPE = "W4A4_FLATQUANT_DYNAMIC"
FLOAT_TYPE = "FLOAT"
CONFIG_QUANTIZE = "w4a4_flatquant_dynamic"
DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_STEM = "quant_model_weight_w4a4_flatquant_dynamic"
WEIGHTS_FILE = WEIGHTS_STEM + ".safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
LINEAR_KEYS = ("weight", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio")
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
KRONECKER_MAX_FACTOR = 256  # CANN's npu_kronecker_quant: both factors at most 256
# quant_model_description.json: one key that is not a tensor name, holding what the folder needs from the server (the
# server looks tensor names up and never reads it; this project's metadata, see core.realquant.ascend_serving)
METADATA_KEY = "flatquant_studio"
NOT_TENSOR_KEYS = ("model_quant_type", METADATA_KEY)
# the activation scale the stored clip_ratio assumes (ReferenceW4A4Linear.forward computes it)
CLIP_CONVENTION = "scale = clip_ratio * max|x| / 7"


class LayoutError(ValueError):
    """A folder that does not follow the layout (the message lists what is wrong)."""


def server_factors(n: int) -> tuple[int, int]:
    """(a, b), a ≤ b, a·b = n, as the server derives them from the input width: among the divisor pairs whose sum
    is even (n = ((a+b)/2)² - ((b-a)/2)²) the one nearest to a square."""
    for a in range(math.isqrt(n), 0, -1):
        if n % a == 0 and (a + n // a) % 2 == 0:
            return a, n // a
    raise ValueError(f"{n} is not a difference of two squares (n % 4 == 2)")


def shard_name(index: int, total: int) -> str:
    return f"{WEIGHTS_STEM}-{index:05d}-of-{total:05d}.safetensors"


# --- reading ------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path.name}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise LayoutError(f"{path.name}: not a JSON object")
    return data


def weight_files(folder: Path) -> dict[str, str]:
    """tensor name -> file name, from the index when the weights are sharded."""
    from safetensors import safe_open

    if (folder / INDEX_FILE).is_file():
        index = read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise LayoutError(f"{INDEX_FILE}: no weight_map")
        for f in set(weight_map.values()):
            if not (folder / f).is_file():
                raise LayoutError(f"{INDEX_FILE} names {f}, which is missing")
        return dict(weight_map)
    if not (folder / WEIGHTS_FILE).is_file():
        raise LayoutError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} is present")
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as fh:
        return {k: WEIGHTS_FILE for k in fh.keys()}


def load_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder (all shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(weight_files(folder).values())):
        out.update(load_file(str(folder / f)))
    return out


# --- validation -------------------------------------------------------------------------------------------------


def _model_dtype(config: dict) -> Optional[torch.dtype]:
    name = config.get("torch_dtype") or config.get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def layout_problems(folder: str | os.PathLike) -> list[str]:
    """Everything in ``folder`` that breaks the layout (empty list: valid)."""
    from safetensors import safe_open

    folder = Path(folder)
    problems: list[str] = []
    try:
        config = read_json(folder / "config.json")
        desc = read_json(folder / DESCRIPTION_FILE)
        files = weight_files(folder)
    except LayoutError as exc:
        return [str(exc)]
    if config.get("quantize") != CONFIG_QUANTIZE:
        problems.append(f'config.json: "quantize" is {config.get("quantize")!r}, not {CONFIG_QUANTIZE!r}')
    if desc.get("model_quant_type") != QUANT_TYPE:
        problems.append(f"{DESCRIPTION_FILE}: model_quant_type is {desc.get('model_quant_type')!r}")
    types = {k: v for k, v in desc.items() if k not in NOT_TENSOR_KEYS}
    bad = sorted(k for k, v in types.items() if v not in (QUANT_TYPE, FLOAT_TYPE))
    if bad:
        problems.append(f"{DESCRIPTION_FILE}: unknown types for {bad[:3]}")
    untyped = sorted(set(files) - set(types))
    if untyped:
        problems.append(f"tensors not typed in {DESCRIPTION_FILE}: {untyped[:3]} ({len(untyped)} in all)")
    # a tied lm_head has no tensor, but the server still looks its type up
    tied = bool(config.get("tie_word_embeddings")) and types.get("lm_head.weight") == FLOAT_TYPE
    missing = sorted(set(types) - set(files) - ({"lm_head.weight"} if tied else set()))
    if missing:
        problems.append(f"{DESCRIPTION_FILE} types tensors that are not stored: {missing[:3]}")

    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(folder / f), "pt")
        return handles[f].get_tensor(name)

    dtype = _model_dtype(config)
    prefixes = sorted(k[: -len(".weight")] for k, v in types.items() if v == QUANT_TYPE and k.endswith(".weight")
                      and k[: -len(".weight")] + ".weight_scale" in types)
    quantized = set(prefixes)
    for p in prefixes:
        keys = [f"{p}.{k}" for k in LINEAR_KEYS]
        absent = [k for k in keys if k not in files]
        if absent:
            problems.append(f"{p}: missing {absent}")
            continue
        mistyped = [k for k in keys + ([f"{p}.bias"] if f"{p}.bias" in files else []) if types.get(k) != QUANT_TYPE]
        if mistyped:
            problems.append(f"{p}: {mistyped} not typed {QUANT_TYPE}")
        w, scale, offset = get(f"{p}.weight"), get(f"{p}.weight_scale"), get(f"{p}.weight_offset")
        left, right, clip = get(f"{p}.left_trans"), get(f"{p}.right_trans"), get(f"{p}.clip_ratio")
        if w.dtype != torch.int8 or w.dim() != 2:
            problems.append(f"{p}.weight: {w.dtype} {tuple(w.shape)}, expected int8 [out, n]")
            continue
        out, n = w.shape
        if n % 8:
            problems.append(f"{p}: input width {n} is not a multiple of 8")
            continue
        if int(w.min()) < -8 or int(w.max()) > 7:
            problems.append(f"{p}.weight: codes outside -8..7")
        for name, t in (("weight_scale", scale), ("weight_offset", offset)):
            if t.dtype != torch.float32 or tuple(t.shape) != (out, 1):
                problems.append(f"{p}.{name}: {t.dtype} {tuple(t.shape)}, expected float32 [{out}, 1]")
        if offset.dtype == torch.float32 and bool(offset.any()):
            problems.append(f"{p}.weight_offset: not all zero (the layout is symmetric)")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            problems.append(f"{p}.weight_scale: non-positive or non-finite values")
        if clip.dtype != torch.float32 or tuple(clip.shape) != (1,) or not 0 < float(clip[0]) <= 1:
            problems.append(f"{p}.clip_ratio: {clip.dtype} {tuple(clip.shape)}, expected float32 [1] in (0, 1]")
        try:
            a, b = server_factors(n)
        except ValueError as exc:
            problems.append(f"{p}: {exc}")
            continue
        if tuple(left.shape) != (a, a) or tuple(right.shape) != (b, b):
            problems.append(f"{p}: left/right_trans {tuple(left.shape)}/{tuple(right.shape)}, the server expects "
                            f"[{a}, {a}]/[{b}, {b}] for n = {n}")
        if max(a, b) > KRONECKER_MAX_FACTOR:
            problems.append(f"{p}: factor {max(a, b)} exceeds the kernel limit {KRONECKER_MAX_FACTOR}")
        for name, t in (("left_trans", left), ("right_trans", right)):
            if dtype is not None and t.dtype != dtype:
                problems.append(f"{p}.{name}: {t.dtype}, expected the model's {dtype}")
    for name, kind in types.items():
        if kind == FLOAT_TYPE and name in files and not get(name).is_floating_point():
            problems.append(f"{name}: typed FLOAT but stored as {get(name).dtype}")
    # fused shards: same type; quantized ones share one kernel input (identical transforms and clip)
    for p in {k.rsplit(".", 2)[0] for k in types if k.count(".") >= 2}:
        for group in FUSED_GROUPS:
            members = [f"{p}.{m}" for m in group if f"{p}.{m}.weight" in types]
            if len(members) < 2:
                continue
            kinds = {types[f"{m}.weight"] for m in members}
            if len(kinds) > 1:
                problems.append(f"{p}: fused shards {list(group)} have different types {sorted(kinds)}")
                continue
            if members[0] in quantized and all(m in quantized for m in members):
                for key in ("left_trans", "right_trans", "clip_ratio"):
                    ref = get(f"{members[0]}.{key}")
                    if any(not torch.equal(ref, get(f"{m}.{key}")) for m in members[1:]):
                        problems.append(f"{p}: fused shards {list(group)} differ in {key}")
    return problems


def check_layout(folder: str | os.PathLike) -> None:
    problems = layout_problems(folder)
    if problems:
        raise LayoutError("; ".join(problems))


# --- the reference loader -----------------------------------------------------------------------------------------


class ReferenceW4A4Linear(nn.Module):
    """One W4A4_FLATQUANT_DYNAMIC linear computed as the server describes it, in fp32 (the integer GEMM exactly).

    The layout fixes the product P1·X·P2, not the order of its two matmuls. Both orders agree to fp32 rounding, but
    a W4A4 model amplifies rounding: one int4 code that rounds the other way changes the next layers' codes, and
    over a few hundred tokens and 30 layers the logits drift as far as from a 1e-7 perturbation of the input
    (measured in bench/ascend_export.py). So by default the reference multiplies (P1·X)·P2, which rounds as this
    project's CPU path does and makes the end-to-end comparison exact; ``right_first`` takes P1·(X·P2)."""

    def __init__(self, tensors: dict[str, torch.Tensor], right_first: bool = False):
        super().__init__()
        self.right_first = right_first
        w = tensors["weight"]
        self.out_features, self.in_features = w.shape
        self.a, self.b = server_factors(self.in_features)
        self.register_buffer("codes", w.to(torch.float64))  # exact integer products and sums in fp64
        self.register_buffer("weight_scale", tensors["weight_scale"].float().reshape(-1))
        self.register_buffer("left_t", tensors["left_trans"].float().t().contiguous())  # transposed once, at load
        self.register_buffer("right", tensors["right_trans"].float())
        self.clip = float(tensors["clip_ratio"].float()[0])
        bias = tensors.get("bias")
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xx = x.float().reshape(-1, self.a, self.b)
        if self.right_first:  # P1 · (X · P2), the fused kernel's documented form
            y = torch.matmul(self.left_t, torch.matmul(xx, self.right))
        else:  # (P1 · X) · P2: the same product, rounded as the project's CPU path rounds it
            y = torch.matmul(torch.matmul(self.left_t, xx), self.right)
        y = y.reshape(xx.shape[0], -1)
        s = y.abs().amax(dim=-1, keepdim=True) * self.clip / 7.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(y / s), -8, 7)
        acc = (q.double() @ self.codes.t()).float()
        out = acc * self.weight_scale * s
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)


@torch.no_grad()
def load_reference(folder: str | os.PathLike, check: bool = True, right_first: bool = False):
    """(model, tokenizer or None): the folder as a transformers model in fp32 whose quantized linears are
    ReferenceW4A4Linear (``right_first``: see there). ``check`` validates the layout first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if check:
        check_layout(folder)
    desc = read_json(folder / DESCRIPTION_FILE)
    tensors = load_tensors(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefixes = [k[: -len(".weight")] for k, v in desc.items() if v == QUANT_TYPE and k.endswith(".weight")
                and k[: -len(".weight")] + ".weight_scale" in desc]
    for p in prefixes:
        own = {k: tensors.pop(f"{p}.{k}") for k in LINEAR_KEYS}
        if f"{p}.bias" in tensors:
            own["bias"] = tensors.pop(f"{p}.bias")
        model.set_submodule(p, ReferenceW4A4Linear(own, right_first))
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise LayoutError(f"tensors the model does not have: {result.unexpected_keys[:3]}")
    own_keys = {f"{p}.{k}" for p in prefixes for k in ("codes", "weight_scale", "left_t", "right", "bias")}
    missing = [k for k in result.missing_keys if k not in own_keys
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise LayoutError(f"the folder lacks tensors for {missing[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        pass
    return model.eval().requires_grad_(False), tokenizer


__all__ = ["QUANT_TYPE", "FLOAT_TYPE", "CONFIG_QUANTIZE", "DESCRIPTION_FILE", "WEIGHTS_STEM", "WEIGHTS_FILE",
           "INDEX_FILE", "LINEAR_KEYS", "FUSED_GROUPS", "KRONECKER_MAX_FACTOR", "METADATA_KEY", "NOT_TENSOR_KEYS",
           "CLIP_CONVENTION", "LayoutError", "server_factors",
           "shard_name", "weight_files", "load_tensors", "layout_problems", "check_layout", "ReferenceW4A4Linear",
           "load_reference"]
