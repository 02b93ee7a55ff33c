"""Shared fixtures: the real SmolLM2 model (embedded default), a small random Qwen3, and ../shared/data."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: libgomp spin-wait is costly on 2 vCPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """LoadedModel for SmolLM2-135M-Instruct (fp32, cpu). Shared: deepcopy the model before changing it."""
    from core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_qwen3():
    """A small random Qwen3ForCausalLM (q_norm/k_norm, GQA): structure and equivalence only, no quality."""
    from core.models import build_random_qwen3

    return build_random_qwen3()


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, tiny_qwen3):
    """The tiny Qwen3 saved as a local model folder, with a tokenizer borrowed from SmolLM2 (same vocab cap)."""
    from core.models import load_model

    path = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_qwen3.save_pretrained(path)
    load_model().tokenizer.save_pretrained(path)
    return path


SHARED_DATA_MISSING = ("needs ../shared/data (WikiText-2, Brown, lm-eval task files) beside the checkout, or "
                       "FLATQUANT_DATA_DIR set to such a folder")


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder (core.data.shared_data_dir). Every test that reads it asks for this fixture, so a
    clone without it skips them, saying how to get it, instead of failing."""
    from core.data import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip(SHARED_DATA_MISSING)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals come before any model loads (through core or straight through transformers)."""
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for where in ("core.models.load_model", "core.pipeline.load_model"):
        monkeypatch.setattr(where, fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
