"""``convert``: replace each folded FlatQuantLinear with its real-quant module (the sample's "Time diff" that compares
the conversion with the original is core.realquant.timing).

Linears whose weights and activations are both quantized (q/k/v, gate/up, down, o_proj with use_o_quant) become
RealQuantLinear on the selected backend; the rest (weight-only or activation-only quantization, layers kept in float)
become FrozenQuantLinear or nn.Linear, and each FlatNormTransform becomes a TransformedNorm. The kv-cache quantizer
stays as configured.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import FlatQuantError
from ..flat import FlatNormTransform, FlatQuantLinear
from ..quantizer import SharedInputQuant
from .backends import Backend, select_backend
from .modules import FrozenQuantLinear, RealQuantLinear, TransformedNorm


def is_real_quant(model: nn.Module) -> bool:
    return any(isinstance(m, (RealQuantLinear, FrozenQuantLinear)) for m in model.modules())


def model_backend(model: nn.Module) -> Optional[str]:
    for m in model.modules():
        if isinstance(m, RealQuantLinear):
            return m.backend.name
    return None


@torch.no_grad()
def convert_model(model: nn.Module, backend: str | Backend = "auto") -> nn.Module:
    """Convert a folded fake-quant model in place (and return it). ``backend``: auto | cpu | cpu-torch | cuda | npu.

    The float parts keep their dtype; call ``.to(torch.bfloat16)`` afterwards for a bf16 model (per-channel
    scales stay fp32)."""
    flats = [(n, m) for n, m in model.named_modules() if isinstance(m, FlatQuantLinear)]
    if not flats:
        if is_real_quant(model):
            return model
        raise FlatQuantError("The model has no FlatQuant layers to convert; calibrate it (quantize) or load a "
                             "flat_matrices.pth first.")
    unfolded = [n for n, m in flats if not m.folded]
    if unfolded:
        raise FlatQuantError(f"Layer {unfolded[0]} is not folded; run core.flat.fold_model(model) before converting.")
    device = flats[0][1].linear.weight.device
    be = select_backend(backend, device)

    members: dict[int, int] = {}
    for _, m in flats:
        if m.real_quant_eligible:
            members[id(m.act_quantizer)] = members.get(id(m.act_quantizer), 0) + 1
    shared = {key: SharedInputQuant(n) for key, n in members.items() if n > 1}

    for name, m in flats:
        state = m.export_state()
        dtype = m.linear.weight.dtype
        if state["real_quant_eligible"] and state["w_bits"] <= 8 and state["a_bits"] <= 8:
            new = RealQuantLinear.from_export_state(state, be, shared.get(id(m.act_quantizer)), dtype)
        elif state["w_bits"] >= 16 and state["a_bits"] >= 16 and state["trans_left"] is None:
            new = nn.Linear(m.in_features, m.out_features, bias=state["bias"] is not None, device=device, dtype=dtype)
            new.weight.data.copy_(state["weight"])
            if state["bias"] is not None:
                new.bias.data.copy_(state["bias"])
            new.requires_grad_(False)
        else:
            new = FrozenQuantLinear.from_export_state(state, dtype)
        model.set_submodule(name, new)

    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FlatNormTransform)]:
        trans = m.trans
        if trans.diag is not None and trans.use_diag:
            raise FlatQuantError(f"{name} still applies its diag scale; fold the model before converting.")
        left, right, _, _ = trans.matrices()
        dtype = m.norm.weight.dtype
        model.set_submodule(name, TransformedNorm(m.norm, left.to(dtype), right.to(dtype)))
    return model.eval().requires_grad_(False)


def memory_sizes(model: nn.Module) -> dict:
    """Bytes the real-quant linears (and weight-only quantized ones) hold in memory (the backend's own layout: int4
    blocks for the native cpu kernels, int8-held codes for torch._int_mm and weight-only linears, int32 words on the
    NPU; plus scales, transforms, biases) against the
    same linears in bf16. The checkpoint's sizes (always packed int4 on disk) are in its quant_config.json."""
    mem = bf16 = 0
    layouts = set()
    for m in model.modules():
        if isinstance(m, RealQuantLinear):
            weights = m.weight_tensors()
        elif isinstance(m, FrozenQuantLinear) and m.w_codes is not None:  # weight-only: int8-held codes
            weights = {"w_codes": m.w_codes}
        else:
            continue
        mem += sum(b.numel() * b.element_size() for b in m.buffers())
        bf16 += 2 * m.out_features * (m.in_features + (1 if m.bias is not None else 0))
        layouts.update(f"{n}:{str(t.dtype).replace('torch.', '')}" for n, t in weights.items())
    return {"in_memory_bytes": mem, "bf16_bytes": bf16, "ratio_to_bf16": (mem / bf16) if bf16 else None,
            "backend": model_backend(model), "weight_layout": sorted(layouts)}
