"""Seed-sized models on small ones: layer streaming, storage dtype, memory estimate/refusal, the algorithm registry
and layer-parallel calibration over torch.distributed (gloo, 2 ranks)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cli import main
from core.matrices import MATRIX_FILE, read_matrices
from core.memory import ActivationStore, MemoryBudgetError, ModelShape, check_fits, estimate_quantize_memory
from core.models import load_model
from core.pipeline import QuantizeOptions, run_quantize
from core.streaming import LayerStreamer, storage_dtype

ROOT = Path(__file__).resolve().parents[1]


def test_layer_streamed_forward_equals_in_memory_forward(tiny_qwen3):
    stored = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)  # host copy in its storage dtype
    reference = copy.deepcopy(stored).float()  # the whole model upcast in memory
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        with LayerStreamer(stored, torch.device("cpu"), compute_dtype=torch.float32):
            got = stored(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # nothing stays upcast: every layer and the embeddings are back in bf16 afterwards
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())


def test_load_in_checkpoint_dtype(tiny_qwen3, tmp_path, smollm2):
    path = tmp_path / "bf16"
    copy.deepcopy(tiny_qwen3).to(torch.bfloat16).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    assert {p.dtype for p in load_model(str(path)).model.parameters()} == {torch.bfloat16}  # auto
    assert {p.dtype for p in load_model(str(path), dtype="fp32").model.parameters()} == {torch.float32}


def test_memory_estimate_refuses_with_one_error_line(tiny_qwen3_dir, tmp_path, capsys):
    code = main(["quantize", "--model_path", str(tiny_qwen3_dir), "--nsamples", "4000000", "--seqlen", "2048",
                 "--output_dir", str(tmp_path / "out"), "--no_ppl", "--no_time_diff"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: this job needs about")
    assert "--nsamples" in errors[0] and "--activation_dir" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out" / MATRIX_FILE).exists()


def test_estimate_parts_scale_with_the_knobs():
    shape = ModelShape(32, 4096, 11008, 32, 32, 128, 32000, False)
    cpu = torch.device("cpu")
    base = estimate_quantize_memory(shape, torch.bfloat16, 128, 2048, 4, cpu)
    assert abs(base.host["weights"] / 2**30 - 12.55) < 0.1  # LLaMA-2-7B in bf16: 6.74e9 params
    assert base.host["activations"] == 2 * 128 * 2048 * 4096 * 4
    disk = estimate_quantize_memory(shape, torch.bfloat16, 128, 2048, 4, cpu, activations_on_disk=True)
    assert disk.host_total == base.host_total - base.host["activations"]
    fp32 = estimate_quantize_memory(shape, torch.float32, 128, 2048, 4, cpu)
    assert fp32.host["weights"] == 2 * base.host["weights"]
    with pytest.raises(MemoryBudgetError, match="--dtype bf16"):
        check_fits(fp32, cpu, ["--dtype bf16"], host_available=16 * 2**30)
    check_fits(disk, cpu, ["--nsamples"], host_available=24 * 2**30)


def test_activation_store_on_disk_leaves_no_files(tmp_path):
    store = ActivationStore(tmp_path / "act")
    t = store.empty((3, 5, 7))
    t.copy_(torch.arange(105, dtype=torch.float32).view(3, 5, 7))
    assert float(t.sum()) == sum(range(105))
    store.close()
    assert list((tmp_path / "act").iterdir()) == []


def test_bf16_in_place_job_with_disk_activations(tiny_qwen3, smollm2, tmp_path):
    path = tmp_path / "bf16"
    copy.deepcopy(tiny_qwen3).to(torch.bfloat16).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    events = []
    result = run_quantize(QuantizeOptions(model_path=str(path), nsamples=4, seqlen=64, epochs=1, ppl_max_windows=2,
                                          activation_dir=str(tmp_path / "act"), keep_original=False,
                                          output_dir=str(tmp_path / "run")), on_event=events.append)
    assert result.original.model is None and result.rtn is None  # one model resident: quantized in place
    ppl = result.report["ppl"]
    assert {"original", "quantized", "rtn"} <= set(ppl) and all(ppl[k] > 1 for k in ("original", "quantized"))
    assert storage_dtype(result.quantized.model.layers[0]) == torch.bfloat16
    assert result.report["calibration"]["dtype"] == "bfloat16"
    assert list((tmp_path / "act").iterdir()) == []
    assert all(e.rss_mb and e.rss_mb > 0 for e in events)


def test_rtn_algorithm_equals_the_rtn_baseline(tiny_qwen3_dir, tmp_path):
    result = run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), algorithm="rtn", nsamples=2, seqlen=32,
                                          ppl_max_windows=2, keep_original=True, output_dir=str(tmp_path / "run")))
    ppl = result.report["ppl"]
    assert ppl["quantized"] == ppl["rtn"] != ppl["original"]


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_distributed_two_ranks_equal_single_process(tiny_qwen3_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    args = ["quantize", "--model_path", str(tiny_qwen3_dir), "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
            "--no_ppl", "--no_time_diff", "--device", "cpu"]
    _run([sys.executable, "-m", "core", *args, "--output_dir", str(tmp_path / "single")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "core", *args, "--output_dir", str(tmp_path / "dist"), "--distributed"], env)
    single = read_matrices(tmp_path / "single" / MATRIX_FILE)
    dist = read_matrices(tmp_path / "dist" / MATRIX_FILE)
    assert set(single["layers"]) == set(dist["layers"]) == {0, 1}
    for i, state in single["layers"].items():
        assert set(state) == set(dist["layers"][i])
        for k, v in state.items():
            assert torch.equal(v, dist["layers"][i][k]), (i, k)


def test_streamed_generation_equals_in_memory(tiny_qwen3, smollm2):
    from core.generation import GenerationOptions, generate_text

    stored = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    opts = GenerationOptions(max_new_tokens=6)
    want = generate_text(stored, smollm2.tokenizer, "Hello there", opts)
    # the streamer's hooks move each layer (and the KV cache it writes) in and out around every decode step
    from core.streaming import LayerStreamer

    with LayerStreamer(stored, torch.device("cpu")):
        got = generate_text(stored, smollm2.tokenizer, "Hello there", opts)
    assert got["text"] == want["text"] and got["new_tokens"] == want["new_tokens"]


def _weight_ptrs(layer):
    from core.streaming import base_weight_modules

    return {id(p): p.data_ptr() for m in base_weight_modules(layer) for p in m.parameters(recurse=False)}


def test_calibrated_layers_return_into_the_host_tensors_they_left(tiny_qwen3_dir):
    """A calibrated, folded layer's weights are written into the (safetensors-mapped) host tensors it was loaded in,
    not into new ones that would double the model in RSS; their values are those of the saved state rebuilt."""
    from core.calibrate import calibrate_model, rebuild_layer
    from core.config import parse_config
    from core.algorithms import get_algorithm
    from core.models import decoder_layers
    from core.progress import Reporter

    model = load_model(str(tiny_qwen3_dir), dtype="bf16").model  # upcast for training and cast back
    cfg = parse_config()
    cfg.epochs = 1
    before = [_weight_ptrs(layer) for layer in decoder_layers(model)]
    states = {}
    calibrate_model(model, torch.randint(0, 1000, (4, 32)), cfg, torch.device("cpu"), Reporter(),
                    on_layer_done=lambda i, state, _r: states.__setitem__(i, state))
    layers = decoder_layers(model)
    assert [_weight_ptrs(layer) for layer in layers] == before
    fresh = load_model(str(tiny_qwen3_dir), dtype="bf16").model.float()  # folded in fp32, as in training
    for i, layer in enumerate(decoder_layers(fresh)):
        rebuild_layer(get_algorithm("flatquant", cfg), layer, i, states[i])
        got = dict(layers[i].named_parameters())
        for name, p in layer.named_parameters():
            assert torch.equal(p.to(got[name].dtype), got[name]), name


def test_streamed_forward_leaves_the_weights_in_their_storage(tiny_qwen3):
    stored = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    ptrs = {name: p.data_ptr() for name, p in stored.named_parameters()}
    with torch.no_grad(), LayerStreamer(stored, torch.device("cpu"), compute_dtype=torch.float32):
        stored(input_ids=torch.randint(0, 1000, (1, 8)))
    assert {name: p.data_ptr() for name, p in stored.named_parameters()} == ptrs


@pytest.mark.parametrize("blocks", ["whole", "row_blocks"])
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_weight_recompute_gives_the_gradients_of_the_plain_path(tiny_qwen3, compute, blocks, monkeypatch):
    """Large layers rebuild each transformed, fake-quantized weight in blocks of output rows in the forward and
    again in backward, keeping only the linear's input (core.flat._RecomputedWeightLinear). In fp32, and under bf16
    autocast with the weight in one block, the loss is the plain autograd path's and every trainable parameter's
    gradient equals it within float summation order (1e-5 relative). With several blocks under bf16 each block's
    matmuls round to bf16 on their own, so the reference is the fp32 gradient: the blocked bf16 gradients are no
    further from it than the plain bf16 ones (bf16 gradients of this small layer are themselves 20-120% off)."""
    import core.calibrate as calibrate
    import core.flat as flat
    from core.algorithms.base import run_layer
    from core.algorithms.flatquant import trainable_groups
    from core.config import parse_config
    from core.flat import init_weight_clips, iter_transforms, set_weight_recompute, wrap_layer
    from core.perplexity import autocast_for

    model = copy.deepcopy(tiny_qwen3)
    cpu = torch.device("cpu")
    inps, kwargs = calibrate.capture_layer_inputs(model, torch.randint(0, 1000, (2, 32)), cpu)
    layer, cfg = model.model.layers[0], parse_config()
    target, stats = calibrate.fp_forward_with_stats(layer, inps, kwargs, cpu, 2, None)
    wrap_layer(layer, 0, cfg, stats)
    init_weight_clips(layer)

    def step(recompute: bool, bf16: bool):
        trained = copy.deepcopy(layer)
        params = [p for g in trainable_groups(trained, cfg) for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        set_weight_recompute(trained, recompute)
        for t in iter_transforms(trained):
            t.cache_matrices(True)
        with autocast_for(trained, torch.bfloat16 if bf16 else None):
            out = run_layer(trained, inps, kwargs)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        return float(loss), [p.grad.detach().clone() for p in params]

    def rel(a, b):
        return float((a - b).norm() / a.norm())

    bf16 = compute == "bf16"
    plain_loss, plain = step(False, bf16)
    if blocks == "row_blocks":
        monkeypatch.setattr(flat, "WEIGHT_BLOCK_ELEMENTS", 50 * 256)  # 50 rows of q/k/v/gate/up: ragged blocks
    re_loss, re = step(True, bf16)
    assert len(plain) == len(re) > 10 and all(a.abs().max() > 0 for a in plain)
    if bf16 and blocks == "row_blocks":
        monkeypatch.setattr(flat, "WEIGHT_BLOCK_ELEMENTS", 1 << 22)
        _, ref = step(False, False)
        plain_err = sum(rel(r, a) for r, a in zip(ref, plain)) / len(ref)
        blocked_err = sum(rel(r, b) for r, b in zip(ref, re)) / len(ref)
        assert abs(plain_loss - re_loss) <= 1e-2 * plain_loss
        assert blocked_err <= 1.25 * plain_err, (blocked_err, plain_err)
        return
    assert abs(plain_loss - re_loss) <= 1e-6 * plain_loss
    worst = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(plain, re))
    assert worst < 1e-5, worst
