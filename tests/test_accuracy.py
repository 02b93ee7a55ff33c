"""lm-eval accuracy on models in memory, offline from the shared HF-schema task files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from core.accuracy import (DEFAULT_TASKS, AccuracyOptions, evaluate_accuracy, format_acc_line, lm_eval_tasks_dir,
                           plan_tasks, write_task_configs)
from core.errors import ConfigError, DataError

EXPECTED_METRIC = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
                   "lambada_openai": "acc", "piqa": "acc_norm", "winogrande": "acc"}
EXPECTED_SPLIT = {"arc_challenge": "test", "arc_easy": "test", "hellaswag": "validation", "lambada_openai": "test",
                  "piqa": "validation", "winogrande": "validation"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def eval_dir(shared_data) -> Path:
    d = shared_data / "eval"
    if not d.is_dir():
        pytest.skip(f"{d} is missing: the lm-eval task files come with ../shared/data (or FLATQUANT_DATA_DIR)")
    return d


@pytest.fixture(scope="module")
def tiny_llama(smollm2):
    """A 2-layer random Llama with SmolLM2's vocabulary: exercises lm-eval's full path in seconds (no quality)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(smollm2.tokenizer), tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def test_generated_configs_include_stock_yaml_and_local_file(eval_dir, tmp_path):
    plan = write_task_configs(plan_tasks(DEFAULT_TASKS, str(eval_dir)), tmp_path)
    assert [t.task for t in plan.local] == list(DEFAULT_TASKS) and plan.stock == []
    stock_root = lm_eval_tasks_dir().resolve()
    for t in plan.local:
        cfg = yaml.safe_load(Path(t.yaml_path).read_text())
        include = Path(cfg["include"])
        assert include.is_absolute() and include.exists() and stock_root in include.resolve().parents
        split = EXPECTED_SPLIT[t.task]
        other = "validation" if split == "test" else "test"
        assert cfg["task"] == f"{t.task}_local" and cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
        assert cfg["training_split"] is None and cfg["fewshot_split"] is None
        assert cfg[f"{split}_split"] == split and cfg[f"{other}_split"] is None
        data_file = Path(cfg["dataset_kwargs"]["data_files"][split])
        assert data_file.is_file() and data_file.parent == eval_dir.resolve()
    hellaswag = next(t for t in plan.local if t.task == "hellaswag")
    assert Path(hellaswag.data_file).name == "hellaswag_sample.jsonl"


def test_all_six_tasks_run_offline_on_ten_items(tiny_llama, smollm2, eval_dir, tmp_path):
    opts = AccuracyOptions(tasks=DEFAULT_TASKS, tasks_data_dir=str(eval_dir), limit=10,
                           task_config_dir=str(tmp_path / "cfg"))
    sec = evaluate_accuracy(tiny_llama, smollm2.tokenizer, opts)
    assert list(sec["acc"]) == list(DEFAULT_TASKS) + ["acc_avg"]
    for task in DEFAULT_TASKS:
        info = sec["tasks"][task]
        assert info["metric"] == EXPECTED_METRIC[task] == sec["metric"][task]
        assert info["samples"] == 10 and info["lm_eval_task"] == f"{task}_local"
        # percent of 10 items: a multiple of 10, and the stored value is lm-eval's raw fraction x 100
        assert sec["acc"][task] == round(100 * info["raw"][info["metric"]], 2)
        assert 0.0 <= sec["acc"][task] <= 100.0 and sec["acc"][task] % 10 == 0
    assert sec["acc"]["acc_avg"] == pytest.approx(sum(sec["acc"][t] for t in DEFAULT_TASKS) / 6, abs=0.006)
    assert "perplexity" in sec["tasks"]["lambada_openai"]["raw"]
    line = format_acc_line(sec["acc"])
    assert re.fullmatch(r"ACC: \{('[a-z_]+': \d+\.\d{1,2}, )+'acc_avg': \d+\.\d{1,2}\}", line), line
    assert sec["unit"] == "percent" and sec["limit"] == 10
    assert sorted(p.name for p in (tmp_path / "cfg").glob("*.yaml")) == sorted(f"{t}_local.yaml" for t in DEFAULT_TASKS)


def _hand_arc_easy(model, tokenizer, path: Path, n: int) -> tuple[float, float]:
    """acc / acc_norm of ARC-Easy's first n questions, computed directly: sum of continuation log-probs per choice."""
    import json

    docs = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    acc = acc_norm = 0
    for doc in docs:
        ctx = f"Question: {doc['question']}\nAnswer:"
        ctx_ids = tokenizer(ctx, add_special_tokens=False).input_ids
        lls, lens = [], []
        for choice in doc["choices"]["text"]:
            whole = tokenizer(ctx + " " + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx_ids):]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            logp = F.log_softmax(logits[len(ctx_ids) - 1:-1], dim=-1)
            lls.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
            lens.append(len(choice))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc += int(max(range(len(lls)), key=lambda i: lls[i]) == gold)
        acc_norm += int(max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == gold)
    return 100.0 * acc / n, 100.0 * acc_norm / n


def test_in_memory_smollm2_matches_hand_computed_loglikelihoods(smollm2, eval_dir):
    sec = evaluate_accuracy(smollm2.model, smollm2.tokenizer,
                            AccuracyOptions(tasks=("arc_easy",), tasks_data_dir=str(eval_dir), limit=10))
    acc, acc_norm = _hand_arc_easy(smollm2.model, smollm2.tokenizer, eval_dir / "arc_easy.jsonl", 10)
    raw = sec["tasks"]["arc_easy"]["raw"]
    assert 100 * raw["acc"] == pytest.approx(acc) and 100 * raw["acc_norm"] == pytest.approx(acc_norm)
    assert sec["acc"]["arc_easy"] == pytest.approx(acc_norm)


def test_other_task_named_by_user_runs_from_local_file(tiny_llama, smollm2, eval_dir):
    # openbookqa is not a default task: its stock YAML is found through lm-eval's own index.
    sec = evaluate_accuracy(tiny_llama, smollm2.tokenizer,
                            AccuracyOptions(tasks=("openbookqa",), tasks_data_dir=str(eval_dir), limit=5))
    assert sec["tasks"]["openbookqa"]["samples"] == 5 and sec["metric"]["openbookqa"] == "acc_norm"
    assert list(sec["acc"]) == ["openbookqa", "acc_avg"]


def test_user_errors_name_what_to_fix(eval_dir, tmp_path):
    with pytest.raises(ConfigError, match="not an lm-eval task"):
        plan_tasks(["arc_easy", "no_such_task_xyz"], str(eval_dir))
    with pytest.raises(DataError, match="No local file for task 'arc_easy'"):
        plan_tasks(["arc_easy"], str(tmp_path))  # offline and the folder has no arc_easy file
    with pytest.raises(DataError, match="is not a folder"):
        plan_tasks(["arc_easy"], str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="twice"):
        plan_tasks(["piqa", "piqa"], str(eval_dir))
    with pytest.raises(ConfigError, match="group or tag"):
        plan_tasks(["ai2_arc"], str(eval_dir))


@pytest.mark.slow
def test_smollm2_six_tasks_limit_50_above_chance(smollm2, eval_dir):
    sec = evaluate_accuracy(smollm2.model, smollm2.tokenizer,
                            AccuracyOptions(tasks=DEFAULT_TASKS, tasks_data_dir=str(eval_dir), limit=50))
    assert all(sec["tasks"][t]["samples"] == (50) for t in DEFAULT_TASKS)
    # chance: ARC 25 %, PIQA 50 %
    assert sec["acc"]["arc_easy"] > 35.0
    assert sec["acc"]["piqa"] > 56.0


def test_progress_per_request_and_cancel_inside_lm_eval(tiny_llama, smollm2, eval_dir):
    from core.errors import JobCancelled
    from core.progress import CancelToken, Reporter

    events = []
    sec = evaluate_accuracy(tiny_llama, smollm2.tokenizer,
                            AccuracyOptions(tasks=("openbookqa",), tasks_data_dir=str(eval_dir), limit=5),
                            Reporter(events.append), label="original")
    steps = [(e.step, e.steps) for e in events if e.step is not None]
    assert steps and steps[-1][0] == steps[-1][1] == 20  # 5 questions x 4 choices, all counted
    assert [s for s, _ in steps] == sorted(s for s, _ in steps)
    assert sec["tasks"]["openbookqa"]["samples"] == 5
    assert not tiny_llama._forward_pre_hooks  # the counting hook is removed

    token = CancelToken()

    def cancel_at_first_progress(e):
        if e.step is not None:
            token.cancel()

    with pytest.raises(JobCancelled):
        evaluate_accuracy(tiny_llama, smollm2.tokenizer,
                          AccuracyOptions(tasks=("openbookqa",), tasks_data_dir=str(eval_dir), limit=5),
                          Reporter(cancel_at_first_progress, token))
