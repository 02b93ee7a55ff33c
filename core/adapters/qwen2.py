"""Qwen2 / Qwen2.5: LLaMA's layout with a bias on q/k/v (o_proj and the MLP have none)."""
from .base import ModelAdapter, register

QWEN2 = register(ModelAdapter(architecture="Qwen2ForCausalLM", layer_class="Qwen2DecoderLayer", family="qwen2",
                              qkv_bias=True))
