"""Real W4A4: packing, kernels of every backend against the fake-quant math, conversion of whole models, the
checkpoint round trip, the export command and backend selection (timings are in bench/latency.py)."""
from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from core.config import parse_config
from core.errors import ConfigError, FlatQuantError, ModelLoadError
from core.algorithms import apply_flat_structure
from core.flat import FlatQuantLinear, fold_model
from core.quantizer import fake_quant_sym, int8_gemm_is_exact
from core import kernels as native
from core.realquant.backends import ActQuant, CpuBackend, CudaBackend, TorchCpuBackend, select_backend
from core.realquant.checkpoint import export_checkpoint, load_checkpoint, read_manifest
from core.realquant.convert import convert_model
from core.algorithms.base import run_layer
from core.realquant.timing import OriginalParts, report_time_diff, time_diff
from core.realquant.modules import FrozenQuantLinear, RealQuantLinear, TransformedNorm
from core.realquant.npu import NpuBackend
from core.realquant.packing import (dequantize_weight, pack_int4, pack_int4_as_int32, quantize_activation,
                                    quantize_weight, unpack_int4, unpack_int4_from_int32)
from core.transforms import kronecker_matmul
from torch_npu_double import TorchNpuDouble, module as torch_npu_module, pack_words, unpack_words


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _fake_model(model, cfg=None):
    m = copy.deepcopy(model)
    apply_flat_structure(m, parse_config(cfg))
    fold_model(m)
    return m.eval()


# --- packing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 7, 8, 577, 1536])
def test_int4_pack_round_trip(k):
    codes = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)


def test_int4_layout_is_low_nibble_first_and_matches_the_npu_int32_words():
    codes = torch.tensor([[1, -2, 3, -4, 5, -6, 7, -8]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0xE1, 0xC3, 0xA5, 0x87]]
    word = int(pack_int4_as_int32(codes)[0, 0]) & 0xFFFFFFFF
    assert [((word >> (4 * i)) & 0xF) for i in range(8)] == [c & 0xF for c in codes[0].tolist()]
    assert torch.equal(unpack_int4_from_int32(pack_int4_as_int32(codes)), codes)
    # torch_npu's documented word, computed independently (tests/torch_npu_double.py): (a & 0xF) | (b & 0xF) << 4 ...
    assert int(pack_words(codes)[0, 0]) & 0xFFFFFFFF == 0x87A5C3E1
    many = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    assert torch.equal(pack_int4_as_int32(many), pack_words(many))
    with pytest.raises(ValueError):
        pack_int4_as_int32(torch.zeros(2, 12, dtype=torch.int8))


@pytest.mark.parametrize("n,k", [(1, 1), (16, 8), (33, 577), (576, 1536)])
def test_native_weight_blocks_round_trip(n, k):
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = native.pack_weight(codes)
    assert packed.shape == (-(-n // 16), -(-k // 8), 64)
    assert torch.equal(native.unpack_weight(packed, n, k), codes)


def test_weight_codes_are_the_fake_quant_codes():
    w = torch.randn(40, 96) * torch.rand(40, 1)
    clip = torch.sigmoid(torch.randn(40, 1))
    for bits in (4, 8):
        codes, scale = quantize_weight(w, bits, clip)
        assert codes.dtype == torch.int8 and int(codes.max()) <= 2 ** (bits - 1) - 1
        assert torch.equal(dequantize_weight(codes, scale), fake_quant_sym(w, bits, dim=1, clip_ratio=clip))


# --- kernels against the fake-quant math --------------------------------------------------------------------------


def _backends():
    out = [("cpu-torch", TorchCpuBackend()), ("cuda-padding-on-cpu", CudaBackend()),
           ("npu-double", NpuBackend(ops=TorchNpuDouble()))]  # torch_npu's documented ops, written apart
    kernels = native.load()
    if kernels is not None:
        out.insert(0, ("cpu-native", CpuBackend()))
    return out


def _fake_linear(x, w, bias, w_bits, a_bits, clip, left, right, w_clip):
    if left is not None:
        x = kronecker_matmul(x, left, right)
    clip_t = None if clip is None else torch.tensor(clip)
    return F.linear(fake_quant_sym(x, a_bits, clip_ratio=clip_t), fake_quant_sym(w, w_bits, dim=1, clip_ratio=w_clip),
                    bias)


CASES = [  # m, k, n, w_bits, a_bits, clip, transform (a, b), bias
    (1, 576, 1536, 4, 4, None, None, False),
    (3, 577, 33, 4, 4, 0.9, None, True),
    (17, 1536, 576, 4, 4, None, (32, 48), False),
    (100, 96, 200, 4, 8, 0.8, (8, 12), True),
    (5, 64, 24, 8, 8, None, None, False),
    (1, 13, 7, 4, 4, 0.95, None, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}k{}n{}w{}a{}".format(*c[:5]))
def test_backend_kernels_match_fake_quant(case):
    m, k, n, w_bits, a_bits, clip, trans, has_bias = case
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 0] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g) if has_bias else None
    left = right = None
    if trans is not None:
        left = torch.linalg.qr(torch.randn(trans[0], trans[0], generator=g))[0]
        right = torch.linalg.qr(torch.randn(trans[1], trans[1], generator=g))[0]
    w_clip = torch.full((n, 1), 0.9)
    ref = _fake_linear(x, w, bias, w_bits, a_bits, clip, left, right, w_clip)
    codes, scale = quantize_weight(w, w_bits, w_clip)
    results = {}
    for name, be in _backends():
        if name == "cuda-padding-on-cpu" and not int8_gemm_is_exact(torch.device("cpu"), a_bits, w_bits):
            continue  # torch._int_mm on a CPU without VNNI saturates 8x8-bit sums; on CUDA it is exact
        tensors = be.prepare_weight(codes, w_bits, a_bits)
        assert torch.equal(be.weight_codes(tensors, n, k), codes), name
        qx = be.quantize(x, ActQuant(a_bits, clip, left, right), tensors)
        out = be.matmul(qx, tensors, n, scale, bias, torch.float32)
        assert out.shape == (m, n) and out.dtype == torch.float32
        # the NPU kernels read bf16 activations and write bf16: a packing or layout bug would be ~100% off
        tol = 5e-2 if name.startswith("npu") else 1e-5
        assert _rel(out, ref) < tol, (name, _rel(out, ref))
        results[name] = out
    if "cpu-native" in results:  # same integer math and the same epilogue order: bit-identical
        assert torch.equal(results["cpu-native"], results["cpu-torch"])


def test_bf16_activations_and_outputs():
    x = torch.randn(9, 160).bfloat16()
    w = torch.randn(48, 160)
    codes, scale = quantize_weight(w, 4)
    ref = F.linear(fake_quant_sym(x, 4).float(), dequantize_weight(codes, scale))
    for name, be in _backends():
        tensors = be.prepare_weight(codes, 4)
        out = be.matmul(be.quantize(x, ActQuant(4), tensors), tensors, 48, scale, None, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2, name


def test_activation_codes_match_the_reference_quantizer():
    x = torch.randn(7, 300) * torch.rand(7, 1) * 10
    x[2] = 0.0  # an all-zero token gets the 1e-8 scale floor and zero codes
    q, s = quantize_activation(x, 4, 0.85)
    assert torch.equal(q.float() * s, fake_quant_sym(x, 4, clip_ratio=torch.tensor(0.85)))
    kernels = native.load()
    if kernels is not None:
        qx = kernels.quantize(x, 4, 0.85)
        assert torch.equal(qx.q[:, :300], q) and torch.equal(qx.scale, s)
        assert torch.equal(qx.extra["rowsum"], q.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("a,b", [(86, 128), (24, 24), (8, 12), (3, 5)])
def test_native_online_transform_matches_the_dense_kronecker_product(a, b):
    kernels = native.load()
    if kernels is None:
        pytest.skip(f"native kernels unavailable: {native.unsupported_reason()}")
    left, right = torch.randn(a, a), torch.randn(b, b)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = torch.randn(5, a * b).to(dtype)
        # x @ (L ⊗ R) in float64 without the dense (a*b)^2 matrix (0.9 GiB at 86 x 128)
        ref = torch.einsum("nij,ik,jl->nkl", x.double().view(-1, a, b), left.to(dtype).double(),
                           right.to(dtype).double()).reshape(-1, a * b).float()
        out = kernels.kron(x, left.to(dtype), right.to(dtype))
        assert out.dtype == dtype and _rel(out, ref) < tol
        # kronecker_matmul takes the kernel for few rows without autograd, torch's matmuls otherwise
        assert torch.equal(kronecker_matmul(x, left.to(dtype), right.to(dtype)), out)
        many = torch.cat([x] * 4)
        assert _rel(kronecker_matmul(many, left.to(dtype), right.to(dtype)), torch.cat([ref] * 4)) < tol
    x = torch.randn(3, a * b, requires_grad=True)
    kronecker_matmul(x, left, right).sum().backward()  # with autograd: the torch path, differentiable
    assert _rel(x.grad, torch.kron(left.sum(1), right.sum(1)).expand(3, -1)) < 1e-5  # rows of L ⊗ R summed


# --- whole models --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["smollm2", "tiny_qwen3"])
def test_converted_model_matches_fake_quant(model_name, request):
    base = request.getfixturevalue(model_name)
    base = base if isinstance(base, torch.nn.Module) else base.model  # smollm2 is a LoadedModel
    fake = _fake_model(base)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, base.config.vocab_size, shape, generator=g) for shape in ((2, 24), (1, 5))]
    with torch.no_grad():
        expected = [fake(input_ids=ids).logits for ids in batches]
    for be in ("auto", "cpu-torch"):
        real = convert_model(copy.deepcopy(fake), be)
        assert not any(isinstance(m, FlatQuantLinear) for m in real.modules())
        n_real = sum(isinstance(m, RealQuantLinear) for m in real.modules())
        assert n_real == 6 * base.config.num_hidden_layers  # q k v gate up down; o_proj stays float by default
        assert sum(isinstance(m, TransformedNorm) for m in real.modules()) == 2 * base.config.num_hidden_layers
        # the folded fake model runs the kernels' integer math (exact fp32 sums of codes) and their epilogue order,
        # and the same transform code (core.transforms.kronecker_matmul), so the logits are identical, for a prompt
        # and for a decode-sized batch (a few rows: the native transform kernel in both)
        with torch.no_grad():
            for ids, ref in zip(batches, expected):
                assert torch.equal(real(input_ids=ids).logits, ref), (be, tuple(ids.shape))


def test_shared_inputs_are_quantized_once_per_group(tiny_qwen3):
    real = convert_model(_fake_model(tiny_qwen3), "cpu")
    be = next(m.backend for m in real.modules() if isinstance(m, RealQuantLinear))
    calls = []
    original = be.quantize

    def counting(x, act, tensors):
        calls.append(x.shape)
        return original(x, act, tensors)

    be.quantize = counting
    ids = torch.randint(0, tiny_qwen3.config.vocab_size, (1, 5))
    with torch.no_grad():
        real(input_ids=ids)
    assert len(calls) == 3 * tiny_qwen3.config.num_hidden_layers  # q/k/v once, gate/up once, down once


def test_converted_model_deepcopies_with_its_own_shared_groups(tiny_qwen3):
    real = convert_model(_fake_model(tiny_qwen3), "cpu")
    twin = copy.deepcopy(real)
    attn, twin_attn = real.model.layers[0].self_attn, twin.model.layers[0].self_attn
    assert twin_attn.q_proj.shared is twin_attn.k_proj.shared is twin_attn.v_proj.shared
    assert twin_attn.q_proj.shared is not attn.q_proj.shared and twin_attn.q_proj.backend is attn.q_proj.backend
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, real(input_ids=ids).logits)


def test_convert_refuses_plain_and_unfolded_models(tiny_qwen3):
    with pytest.raises(FlatQuantError, match="no FlatQuant layers"):
        convert_model(copy.deepcopy(tiny_qwen3))
    unfolded = copy.deepcopy(tiny_qwen3)
    apply_flat_structure(unfolded, parse_config(None))
    with pytest.raises(FlatQuantError, match="not folded"):
        convert_model(unfolded)


def test_memory_sizes_follow_the_backend_layout(tiny_qwen3):
    from core.realquant.convert import memory_sizes

    fake = _fake_model(tiny_qwen3)
    held = memory_sizes(convert_model(copy.deepcopy(fake), "cpu-torch"))
    assert held["weight_layout"] == ["qweight:int8"] and 0.5 < held["ratio_to_bf16"] < 0.53
    if native.load() is not None:
        packed = memory_sizes(convert_model(copy.deepcopy(fake), "cpu"))
        assert packed["weight_layout"] == ["qweight_vnni:uint8"] and 0.25 < packed["ratio_to_bf16"] < 0.28


def test_dtype_cast_keeps_fp32_scales(tiny_qwen3):
    real = convert_model(_fake_model(tiny_qwen3), "cpu")
    before = real.model.layers[0].mlp.down_proj.w_scale.clone()
    real = real.to(torch.bfloat16)
    lin = real.model.layers[0].mlp.down_proj
    assert lin.w_scale.dtype == torch.float32 and lin.trans_left.dtype == torch.bfloat16
    assert torch.equal(lin.w_scale, before)  # the values too, not only the dtype (no round trip through bf16)
    with torch.no_grad():
        out = real(input_ids=torch.randint(0, 100, (1, 4))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- checkpoint ----------------------------------------------------------------------------------------------------

RICH_CFG = {  # o_proj W4A4, 4-bit kv-cache, a skipped q_proj and an int8 lm_head
    "quant_cfg": {"inputs": {"type": "int4", "symmetric": True, "strategy": "token"},
                  "weights": {"type": "int4", "symmetric": True, "strategy": "channel"}},
    "algorithm": {"flatquant": {"use_o_quant": True, "use_kcache_quant": True, "k_bits": 4,
                                "use_vcache_quant": True, "v_bits": 4, "lac": True}},
    "skip_layers": ["layers.1.self_attn.q_proj"],
}


O_QUANT_CFG = {"algorithm": {"flatquant": {"use_o_quant": True, "lac": True}}, "skip_layers": []}  # lm_head int8
W4A16_CFG = {"quant_cfg": {"inputs": {"type": "fp16"}}}  # weight-only: FrozenQuantLinear with int4 codes


@pytest.mark.parametrize("cfg", [None, RICH_CFG, W4A16_CFG], ids=["default", "o_quant+kv+skip", "w4a16"])
def test_checkpoint_round_trip_gives_identical_logits(tiny_qwen3, tmp_path, cfg, smollm2):
    fake = _fake_model(tiny_qwen3, cfg)
    real = convert_model(copy.deepcopy(fake), "auto")
    info = export_checkpoint(real, smollm2.tokenizer, tmp_path / "ck", parse_config(cfg))
    # packed int4 (+ scales); RICH_CFG's int8 lm_head is most of this tiny model's quantized bytes
    assert info["ratio_to_bf16"] <= (0.55 if cfg is RICH_CFG else 0.3)
    manifest = read_manifest(tmp_path / "ck")
    kinds = {e["kind"] for e in manifest["modules"].values()}
    assert "norm_transform" in kinds
    assert kinds >= ({"frozen"} if cfg is W4A16_CFG else {"realquant"})
    if cfg is RICH_CFG:
        assert "kv_quantizer" in kinds
        assert isinstance(real.model.layers[1].self_attn.q_proj, torch.nn.Linear)
        o_proj = real.model.layers[0].self_attn.o_proj  # W4A4 with its online transform: the integer kernels too
        assert isinstance(o_proj, RealQuantLinear) and o_proj.trans_left is not None
        assert manifest["modules"]["model.layers.0.self_attn.o_proj"]["kind"] == "realquant"
        assert manifest["modules"]["lm_head"]["kind"] == "realquant" and manifest["modules"]["lm_head"]["w_bits"] == 8
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.tokenizer is not None and loaded.architecture == "Qwen3ForCausalLM"
    ids = torch.randint(0, tiny_qwen3.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, real(input_ids=ids).logits)
        assert torch.equal(real(input_ids=ids).logits, fake(input_ids=ids).logits)  # o_proj, kv, LAC: same math too
    packed = [m for m in loaded.model.modules() if isinstance(m, (RealQuantLinear, FrozenQuantLinear))]
    assert packed and all(not t.is_meta for t in loaded.model.state_dict().values())


@pytest.mark.parametrize("quant_head", [False, True], ids=["float lm_head", "int8 lm_head"])
@pytest.mark.parametrize("keep_model", [False, True])
def test_checkpoint_of_tied_smollm2_stores_the_embedding_once(smollm2, tmp_path, quant_head, keep_model):
    """The tied embedding is stored once; an int8 lm_head (its own codes) leaves the embedding float and whole."""
    fake = _fake_model(smollm2.model, {"skip_layers": []} if quant_head else None)
    fake.model.layers = fake.model.layers[:2]  # two layers keep the file small
    fake.config.num_hidden_layers = 2
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        expected = fake(input_ids=ids).logits
    export_checkpoint(fake, smollm2.tokenizer, tmp_path / "ck", keep_model=keep_model)  # else converts in place
    assert isinstance(fake.lm_head, FlatQuantLinear if quant_head and keep_model else torch.nn.Module)
    manifest = read_manifest(tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck").model
    if quant_head:
        assert manifest["aliases"] == {} and manifest["modules"]["lm_head"]["kind"] == "realquant"
        assert isinstance(loaded.lm_head, RealQuantLinear)
        assert torch.equal(loaded.model.embed_tokens.weight, smollm2.model.model.embed_tokens.weight)
    else:
        assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        assert torch.equal(fake(input_ids=ids).logits, expected)


def test_bad_checkpoints_are_refused(tmp_path, tiny_qwen3, smollm2):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no quant_config.json"):
        load_checkpoint(tmp_path / "empty")
    ck = tmp_path / "ck"
    export_checkpoint(_fake_model(tiny_qwen3), None, ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_checkpoint(ck)
    manifest = json.loads((ck / "quant_config.json").read_text())
    (ck / "quant_config.json").write_text(json.dumps(dict(manifest, format="something/else")))
    with pytest.raises(ModelLoadError, match="not a FlatQuant Studio real-quant checkpoint"):
        load_checkpoint(ck)


def test_report_time_diff_writes_the_seed_numbers(tiny_qwen3, smollm2, tmp_path):
    res = report_time_diff(tiny_qwen3, _fake_model(tiny_qwen3), smollm2.tokenizer, str(tmp_path), seqlen=8,
                           repeats=1)
    report = json.loads((tmp_path / "report.json").read_text())["real_quant"]
    assert report["time_orig_ms"] > 0 and report["time_real_quant_ms"] > 0 and report["batch"] == [1, 8]
    assert res["backend"] in ("cpu", "cpu-torch") and report["original_from"] == "memory"
    parts = report["parts_ms"]  # the forward is the sum of its parts, each timed for both models
    assert len(parts["layers"]) == len(tiny_qwen3.model.layers)
    assert report["time_orig_ms"] == pytest.approx(parts["embed"] + sum(o for o, _ in parts["layers"]) +
                                                   parts["head"][0])


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mistral"])
def test_original_parts_from_the_checkpoint_are_the_original(family, smollm2, tmp_path):
    """The time diff of an in-place quantized model reads the original's layers and head from its checkpoint, one
    at a time: they compute exactly what the original model's own parts compute (every family, tied head too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core import models

    if family == "llama":
        torch.manual_seed(0)
        original = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                                tie_word_embeddings=True)).eval()
    else:
        original = getattr(models, f"build_random_{family}")(hidden_size=128, intermediate_size=384)
    original.save_pretrained(tmp_path)
    quantized = _fake_model(original)  # the structure of an in-place quantized model
    parts = OriginalParts(quantized, folder=tmp_path)
    from core.calibrate import capture_layer_inputs

    ids = torch.randint(0, 49152, (1, 12))
    hidden, kwargs = capture_layer_inputs(original, ids, torch.device("cpu"))
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            mine = parts.layer(i)
            assert not any(t.is_meta for t in mine.state_dict().values())
            want = run_layer(layer, hidden, kwargs)
            assert torch.equal(run_layer(mine, hidden, kwargs), want)
            hidden = want
        assert torch.equal(parts.head()(hidden), original.lm_head(original.model.norm(hidden)))
    res = time_diff(parts, quantized, ids, repeats=1, warmup=0)
    assert res["original_from"] == "checkpoint" and res["time_orig_ms"] > 0 and res["time_real_quant_ms"] > 0


# --- backend selection ---------------------------------------------------------------------------------------------


def test_backend_selection_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    assert select_backend("auto", "cpu").name == "cpu"
    assert select_backend("auto").name == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_backend("cpu-torch").name == "cpu-torch"
    with pytest.raises(ConfigError, match="not available"):
        select_backend("npu")
    with pytest.raises(ConfigError, match="Unknown real-quant backend"):
        select_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            select_backend("cuda")
    with pytest.raises(ConfigError, match="runs on cpu"):
        select_backend("cpu", "meta")


def test_torch_npu_double_reproduces_the_documented_numbers():
    """The double against torch_npu's own pages: npu_dynamic_quant's printed example, npu_quant_matmul's two x2
    layouts of int4 weights, npu_kronecker_quant's scale (clip ratio narrows the range) and int4 saturation."""
    x = torch.tensor([[0.7261, 0.3726, 0.9126], [0.9023, 0.9990, 0.1279], [0.8628, 0.6240, 0.9028]],
                     dtype=torch.float16)
    y, scale = TorchNpuDouble.npu_dynamic_quant(x)
    assert y.tolist() == [[101, 52, 127], [115, 127, 16], [121, 88, 127]]
    assert torch.allclose(scale, torch.tensor([0.0072, 0.0079, 0.0071]), atol=5e-5)
    g = torch.Generator().manual_seed(0)
    a, w = torch.randint(-8, 8, (3, 16), generator=g), torch.randint(-8, 8, (8, 16), generator=g)
    s_w, s_t = torch.rand(8, generator=g), torch.rand(3, generator=g)
    want = (a @ w.t()).float() * s_w * s_t[:, None]
    for x2 in (pack_words(w).t(), pack_words(w.t().contiguous())):  # (k/8, n) transpose view, or (k, n/8)
        out = TorchNpuDouble.npu_quant_matmul(pack_words(a), x2, s_w, pertoken_scale=s_t, output_dtype=torch.float16)
        assert out.dtype == torch.float16 and torch.allclose(out.float(), want, rtol=1e-3)
    x = torch.tensor([[[1.5] * 7 + [-3.5]]], dtype=torch.bfloat16)  # [K=1, M=1, N=8], identity factors
    eye1, eye8 = torch.eye(1, dtype=torch.bfloat16), torch.eye(8, dtype=torch.bfloat16)
    for ratio, codes, s in ((1.0, [3] * 7 + [-7], 0.5), (0.5, [6] * 7 + [-8], 0.25)):  # -14 saturates to -8
        q, scale = TorchNpuDouble.npu_kronecker_quant(x, eye1, eye8, clip_ratio=ratio)
        assert q.shape == (1, 1, 1) and unpack_words(q).flatten().tolist() == codes
        assert scale.shape == (1,) and abs(float(scale) - s) < 1e-6


def test_backend_selection_with_torch_npu_present(monkeypatch, tiny_qwen3):
    """A stand-in torch_npu module exposing the documented ops (tests/torch_npu_double.py, written from torch_npu's
    documentation, nothing shared with the backend) and a visible device: auto picks the npu backend, which then
    converts and runs a model through those entry points."""
    fake_npu = torch_npu_module()
    monkeypatch.setitem(sys.modules, "torch_npu", fake_npu)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    be = select_backend("auto")
    assert isinstance(be, NpuBackend) and be.ops is fake_npu
    assert select_backend("auto", "cpu").name == "cpu"  # a model on the cpu still gets the cpu backend
    fake = _fake_model(tiny_qwen3)
    real = convert_model(copy.deepcopy(fake), be)  # the npu path, run on cpu tensors through the double's ops
    lin = real.model.layers[0].mlp.down_proj
    assert lin.qweight_int4.dtype == torch.int32 and lin.qweight_int4.shape == (256, 768 // 8)
    ids = torch.randint(0, tiny_qwen3.config.vocab_size, (1, 6))
    with torch.no_grad():
        ref = fake(input_ids=ids).logits
        bf16_noise = _rel(copy.deepcopy(fake).to(torch.bfloat16)(input_ids=ids).logits, ref)
        # the NPU kernels quantize bf16 activations and write bf16: as close as the fake model's own bf16 run
        assert _rel(real(input_ids=ids).logits, ref) < 1.5 * bf16_noise


def test_native_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FLATQUANT_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", {})
    be = CpuBackend()
    assert be.native is None and "qweight" in be.prepare_weight(torch.zeros(4, 8, dtype=torch.int8), 4)
    assert "FLATQUANT_NATIVE=0" in native.unsupported_reason()


# --- every native code path (AVX-512 VNNI, AVX-VNNI, AVX2, NEON, portable C) -----------------------------------


def _native_paths():
    kernels = native.load()
    return [] if kernels is None else kernels.compiled_isas()


@pytest.fixture
def native_path(request):
    """Run the native kernels on one code path for the test, then restore the automatic choice."""
    kernels = native.load()
    previous = kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(previous)


def test_the_portable_path_is_always_there():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.unsupported_reason()}")
    assert "portable" in native.load().compiled_isas() and native.cpu_isas()[-1] == "portable"
    assert native.load().isa == native.requested_isa()


@pytest.mark.parametrize("native_path", _native_paths(), indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}k{}n{}w{}a{}".format(*c[:5]))
def test_native_path_equals_the_reference_integer_math(native_path, case):
    """Activation codes, scales, code sums, GEMM + epilogue (fp32 and bf16 out) and the fused call of each path are
    bit-identical to the PyTorch reference (cpu-torch: quantize_per_token + an exact integer GEMM + rescale); 8-bit
    weights too (two int4 planes on the same kernels)."""
    m, k, n, w_bits, a_bits, clip, trans, has_bias = case
    kernels = native.load()
    g = torch.Generator().manual_seed(m * 7 + k)
    codes, scale = quantize_weight(torch.randn(n, k, generator=g), w_bits, torch.full((n, 1), 0.9))
    bias = torch.randn(n, generator=g) if has_bias else None
    ref_be, be = TorchCpuBackend(), CpuBackend()
    ref_t, t = ref_be.prepare_weight(codes, w_bits, a_bits), be.prepare_weight(codes, w_bits, a_bits)
    assert set(t) == ({"qweight_vnni"} if w_bits == 4 else {"qweight_vnni_hi", "qweight_vnni_lo"})
    assert torch.equal(be.weight_codes(t, n, k), codes)
    if w_bits == 8:
        assert codes.min() == -128 and codes.max() == 127  # the planes' extremes are covered
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        x[:, 1] *= 30
        qx = kernels.quantize(x, a_bits, clip)
        ref_q = ref_be.quantize(x, ActQuant(a_bits, clip), ref_t)
        assert torch.equal(qx.q[:, :k], ref_q.q) and torch.equal(qx.scale, ref_q.scale), native_path
        assert torch.equal(qx.extra["rowsum"], ref_q.q.sum(1, dtype=torch.int32))
        for out_dtype in (torch.float32, torch.bfloat16):
            ref = ref_be.matmul(ref_q, ref_t, n, scale, bias, out_dtype)
            assert torch.equal(be.matmul(qx, t, n, scale, bias, out_dtype), ref), (native_path, out_dtype)
        left = right = None
        if trans is not None:
            left = torch.linalg.qr(torch.randn(trans[0], trans[0], generator=g))[0].to(dtype)
            right = torch.linalg.qr(torch.randn(trans[1], trans[1], generator=g))[0].to(dtype)
        act = ActQuant(a_bits, clip, left, right)
        separate = be.matmul(be.quantize(x[:1], act, t), t, n, scale, bias, dtype)
        fused = be.fused_linear(x[:1], act, t, n, scale, bias, dtype)
        if w_bits == 8:  # no fused single call for the two planes
            assert fused is None
            continue
        assert fused is not None and torch.equal(fused, separate), native_path


@pytest.mark.parametrize("native_path", _native_paths(), indirect=True)
def test_native_transform_is_identical_on_every_path(native_path):
    kernels = native.load()
    g = torch.Generator().manual_seed(3)
    for a, b in ((86, 128), (8, 12), (3, 5)):
        left, right = torch.randn(a, a, generator=g), torch.randn(b, b, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, a * b, generator=g).to(dtype)
            out = kernels.kron(x, left.to(dtype), right.to(dtype))
            previous = kernels.set_isa("portable")
            try:
                ref = kernels.kron(x, left.to(dtype), right.to(dtype))
            finally:
                kernels.set_isa(previous)
            assert torch.equal(out, ref), (native_path, a, b, dtype)
            dense = (x.double() @ torch.kron(left.to(dtype).double(), right.to(dtype).double())).float()
            assert _rel(out, dense) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("native_path", _native_paths(), indirect=True)
@pytest.mark.parametrize("int_gemm", ["int", "float"])
def test_real_quant_equals_fake_quant_on_every_native_path(native_path, int_gemm, tiny_qwen3, monkeypatch):
    """Prompt- and decode-sized batches (fused single-call path for 1-4 tokens): real-quant logits equal the folded
    fake-quant model's on each code path, with the fake model's GEMM on torch._int_mm or in fp32 (no-VNNI CPUs)."""
    from core.quantizer import INT_GEMM_ENV

    monkeypatch.setenv(INT_GEMM_ENV, int_gemm)
    fake = _fake_model(tiny_qwen3, O_QUANT_CFG)  # all seven linears W4A4 (o_proj: its own online transform) + lm_head
    real = convert_model(copy.deepcopy(fake), "cpu")
    linears = [m for m in real.modules() if isinstance(m, RealQuantLinear)]
    assert len(linears) == 7 * tiny_qwen3.config.num_hidden_layers + 1
    assert all("qweight_vnni" in dict(m.named_buffers()) for m in linears if m is not real.lm_head)
    assert {"qweight_vnni_hi", "qweight_vnni_lo"} <= dict(real.lm_head.named_buffers()).keys()  # int8: two planes
    g = torch.Generator().manual_seed(5)
    for shape in ((1, 1), (1, 3), (2, 9)):  # (bf16 kernels: test_native_path_equals_the_reference_integer_math)
        ids = torch.randint(0, tiny_qwen3.config.vocab_size, shape, generator=g)
        with torch.no_grad():
            assert torch.equal(real(input_ids=ids).logits, fake(input_ids=ids).logits), (native_path, shape)


def test_forced_code_path_is_checked(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ConfigError, match="must be one of"):
        native.requested_isa()
    missing = next((n for n in native.ISAS if n not in native.cpu_isas()), None)
    if missing is not None:
        monkeypatch.setenv(native.ISA_ENV, missing)
        with pytest.raises(ConfigError, match="lacks"):
            native.requested_isa()
    monkeypatch.setenv(native.ISA_ENV, "portable")
    assert native.requested_isa() == "portable"
