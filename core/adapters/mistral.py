"""Mistral: LLaMA's layout (sliding-window attention changes only the mask, not the structure)."""
from .base import ModelAdapter, register

MISTRAL = register(ModelAdapter(architecture="MistralForCausalLM", layer_class="MistralDecoderLayer",
                                family="mistral"))
