"""core.perplexity against a hand-computed reference: non-overlapping windows, mean next-token NLL, exp."""
from __future__ import annotations

import math

import pytest
import torch

from core.perplexity import perplexity

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
        "surpassed the Washington Monument to become the tallest man-made structure in the world.")


def _reference(model, tokenizer, text: str, seqlen: int, max_windows=None) -> float:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    nll, count = 0.0, 0
    for w in range(n):
        window = ids[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()
        for t in range(seqlen - 1):  # position t predicts token t+1; the remainder after the last window is dropped
            nll -= float(torch.log_softmax(logits[t], dim=-1)[window[t + 1]])
            count += 1
    return math.exp(nll / count)


def test_perplexity_matches_hand_computed_reference(smollm2):
    n_tokens = len(smollm2.tokenizer(TEXT, add_special_tokens=False).input_ids)
    assert n_tokens > 3 * 16
    ref = _reference(smollm2.model, smollm2.tokenizer, TEXT, 16)
    got = perplexity(smollm2.model, smollm2.tokenizer, TEXT, seqlen=16, batch_size=2, dtype=None)
    assert got == pytest.approx(ref, rel=1e-4)
    ref2 = _reference(smollm2.model, smollm2.tokenizer, TEXT, 16, max_windows=2)
    got2 = perplexity(smollm2.model, smollm2.tokenizer, TEXT, seqlen=16, max_windows=2, dtype=None)
    assert got2 == pytest.approx(ref2, rel=1e-4) and got2 != pytest.approx(got, rel=1e-4)
    # the default bf16 autocast stays close to the fp32 reference
    assert perplexity(smollm2.model, smollm2.tokenizer, TEXT, seqlen=16) == pytest.approx(ref, rel=0.05)
