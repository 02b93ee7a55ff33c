"""`python -m core export --format native` (the default): the project's own real-quant checkpoint, written in the
serving dtype, staged and renamed, and refused for targets that would lose data."""
import copy
import errno
import os

import pytest
import torch

from core.cli import main
from core.config import parse_config
from core.matrices import build_payload, load_matrices, save_matrices, uncalibrated_states
from core.models import load_model
from core.progress import CancelToken
from core.realquant.checkpoint import load_checkpoint, read_manifest
from core.realquant.convert import convert_model


def _matrix(tmp_path, model):
    cfg = parse_config(None)
    _, states = uncalibrated_states(model, cfg)
    return save_matrices(tmp_path / "flat_matrices.pth", build_payload(model, cfg, states, complete=True))


def _assert_folder_gives_converted_logits(folder, model_dir, matrix, ids) -> None:
    """No original weights needed: the exported folder alone gives the converted model's logits."""
    fake = load_model(str(model_dir)).model
    load_matrices(matrix, fake)
    with torch.no_grad():
        ref = convert_model(fake)(input_ids=ids).logits
        assert torch.equal(load_checkpoint(folder).model(input_ids=ids).logits, ref)


def test_export_command_writes_a_loadable_checkpoint(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys):
    matrix = _matrix(tmp_path, tiny_qwen3)
    out = tmp_path / "export"
    rc = main(["export", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix),
               "--output_dir", str(out), "--verify", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 0 and "identical logits" in text and "All done!" in text
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert read_manifest(out)["sizes"]["ratio_to_bf16"] <= 0.3
    _assert_folder_gives_converted_logits(out, tiny_qwen3_dir, matrix, torch.randint(0, 100, (1, 6)))
    rc = main(["export", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(tmp_path / "nope.pth"),
               "--output_dir", str(tmp_path / "other")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_native_export_streams_layers_into_shards_that_load_back_exactly(tiny_qwen3_dir, tiny_qwen3, tmp_path,
                                                                         capsys):
    """Issue 10: the native export writes one decoder layer at a time (each released once written) into shards of at
    most --shard_size with an index; the sharded folder loads back to the same logits as the in-memory conversion,
    and a missing shard is refused with one clear message."""
    import json

    from core.errors import ModelLoadError

    matrix = _matrix(tmp_path, tiny_qwen3)
    out = tmp_path / "sharded"
    rc = main(["export", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix),
               "--output_dir", str(out), "--dtype", "float32", "--shard_size", "300KB"])
    text = capsys.readouterr().out
    assert rc == 0 and "safetensors shards" in text and "one decoder layer at a time" in text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    per_shard = {f: sum(1 for v in index["weight_map"].values() if v == f) for f in shards}
    header = 64 * 1024  # safetensors' JSON header
    assert all((out / f).stat().st_size <= 300 * 1024 + header or per_shard[f] == 1 for f in shards)
    _assert_folder_gives_converted_logits(out, tiny_qwen3_dir, matrix, torch.randint(0, 100, (2, 7)))
    (out / shards[1]).unlink()
    with pytest.raises(ModelLoadError, match="lacks " + shards[1]):
        load_checkpoint(out)


def test_export_of_a_model_in_memory_leaves_it_unchanged(tiny_qwen3, tmp_path):
    """The GUI / `quantize --export native` path converts a copy of one layer at a time, never the whole model."""
    from core.flat import FlatQuantLinear, fold_model
    from core.realquant.ascend import export_quantized

    cfg = parse_config(None)
    quantized, _ = uncalibrated_states(tiny_qwen3, cfg)
    fold_model(quantized)
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        fake_logits = quantized(input_ids=ids).logits
    export_quantized(quantized, cfg, None, "smollm2", tmp_path / "ck", "native", say=lambda s: None)
    assert sum(isinstance(m, FlatQuantLinear) for m in quantized.modules()) > 0
    after = quantized.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the same folder as converting a whole copy at once (the serving dtype of the smollm2 source: bf16)
    from core.realquant.checkpoint import export_checkpoint

    export_checkpoint(copy.deepcopy(quantized), None, tmp_path / "whole", cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        a = load_checkpoint(tmp_path / "ck").model(input_ids=ids).logits
        b = load_checkpoint(tmp_path / "whole").model(input_ids=ids).logits
    assert torch.equal(a, b) and a.shape == fake_logits.shape


def test_default_export_keeps_float_parts_in_the_serving_dtype(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys):
    """A float32 checkpoint exports its float parts in bfloat16 (issue 13: the zip was twice the model's size)."""
    matrix = _matrix(tmp_path, tiny_qwen3)
    fp32, auto = tmp_path / "fp32", tmp_path / "auto"
    for out, extra in ((fp32, ["--dtype", "float32"]), (auto, [])):
        assert main(["export", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix),
                     "--output_dir", str(out), "--verify"] + extra) == 0
    capsys.readouterr()
    assert read_manifest(auto)["dtype"] == "bfloat16" and read_manifest(fp32)["dtype"] == "float32"
    size = {p: (p / "model.safetensors").stat().st_size for p in (fp32, auto)}
    assert size[auto] < 0.6 * size[fp32]
    reloaded = load_checkpoint(auto).model
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert reloaded.model.layers[0].mlp.down_proj.w_scale.dtype == torch.float32


def test_native_export_refuses_targets_that_lose_data(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys, monkeypatch):
    matrix = _matrix(tmp_path, tiny_qwen3)
    base = ["export", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix), "--output_dir"]

    def refused(args, match):
        rc = main(args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and match in errors[0] and "Traceback" not in err, err

    def hashes(folder):
        import hashlib

        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    source_before = hashes(tiny_qwen3_dir)
    refused(base + [str(tiny_qwen3_dir), "--overwrite"], "source model")  # would overwrite the source weights
    refused(base + [str(tiny_qwen3_dir / "sub"), "--overwrite"], "source model")  # inside it
    assert hashes(tiny_qwen3_dir) == source_before and not (tiny_qwen3_dir / "sub").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    refused(base + [str(busy)], "--overwrite")
    file_target = tmp_path / "afile"
    file_target.write_text("")
    refused(base + [str(file_target)], "is a file")

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # the shard writer's first shard
    refused(base + [str(busy), "--overwrite"], "No space left on device")
    assert (busy / "x").read_text() == "keep" and not list(tmp_path.glob(".busy*"))


def test_gui_checkpoint_zip_of_fully_quantized_smollm2_is_at_most_0_6_of_bf16(smollm2, tmp_path):
    """Issue 13, acceptance 3: every decoder layer quantized, exported as the GUI does (export_quantized, native),
    zipped as the Artifacts tab does (RunStore.zip_checkpoint): at most 0.6x the bf16 model's bytes."""
    from core.config import parse_config
    from core.flat import fold_model
    from core.matrices import uncalibrated_states
    from core.realquant.ascend import export_quantized
    from flatgui.runs import CHECKPOINT_DIR, CHECKPOINT_ZIP, RunStore

    cfg = parse_config(None)
    quantized, _ = uncalibrated_states(smollm2.model, cfg)  # all 30 layers wrapped (random starting transforms)
    fold_model(quantized)
    store = RunStore(tmp_path)
    run = store.new_run()
    export_quantized(quantized, cfg, smollm2.tokenizer, "smollm2", run / CHECKPOINT_DIR, "native", say=lambda s: None)
    zipped = store.zip_checkpoint(run.name, CHECKPOINT_DIR, CHECKPOINT_ZIP)
    bf16_bytes = 2 * sum(p.numel() for p in smollm2.model.parameters())  # tied embeddings counted once
    assert zipped is not None
    assert os.path.getsize(zipped) <= 0.6 * bf16_bytes, (os.path.getsize(zipped), bf16_bytes)


@pytest.mark.parametrize("meta", [{"algorithm": "quarot"}, {"weight_rounding": "gptq"}])
@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_export_refuses_matrix_files_it_would_rebuild_wrongly(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys, meta,
                                                              fmt):
    """Export from a matrix file takes FlatQuant files with RTN rounding (the ascend layout is FlatQuant's); a QuaRot
    or GPTQ file is refused with one line pointing to `quantize ... --export`."""
    cfg = parse_config(None)
    _, states = uncalibrated_states(tiny_qwen3, cfg)
    matrix = save_matrices(tmp_path / "m.pth", build_payload(tiny_qwen3, cfg, states, complete=True, extra=meta))
    rc = main(["export", "--format", fmt, "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix),
               "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "--export native|ascend" in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_export_refuses_states_for_layers_the_model_lacks(tiny_qwen3_dir, tiny_qwen3, tmp_path, capsys, fmt):
    """The streaming exporters visit the model's layers; a state for a layer it does not have is refused up front,
    not silently skipped."""
    cfg = parse_config(None)
    _, states = uncalibrated_states(tiny_qwen3, cfg)
    states[len(states) + 5] = states[0]
    matrix = save_matrices(tmp_path / "m.pth", build_payload(tiny_qwen3, cfg, states, complete=True))
    rc = main(["export", "--format", fmt, "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(matrix),
               "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and f"state for layer {len(states) + 4}," in errors[0]
    assert not (tmp_path / "out").exists() and "Traceback" not in err


class _CancelAfter(CancelToken):
    """Pressed after ``checks`` checks: the export is cancelled with a layer written and the next one due."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks = checks

    def check(self) -> None:
        self.checks -= 1
        if self.checks < 0:
            self.cancel()
        super().check()


@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_cancelled_export_of_a_model_in_memory_leaves_no_folder(tiny_qwen3, tmp_path, fmt):
    """Issue 21: the GUI's export (export_quantized) checks its cancel token once per layer; a cancel removes the
    staged folder, so nothing that looks complete is left, and an earlier export there stays as it was."""
    from core.errors import JobCancelled
    from core.flat import fold_model
    from core.progress import Reporter
    from core.realquant.ascend import export_quantized

    cfg = parse_config(None)
    quantized, _ = uncalibrated_states(tiny_qwen3, cfg)
    fold_model(quantized)
    target = tmp_path / "out" / fmt
    target.parent.mkdir()
    token = _CancelAfter(1)
    with pytest.raises(JobCancelled):
        export_quantized(quantized, cfg, None, "smollm2", target, fmt, reporter=Reporter(cancel=token))
    assert token.checks < 0  # the first layer was written, the cancel landed at the second
    assert not target.exists() and list(target.parent.iterdir()) == []  # no staged (.partial) folder either
    export_quantized(quantized, cfg, None, "smollm2", target, fmt, say=lambda s: None)
    before = sorted((p.relative_to(target), p.stat().st_size) for p in target.rglob("*"))
    with pytest.raises(JobCancelled):
        export_quantized(quantized, cfg, None, "smollm2", target, fmt, reporter=Reporter(cancel=_CancelAfter(1)))
    assert sorted((p.relative_to(target), p.stat().st_size) for p in target.rglob("*")) == before
    assert [p.name for p in target.parent.iterdir()] == [fmt]
