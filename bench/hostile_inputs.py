"""Hostile inputs, re-tested (issue 21): each case runs the CLI as a user would (`python -m core ...`, a subprocess)
with one bad input and judges how it ended.

A refusal passes when the process exits 2, stderr has exactly one line starting with ``error:`` (its message at
most 1000 characters) and no ``Traceback``, no ``usage:`` block, and it ended within the case's time limit. Every case also
checks that nothing was lost (every file of the case's inputs has the bytes it had before) and that nothing was left
that looks complete (no new report.json, matrix file, safetensors, or a hidden ``.partial-``/``.old-`` folder).
Cases marked ``intact`` may also succeed (exit 0) as long as nothing was lost. The kinds are the issue's; the inputs
differ from the ones the issue names.

    python bench/hostile_inputs.py [--only KIND] [--keep DIR]

Needs root for the full-disk cases (small tmpfs mounts); without it they are reported as skipped. Writes a table to
stdout (markdown) and a JSON summary with --json FILE.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOOKS_COMPLETE = ("report.json", "flat_matrices.pth", "model.safetensors", "quant_model_description.json")


@dataclass
class Case:
    kind: str
    name: str
    argv: list[str]  # after `python -m core`; "{x}" fields are filled from the case's context
    setup: Optional[Callable[[dict], None]] = None  # makes the bad input; may add fields to the context
    intact: bool = False  # exit 0 is also acceptable: the case only checks that nothing was lost
    succeed: bool = False  # the command must succeed (exit 0), e.g. a rerun after a killed job
    limit_s: float = 120.0  # a refusal must come within this many seconds
    cwd: str = "{case}"
    before: Optional[Callable[[dict], subprocess.Popen]] = None  # a concurrent first job (two jobs, one folder)


@dataclass
class Outcome:
    case: Case
    ok: bool
    code: Optional[int]
    seconds: float
    why: str = ""
    error_line: str = ""


# --- the shared fixtures ------------------------------------------------------------------------------------------


def run_core(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "core", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def popen_core(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.Popen([sys.executable, "-m", "core", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def _fixture_run(root: Path, name: str, seed: int, text: Path, **shape) -> tuple[Path, Path]:
    """A random bf16 LLaMA folder (SmolLM2's tokenizer) and a finished quantize run of it: (model, run folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import load_model

    model_dir, run = root / "fixtures" / name, root / "fixtures" / f"{name}-run"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
                                         torch_dtype="bfloat16", **shape)).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    load_model().tokenizer.save_pretrained(model_dir)
    proc = run_core(["quantize", "--model_path", str(model_dir), "--calib_data", str(text), "--nsamples", "2",
                     "--seqlen", "32", "--epochs", "1", "--no_ppl", "--no_time_diff", "--output_dir", str(run)],
                    root)
    if proc.returncode != 0:
        raise SystemExit(f"fixture quantize of {name} failed:\n{proc.stderr[-3000:]}")
    return model_dir, run


def build_fixtures(root: Path) -> dict:
    """A tiny random LLaMA folder with one finished quantize run, a larger one whose export takes seconds (the
    first job of the two-jobs export cases), and a calibration text."""
    import pydoc_data.topics as topics

    text = root / "fixtures" / "calib.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(list(topics.topics.values())[:200]), encoding="utf-8")
    model_dir, run = _fixture_run(root, "tiny-llama", 0, text, hidden_size=128, intermediate_size=384,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    medium_dir, medium_run = _fixture_run(root, "medium-llama", 1, text, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)
    export = root / "fixtures" / "export_size"
    proc = run_core(["export", "--model_path", str(model_dir), "--flat_matrix_path", str(run / "flat_matrices.pth"),
                     "--output_dir", str(export)], root)
    if proc.returncode != 0:
        raise SystemExit(f"fixture export failed:\n{proc.stderr[-3000:]}")
    export_bytes = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    shutil.rmtree(export)
    return {"model": str(model_dir), "calib": str(text), "run": str(run), "export_bytes": export_bytes,
            "medium_model": str(medium_dir), "medium_matrix": str(medium_run / "flat_matrices.pth"),
            "eval": str(shared_eval() or ""), "fixtures": str(root / "fixtures")}


def shared_eval() -> Optional[Path]:
    from core.data import shared_data_dir

    d = shared_data_dir()
    return d / "eval" if d is not None and (d / "eval").is_dir() else None


# --- case helpers -------------------------------------------------------------------------------------------------


def copy_model(ctx: dict, name: str = "model") -> Path:
    dst = Path(ctx["case"]) / name
    shutil.copytree(ctx["model"], dst)
    ctx[name] = str(dst)
    return dst


def copy_run(ctx: dict, name: str = "run") -> Path:
    dst = Path(ctx["case"]) / name
    shutil.copytree(ctx["run"], dst)
    ctx[name] = str(dst)
    ctx["matrix"] = str(dst / "flat_matrices.pth")
    return dst


def model_with_config(**changes) -> Callable[[dict], None]:
    def setup(ctx):
        d = copy_model(ctx)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return setup


def model_with_raw_config(text: str) -> Callable[[dict], None]:
    def setup(ctx):
        d = copy_model(ctx)
        cfg = (d / "config.json").read_text()
        (d / "config.json").write_text(cfg.replace('"hidden_size": 128', text, 1))
    return setup


def model_with_weights(kind: str) -> Callable[[dict], None]:
    def setup(ctx):
        import torch
        from safetensors.torch import load_file

        d = copy_model(ctx)
        st = d / "model.safetensors"
        if kind == "bin":
            torch.save(load_file(str(st)), d / "pytorch_model.bin")
            st.unlink()
        elif kind == "evil_bin":  # a pickle that would create a file when unpickled
            marker = Path(ctx["case"]) / "PWNED"
            ctx["marker"] = str(marker)
            payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
            (d / "pytorch_model.bin").write_bytes(payload)
            st.unlink()
        elif kind == "pt":
            torch.save(load_file(str(st)), d / "model.pt")
            st.unlink()
        elif kind == "sharded_bin":
            sd = load_file(str(st))
            names = sorted(sd)
            half = len(names) // 2
            torch.save({k: sd[k] for k in names[:half]}, d / "pytorch_model-00001-of-00002.bin")
            torch.save({k: sd[k] for k in names[half:]}, d / "pytorch_model-00002-of-00002.bin")
            (d / "pytorch_model.bin.index.json").write_text(json.dumps(
                {"weight_map": {k: f"pytorch_model-0000{1 + (i >= half)}-of-00002.bin" for i, k in enumerate(names)}}))
            st.unlink()
        elif kind == "truncated":
            data = st.read_bytes()
            st.write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            st.write_bytes(b"")
        elif kind == "dir":
            st.unlink()
            st.mkdir()
        elif kind == "garbage":
            st.write_bytes(os.urandom(4096))
    return setup


def write_file(key: str, name: str, content: bytes | str) -> Callable[[dict], None]:
    def setup(ctx):
        p = Path(ctx["case"]) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        ctx[key] = str(p)
    return setup


def task_dir(file: str, content: Optional[bytes | str], copy_others: bool = True) -> Callable[[dict], None]:
    """A copy of the shared eval folder with ``file`` replaced (None: made a folder)."""
    def setup(ctx):
        d = Path(ctx["case"]) / "eval"
        d.mkdir()
        if copy_others and ctx["eval"]:
            for p in Path(ctx["eval"]).iterdir():
                if p.name != file:
                    shutil.copy(p, d / p.name)
        if content is None:
            (d / file).mkdir()
        else:
            (d / file).write_bytes(content.encode() if isinstance(content, str) else content)
        ctx["tasks"] = str(d)
    return setup


def sparse_file(key: str, name: str, size: int) -> Callable[[dict], None]:
    def setup(ctx):
        p = Path(ctx["case"]) / name
        with p.open("wb") as f:
            f.truncate(size)
        ctx[key] = str(p)
    return setup


def both(*setups) -> Callable[[dict], None]:
    def setup(ctx):
        for s in setups:
            s(ctx)
    return setup


def mount_tmpfs(key: str, size: int | Callable[[dict], int], readonly: bool = False) -> Callable[[dict], None]:
    def setup(ctx):
        d = Path(ctx["case"]) / key
        d.mkdir()
        n = size(ctx) if callable(size) else size
        opts = f"size={max(n, 4096)}" + (",ro" if readonly else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True).returncode:
            raise Skip("cannot mount a tmpfs here (needs root)")
        ctx.setdefault("mounts", []).append(str(d))
        ctx[key] = str(d)
    return setup


class Skip(Exception):
    pass


def symlink(key: str, target_key: str) -> Callable[[dict], None]:
    def setup(ctx):
        link = Path(ctx["case"]) / key
        link.symlink_to(ctx[target_key], target_is_directory=True)
        ctx[key] = str(link)
    return setup


def long_quantize(out_key: str) -> Callable[[dict], subprocess.Popen]:
    """A first quantize job into ctx[out_key] that runs for a while; returns once it has started writing."""
    def start(ctx):
        out = Path(ctx[out_key])
        proc = popen_core(["quantize", "--model_path", ctx["model"], "--calib_data", ctx["calib"], "--nsamples",
                           "32", "--seqlen", "256", "--epochs", "30", "--no_ppl", "--no_time_diff", "--output_dir",
                           str(out)], Path(ctx["case"]))
        wait_for(lambda: (out / "quantize.log").exists() or proc.poll() is not None, 120)
        time.sleep(1.0)
        return proc
    return start


def long_export(out_key: str, until: str = "lock") -> Callable[[dict], subprocess.Popen]:
    """A first export (of the larger fixture model) into ctx[out_key]; returns once it holds the target's lock
    (``until="lock"``) or has begun writing its staged folder (``"partial"``)."""
    def start(ctx):
        out = Path(ctx[out_key])
        proc = popen_core(["export", "--model_path", ctx["medium_model"], "--flat_matrix_path",
                           ctx["medium_matrix"], "--output_dir", str(out), "--verify"], Path(ctx["case"]))
        mark = f".{out.name}.lock" if until == "lock" else f".{out.name}.partial-*"
        wait_for(lambda: any(out.parent.glob(mark)) or proc.poll() is not None, 120)
        return proc
    return start


def killed(start: Callable[[dict], subprocess.Popen]) -> Callable[[dict], None]:
    """Start a first job and SIGKILL it once it has begun writing."""
    def run(ctx):
        proc = start(ctx)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return run


def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.1)


# --- the cases ------------------------------------------------------------------------------------------------------


def cases() -> list[Case]:
    Q = ["quantize", "--model_path", "{model}", "--calib_data", "{calib}", "--nsamples", "2", "--seqlen", "32",
         "--epochs", "1", "--ppl_max_windows", "1", "--ppl_seqlen", "32"]
    QOUT = [*Q, "--output_dir", "{case}/out"]
    EV = ["evaluate", "--model_path", "{model}", "--output_dir", "{case}/out"]
    EXP = ["export", "--model_path", "{model}", "--flat_matrix_path", "{matrix}"]
    out: list[Case] = []

    def add(kind, name, argv, setup=None, **kw):
        out.append(Case(kind, name, argv, setup, **kw))

    # data loss: an output folder that holds an input of the same command
    k = "data loss"
    add(k, "export native --overwrite into the matrix file's folder", [*EXP, "--output_dir", "{run}", "--overwrite"],
        copy_run)
    add(k, "export ascend --overwrite into the matrix file's folder",
        [*EXP, "--format", "ascend", "--output_dir", "{run}", "--overwrite"], copy_run)
    add(k, "export --overwrite into the folder above the matrix file's",
        [*EXP, "--output_dir", "{case}", "--overwrite"], copy_run, cwd="{fixtures}")
    add(k, "export --overwrite into the matrix folder spelt with ./ and a trailing slash",
        [*EXP, "--output_dir", "{run}/./", "--overwrite"], copy_run)
    add(k, "export --overwrite into a symlink to the matrix file's folder",
        [*EXP, "--output_dir", "{link}", "--overwrite"], both(copy_run, symlink("link", "run")))
    add(k, "export --overwrite into '.' from inside the matrix folder",
        ["export", "--model_path", "{model}", "--flat_matrix_path", "flat_matrices.pth", "--output_dir", ".",
         "--overwrite"], copy_run, cwd="{run}")
    add(k, "export --overwrite into the model folder", [*EXP, "--output_dir", "{model}", "--overwrite"],
        both(copy_run, copy_model))
    add(k, "export ascend --overwrite into the folder above the model",
        [*EXP, "--format", "ascend", "--output_dir", "{case}", "--overwrite"], both(copy_run, copy_model),
        cwd="{fixtures}")
    add(k, "quantize --export native where OUTPUT_DIR/checkpoint holds the calibration text",
        [*Q[:4], "{case}/out/checkpoint/calib.txt", *Q[5:], "--output_dir", "{case}/out", "--export", "native"],
        write_file("calib_copy", "out/checkpoint/calib.txt", "Calibration text the export must not delete. " * 300),
        intact=True)
    add(k, "quantize --export ascend where OUTPUT_DIR/ascend holds the perplexity text",
        [*QOUT, "--ppl_data", "{case}/out/ascend/ppl.txt", "--export", "ascend"],
        write_file("ppl", "out/ascend/ppl.txt", "The quick brown fox jumps over the lazy dog. " * 400), intact=True)
    add(k, "quantize with --activation_dir = the model folder",
        [*QOUT, "--activation_dir", "{model}"], copy_model, intact=True)
    add(k, "quantize with --activation_dir = the folder of the calibration text",
        [*QOUT, "--activation_dir", "{case}/data", "--calib_data", "{case}/data/calib.txt"],
        write_file("c", "data/calib.txt", "Calibration text that must survive the job. " * 300), intact=True)
    add(k, "quantize --output_dir = the model folder", [*Q, "--output_dir", "{model}"], copy_model, intact=True)
    add(k, "evaluate --output_dir = the tasks folder",
        [*EV[:4], "{tasks}", "--eval", "acc", "--tasks", "arc_easy", "--limit", "2", "--tasks_data_dir", "{tasks}"],
        task_dir("notes.txt", "keep me"), intact=True)

    # crashes instead of a message: a full disk, a bad activation dir, a malformed config.json, .bin weights, tasks
    k = "crash"
    exp_size = (lambda f: (lambda ctx: int(ctx["export_bytes"] * f)))
    for fmt in ("native", "ascend"):
        for frac in (0.02, 0.5, 0.9):
            add(k, f"export {fmt} onto a disk with {frac:.0%} of the room it needs",
                [*EXP, "--format", fmt, "--output_dir", "{disk}/out"], both(copy_run, mount_tmpfs("disk", exp_size(frac))))
    add(k, "quantize --output_dir on a 16 KiB disk", [*Q, "--output_dir", "{disk}/out"], mount_tmpfs("disk", 16384))
    add(k, "quantize --export native onto a disk that fits the matrices only",
        [*Q, "--output_dir", "{disk}/out", "--export", "native"], mount_tmpfs("disk", 3 * 2 ** 20))
    for size in (4096, 48 * 1024):
        add(k, f"--activation_dir on a {size // 1024} KiB disk", [*QOUT, "--activation_dir", "{disk}/acts"],
            mount_tmpfs("disk", size))
    add(k, "--activation_dir on a read-only filesystem", [*QOUT, "--activation_dir", "{disk}/acts"],
        mount_tmpfs("disk", 2 ** 20, readonly=True))
    add(k, "--activation_dir is an existing file", [*QOUT, "--activation_dir", "{f}"], write_file("f", "acts.bin", "x"))
    add(k, "--activation_dir below a file", [*QOUT, "--activation_dir", "{f}/sub"], write_file("f", "acts.bin", "x"))
    add(k, "--activation_dir is a dangling symlink", [*QOUT, "--activation_dir", "{case}/dangling"],
        lambda ctx: Path(ctx["case"], "dangling").symlink_to(Path(ctx["case"], "nowhere", "deeper")))
    for field_, value in (("hidden_size", "128"), ("hidden_size", 127.5), ("hidden_size", True), ("hidden_size", []),
                          ("hidden_size", None), ("hidden_size", -128), ("num_hidden_layers", "two"),
                          ("num_hidden_layers", 0), ("intermediate_size", 383.5), ("num_attention_heads", 0),
                          ("num_key_value_heads", 3), ("vocab_size", -1), ("max_position_embeddings", "long"),
                          ("head_dim", 0.5)):
        add(k, f"config.json {field_} = {json.dumps(value)}", [*QOUT, "--model_path", "{model}"],
            model_with_config(**{field_: value}))
    add(k, "config.json hidden_size = 1e999 (inf)", [*QOUT], model_with_raw_config('"hidden_size": 1e999'))
    add(k, "config.json hidden_size = NaN", [*QOUT], model_with_raw_config('"hidden_size": NaN'))
    for kind in ("bin", "evil_bin", "pt", "sharded_bin", "truncated", "empty", "dir", "garbage"):
        add(k, f"model folder weights: {kind}", [*QOUT], model_with_weights(kind))
        if kind in ("bin", "truncated"):
            add(k, f"export from a model folder with weights: {kind}", [*EXP, "--output_dir", "{case}/out"],
                both(copy_run, model_with_weights(kind)))
            add(k, f"evaluate a model folder with weights: {kind}", [*EV, "--eval", "ppl", "--ppl_max_windows", "1"],
                model_with_weights(kind))
    bad_tasks = [("arc_easy.jsonl", '{"id": "q0", "question": "Which', "a truncated JSON line"),
                 ("arc_easy.jsonl", "", "an empty file"),
                 ("arc_easy.jsonl", os.urandom(2048), "binary garbage"),
                 ("arc_easy.jsonl", None, "a folder"),
                 ("arc_easy.jsonl", '{"foo": 1, "bar": [2]}\n' * 5, "the wrong schema"),
                 ("arc_easy.jsonl", b'{"id": "q\xff\xfe", "question": "x"}\n', "invalid UTF-8"),
                 ("piqa.jsonl", '[{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}]', "a JSON array, not lines"),
                 ("hellaswag_sample.jsonl", "{not json}\n", "a malformed hellaswag sample")]
    for file, content, what in bad_tasks:
        task = file.split(".")[0].replace("_sample", "")
        add(k, f"--tasks_data_dir with {file} as {what}",
            [*EV, "--eval", "acc", "--tasks", task, "--limit", "2", "--tasks_data_dir", "{tasks}"],
            task_dir(file, content))

    # silent wrong configuration
    k = "silent config"
    for value in (",,", "  ,  ", "\t", ", ,", ";"):
        add(k, f"--skip_layers {value!r}", [*QOUT, "--skip_layers", value])
    add(k, "--skip_layers=',' (equals form)", [*QOUT, "--skip_layers=,"])
    for name, text in (("cfg.yaml", "skip_layers: [',', ' ']\n"), ("cfg.json", '{"skip_layers": " , "}'),
                       ("cfg.yaml", "skip_layers: [[]]\n"), ("cfg.yaml", "skip_layers: ','\n")):
        add(k, f"config file {name}: {text.strip()}", [*QOUT, "--config", "{cfg}"], write_file("cfg", name, text))

    # unbounded: what a config can expand to, and what a message echoes
    k = "unbounded"

    def bomb(levels: int, width: int, mapping: bool = False) -> str:
        lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
        for i in range(1, levels):
            refs = ", ".join([f"*a{i - 1}"] * width)
            lines.append(f"a{i}: &a{i} " + ("{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(width)) + "}"
                                             if mapping else f"[{refs}]"))
        lines.append(f"skip_layers: *a{levels - 1}")
        return "\n".join(lines) + "\n"
    add(k, "YAML alias bomb, 12 levels x 6", [*QOUT, "--config", "{cfg}"], write_file("cfg", "c.yaml", bomb(12, 6)),
        limit_s=30)
    add(k, "YAML alias bomb through mappings, 10 levels x 8", [*QOUT, "--config", "{cfg}"],
        write_file("cfg", "c.yaml", bomb(10, 8, mapping=True)), limit_s=30)
    add(k, "YAML bomb in an unknown key", [*QOUT, "--config", "{cfg}"],
        write_file("cfg", "c.yml", bomb(11, 7).replace("skip_layers:", "not_a_key:")), limit_s=30)
    add(k, "YAML nested 50,000 deep", [*QOUT, "--config", "{cfg}"],
        write_file("cfg", "c.yaml", "epochs: " + "[" * 50000 + "]" * 50000 + "\n"), limit_s=30)
    add(k, "JSON nested 200,000 deep", [*QOUT, "--config", "{cfg}"],
        write_file("cfg", "c.json", '{"epochs": ' + "[" * 200000 + "]" * 200000 + "}"), limit_s=30)
    add(k, "a 20 MB string in skip_layers", [*QOUT, "--config", "{cfg}"],
        write_file("cfg", "c.json", json.dumps({"skip_layers": "x" * 20_000_000})), limit_s=30)
    add(k, "a 3 GB sparse config file", [*QOUT, "--config", "{cfg}"], sparse_file("cfg", "big.yaml", 3 * 2 ** 30),
        limit_s=30)
    add(k, "config file /dev/zero", [*QOUT, "--config", "/dev/zero"], limit_s=30)
    add(k, "a 20,000-character --model_path", [*QOUT[:1], "--model_path", "m" * 20000, *QOUT[3:]], limit_s=30)
    add(k, "a 5 MB architecture name in config.json", [*QOUT], model_with_config(architectures=["A" * 5_000_000]),
        limit_s=30)
    add(k, "a 100,000-character --tasks list", [*EV, "--eval", "acc", "--tasks", "t" * 100000], limit_s=30)

    # not one line: argparse's own errors, every command
    k = "argparse"
    for argv in (["quantize", "--nsamples", "1.5"], ["quantize", "--seqlen", ""], ["quantize", "--epochs"],
                 ["quantize", "--bogus_flag"], ["quantize", "--algorithm"], ["quantize", "--dtype", "int3"],
                 ["quantize", "--compute_dtype", "fp8"], ["quantize", "--flat_lr", "fast"],
                 ["evaluate", "--eval", "ppl", "bogus"], ["evaluate", "--limit", "abc"],
                 ["evaluate", "--ppl_seqlens", "512", "x"], ["evaluate", "--eval_batch_size", "big"],
                 ["export"], ["export", "--flat_matrix_path", "x.pth"], ["export", "--format", "gguf",
                                                                        "--flat_matrix_path", "x", "--output_dir", "y"],
                 [], ["quantise"], ["--version-of-nothing"], ["evaluate", "--tasks"],
                 ["export", "--flat_matrix_path", "x", "--output_dir", "y", "--shard_size", "lots"]):
        add(k, "python -m core " + " ".join(argv), argv, limit_s=30)

    # checked too late: evaluate's options before the model loads, and counts
    k = "checked late"
    for extra, setup in ((["--eval", "acc", "--tasks", "no_such_task", "--tasks_data_dir", "{tasks}"],
                          task_dir("notes.txt", "x")),
                         (["--eval", "acc", "--tasks_data_dir", "{case}/missing"], None),
                         (["--eval", "acc", "--limit", "0"], None), (["--eval", "acc", "--limit", "-5"], None),
                         (["--eval", "ppl", "--ppl_seqlens", "0"], None),
                         (["--eval", "ppl", "--ppl_seqlens", "999999"], None),
                         (["--eval", "ppl", "--ppl_max_windows", "0"], None),
                         (["--eval", "ppl", "--ppl_max_windows", "-2"], None),
                         (["--eval", "acc", "--tasks", "arc_easy", "--tasks_data_dir", "{tasks}"],
                          task_dir("notes.txt", "x", copy_others=False)),
                         (["--eval", "ppl", "--ppl_data", "{case}/none.txt"], None),
                         (["--eval", "acc", "--eval_batch_size", "0"], None)):
        add(k, "evaluate " + " ".join(extra).replace("{case}/", "").replace("{tasks}", "DIR"), [*EV, *extra], setup,
            limit_s=25)
    for flag, value in (("--nsamples", "0"), ("--seqlen", "0"), ("--cali_bsz", "0"), ("--epochs", "-1"),
                        ("--ppl_max_windows", "-1"), ("--max_layers", "-2"), ("--ppl_seqlen", "0")):
        add(k, f"quantize {flag} {value}", [*QOUT, flag, value], limit_s=25)

    # two jobs, one folder
    k = "two jobs"
    add(k, "a second quantize into a running quantize's --output_dir", [*QOUT], copy_model,
        before=long_quantize("out"))
    add(k, "a second export into a running export's target", [*EXP, "--output_dir", "{out}"],
        both(copy_run, copy_model), before=long_export("out"))
    add(k, "export --overwrite into a running export's target", [*EXP, "--output_dir", "{out}", "--overwrite"],
        both(copy_run, copy_model), before=long_export("out"))
    add(k, "evaluate into a running quantize's --output_dir", [*EV, "--eval", "ppl", "--ppl_max_windows", "1"],
        copy_model, before=long_quantize("out"))
    add(k, "export ascend --overwrite into a running quantize's --output_dir",
        [*EXP, "--format", "ascend", "--output_dir", "{out}", "--overwrite"], both(copy_run, copy_model),
        before=long_quantize("out"))
    add(k, "export again after the first export was SIGKILLed mid-write", [*EXP, "--output_dir", "{out}",
                                                                           "--overwrite"],
        both(copy_run, copy_model), before=killed(long_export("out", until="partial")), succeed=True)
    return out


# --- running and judging ------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    files = {}
    for p in sorted(root.rglob("*")):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 2 ** 28:
                files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            pass
    return files


def fill(value: str, ctx: dict) -> str:
    try:
        return value.format(**ctx)
    except (KeyError, IndexError, ValueError):
        return value


def run_case(case: Case, base: dict, root: Path, index: int) -> Outcome:
    case_dir = root / "cases" / f"{index:03d}"
    case_dir.mkdir(parents=True)
    ctx = dict(base, case=str(case_dir), out=str(case_dir / "out"))
    first = None
    try:
        if case.setup is not None:
            case.setup(ctx)
        if case.before is not None:
            first = case.before(ctx)
        inputs = snapshot(case_dir)
        argv = [fill(a, ctx) for a in case.argv]
        start = time.monotonic()
        try:
            proc = run_core(argv, Path(fill(case.cwd, ctx)), timeout=max(case.limit_s * 3, 300))
        except subprocess.TimeoutExpired:
            return Outcome(case, False, None, time.monotonic() - start, "hung past the time limit")
        seconds = time.monotonic() - start
        return judge(case, ctx, proc, seconds, inputs, case_dir, first)
    except Skip as exc:
        return Outcome(case, True, None, 0.0, f"skipped: {exc}")
    finally:
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        for m in reversed(ctx.get("mounts", [])):
            subprocess.run(["umount", "-l", m], capture_output=True)


def judge(case: Case, ctx: dict, proc, seconds: float, inputs: dict, case_dir: Path, first) -> Outcome:
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    line = errors[0] if errors else ""
    why = []
    if "Traceback" in err:
        why.append("traceback")
    if any(line.startswith("usage:") for line in err.splitlines()):
        why.append("usage block")
    if case.succeed:
        if proc.returncode != 0:
            why.append(f"exit {proc.returncode}, expected success: {(errors or err.splitlines() or [''])[-1][:200]}")
    elif proc.returncode == 0 and case.intact:
        pass
    elif proc.returncode != 2:
        why.append(f"exit {proc.returncode}")
    elif len(errors) != 1:
        why.append(f"{len(errors)} error lines")
    elif len(line) > len("error: ") + 1000:  # the product's bound on a message (core.errors.LINE_LIMIT)
        why.append(f"error line of {len(line)} characters")
    if proc.returncode == 2 and seconds > case.limit_s:
        why.append(f"refused after {seconds:.0f} s (limit {case.limit_s:.0f} s)")
    if first is not None and not case.succeed:  # the first job must be unharmed; wait for it
        try:
            out1, err1 = first.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
            out1, err1 = first.communicate()
        if first.returncode != 0 or "All done!" not in out1:
            why.append(f"the first job failed (exit {first.returncode}): {err1.strip().splitlines()[-1:]}")
        else:  # the first job's own writes (its folder, its staged folder beside it)
            inputs = {k: v for k, v in inputs.items() if not (k.startswith("out/") or k.startswith(".out."))}
    after = snapshot(case_dir)
    lost = [k for k, v in inputs.items() if after.get(k) != v and not k.endswith(".lock")]
    if lost:
        why.append(f"lost or changed: {', '.join(lost[:4])}")
    if proc.returncode != 0 and first is None:
        new = [k for k in after if k not in inputs and Path(k).name in LOOKS_COMPLETE]
        if new:
            why.append(f"left complete-looking {', '.join(new[:3])}")
    partial = [str(p.relative_to(case_dir)) for p in case_dir.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]
    if partial:
        why.append(f"left {partial[0]}")
    if ctx.get("marker") and Path(ctx["marker"]).exists():
        why.append("a pickle payload ran")
    return Outcome(case, not why, proc.returncode, seconds, "; ".join(why), line[:160])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run the cases of one kind (substring of the kind)")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    ap.add_argument("--json", default=None, help="also write the outcomes here")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases() if args.only is None or args.only in c.kind]
    print(f"# hostile inputs: {len(todo)} cases, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}", flush=True)
    base = build_fixtures(root)
    outcomes = []
    for i, case in enumerate(todo):
        o = run_case(case, base, root, i)
        outcomes.append(o)
        mark = "ok " if o.ok else "BAD"
        print(f"{mark} [{case.kind}] {case.name}: exit {o.code}, {o.seconds:.1f}s {o.why} | {o.error_line[:120]}",
              flush=True)
    bad = [o for o in outcomes if not o.ok]
    skipped = [o for o in outcomes if o.why.startswith("skipped")]
    print("\n| kind | cases | clean | skipped |\n| --- | --- | --- | --- |")
    for kind in dict.fromkeys(o.case.kind for o in outcomes):
        mine = [o for o in outcomes if o.case.kind == kind]
        print(f"| {kind} | {len(mine)} | {sum(o.ok and not o.why for o in mine)} | "
              f"{sum(o.why.startswith('skipped') for o in mine)} |")
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} ended cleanly ({len(skipped)} skipped); {len(bad)} did not")
    if args.json:
        Path(args.json).write_text(json.dumps([{"kind": o.case.kind, "name": o.case.name, "ok": o.ok,
                                                "exit": o.code, "seconds": round(o.seconds, 2), "why": o.why,
                                                "error": o.error_line} for o in outcomes], indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
