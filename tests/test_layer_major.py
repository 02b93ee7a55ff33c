"""Layer-major baseline perplexity (core.layer_major): the same number as the whole-copy build's perplexity, without
a second whole model.

Tolerance: the layer-major run makes the same module calls in the same order on the same batches as
core.perplexity.perplexity_from_ids on the whole build, so on CPU the two are equal to the last bit; asserted to a
relative 1e-9 (far below the ~1e-3 of any real change, e.g. a layer rotated twice or a clip missing)."""
import gc
import math
import warnings

import pytest
import torch

import core.layer_major as layer_major
from core.algorithms import get_algorithm
from core.config import parse_config
from core.layer_major import layer_major_perplexity
from core.models import decoder_layers
from core.perplexity import perplexity_from_ids
from core.pipeline import BASELINES, QuantizeOptions, run_quantize

REL = 1e-9
SEQLEN = 64


def _ids(model, windows=5):
    return torch.randint(0, model.config.vocab_size, (windows * SEQLEN,), generator=torch.Generator().manual_seed(0))


def _both(model, name, num_layers, ids):
    """(whole-copy perplexity, layer-major perplexity) of baseline ``name``."""
    cfg = parse_config(None)
    whole = perplexity_from_ids(BASELINES[name](model, cfg, num_layers), ids, SEQLEN)
    return whole, layer_major_perplexity(model, get_algorithm(name, cfg), ids, SEQLEN, num_layers=num_layers)


@pytest.mark.parametrize("name,num_layers", [("quarot", 2), ("rtn", None)])
def test_layer_major_equals_whole_copy_on_smollm2(smollm2, name, num_layers):
    """5 windows: one full batch of 4 and a partial one; QuaRot rotates all 30 layers and quantizes the first 2."""
    before = {k: v.clone() for k, v in list(smollm2.model.state_dict().items())[:3]}
    whole, streamed = _both(smollm2.model, name, num_layers, _ids(smollm2.model))
    assert math.isclose(streamed, whole, rel_tol=REL), (streamed, whole)
    assert all(torch.equal(smollm2.model.state_dict()[k], v) for k, v in before.items())  # the original untouched
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight  # still tied


def test_layer_major_quarot_equals_whole_copy_on_tiny_qwen3(tiny_qwen3):
    """Every layer quantized, q_norm/k_norm, GQA."""
    whole, streamed = _both(tiny_qwen3, "quarot", None, _ids(tiny_qwen3, 3))
    assert math.isclose(streamed, whole, rel_tol=REL), (streamed, whole)


def _tensor_bytes(exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages alive, other than ``exclude`` (data pointers)."""
    seen, total = set(exclude), 0
    with warnings.catch_warnings():  # inspecting every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in objects:
        try:
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - objects that refuse inspection
            continue
        if storage.data_ptr() not in seen and storage.device.type == "cpu":
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def test_layer_major_never_holds_a_second_model(smollm2, monkeypatch):
    """Counted inside every layer's forward: the tensors alive besides the original's are the QuaRot copies of the
    embedding and lm_head, one built layer, the windows' hidden states and small things; the whole-copy build
    would add all 30 layers (each ~14 MB in fp32) on top."""
    model = smollm2.model
    original = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    layer_bytes = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    emb = model.get_input_embeddings().weight
    outside = 2 * emb.numel() * emb.element_size()  # rotated embedding + untied, rotated lm_head
    peaks = []
    run_layer = layer_major.run_layer

    def counting(layer, x, kwargs):
        peaks.append(_tensor_bytes(original) - base)
        return run_layer(layer, x, kwargs)

    monkeypatch.setattr(layer_major, "run_layer", counting)
    ids = _ids(model, 2)
    gc.collect()
    base = _tensor_bytes(original)  # other tests' fixtures
    monkeypatch.setitem(BASELINES, "quarot", None)  # the whole-copy builder is not called
    layer_major_perplexity(model, get_algorithm("quarot", parse_config(None)), ids, SEQLEN, num_layers=1)
    assert len(peaks) == len(decoder_layers(model))
    budget = outside + 2 * layer_bytes + 64 * 2**20  # one layer (+ its fold's temporaries) and slack
    assert max(peaks) < budget, (max(peaks) / 2**20, budget / 2**20)
    print(f"peak {max(peaks) / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB, layer {layer_bytes / 2**20:.0f} MiB")
    assert max(peaks) < outside + 8 * layer_bytes  # far from 30 layers


def test_in_place_quantize_measures_baselines_layer_major(smollm2, tmp_path, monkeypatch):
    """The CLI's in-place job (keep_original False) builds no whole baseline model: the builders are replaced by
    ones that fail, and the report still has both baselines' perplexities."""
    def refuse(*_a, **_k):
        raise AssertionError("whole baseline model built")

    monkeypatch.setitem(BASELINES, "rtn", refuse)
    monkeypatch.setitem(BASELINES, "quarot", refuse)
    result = run_quantize(QuantizeOptions(nsamples=1, seqlen=32, epochs=0, max_layers=1, ppl_seqlen=SEQLEN,
                                          ppl_max_windows=1, keep_original=False, baselines="rtn,quarot",
                                          check_memory=False, output_dir=str(tmp_path / "out")))
    ppl = result.report["ppl"]
    assert set(ppl) >= {"original", "quantized", "rtn", "quarot"}
    assert all(math.isfinite(ppl[k]) for k in ("rtn", "quarot"))
