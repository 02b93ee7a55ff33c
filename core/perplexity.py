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


@torch.no_grad()
def perplexity_from_ids(model: torch.nn.Module, ids: torch.Tensor, seqlen: int = 512, batch_size: int = 4,
                        max_windows: Optional[int] = None, reporter: Optional[Reporter] = None,
                        dtype: Optional[torch.dtype | str] = "auto", label: str = "") -> float:
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"Perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    device = next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    nll_sum, count = 0.0, 0
    for start in range(0, n, batch_size):
        if reporter is not None:
            reporter.check()
            reporter.emit("ppl", f"perplexity {label} window {start}/{n}", step=start, steps=n)
        batch = windows[start:start + batch_size].to(device)
        with autocast_for(model, dtype):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        nll_sum += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll_sum / count)


def perplexity(model: torch.nn.Module, tokenizer, text: str, seqlen: int = 512, **kwargs) -> float:
    return perplexity_from_ids(model, tokenize(tokenizer, text), seqlen, **kwargs)
