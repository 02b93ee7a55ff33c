"""Model-level latency: prefill ms, decode ms/token with a KV cache, tokens/s and peak memory.

Several models are measured interleaved (A, B, A, B, ...) after a warm-up, and the median of the repeats is kept:
on a shared, frequency-scaling machine a model timed minutes after another sees a different machine, while
interleaved rounds see the same drift. Peak memory is the process RSS high-water mark on CPU (reset per run through
/proc/self/clear_refs where Linux allows it; it then covers everything resident in the process, including the other
models) and ``max_memory_allocated`` on cuda/npu. ``weights_mb`` (parameters + buffers of the model alone) is the
per-model number to compare.
"""
from __future__ import annotations

import inspect
import resource
import statistics
import time
from typing import Optional

import torch
from torch import nn

from .device import synchronize
from .memory import proc_kb


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_weights_mb(model: nn.Module) -> float:
    """Bytes of the model's parameters and buffers (packed int4 buffers count at their real size)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied embeddings share storage
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total / 2**20


# --- peak memory --------------------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device) / 2**20
    hwm = proc_kb("/proc/self/status", "VmHWM")
    if hwm is None:  # not Linux: lifetime peak of the process
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm / 1024


# --- one measurement --------------------------------------------------------------------------------------------


def _forward_parameters(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _forward_kwargs(model: nn.Module) -> dict:
    # Only the last position's logits are needed to pick the next token; skipping the others is what generate() does.
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward`` and of its output: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _preallocated_cache(model: nn.Module, length: int):
    """transformers' StaticCache for ``length`` tokens (what llama.cpp's context is): each decode step writes its
    keys/values in place instead of concatenating the whole cache again (1.08x faster decode of a 7B-shaped 4-layer
    model on 2 CPU threads, bench/decode_cache.py); None (a dynamic cache) for a model without a transformers config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return None
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=length)


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, decode_tokens: int,
                  preallocate: bool = True) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds for ``decode_tokens`` greedy steps, the 1 + decode_tokens picked ids) on a
    fresh KV cache, preallocated unless ``preallocate`` is off (then transformers' dynamic cache): one prefill forward,
    then one single-token forward per step."""
    device = input_ids.device
    kwargs = _forward_kwargs(model)
    name = cache_argument(model)
    cache = _preallocated_cache(model, input_ids.shape[1] + decode_tokens + 1) if preallocate else None
    if cache is not None:
        kwargs[name] = cache
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    nxt = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    t1 = time.perf_counter()
    picked = [nxt]
    for _ in range(decode_tokens):
        kwargs[name] = out[name]
        out = model(input_ids=nxt, use_cache=True, **kwargs)
        nxt = out.logits[:, -1:].argmax(-1)
        picked.append(nxt)
    synchronize(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(picked, dim=1)


def _check_input(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [1, L] with L >= 1, got {tuple(input_ids.shape)}.")
    return input_ids


def measure_interleaved(models: dict[str, nn.Module], input_ids: torch.Tensor, decode_tokens: int = 64,
                        repeats: int = 3, warmup: int = 1) -> dict[str, dict]:
    """Time every model in rounds (one run each per round); warm-up rounds are dropped, medians kept.

    Returns {name: {prefill_ms, decode_ms_per_token, tokens_per_s, peak_memory_mb, weights_mb, prompt_tokens,
    decode_tokens, repeats, prefill_ms_runs, decode_ms_per_token_runs, device}}. ``tokens_per_s`` is decode throughput.
    """
    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError("repeats must be >= 1, warmup >= 0 and decode_tokens >= 0.")
    input_ids = _check_input(input_ids)
    inputs = {name: input_ids.to(model_device(m)) for name, m in models.items()}
    prefill: dict[str, list[float]] = {n: [] for n in models}
    decode: dict[str, list[float]] = {n: [] for n in models}
    peak: dict[str, float] = {n: 0.0 for n in models}
    for rnd in range(warmup + repeats):
        for name, model in models.items():
            device = inputs[name].device
            reset_peak_memory(device)
            p, d, _ = greedy_decode(model, inputs[name], decode_tokens)
            if rnd >= warmup:
                prefill[name].append(p * 1e3)
                decode[name].append(d * 1e3 / max(decode_tokens, 1))
                peak[name] = max(peak[name], peak_memory_mb(device))
    out = {}
    for name, model in models.items():
        dec = statistics.median(decode[name]) if decode_tokens else None
        out[name] = {
            "prefill_ms": statistics.median(prefill[name]),
            "decode_ms_per_token": dec,
            "tokens_per_s": (1e3 / dec) if dec else None,
            "peak_memory_mb": peak[name],
            "weights_mb": model_weights_mb(model),
            "prompt_tokens": int(input_ids.shape[1]),
            "decode_tokens": decode_tokens,
            "repeats": repeats,
            "prefill_ms_runs": prefill[name],
            "decode_ms_per_token_runs": decode[name] if decode_tokens else [],
            "device": str(inputs[name].device),
        }
    return out


def measure_model_latency(model: nn.Module, input_ids: torch.Tensor, decode_tokens: int = 64, repeats: int = 3,
                          warmup: int = 1) -> dict:
    """prefill_ms, decode_ms_per_token, tokens_per_s, peak_memory_mb (+ weights_mb, runs) for one model."""
    return measure_interleaved({"model": model}, input_ids, decode_tokens, repeats, warmup)["model"]


@torch.inference_mode()
def one_forward_ms(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Wall time of one plain forward (no cache) of a batch already on the model's device, device-synchronized."""
    synchronize(input_ids.device)
    t0 = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    synchronize(input_ids.device)
    return (time.perf_counter() - t0) * 1e3


def forward_time_ms(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of one plain forward (no cache) after one warm-up: the sample's "Time diff" number."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1.")
    input_ids = _check_input(input_ids).to(model_device(model))
    one_forward_ms(model, input_ids)
    return statistics.median(one_forward_ms(model, input_ids) for _ in range(repeats))


# Real English for timing prompts: content does not change timings, real tokens keep the prompt representative.
LATENCY_TEXT = ("Quantization maps the weights and activations of a neural network to low-bit integers, so that "
                "matrix multiplications run on integer units and the model takes less memory. ")


def latency_input_ids(tokenizer, length: int, text: Optional[str] = None, vocab_size: Optional[int] = None,
                      seed: int = 0) -> torch.Tensor:
    """A [1, length] prompt: real text tokens when given (repeated to length), else seeded random token ids."""
    if length < 1:
        raise ValueError("length must be >= 1.")
    if text:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() == 0:
            raise ValueError("The latency prompt text tokenizes to nothing.")
        reps = -(-length // ids.numel())
        return ids.repeat(reps)[:length].unsqueeze(0)
    vocab = vocab_size or len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)
