"""core.attention: the CPU decode-step attention equals SDPA; models loaded here run it; other steps are SDPA."""
import copy

import pytest
import torch
import torch.nn.functional as F

from core.attention import ATTN_KEY, decode_attention, use_flatquant_attention
from core.latency import cache_argument


def _sdpa(q, k, v, mask, scale=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def _masks(b, h, q, length, g):
    pad = torch.ones(b, 1, q, length, dtype=torch.bool)
    pad[0, :, :, :3] = False  # the first sequence is left-padded by three tokens
    if q > 1:
        pad &= torch.ones(q, length, dtype=torch.bool).tril(length - q)  # causal over the new tokens
    additive = torch.zeros(b, 1, q, length).masked_fill(~pad, float("-inf"))
    per_head = pad.expand(b, h, q, length).clone()
    per_head[:, 1, :, 5:9] = False
    return {"none": None, "bool": pad, "additive": additive, "per_head": per_head}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_attention_equals_sdpa(heads, kv_heads, q_len):
    g = torch.Generator().manual_seed(heads * 10 + q_len)
    b, length, d = 2, 17, 16
    q = torch.randn(b, heads, q_len, d, generator=g)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g) for _ in range(2))
    for name, mask in _masks(b, heads, q_len, length, heads // kv_heads).items():
        for scale in (None, 0.3):
            out = decode_attention(q, k, v, mask, scale)
            assert out.shape == (b, q_len, heads, d)
            torch.testing.assert_close(out, _sdpa(q, k, v, mask, scale), atol=1e-5, rtol=1e-5, msg=name)


def _decode_logits(model, ids, mask, steps):
    """Prefill, then ``steps`` greedy single-token steps with the cache: every step's logits."""
    out, logits = model(input_ids=ids, attention_mask=mask, use_cache=True), []
    name = cache_argument(model)
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: out[name]})
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("name", ["smollm2", "tiny_qwen3"])
def test_models_decode_as_with_sdpa(name, request, monkeypatch):
    """Loaded models run ``flatquant`` attention; a decode step with it (GQA, a left-padded batch) gives SDPA's
    logits within fp32 rounding."""
    import core.attention

    calls = []
    monkeypatch.setattr(core.attention, "decode_attention",
                        lambda *a: calls.append(a[0].shape) or decode_attention(*a))
    base = request.getfixturevalue(name)
    model = copy.deepcopy(base if isinstance(base, torch.nn.Module) else base.model)
    if name == "smollm2":
        assert model.config._attn_implementation == ATTN_KEY  # core.models.load_model switched it
    sdpa = copy.deepcopy(model)
    sdpa.config._attn_implementation = "sdpa"
    use_flatquant_attention(model)
    assert model.config._attn_implementation == ATTN_KEY
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ours, ref = _decode_logits(model, ids, mask, 4), _decode_logits(sdpa, ids, mask, 4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers and all(shape[2] == 1 for shape in calls)  # decode steps only, not the prompt


def test_eager_models_are_left_alone(tiny_qwen3):
    model = copy.deepcopy(tiny_qwen3)
    model.config._attn_implementation = "eager"
    use_flatquant_attention(model)
    assert model.config._attn_implementation == "eager"
    use_flatquant_attention(model, force=True)  # a kv-cache quantizer needs it
    assert model.config._attn_implementation == ATTN_KEY
