"""Every `python -m core ...` line of README.md runs as written, on tiny models and the smallest budgets.

The README's command lines are read from its code blocks (continuations joined, comments cut); the placeholders a
reader fills in (``/models/llama-2-7b``, ``DIR``, ``PATH``, ``...``, ``/data/...``) become a tiny random model folder
and the shared data; the budgets are cut by appending the smallest values (argparse keeps the last). Each line must
end with exit 0 and ``All done!``, or with the one documented ``error:`` line; never a traceback. The options table
of the quantize command is checked against its parser, and the options that select another code path (GPTQ,
QuaRot, RTN, o_proj, memory options) run for real.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TINY = "llama-2-7b"  # the tiny random LLaMA that stands for /models/llama-2-7b, DIR, PATH and the embedded model

# the smallest budgets, appended per command (the last value of a repeated option wins)
QUANTIZE_BUDGET = ["--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--ppl_max_windows", "2",
                   "--ppl_seqlen", "32"]
EVALUATE_BUDGET = ["--limit", "2", "--ppl_max_windows", "2", "--ppl_seqlens", "32", "--latency_seqlen", "8",
                   "--decode_tokens", "2", "--latency_repeats", "1", "--max_new_tokens", "2",
                   "--tasks", "arc_easy,piqa"]


def readme_commands() -> list[list[str]]:
    """The argument lists of the `python -m core` lines in README.md's code blocks, in order."""
    commands, in_block, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        tokens, pending = shlex.split(pending, comments=True), ""
        if tokens[:3] == ["python", "-m", "core"]:
            commands.append(tokens[3:])
    return commands


def readme_quantize_option_rows() -> list[str]:
    """The flags named in the first cell of each row of the quantize options table."""
    text = README.read_text(encoding="utf-8")
    table = text.split("| option | meaning |", 1)[1].split("\n\n", 1)[0]
    return [flag for row in table.splitlines()[2:] for flag in re.findall(r"--[a-z_]+", row.split("|")[1])]


def readme_evaluate_options() -> list[str]:
    """The flags of the evaluation section's "Options:" paragraph."""
    text = README.read_text(encoding="utf-8").split("\nOptions: ", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"`(--[a-z_]+)", text)


def test_readme_has_the_command_lines():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"quantize", "evaluate", "export"}, commands
    assert len(commands) >= 8
    assert len(readme_quantize_option_rows()) >= 15


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder with models/<TINY>, models/qwen3-8b (tiny random stand-ins with SmolLM2's tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import build_random_qwen3, load_model

    root = tmp_path_factory.mktemp("readme")
    tokenizer = load_model().tokenizer
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                         max_position_embeddings=4096, tie_word_embeddings=False))
    for name, model in ((TINY, llama), ("qwen3-8b", build_random_qwen3(hidden_size=128, intermediate_size=384,
                                                                       heads=4, kv_heads=2, head_dim=32))):
        model.save_pretrained(root / "models" / name)
        tokenizer.save_pretrained(root / "models" / name)
    return root


def concrete(args: list[str], root: Path, data: Path) -> list[str]:
    """A README line with its placeholders filled in for ``root`` and the shared ``data``."""
    model = str(root / "models" / TINY)
    out: list[str] = []
    for i, arg in enumerate(args):
        prev = args[i - 1] if i else ""
        if arg == "...":  # "the rest of a quantize command": the model
            out += ["--model_path", model]
        elif arg in ("DIR", "PATH"):
            out.append(model if prev == "--model_path" else str(root / "export"))
        elif arg.startswith("/models/"):
            out.append(str(root / "models" / arg.split("/")[2]))
        elif arg.startswith("/data/"):  # a user's full WikiText-2 folder: the stand-in made by wikitext_folder
            out.append(str(root / "data" / arg[len("/data/"):]))
        elif arg.startswith("../shared/data"):
            out.append(str(data / arg[len("../shared/data/"):]))
        else:
            out.append(re.sub(r"outputs/(x|smollm2)/", f"outputs/{TINY}/", arg))
    if out[0] in ("quantize", "evaluate") and "--model_path" not in out:
        out += ["--model_path", model]  # the embedded SmolLM2 in the README; the tiny model here (speed)
    if out[0] == "quantize":
        out += QUANTIZE_BUDGET if "--load_matrix" not in out else ["--ppl_max_windows", "2", "--ppl_seqlen", "32"]
    if out[0] == "evaluate" or "--eval" in out:
        out += EVALUATE_BUDGET
    return out


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def assert_clean(proc: subprocess.CompletedProcess, args: list[str]) -> None:
    shown = " ".join(args)
    assert "Traceback" not in proc.stderr, f"{shown}\n{proc.stderr[-3000:]}"
    if proc.returncode == 2:  # a documented refusal: one error line
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{shown}\n{proc.stderr[-3000:]}"
        return
    assert proc.returncode == 0, f"{shown}\n{proc.stderr[-3000:]}"
    assert proc.stdout.rstrip().endswith("All done!") or args[0] == "evaluate", f"{shown}\n{proc.stdout[-2000:]}"


def wikitext_folder(root: Path, data: Path) -> None:
    """/data/wikitext-2-raw as a user has it (train and test splits), from the shared data: the validation split
    stands in for the train split (links, nothing copied)."""
    folder = root / "data" / "wikitext-2-raw"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("wiki.train.raw", data / "wikitext-2" / "wiki.valid.tokens"),
                         ("wiki.test.raw", data / "wikitext-2-raw" / "wiki.test.raw")):
        if not (folder / name).exists():
            (folder / name).symlink_to(source)


@pytest.mark.slow  # ~70 s of subprocesses: run with -m slow; the options and GPTQ's row stay in the default suite
def test_every_readme_command_line_runs(workdir, shared_data):
    """In README order, in one folder: the export lines read the matrices the quantize lines wrote."""
    wikitext_folder(workdir, shared_data)
    ran = []
    for args in readme_commands():
        if args[0] == "export":  # each export line writes DIR anew
            shutil.rmtree(workdir / "export", ignore_errors=True)
        cmd = concrete(args, workdir, shared_data)
        proc = run_cli(cmd, workdir)
        assert_clean(proc, cmd)
        ran.append((cmd[0], proc.returncode))
    assert all(code == 0 for _, code in ran), ran  # every README line is meant to work, not to be refused
    assert (workdir / "outputs" / TINY / "ascend" / "quant_model_description.json").exists()


@pytest.mark.parametrize("command, documented", [("quantize", readme_quantize_option_rows),
                                                   ("evaluate", readme_evaluate_options)])
def test_readme_options_are_the_parsers(command, documented):
    proc = run_cli([command, "--help"], REPO)
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"--[a-z_]+", proc.stdout))
    missing = [flag for flag in documented() if flag not in flags]
    assert not missing, f"README options that `{command} --help` does not list: {missing}"


@pytest.mark.parametrize("options", [
    ["--weight_rounding", "gptq"],
    pytest.param(["--algorithm", "quarot", "--weight_rounding", "gptq", "--baselines", "rtn,quarot"],
                 marks=pytest.mark.slow),
    pytest.param(["--algorithm", "rtn", "--no_down_quant", "--skip_layers", "lm_head,layers.0.mlp"],
                 marks=pytest.mark.slow),
    pytest.param(["--use_o_quant", "--use_kcache_quant", "--use_vcache_quant", "--max_layers", "1", "--dtype",
                  "bf16", "--compute_dtype", "fp32", "--keep_original", "--activation_dir", "ACT", "--export",
                  "native"], marks=pytest.mark.slow),
], ids=["gptq", "quarot-gptq-baselines", "rtn-skips", "o-kv-memory-export"])
def test_readme_option_rows_run(workdir, options, tmp_path):
    options = [str(tmp_path / "act") if o == "ACT" else o for o in options]
    cmd = ["quantize", "--model_path", str(workdir / "models" / TINY), "--output_dir", str(tmp_path / "out"),
           *QUANTIZE_BUDGET, *options]
    proc = run_cli(cmd, tmp_path)
    assert_clean(proc, cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PPL score:" in proc.stdout and (tmp_path / "out" / "flat_matrices.pth").exists()
