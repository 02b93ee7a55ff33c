"""Side-by-side generation: the same chat-templated prompt through the original and the quantized model."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .progress import Reporter
from .streaming import needs_streaming

# The sample's prompt. "/no_think" switches Qwen3's reasoning trace off; other models get the prompt without it.
DEFAULT_PROMPT = "Give me a short introduction to the Ascend Model Compression Toolkit(AMCT)."
QWEN3_PROMPT = DEFAULT_PROMPT + " /no_think"


@dataclass
class GenerationOptions:
    prompt: Optional[str] = None  # None = default_prompt(model)
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default: both models see the same decoding rule, outputs are reproducible
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    system_prompt: Optional[str] = None


def default_prompt(model: nn.Module) -> str:
    return QWEN3_PROMPT if type(model).__name__.startswith("Qwen3") else DEFAULT_PROMPT


def build_chat_input(tokenizer, prompt: str, system_prompt: Optional[str] = None) -> tuple[str, bool]:
    """(text fed to the model, whether the tokenizer's chat template was applied)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    # Base models without a template: the raw prompt (recorded, so the report says so).
    return (f"{system_prompt}\n\n{prompt}" if system_prompt else prompt), False


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_text(model: nn.Module, tokenizer, chat_text: str, options: GenerationOptions, streamer=None,
                  device: Optional[torch.device] = None) -> dict:
    """Generate from an already templated text; returns text, token counts, seconds and tokens/s. ``streamer``: a
    transformers streamer (live text). A model on the host with an accelerator ``device`` is streamed there one
    decoder layer at a time (``streamed: true``)."""
    from .streaming import LayerStreamer

    if needs_streaming(model, device):
        with LayerStreamer(model, device):
            result = generate_text(model, tokenizer, chat_text, options, streamer)
        return dict(result, streamed=True)
    enc = tokenizer(chat_text, return_tensors="pt", add_special_tokens=False)
    device = _device_of(model)
    input_ids = enc.input_ids.to(device)
    attention_mask = enc.attention_mask.to(device)
    kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p)
        torch.manual_seed(options.seed)
    else:  # the model's generation_config may carry sampling knobs; unset them so greedy runs without warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, input_ids.shape[1]:]
    n_new = int(new.numel())
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
        "new_tokens": n_new,
        "prompt_tokens": int(input_ids.shape[1]),
        "seconds": seconds,
        "tokens_per_s": n_new / seconds if seconds > 0 else None,
    }


def compare_generation(original: nn.Module, quantized: Optional[nn.Module], tokenizer,
                       options: GenerationOptions | None = None, reporter: Reporter | None = None,
                       streamer_for=None, device: Optional[torch.device] = None) -> dict:
    """The report's "generation" section: prompt, templated input and both models' outputs (``quantized=None``:
    the original only). ``streamer_for(label)`` may give a transformers streamer per model (live text)."""
    options = options or GenerationOptions()
    reporter = reporter or Reporter()
    prompt = options.prompt or default_prompt(original)
    chat_text, templated = build_chat_input(tokenizer, prompt, options.system_prompt)
    section = {
        "prompt": prompt,
        "chat_template_applied": templated,
        "model_input": chat_text,
        "max_new_tokens": options.max_new_tokens,
        "decoding": "sampling" if options.do_sample else "greedy",
        "units": {"seconds": "s", "tokens_per_s": "generated tokens per second (incl. prefill)"},
    }
    for label, model in (("original", original), ("quantized", quantized)):
        if model is None:
            continue
        reporter.check()
        if needs_streaming(model, device):
            reporter.emit("generate_streaming", {"model": label, "max_new_tokens": options.max_new_tokens,
                                                 "device": str(device)})
        else:
            reporter.emit("generate", {"model": label, "max_new_tokens": options.max_new_tokens})
        section[label] = generate_text(model, tokenizer, chat_text, options,
                                       streamer_for(label) if streamer_for else None, device)
    return section
