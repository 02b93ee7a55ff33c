"""Issue 12: export in the layout vllm-ascend serves (W4A4_FLATQUANT_DYNAMIC), checked against the reference loader
(core.realquant.ascend_reference: the serving math, written from the layout facts) and the layout validator."""
import copy
import errno
import json
import shutil

import pytest
import torch

from core.cli import main
from core.config import parse_config
from core.flat import fold_model
from core.matrices import build_payload, save_matrices, uncalibrated_states
from core.realquant import convert_model
from core.realquant.ascend import export_ascend, export_matrix_file, widen_skip_layers
from core.realquant.folder import parse_size
from core.realquant.ascend_reference import (DESCRIPTION_FILE, INDEX_FILE, QUANT_TYPE, WEIGHTS_FILE, layout_problems,
                                             load_reference, load_tensors, server_factors)
from core.transforms import kron_factors

REL_TOL = 1e-3


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _matrix_file(path, model, cfg):
    _, states = uncalibrated_states(model, cfg)
    return save_matrices(path, build_payload(model, cfg, states, complete=True))


def _text_ids(tokenizer, shared_data, n=256):
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]


def _quantized_sizes(folder):
    desc = json.loads((folder / DESCRIPTION_FILE).read_text())
    tensors = load_tensors(folder)
    q = sum(t.numel() * t.element_size() for n, t in tensors.items() if desc[n] == QUANT_TYPE)
    bf16 = sum(2 * t.numel() for n, t in tensors.items() if desc[n] == QUANT_TYPE and n.endswith(".weight"))
    return q, bf16


def _errors(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def test_server_factors_follow_the_servers_rule():
    for n, ab in {4096: (64, 64), 11008: (86, 128), 12288: (96, 128), 576: (24, 24), 1536: (32, 48),
                  14336: (112, 128), 256: (16, 16), 768: (24, 32)}.items():
        assert server_factors(n) == ab == kron_factors(n)
    # the server only takes pairs with an even sum: 40 = 5 x 8 for FlatQuant, 4 x 10 for the server
    assert kron_factors(40) == (5, 8) and server_factors(40) == (4, 10)
    assert parse_size("2GB") == 2 * 2 ** 30 and parse_size("500kb") == 500 * 1024 and parse_size("123") == 123


@pytest.fixture(scope="module")
def smol_calibrated(tmp_path_factory, smollm2):
    """SmolLM2 calibrated with a small budget (2 layers, 4 x 64 tokens, 1 epoch): trained transforms and clips."""
    from core.pipeline import QuantizeOptions, run_quantize

    out = tmp_path_factory.mktemp("smol_cal")
    result = run_quantize(QuantizeOptions(nsamples=4, seqlen=64, epochs=1, max_layers=2, skip_ppl=True,
                                          skip_rtn=True, output_dir=str(out)))
    return result


def test_smollm2_export_equals_the_real_quant_model_on_wikitext(smol_calibrated, smollm2, shared_data, tmp_path,
                                                                capsys):
    out = tmp_path / "smol_ascend"
    rc = main(["export", "--format", "ascend", "--flat_matrix_path", str(smol_calibrated.matrix_path),
               "--output_dir", str(out), "--shard_size", "40MB"])
    text = capsys.readouterr().out
    assert rc == 0 and "All done!" in text and "vllm serve" in text
    assert layout_problems(out) == []
    # sharded: -0000i-of-0000n files and an index naming every tensor
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / WEIGHTS_FILE).exists()
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["quantize"] == "w4a4_flatquant_dynamic" and config["torch_dtype"] == "bfloat16"
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model_quant_type"] == QUANT_TYPE and desc["lm_head.weight"] == "FLOAT"  # tied: typed, not stored
    assert "lm_head.weight" not in index["weight_map"]
    assert desc["model.layers.1.mlp.down_proj.weight"] == QUANT_TYPE
    assert desc["model.layers.2.mlp.down_proj.weight"] == "FLOAT"  # not calibrated (max_layers 2)
    assert desc["model.layers.0.self_attn.o_proj.weight"] == "FLOAT"
    assert (out / "tokenizer.json").exists()

    exact = tmp_path / "smol_ascend_fp32"
    export_matrix_file(None, smol_calibrated.matrix_path, exact, dtype=torch.float32, say=lambda s: None)
    served, fp32 = load_tensors(out), load_tensors(exact)
    for name, t in served.items():  # the served folder's numbers are the fp32 folder's, in bf16 where float
        same = fp32[name].to(t.dtype) if t.is_floating_point() and t.dtype != fp32[name].dtype else fp32[name]
        assert torch.equal(t, same), name
    ref, tokenizer = load_reference(exact)
    real = convert_model(copy.deepcopy(smol_calibrated.quantized), "cpu")
    ids = _text_ids(tokenizer, shared_data)
    with torch.no_grad():
        assert _rel(ref(input_ids=ids).logits, real(input_ids=ids).logits) < REL_TOL
    q, bf16 = _quantized_sizes(out)
    assert q <= 0.55 * bf16


def test_int8_lm_head_is_exported_float_with_a_note(tiny_qwen3, tmp_path):
    cfg = parse_config({"skip_layers": []})  # lm_head quantized (int8) in the run, which vllm-ascend cannot serve
    wrapped, _ = uncalibrated_states(tiny_qwen3, cfg)
    fold_model(wrapped)
    notes = []
    info = export_ascend(wrapped, cfg, None, tmp_path / "h", dtype=torch.float32, say=notes.append)
    assert layout_problems(tmp_path / "h") == [] and info["quantized_linears"] == 12
    assert len(notes) == 1 and "lm_head" in notes[0] and "FLOAT" in notes[0]
    assert json.loads((tmp_path / "h" / DESCRIPTION_FILE).read_text())["lm_head.weight"] == "FLOAT"
    tensors = load_tensors(tmp_path / "h")
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in tensors)
    assert torch.equal(tensors["lm_head.weight"], tiny_qwen3.lm_head.weight)


def test_tiny_qwen3_export_from_memory_equals_real_quant(tiny_qwen3, smollm2, shared_data, tmp_path):
    cfg = parse_config(None)
    cfg.lac = True  # a learned activation clip (sigmoid(4) here) must reach clip_ratio
    wrapped, _ = uncalibrated_states(tiny_qwen3, cfg)
    fold_model(wrapped)
    ids = _text_ids(smollm2.tokenizer, shared_data, 128)
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
    info = export_ascend(wrapped, cfg, smollm2.tokenizer, tmp_path / "q3", dtype=torch.float32, say=lambda s: None)
    out = tmp_path / "q3"
    assert info["quantized_linears"] == 12 and info["ratio_to_bf16"] <= 0.55
    assert layout_problems(out) == [] and (out / WEIGHTS_FILE).exists()  # one file below the shard size
    clip = load_tensors(out)["model.layers.0.self_attn.q_proj.clip_ratio"]
    assert clip.dtype == torch.float32 and abs(float(clip) - torch.sigmoid(torch.tensor(4.0)).item()) < 1e-6
    ref, _ = load_reference(out)
    real = convert_model(copy.deepcopy(wrapped), "cpu")
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, before)  # the in-memory model is not modified
        assert _rel(ref(input_ids=ids).logits, real(input_ids=ids).logits) < REL_TOL
    q, bf16 = _quantized_sizes(out)
    assert q <= 0.55 * bf16


def test_bf16_export_keeps_float_parts_in_bf16(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys):
    matrix = _matrix_file(tmp_path / "m.pth", tiny_qwen3, parse_config(None))
    out = tmp_path / "bf16"
    assert main(["export", "--format", "ascend", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path",
                 str(matrix), "--output_dir", str(out)]) == 0  # auto: bfloat16 for a float32 checkpoint
    tensors = load_tensors(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.left_trans"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float32
    assert layout_problems(out) == []


def _rewrite(folder, edit_tensors=None, edit_desc=None):
    from safetensors.torch import save_file

    if edit_tensors:
        tensors = load_tensors(folder)
        edit_tensors(tensors)
        save_file(tensors, str(folder / WEIGHTS_FILE))
    if edit_desc:
        desc = json.loads((folder / DESCRIPTION_FILE).read_text())
        edit_desc(desc)
        (folder / DESCRIPTION_FILE).write_text(json.dumps(desc))


def test_layout_validator_catches_broken_folders(tiny_qwen3, tmp_path):
    cfg = parse_config(None)
    wrapped, _ = uncalibrated_states(tiny_qwen3, cfg)
    fold_model(wrapped)
    good = tmp_path / "good"
    export_ascend(wrapped, cfg, None, good, dtype=torch.float32, say=lambda s: None)
    assert layout_problems(good) == []
    p = "model.layers.0.self_attn"

    def case(name, match, **edits):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        _rewrite(folder, **edits)
        problems = layout_problems(folder)
        assert any(match in msg for msg in problems), (name, problems)

    case("type", "different types", edit_desc=lambda d: d.__setitem__(f"{p}.k_proj.weight", "FLOAT"))
    case("left", "differ in left_trans", edit_tensors=lambda t: t[f"{p}.v_proj.left_trans"].mul_(2))
    case("clip", "differ in clip_ratio", edit_tensors=lambda t: t.__setitem__(f"{p}.q_proj.clip_ratio",
                                                                              torch.tensor([0.5])))
    case("untyped", "not typed", edit_desc=lambda d: d.pop("model.norm.weight"))
    case("mqt", "model_quant_type", edit_desc=lambda d: d.pop("model_quant_type"))
    case("codes", "outside -8..7", edit_tensors=lambda t: t[f"{p}.q_proj.weight"].__setitem__((0, 0), 9))
    case("shape", "the server expects", edit_tensors=lambda t: t.__setitem__(f"{p}.q_proj.right_trans",
                                                                             torch.eye(8)))
    case("offset", "not all zero", edit_tensors=lambda t: t[f"{p}.q_proj.weight_offset"].add_(1))
    case("scale", "expected float32", edit_tensors=lambda t: t.__setitem__(
        f"{p}.q_proj.weight_scale", t[f"{p}.q_proj.weight_scale"].reshape(-1)))
    case("dtype", "expected the model's", edit_tensors=lambda t: t.__setitem__(
        f"{p}.q_proj.left_trans", t[f"{p}.q_proj.left_trans"].half()))
    folder = tmp_path / "noquantize"
    shutil.copytree(good, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantize")
    (folder / "config.json").write_text(json.dumps(config))
    assert any('"quantize"' in msg for msg in layout_problems(folder))


def test_a_skip_that_splits_a_fused_group_is_refused_or_widened(tiny_qwen3, tiny_qwen3_dir, tmp_path, capsys):
    cfg = parse_config({"skip_layers": ["lm_head", "layers.0.self_attn.k_proj"]})
    skip, notes = widen_skip_layers(cfg, range(2))
    assert set(skip) >= {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} and len(notes) == 1
    matrix = _matrix_file(tmp_path / "split.pth", tiny_qwen3, cfg)
    out = tmp_path / "split"
    rc = main(["export", "--format", "ascend", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path",
               str(matrix), "--output_dir", str(out)])
    errors, err = _errors(capsys)
    assert rc == 2 and len(errors) == 1 and "q_proj/k_proj/v_proj" in errors[0] and "Traceback" not in err
    assert not out.exists()
    # quantize --export ascend widens it to the group, says so, and the folder has q/k/v of layer 0 all FLOAT
    run = tmp_path / "run"
    rc = main(["quantize", "--model_path", str(tiny_qwen3_dir), "--max_layers", "1", "--nsamples", "2", "--seqlen",
               "32", "--epochs", "1", "--no_ppl", "--no_time_diff", "--skip_layers", "lm_head,layers.0.self_attn.k_proj",
               "--output_dir", str(run), "--export", "ascend"])
    text = capsys.readouterr().out
    assert rc == 0 and "widened to all of q_proj/k_proj/v_proj in layer 0" in text
    desc = json.loads((run / "ascend" / DESCRIPTION_FILE).read_text())
    assert {desc[f"model.layers.0.self_attn.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj")} == {"FLOAT"}
    assert desc["model.layers.0.mlp.gate_proj.weight"] == QUANT_TYPE and layout_problems(run / "ascend") == []


def test_o_proj_and_kv_cache_settings_are_exported_float_with_one_note(tiny_qwen3, tiny_qwen3_dir, tmp_path,
                                                                       capsys):
    cfg = parse_config({"algorithm": {"flatquant": {"use_o_quant": True, "use_kcache_quant": True, "k_bits": 4}}})
    matrix = _matrix_file(tmp_path / "o.pth", tiny_qwen3, cfg)
    out = tmp_path / "o"
    rc = main(["export", "--format", "ascend", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path",
               str(matrix), "--output_dir", str(out)])
    lines = [s for s in capsys.readouterr().out.splitlines() if "not part of the exported model" in s]
    assert rc == 0 and len(lines) == 1 and "o_proj" in lines[0] and "kv-cache" in lines[0]
    assert layout_problems(out) == []
    tensors = load_tensors(out)
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model.layers.0.self_attn.o_proj.weight"] == "FLOAT"
    assert not any("kv_quantizer" in n or "o_proj.left_trans" in n for n in tensors)
    # o_proj is back in the original basis: its float weight is the model's own (in bf16, the served dtype)
    w = tiny_qwen3.model.layers[1].self_attn.o_proj.weight
    assert _rel(tensors["model.layers.1.self_attn.o_proj.weight"], w) < 1e-2


def test_bad_inputs_give_one_error_line_and_write_nothing(tiny_qwen3, tiny_qwen3_dir, smol_calibrated, tmp_path,
                                                          capsys, monkeypatch):
    matrix = _matrix_file(tmp_path / "m.pth", tiny_qwen3, parse_config(None))
    base = ["export", "--format", "ascend", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path"]

    def refused(args, match):
        rc = main(args)
        errors, err = _errors(capsys)
        assert rc == 2 and len(errors) == 1 and match in errors[0] and "Traceback" not in err, err

    # a matrix file for another model
    out = tmp_path / "foreign"
    refused(base + [str(smol_calibrated.matrix_path), "--output_dir", str(out)], "calibrated for another model")
    assert not out.exists()
    # a non-empty output folder without --overwrite: refused and left as it was
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(base + [str(matrix), "--output_dir", str(busy)], "--overwrite")
    assert (busy / "keep.txt").read_text() == "mine"
    # the source model's folder, or a folder inside it
    refused(base + [str(matrix), "--output_dir", str(tiny_qwen3_dir), "--overwrite"], "source model")
    refused(base + [str(matrix), "--output_dir", str(tiny_qwen3_dir / "sub")], "source model")
    # a disk that fills up mid-write: one error line, no target, no temp folder left, an old target kept intact
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 1000)  # a partial shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    full = tmp_path / "full"
    refused(base + [str(matrix), "--output_dir", str(full), "--shard_size", "1MB"], "No space left on device")
    assert not full.exists() and not list(tmp_path.glob(".full*"))
    calls.clear()
    refused(base + [str(matrix), "--output_dir", str(busy), "--overwrite", "--shard_size", "1MB"],
            "No space left on device")
    assert (busy / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".busy*"))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    # --overwrite replaces the folder as a whole
    assert main(base + [str(matrix), "--output_dir", str(busy), "--overwrite"]) == 0
    assert not (busy / "keep.txt").exists() and layout_problems(busy) == []
    # a W8 config cannot be held by the format
    w8 = _matrix_file(tmp_path / "w8.pth", tiny_qwen3, parse_config({"quant_cfg": {"weights": {"type": "int8"}}}))
    refused(base + [str(w8), "--output_dir", str(tmp_path / "w8")], "W4A4 models only")
    refused(base + [str(matrix), "--output_dir", str(tmp_path / "s"), "--shard_size", "lots"], "--shard_size")


# --- the NPU backend, called as vllm-ascend calls torch_npu ---------------------------------------------------------


def test_npu_backend_calls_follow_vllm_ascend(monkeypatch):
    from core.realquant.backends import ActQuant
    from core.realquant.npu import KRON_MAX_TOKENS, NpuBackend, self_check
    from torch_npu_double import TorchNpuDouble

    calls = []

    class Recording(TorchNpuDouble):  # torch_npu's documented ops, written apart
        @staticmethod
        def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
            calls.append(("pack", inner_k_tiles))
            return TorchNpuDouble.npu_convert_weight_to_int4pack(weight, inner_k_tiles)

        @staticmethod
        def npu_kronecker_quant(x, p1, p2, clip_ratio=None, dst_dtype=None):
            calls.append(("kron", x.shape[0], dst_dtype))
            return TorchNpuDouble.npu_kronecker_quant(x, p1, p2, clip_ratio, dst_dtype)

    be = NpuBackend(ops=Recording())
    self_check(be.ops, "cpu")  # the first use of each op checks it on small tensors (core.realquant.npu)
    calls.clear()
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    tensors = be.prepare_weight(codes, 4)
    assert calls == [("pack", 1)]
    left, right = torch.linalg.qr(torch.randn(8, 8))[0], torch.linalg.qr(torch.randn(8, 8))[0]
    act = ActQuant(4, 0.9, left, right)
    x = torch.randn(KRON_MAX_TOKENS + 5, 64, dtype=torch.bfloat16)
    qx = be.quantize(x, act, tensors)
    assert [c for c in calls if c[0] == "kron"] == [("kron", KRON_MAX_TOKENS, torch.int32), ("kron", 5, torch.int32)]
    single = be.quantize(x[-5:], act, tensors)  # the chunked call equals the unchunked one on the same rows
    assert torch.equal(qx.q[-5:], single.q) and torch.equal(qx.scale[-5:], single.scale)
    with pytest.raises(RuntimeError, match="limits"):
        TorchNpuDouble.npu_kronecker_quant(torch.zeros(2, 4, 300, dtype=torch.bfloat16),
                                           torch.eye(4, dtype=torch.bfloat16), torch.eye(300, dtype=torch.bfloat16))
    # a right factor that is a multiple of 8 but not 16 still runs, with a warning for older CANN
    with pytest.warns(UserWarning, match="multiple of 16"):
        be.quantize(torch.randn(3, 8 * 24, dtype=torch.bfloat16),
                    ActQuant(4, None, torch.eye(8), torch.eye(24)), be.prepare_weight(codes.repeat(1, 3), 4))
