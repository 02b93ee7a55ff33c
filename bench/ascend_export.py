"""The vllm-ascend export (issue 12): reference-loader logits vs the project's real-quant model on real text,
quantized-linear bytes vs bf16, folder size, export time and peak memory.

    python bench/ascend_export.py                                   # smollm2 + qwen3 sections
    python bench/ascend_export.py --flat_matrix_path outputs/smollm2/flat_matrices.pth --windows 8
    python bench/ascend_export.py --sections llama7b --layers 2     # LLaMA-2-7B shapes, random weights

Sections
  smollm2  SmolLM2-135M with a matrix file (--flat_matrix_path; default: calibrate 30 layers x 8 samples x 128
           tokens x 1 epoch first): the ascend export with float32 float parts in a child process (time, peak RSS),
           then the reference loader (core.realquant.ascend_reference: the serving math) vs convert_model's
           real-quant model on --windows windows of 512 tokens of WikiText-2 test: max |diff| / max |logit| per
           window; quantized-linear bytes / bf16 bytes; and the default export (bf16 float parts) folder size.
  qwen3    the same for a random Qwen3 (hidden 1024, intermediate 3072, 4 layers) with random FlatQuant
           transforms and LAC clip ratios (equivalence only: random weights have no quality).
  llama7b  a LLaMA-2-7B-shaped model (4096 / 11008, 32 heads, vocab 32000) with --layers decoder layers, random
           bf16 weights and random transforms saved to disk; `export --format ascend` in a child process: time,
           peak RSS (ru_maxrss of the child) and folder size. Memory = the bf16 model + one layer in fp32 + one
           shard; run with --layers 32 on a machine with ~24 GiB free for the full model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


FP32_EXPORT = ("import sys, torch; from core.realquant.ascend import export_matrix_file; "
               "export_matrix_file(sys.argv[1], sys.argv[2], sys.argv[3], dtype=torch.float32, overwrite=True)")


def _export(model_path, matrix, out, fp32: bool = False) -> dict:
    """`python -m core export --format ascend` in a child process (``fp32``: the same export with float32 float
    parts, which the CLI refuses, through core.realquant.ascend.export_matrix_file): seconds and the child's peak
    RSS."""
    t = time.perf_counter()
    args = (["-c", FP32_EXPORT, str(model_path), str(matrix), str(out)] if fp32 else
            ["-m", "core", "export", "--format", "ascend", "--model_path", str(model_path), "--flat_matrix_path",
             str(matrix), "--output_dir", str(out), "--overwrite"])
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mib_children_max": round(rss),
            "folder_mib": round(size / 2 ** 20, 1), "stdout": proc.stdout.strip().splitlines()}


def _sizes(folder) -> dict:
    from core.realquant.ascend_reference import DESCRIPTION_FILE, QUANT_TYPE, load_tensors

    desc = json.loads((Path(folder) / DESCRIPTION_FILE).read_text())
    tensors = load_tensors(folder)
    q = sum(t.numel() * t.element_size() for n, t in tensors.items() if desc[n] == QUANT_TYPE)
    bf16 = sum(2 * t.numel() for n, t in tensors.items() if desc[n] == QUANT_TYPE and n.endswith(".weight"))
    return {"quantized_linear_mib": round(q / 2 ** 20, 2), "bf16_mib": round(bf16 / 2 ** 20, 2),
            "ratio_to_bf16": round(q / bf16, 4)}


def _compare(folder, real, ids_windows) -> dict:
    """max |a - b| / max |b| of the logits per window: the reference ((P1·X)·P2, default) vs the real-quant model;
    the reference with P1·(X·P2); and, as the yardstick for the latter, the real-quant model vs itself with its
    input embeddings perturbed by 1e-7 relative noise (a W4A4 model amplifies rounding flips)."""
    from core.realquant.ascend_reference import layout_problems, load_reference

    assert layout_problems(folder) == []
    ref, _ = load_reference(folder)
    ref_rf, _ = load_reference(folder, check=False, right_first=True)
    g = torch.Generator().manual_seed(0)
    rels = {"reference": [], "reference_right_first": [], "real_vs_real_1e-7_noise": []}
    top1 = {k: [] for k in rels}
    with torch.no_grad():
        for ids in ids_windows:
            b = real(input_ids=ids).logits
            emb = real.get_input_embeddings()(ids)
            noisy = emb * (1 + 1e-7 * torch.randn(emb.shape, generator=g))
            for key, a in (("reference", ref(input_ids=ids).logits),
                           ("reference_right_first", ref_rf(input_ids=ids).logits),
                           ("real_vs_real_1e-7_noise", real(inputs_embeds=noisy).logits)):
                rels[key].append(float((a - b).abs().max() / b.abs().max()))
                top1[key].append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return {"windows": len(ids_windows), "tokens_per_window": int(ids_windows[0].shape[1]),
            "max_rel_diff": {k: max(v) for k, v in rels.items()},
            "top1_agreement_min": {k: min(v) for k, v in top1.items()}}


def _windows(tokenizer, n, seqlen=512):
    text = (ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tokenizer(text[: 400 * seqlen * n // 100 + 20000], return_tensors="pt").input_ids
    return [ids[:, i * seqlen:(i + 1) * seqlen] for i in range(n) if ids.shape[1] >= (i + 1) * seqlen]


def smollm2(args, tmp: Path) -> dict:
    from core.matrices import load_matrices
    from core.models import load_model
    from core.realquant import convert_model

    matrix = args.flat_matrix_path
    calib = None
    if matrix is None:
        from core.pipeline import QuantizeOptions, run_quantize

        t = time.perf_counter()
        res = run_quantize(QuantizeOptions(nsamples=8, seqlen=128, epochs=1, max_layers=30, skip_ppl=True,
                                           skip_rtn=True, output_dir=str(tmp / "cal")))
        matrix, calib = res.matrix_path, {"layers": 30, "nsamples": 8, "seqlen": 128, "epochs": 1,
                                          "seconds": round(time.perf_counter() - t, 1)}
        del res
    out = tmp / "smol_fp32"
    exp = _export("smollm2", matrix, out, fp32=True)
    loaded = load_model()
    load_matrices(matrix, loaded.model)
    real = convert_model(loaded.model, "cpu")
    result = {"calibration": calib or str(matrix), "export_fp32": exp, **_sizes(out),
              **_compare(out, real, _windows(loaded.tokenizer, args.windows))}
    result["export_default_bf16"] = _export("smollm2", matrix, tmp / "smol_bf16")
    return result


def qwen3(args, tmp: Path) -> dict:
    from core.config import parse_config
    from core.flat import fold_model
    from core.matrices import build_payload, save_matrices, uncalibrated_states
    from core.models import build_random_qwen3, load_model
    from core.realquant import convert_model

    tok = load_model().tokenizer
    model = build_random_qwen3(hidden_size=1024, intermediate_size=3072, layers=4, heads=8, kv_heads=4, head_dim=128)
    model.save_pretrained(tmp / "q3")
    tok.save_pretrained(tmp / "q3")
    cfg = parse_config({"algorithm": {"flatquant": {"lac": True}}})
    wrapped, states = uncalibrated_states(model, cfg)
    matrix = save_matrices(tmp / "q3.pth", build_payload(model, cfg, states, complete=True))
    fold_model(wrapped)
    out = tmp / "q3_fp32"
    exp = _export(tmp / "q3", matrix, out, fp32=True)
    real = convert_model(wrapped, "cpu")
    return {"shape": "hidden 1024, intermediate 3072, 4 layers", "export_fp32": exp, **_sizes(out),
            **_compare(out, real, _windows(tok, args.windows))}


def llama7b(args, tmp: Path) -> dict:
    """The model is built by bench/scale.py's builder (random bf16 weights written one decoder layer per shard, never
    the whole model in memory); the random transforms depend only on shapes and seeds, so they come from one empty
    layer at a time."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from core.config import parse_config
    from core.flat import flat_state, iter_transforms, wrap_layer
    from core.matrices import build_payload, save_matrices

    sys.path.insert(0, str(ROOT / "bench"))
    from scale import build_model, model_config

    path = build_model("llama2-7b", args.layers, tmp)
    cfg = parse_config(None)
    cfg_hf = model_config(dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128, vocab=32000, arch="llama"),
                           args.layers)
    states = {}
    for i in range(args.layers):
        with torch.device("meta"):
            one = LlamaDecoderLayer(cfg_hf, i)
        one = one.to_empty(device="cpu").float()
        wrap_layer(one, i, cfg, None)
        for t in iter_transforms(one):
            t.freeze()
        states[i] = flat_state(one)
        del one

    with torch.device("meta"):  # build_payload reads the architecture and sizes only
        skeleton = LlamaForCausalLM(cfg_hf)
    matrix = save_matrices(tmp / "l7.pth", build_payload(skeleton, cfg, states, complete=True))
    source_mib = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2 ** 20
    exp = _export(path, matrix, tmp / "l7_ascend")
    return {"layers": args.layers, "source_bf16_mib": round(source_mib, 1), "export": exp,
            **_sizes(tmp / "l7_ascend")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["smollm2", "qwen3"], choices=["smollm2", "qwen3", "llama7b"])
    ap.add_argument("--flat_matrix_path", default=None)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ascend_bench_") as tmp:
        for name in args.sections:
            results[name] = globals()[name](args, Path(tmp))
            print(name, json.dumps(results[name], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
