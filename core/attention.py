"""The attention function the models here run, registered with transformers as ``flatquant``.

- A layer's KVCacheQuantizer (core.flat, with use_kcache_quant / use_vcache_quant) is applied first.
- A decode step on the CPU (one query token, no gradient) is two batched matmuls over the cache with the softmax in
  fp32, as transformers' eager attention computes it: PyTorch's CPU SDPA kernel takes ~1.6 ms per 7B-shaped layer at
  a 576-token cache where the matmuls take ~0.34 ms (bf16, 2 threads; bench/latency.py --sections attention), which
  was a fifth of a 4-layer decode step.
- Everything else (prompts, training, GPUs, NPUs) is SDPA, unchanged.

``use_flatquant_attention(model)`` selects it for a model whose attention is SDPA or this one already; models are
switched when loaded (core.models.load_model, core.realquant.checkpoint.load_checkpoint), so an original and its
quantized copy always run the same attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ATTN_KEY = "flatquant"


def _pack_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, kv_heads * g, q, x] -> [b, kv_heads, g * q, x]: the g query heads sharing a kv head become rows of one
    matmul against it (no copy of the cache)."""
    b, h, q, x = t.shape
    return t.reshape(b, kv_heads, (h // kv_heads) * q, x)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: Optional[float]) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + mask)·v for a few query tokens: query [b, h, q, d], key/value [b, kv_heads, L, d]
    (grouped-query heads shared), attention_mask None, bool (True = attend) or additive, broadcastable to
    [b, h, q, L]. Returns [b, q, h, d] (transformers' attention output layout)."""
    b, h, q, d = query.shape
    kv_heads = key.shape[1]
    scale = d ** -0.5 if scaling is None else scaling
    scores = torch.matmul(_pack_heads(query, kv_heads), key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        mask = attention_mask
        if mask.shape[1] != 1 or (q > 1 and h != kv_heads):  # per head, or rows that must follow the packing
            mask = _pack_heads(mask.expand(b, h, q, mask.shape[-1]), kv_heads)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv_heads, g * q, d]
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous()


def _is_cpu_decode_step(module: nn.Module, query: torch.Tensor, kwargs: dict) -> bool:
    return (query.shape[2] == 1 and query.device.type == "cpu" and not torch.is_grad_enabled()
            and not module.training and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False))


def flatquant_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: Optional[float] = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kvq = getattr(module, "kv_quantizer", None)
    if kvq is not None:
        query, key, value = kvq(query, key, value)
    if _is_cpu_decode_step(module, query, kwargs):
        return decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_attention() -> None:
    """Register ``flatquant`` with transformers (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if ATTN_KEY in AttentionInterface._global_mapping:
        return
    AttentionInterface.register(ATTN_KEY, flatquant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_KEY, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_flatquant_attention(config_or_model, force: bool = False) -> None:
    """Run ``flatquant`` attention in this model (or config) when it runs SDPA now (others, eager or flash, stay),
    or always with ``force`` (a kv-cache quantizer is applied by nothing else)."""
    config = getattr(config_or_model, "config", config_or_model)
    if force or getattr(config, "_attn_implementation", None) in ("sdpa", ATTN_KEY):
        register_attention()
        config._attn_implementation = ATTN_KEY
