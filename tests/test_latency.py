"""Model-level latency helpers: structure and positivity only (timings belong in bench/)."""
from __future__ import annotations

import copy

import pytest
import torch

from core.latency import (cache_argument, forward_time_ms, greedy_decode, latency_input_ids, measure_interleaved,
                          measure_model_latency, model_weights_mb)

KEYS = {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_memory_mb", "weights_mb", "prompt_tokens",
        "decode_tokens", "repeats", "prefill_ms_runs", "decode_ms_per_token_runs", "device"}


def test_measure_model_latency_fields(tiny_qwen3):
    ids = torch.randint(0, tiny_qwen3.config.vocab_size, (1, 16))
    r = measure_model_latency(tiny_qwen3, ids, decode_tokens=4, repeats=2, warmup=1)
    assert KEYS <= set(r)
    assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_memory_mb"] > 0
    assert r["tokens_per_s"] == pytest.approx(1000.0 / r["decode_ms_per_token"])
    assert len(r["prefill_ms_runs"]) == 2 and len(r["decode_ms_per_token_runs"]) == 2
    assert r["prompt_tokens"] == 16 and r["decode_tokens"] == 4 and r["device"] == "cpu"
    n_bytes = sum(p.numel() * p.element_size() for p in tiny_qwen3.parameters())
    assert r["weights_mb"] == pytest.approx(n_bytes / 2**20, rel=0.01)


def test_interleaved_returns_every_model(tiny_qwen3):
    other = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    ids = torch.randint(0, tiny_qwen3.config.vocab_size, (16,))  # 1-D input is accepted as one prompt
    res = measure_interleaved({"fp32": tiny_qwen3, "bf16": other}, ids, decode_tokens=2, repeats=1, warmup=0)
    assert set(res) == {"fp32", "bf16"}
    assert all(res[k]["prefill_ms"] > 0 and res[k]["decode_ms_per_token"] > 0 for k in res)
    assert res["bf16"]["weights_mb"] == pytest.approx(res["fp32"]["weights_mb"] / 2, rel=0.01)


def test_decode_loop_with_kv_cache_matches_generate(smollm2, tiny_qwen3):
    """The timed decode loop (a preallocated StaticCache) is real greedy decoding: same tokens as transformers'
    generate() (dynamic cache), and its last logits equal a dynamic-cache loop's within fp32 rounding (GQA too)."""
    from transformers import StaticCache

    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    _, _, picked = greedy_decode(smollm2.model, ids, decode_tokens=12)
    ref = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=13, do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=smollm2.tokenizer.eos_token_id, eos_token_id=None)
    assert picked[0].tolist() == ref[0, ids.shape[1]:].tolist()
    seq = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, name = {}, cache_argument(tiny_qwen3)
        for kind in ("static", "dynamic"):
            past = StaticCache(config=tiny_qwen3.config, max_cache_len=12) if kind == "static" else None
            out = tiny_qwen3(input_ids=seq[:, :6], use_cache=True, **{name: past})
            for t in range(6, 9):
                out = tiny_qwen3(input_ids=seq[:, t:t + 1], use_cache=True, **{name: out[name]})
            assert isinstance(out[name], StaticCache) == (kind == "static")
            logits[kind] = out.logits
    torch.testing.assert_close(logits["static"], logits["dynamic"], atol=1e-4, rtol=1e-4)


def test_forward_time_and_inputs(tiny_qwen3, smollm2):
    ids = latency_input_ids(smollm2.tokenizer, 12, text="short text")
    assert ids.shape == (1, 12)
    assert forward_time_ms(tiny_qwen3, ids, repeats=2) > 0
    rnd = latency_input_ids(smollm2.tokenizer, 7, vocab_size=100, seed=1)
    assert rnd.shape == (1, 7) and int(rnd.max()) < 100
    assert torch.equal(rnd, latency_input_ids(smollm2.tokenizer, 7, vocab_size=100, seed=1))
    with pytest.raises(ValueError):
        measure_model_latency(tiny_qwen3, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        measure_model_latency(tiny_qwen3, ids, repeats=0)
    # tied embeddings are counted once
    emb = smollm2.model.get_input_embeddings().weight
    assert smollm2.model.lm_head.weight.data_ptr() == emb.data_ptr()
    total = sum(t.numel() * t.element_size() for t in smollm2.model.parameters())
    assert model_weights_mb(smollm2.model) <= total / 2**20 + 1
