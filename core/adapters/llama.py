"""LLaMA family (LLaMA-2/3, SmolLM2): q/k/v after input_layernorm, gate/up after post_attention_layernorm.
LLaMA checkpoints may carry attention/MLP biases (config attention_bias / mlp_bias); the modules handle them."""
from .base import ModelAdapter, register

LLAMA = register(ModelAdapter(architecture="LlamaForCausalLM", layer_class="LlamaDecoderLayer", family="llama"))
