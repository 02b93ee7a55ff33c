"""Perplexity the WikiText-2 way: one long token stream, non-overlapping windows of seqlen, mean NLL."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from .data import tokenize
from .device import compute_dtype
from .errors import DataError
from .progress import Reporter


def autocast_for(model: torch.nn.Module, dtype: Optional[torch.dtype | str]):
    """Autocast to ``dtype`` on the model's device; a name (``"auto"``, bf16, fp16, fp32) is resolved by
    ``core.device.compute_dtype`` (auto: bf16 only where it is native); None or fp32: no autocast."""
    device = next(model.parameters()).device
    if isinstance(dtype, str):
        dtype = compute_dtype(device, dtype)
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _window_nll(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows. The head runs one window at a time, so the logits held at once
    are [seqlen, vocab] rather than [batch, seqlen, vocab] (a 49k-token vocabulary makes that the peak)."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum"))
    return head_nll(head, base(input_ids=batch, use_cache=False).last_hidden_state, batch)


def head_nll(head: torch.nn.Module, hidden: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch from its final hidden states (after the final norm), one window's logits
    at a time."""
    total = 0.0
    for b in range(batch.shape[0]):
        logits = head(hidden[b, :-1])
        total += float(F.cross_entropy(logits.float(), batch[b, 1:], reduction="sum"))
    return total


def perplexity_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """The non-overlapping windows [n, seqlen] perplexity reads (at most ``max_windows``)."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"Perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity_from_ids(model: torch.nn.Module, ids: torch.Tensor, seqlen: int = 512, batch_size: int = 4,
                        max_windows: Optional[int] = None, reporter: Optional[Reporter] = None,
                        dtype: Optional[torch.dtype | str] = "auto", label: str = "",
                        device: Optional[torch.device] = None) -> float:
    """``device``: where to compute. A model on the host with an accelerator ``device`` is streamed there one
    decoder layer at a time (core.streaming), so a model larger than the device still gets its perplexity."""
    from .streaming import LayerStreamer, model_device, needs_streaming

    windows = perplexity_windows(ids, seqlen, max_windows)
    n = windows.shape[0]
    stream = needs_streaming(model, device)
    if stream and reporter is not None:
        reporter.emit("ppl_streaming", {"model": label, "device": str(device)})
    target = torch.device(device) if stream else model_device(model)
    nll_sum, count = 0.0, 0
    with LayerStreamer(model, target) if stream else nullcontext():
        for start in range(0, n, batch_size):
            if reporter is not None:
                reporter.check()
                reporter.emit("ppl_window", {"model": label, "start": start, "n": n}, step=start, steps=n)
            batch = windows[start:start + batch_size].to(target)
            with autocast_for(model, dtype):  # inside the streamer the embeddings are on the target
                nll_sum += _window_nll(model, batch)
            count += batch[:, 1:].numel()
    return math.exp(nll_sum / count)


def perplexity(model: torch.nn.Module, tokenizer, text: str, seqlen: int = 512, **kwargs) -> float:
    return perplexity_from_ids(model, tokenize(tokenizer, text), seqlen, **kwargs)
