"""Side-by-side generation: the chat template is applied, both models answer, greedy is reproducible."""
from __future__ import annotations

import pytest

from core.generation import (DEFAULT_PROMPT, QWEN3_PROMPT, GenerationOptions, build_chat_input, compare_generation,
                             default_prompt)


@pytest.fixture(scope="module")
def rtn_smollm2(smollm2):
    from core.evaluate import build_rtn_model

    return build_rtn_model(smollm2.model)


def test_compare_generation_applies_chat_template(smollm2, rtn_smollm2):
    sec = compare_generation(smollm2.model, rtn_smollm2, smollm2.tokenizer, GenerationOptions(max_new_tokens=12))
    assert sec["prompt"] == DEFAULT_PROMPT and sec["chat_template_applied"] is True
    expected = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}], tokenize=False,
                                                     add_generation_prompt=True)
    assert sec["model_input"] == expected
    assert "<|im_start|>user\n" + DEFAULT_PROMPT in sec["model_input"]
    assert sec["model_input"].endswith("<|im_start|>assistant\n")
    for name in ("original", "quantized"):
        out = sec[name]
        assert isinstance(out["text"], str) and out["text"].strip()
        assert 1 <= out["new_tokens"] <= 12 and out["tokens_per_s"] > 0
        assert out["prompt_tokens"] == len(smollm2.tokenizer(expected, add_special_tokens=False).input_ids)
    # Greedy: the original's answer is exactly what generate() gives on the templated ids.
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = smollm2.model.generate(**ids, max_new_tokens=12, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=smollm2.tokenizer.eos_token_id)
    ref_text = smollm2.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert sec["original"]["text"] == ref_text
    # W4A4 RTN on a 135M model changes the answer: the two columns come from two different models.
    assert sec["quantized"]["text"] != sec["original"]["text"]


def test_original_only_and_custom_prompt(smollm2):
    sec = compare_generation(smollm2.model, None, smollm2.tokenizer,
                             GenerationOptions(prompt="Name a color.", max_new_tokens=4))
    assert "quantized" not in sec and sec["prompt"] == "Name a color." and sec["original"]["new_tokens"] <= 4


def test_qwen3_default_prompt_and_template_fallback(tiny_qwen3, smollm2):
    assert default_prompt(tiny_qwen3) == QWEN3_PROMPT and QWEN3_PROMPT.endswith("/no_think")
    assert default_prompt(smollm2.model) == DEFAULT_PROMPT

    class NoTemplate:
        chat_template = None

    text, applied = build_chat_input(NoTemplate(), "hello")
    assert (text, applied) == ("hello", False)
    text, applied = build_chat_input(smollm2.tokenizer, "hello", system_prompt="Be brief.")
    assert applied and "<|im_start|>system\nBe brief.<|im_end|>" in text
