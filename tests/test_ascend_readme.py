"""Issue 23: an Ascend export says what it needs from the server (README.md and the description's metadata), the
extra key does not disturb the layout or the reference loader, and float32 is refused before the model loads."""
import json

import torch

from core.cli import main
from core.config import parse_config
from core.matrices import build_payload, save_matrices, uncalibrated_states
from core.realquant.ascend_reference import (CLIP_CONVENTION, DESCRIPTION_FILE, METADATA_KEY, QUANT_TYPE,
                                             layout_problems, load_reference, server_factors)
from core.realquant.ascend_serving import REQUIREMENTS


def _matrix_file(path, model, cfg):
    _, states = uncalibrated_states(model, cfg)
    return save_matrices(path, build_payload(model, cfg, states, complete=True))


def test_ascend_folder_states_what_the_server_needs_and_still_loads(tiny_qwen3, tiny_qwen3_dir, tmp_path, capsys):
    matrix = _matrix_file(tmp_path / "m.pth", tiny_qwen3, parse_config(None))
    out = tmp_path / "ascend"
    assert main(["export", "--format", "ascend", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path",
                 str(matrix), "--output_dir", str(out)]) == 0
    assert "README.md" in capsys.readouterr().out
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    meta = desc[METADATA_KEY]
    hidden, inter = tiny_qwen3.config.hidden_size, tiny_qwen3.config.intermediate_size
    assert meta["quant_type"] == QUANT_TYPE and meta["float_dtype"] == "bfloat16"
    assert meta["clip_convention"] == CLIP_CONVENTION == "scale = clip_ratio * max|x| / 7"
    assert sorted(map(tuple, meta["kronecker_factors"])) == sorted({server_factors(hidden), server_factors(inter)})
    assert meta["float_linears"] == {"lm_head": 1, "o_proj": tiny_qwen3.config.num_hidden_layers}
    assert meta["requires"]["vllm-ascend"].startswith(">= 0.11.0rc1") and meta["requires"] == REQUIREMENTS
    assert meta["serve"] == "vllm serve DIR --quantization ascend"

    readme = (out / "README.md").read_text()
    for fact in ("vllm serve THIS_FOLDER --quantization ascend", QUANT_TYPE, "clip_ratio * max|x| / 7",
                 "max|x| / (7 * clip_ratio)", "bfloat16", "vllm-ascend: >= 0.11.0rc1", "CANN: >= 8.3.RC1",
                 "torch_npu: 2.7.1", "not confirmed", "o_proj x", "lm_head x1", "x".join(map(str, server_factors(hidden)))):
        assert fact in readme, fact

    # the metadata key is no tensor name: the layout stays valid and the reference loads and runs
    assert layout_problems(out) == []
    ref, _ = load_reference(out)
    with torch.no_grad():
        assert torch.isfinite(ref(input_ids=torch.randint(0, 100, (1, 5))).logits).all()
    # vllm-ascend looks the types up by tensor name ("<prefix>.weight"); the extra key answers none of them
    assert not METADATA_KEY.endswith(".weight") and "." not in METADATA_KEY


def test_float32_is_refused_for_ascend_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import core.models

    monkeypatch.setattr(core.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = main(["export", "--format", "ascend", "--flat_matrix_path", str(tmp_path / "none.pth"), "--output_dir",
               str(tmp_path / "out"), "--dtype", "float32"])
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --dtype float32")
    assert "bfloat16 or float16" in lines[0] and not (tmp_path / "out").exists()
