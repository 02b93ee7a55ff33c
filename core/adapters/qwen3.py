"""Qwen3: LLaMA's layout plus per-head RMSNorms on q and k (q_norm/k_norm, applied after the projections, so they
stay off the residual stream and need no folding)."""
from .base import ModelAdapter, register

QWEN3 = register(ModelAdapter(architecture="Qwen3ForCausalLM", layer_class="Qwen3DecoderLayer", family="qwen3",
                              head_norms=("self_attn.q_norm", "self_attn.k_norm")))
