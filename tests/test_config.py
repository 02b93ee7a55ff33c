import copy
import json

import pytest

from core.config import INT4_FLAT_QUANT_CFG, FlatQuantConfig, load_config_file, normalize_skip_layers, parse_config
from core.errors import ConfigError


def test_default_is_amct_int4_flat_quant_cfg():
    cfg = parse_config(INT4_FLAT_QUANT_CFG)
    assert (cfg.w_bits, cfg.a_bits, cfg.epochs, cfg.cali_bsz, cfg.flat_lr) == (4, 4, 15, 4, 5e-3)
    assert cfg.use_down_quant and cfg.lwc and not cfg.lac and cfg.add_diag and cfg.diag_alpha == 0.3
    assert cfg.skip_layers == ["lm_head"]
    assert parse_config(cfg.to_amct_dict()) == cfg  # round trip
    assert json.dumps(cfg.to_amct_dict())  # JSON-safe (skip_layers as a list)


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["algorithm"]["flatquant"].update(epoch=3), "epoch"),
    (lambda c: c.update(extra=1), "extra"),
    (lambda c: c["algorithm"]["flatquant"].update(k_bits=3), "k_bits"),
    (lambda c: c["algorithm"]["flatquant"].update(epochs="15"), "epochs"),
    (lambda c: c["algorithm"]["flatquant"].update(use_down_quant=1), "use_down_quant"),
    (lambda c: c["algorithm"]["flatquant"].update(flat_lr=True), "flat_lr"),
    (lambda c: c["quant_cfg"]["weights"].update(type="int3"), "quant_cfg.weights.type"),
    (lambda c: c["quant_cfg"]["inputs"].update(strategy="tensor"), "quant_cfg.inputs.strategy"),
    (lambda c: c["quant_cfg"]["inputs"].update(symmetric=False), "quant_cfg.inputs.symmetric"),
    (lambda c: c.update(skip_layers=5), "skip_layers"),
    (lambda c: c.update(skip_layers={"--"}), "'--'"),
    (lambda c: c["algorithm"]["flatquant"].update(diag_alpha=2.0), "diag_alpha"),
])
def test_malformed_config_names_the_key(mutate, needle):
    cfg = copy.deepcopy(INT4_FLAT_QUANT_CFG)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_skip_layers_substring_and_exact_match():
    cfg = FlatQuantConfig(skip_layers=normalize_skip_layers("lm_head, layers.1.mlp, down_proj"))
    assert cfg.is_skipped("lm_head")
    assert cfg.is_skipped("model.layers.1.mlp.up_proj")
    assert not cfg.is_skipped("model.layers.11.mlp.up_proj")  # 'layers.1.mlp' is not a substring of 'layers.11.mlp'
    assert FlatQuantConfig(skip_layers=["layers.1"]).is_skipped("model.layers.11.mlp.up_proj")  # but 'layers.1' is
    assert cfg.is_skipped("model.layers.7.mlp.down_proj")
    assert not cfg.is_skipped("model.layers.2.self_attn.q_proj")


@pytest.mark.parametrize("bad", ["--", ".", "a,--"])
def test_skip_layers_without_letters_or_digits_is_an_error(bad):
    with pytest.raises(ConfigError, match="no letter or digit"):
        normalize_skip_layers(bad)


@pytest.mark.parametrize("bad", [",", " ", " , ", "lm_head,", ["lm_head", ""]])
def test_skip_layers_with_an_empty_entry_is_an_error(bad):
    with pytest.raises(ConfigError, match="empty entry"):  # never silently an empty list (lm_head quantized)
        normalize_skip_layers(bad)


def test_empty_skip_layers_skip_nothing():
    assert normalize_skip_layers("") == normalize_skip_layers([]) == []


def test_config_file_json_and_yaml(tmp_path):
    cfg = copy.deepcopy(INT4_FLAT_QUANT_CFG)
    cfg["skip_layers"] = ["lm_head", "down_proj"]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert parse_config(load_config_file(tmp_path / "c.json")).skip_layers == ["down_proj", "lm_head"]
    (tmp_path / "c.yaml").write_text("algorithm:\n  flatquant:\n    epochs: 2\n")
    assert parse_config(load_config_file(tmp_path / "c.yaml")).epochs == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")
