"""Seed-sized models on this machine: build a LLaMA-2-7B- or Qwen3-8B-shaped model with random bf16 weights (layer
by layer, never the whole model in memory), run the default `python -m core quantize` command on it end to end with a
tiny budget (time diff, RTN + QuaRot baselines, perplexity, a --limit 20 accuracy run, --export ascend), then
`python -m core export`, recording each command's peak RSS (os.wait4), wall time and per-layer seconds; and the
per-layer calibration time at the paper's budget (128 x 2048, 15 epochs), measured on a few steps and extrapolated.

    python bench/scale.py --shape llama2-7b --out /work/scratch/scale.json            # full 7B shape (~16 GiB)
    python bench/scale.py --shape both --layers 2 --out /work/scratch/scale_quick.json  # quick check
    python bench/scale.py --shape llama2-7b --device cuda --out scale_cuda.json       # GPU: + max_memory_allocated

Results print as JSON lines and go to --out. Work files (models, runs) go under --work (default /work/scratch/scale).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.data import shared_data_dir  # noqa: E402  ../shared/data or $FLATQUANT_DATA_DIR

SHAPES = {
    "llama2-7b": dict(arch="llama", layers=32, hidden=4096, inter=11008, heads=32, kv=32, head_dim=128, vocab=32000),
    "qwen3-8b": dict(arch="qwen3", layers=36, hidden=4096, inter=12288, heads=32, kv=8, head_dim=128, vocab=151936),
    # TinyLlama-1.1B's shape: with --layers 8, the 1.1B-shaped model of issue 25's first acceptance line
    "tinyllama-1.1b": dict(arch="llama", layers=22, hidden=2048, inter=5632, heads=32, kv=4, head_dim=64, vocab=32000),
}
GIB = 2 ** 30


def emit(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def model_config(shape: dict, layers: int):
    import torch
    from transformers import LlamaConfig, Qwen3Config

    common = dict(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=layers,
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"], vocab_size=shape["vocab"],
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if shape["arch"] == "qwen3":
        cfg = Qwen3Config(head_dim=shape["head_dim"], **common)
    else:
        cfg = LlamaConfig(**common)
    cfg.torch_dtype = torch.bfloat16
    cfg.architectures = ["Qwen3ForCausalLM" if shape["arch"] == "qwen3" else "LlamaForCausalLM"]
    return cfg


def _tokenizer(vocab: int, work: Path):
    """A BPE tokenizer trained on WikiText-2 validation (no hub): ids stay below the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cache = work / f"tokenizer_{vocab}"
    if (cache / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(cache)
    data = shared_data_dir()
    files = [str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train(files, trainers.BpeTrainer(vocab_size=min(vocab, 32000), special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(cache)
    return fast


def build_model(name: str, layers: int, work: Path) -> Path:
    """Random bf16 weights written one decoder layer per safetensors shard; the skeleton lives on the meta device."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    shape = SHAPES[name]
    out = work / f"{name}-L{layers}"
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model_config(shape, layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    groups: dict[str, dict] = {}
    for key, t in skeleton.state_dict().items():
        part = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        groups.setdefault(part, {})[key] = t
    gen = torch.Generator().manual_seed(0)
    # one 64M-value random block, rolled per tensor: random-looking weights at memory-copy speed
    block = torch.randn(1 << 26, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    weight_map = {}
    total = 0
    for part, tensors in groups.items():
        data = {}
        for key, t in tensors.items():
            if key.endswith("norm.weight"):
                data[key] = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                n = t.numel()
                shift = int(torch.randint(0, block.numel(), (1,), generator=gen))
                reps = -(-(n + shift) // block.numel())
                data[key] = block.repeat(reps)[shift:shift + n].view(t.shape).clone()
        fname = f"model-{part}.safetensors"
        save_file(data, str(tmp / fname), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in data.values())
        weight_map.update({k: fname for k in data})
        del data
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    _tokenizer(shape["vocab"], work).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run a command; its own peak RSS from wait4 (not this process's)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace").splitlines()[-5:]
    return {"exit_code": code, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
            "log_tail": tail if code else None}


def one_layer_model(name: str, scale: int = 1):
    """A one-decoder-layer model of the shape (hidden, intermediate and heads divided by ``scale``) with random bf16
    weights in memory, vocabulary 1024; and its config."""
    import torch
    from transformers import AutoModelForCausalLM

    shape = dict(SHAPES[name], vocab=1024)
    for key in ("hidden", "inter"):
        shape[key] //= scale
    shape["heads"] = max(1, shape["heads"] // scale)
    shape["kv"] = max(1, min(shape["kv"], shape["heads"]))
    cfg = model_config(shape, 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model, cfg


def paper_budget_layer_seconds(name: str, device: str, steps: int = 2) -> dict:
    """One decoder layer of the shape trained at batch 4 x 2048 for a few steps; per-layer time at 128 x 2048 x 15
    epochs extrapolated from the measured per-step time (480 steps) plus the full-precision forward of 128 samples."""
    import torch

    from core.calibrate import calibrate_model
    from core.config import parse_config
    from core.progress import Reporter

    model, _ = one_layer_model(name)
    cfg = parse_config()
    cfg.epochs, cfg.cali_bsz = 1, 4
    samples = torch.randint(0, 1024, (4 * steps, 2048))
    dev = torch.device(device)
    t0 = time.monotonic()
    res = calibrate_model(model, samples, cfg, dev, Reporter())
    total = time.monotonic() - t0
    per_step = res[0].seconds / steps
    fp_forward = (total - res[0].seconds) / (4 * steps)  # capture + fp forward per sample (upper bound)
    paper_steps = (128 // 4) * 15
    return {"measured_steps": steps, "batch": "4 x 2048", "seconds_per_step": round(per_step, 2),
            "paper_budget": "128 x 2048, 15 epochs (480 steps)",
            "extrapolated_layer_seconds": round(per_step * paper_steps + fp_forward * 128, 1),
            "extrapolated_model_hours": round((per_step * paper_steps + fp_forward * 128) * SHAPES[name]["layers"]
                                              / 3600, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="both", choices=(*SHAPES, "both"), help="both: llama2-7b and qwen3-8b")
    ap.add_argument("--layers", type=int, default=None, help="build only N decoder layers (quick check)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | npu")
    ap.add_argument("--work", default="/work/scratch/scale")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--ppl_windows", type=int, default=2)
    ap.add_argument("--baselines", default="rtn,quarot", help="quantize --baselines (the default command's RTN, "
                                                              "and QuaRot)")
    ap.add_argument("--acc_limit", type=int, default=20, help="quantize --eval acc --limit N on the shared task "
                                                               "files (0: no accuracy run)")
    ap.add_argument("--quantize_export", default="ascend", choices=("native", "ascend", "none"),
                    help="quantize --export (default ascend, as the Ascend flow runs)")
    ap.add_argument("--no_time_diff", action="store_true", help="pass --no_time_diff (not the default command)")
    ap.add_argument("--skip_export", action="store_true")
    ap.add_argument("--export_format", default="native", choices=("native", "ascend"), help="export --format")
    ap.add_argument("--skip_paper_budget", action="store_true")
    ap.add_argument("--keep_models", action="store_true", help="keep the built models in --work afterwards")
    ap.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args._build:
        build_model(args._build[0], int(args._build[1]), work)
        return 0
    records: list = []
    from core.device import machine_summary

    emit({"kind": "machine", **machine_summary(), "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
         records)
    names = ["llama2-7b", "qwen3-8b"] if args.shape == "both" else [args.shape]
    py = sys.executable
    for name in names:
        layers = args.layers or SHAPES[name]["layers"]
        t0 = time.monotonic()
        # built in a child process: a forked child's peak RSS (wait4) would otherwise start at this one's
        subprocess.run([py, __file__, "--_build", name, str(layers), "--work", str(work), "--out", args.out],
                       check=True)
        path = work / f"{name}-L{layers}"
        bf16_gib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / GIB
        emit({"kind": "build", "shape": name, "layers": layers, "path": str(path), "bf16_weights_gib":
              round(bf16_gib, 3), "seconds": round(time.monotonic() - t0, 1)}, records)
        run_dir = work / f"run-{name}-L{layers}-{args.device}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [py, "-m", "core", "quantize", "--model_path", str(path), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--epochs", str(args.epochs), "--ppl_max_windows", str(args.ppl_windows),
               "--calib_data", str(shared_data_dir() / "wikitext-2" / "wiki.valid.tokens"),
               "--device", args.device, "--output_dir", str(run_dir), "--no_resume", "--baselines", args.baselines]
        cmd += ["--no_time_diff"] if args.no_time_diff else []
        cmd += ["--export", args.quantize_export] if args.quantize_export != "none" else []
        if args.acc_limit:
            cmd += ["--eval", "acc", "--limit", str(args.acc_limit), "--tasks_data_dir",
                    str(shared_data_dir() / "eval")]
        q = run_measured(cmd, work / f"quantize-{name}.log")
        rec = {"kind": "quantize", "shape": name, "layers": layers, "device": args.device, **q,
               "bf16_weights_gib": round(bf16_gib, 3), "rss_target_gib": round(bf16_gib + 3, 3),
               "rss_within_target": q["peak_rss_gib"] <= bf16_gib + 3}
        report_path = run_dir / "report.json"
        if report_path.exists():
            rep = json.loads(report_path.read_text())
            cal = rep.get("calibration", {})
            secs = [layer["seconds"] for layer in cal.get("layers", [])]
            rec.update({"calibration_seconds": cal.get("seconds"), "layer_seconds": secs,
                        "mean_layer_seconds": round(sum(secs) / len(secs), 2) if secs else None,
                        "ppl": {k: rep.get("ppl", {}).get(k) for k in ("original", "rtn", "quantized")},
                        "device_peak_mb": cal.get("device_peak_mb"), "memory_estimate": cal.get("memory_estimate")})
        emit(rec, records)
        if not args.skip_export and q["exit_code"] == 0:
            exp_dir = work / f"export-{name}-L{layers}"
            shutil.rmtree(exp_dir, ignore_errors=True)
            e = run_measured([py, "-m", "core", "export", "--model_path", str(path), "--flat_matrix_path",
                              str(run_dir / "flat_matrices.pth"), "--output_dir", str(exp_dir),
                              "--format", args.export_format],
                             work / f"export-{name}.log")
            size = sum(f.stat().st_size for f in exp_dir.glob("*.safetensors")) / GIB if exp_dir.exists() else None
            emit({"kind": "export", "format": args.export_format, "shape": name, "layers": layers, **e, "checkpoint_gib":
                  round(size, 3) if size else None, "rss_within_target": e["peak_rss_gib"] <= bf16_gib + 3}, records)
            shutil.rmtree(exp_dir, ignore_errors=True)
        if not args.keep_models:
            shutil.rmtree(path, ignore_errors=True)
        Path(args.out).write_text(json.dumps(records, indent=1))
    for name in names:  # last: it grows this process, whose children are measured above
        if not args.skip_paper_budget:
            emit({"kind": "paper_budget", "shape": name, "device": args.device,
                  **paper_budget_layer_seconds(name, args.device)}, records)
    Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
