"""Real W4A4 latency: the original (bf16) vs the real-quant model, timed interleaved in one run.

    python bench/latency.py                       # everything: OMP_WAIT_POLICY PASSIVE and ACTIVE with 2 threads,
                                                  # and PASSIVE with 1 thread
    python bench/latency.py --sections linear --configs passive:2 --repeats 9
    python bench/latency.py --sections model --layers 4 --json /tmp/latency.json

Sections
  linear  one linear at LLaMA-2-7B shapes (4096->4096 q/k/v/o, 4096->11008 gate/up, 11008->4096 down with its
          86x128 online Kronecker transform), M = 1, 16, 128, 512 tokens: bf16 nn.Linear (oneDNN), fp32 nn.Linear
          (MKL), fp32 through oneDNN (mkldnn._linear_pointwise, prepacked), and RealQuantLinear on the `cpu`
          (native int4 VNNI) and `cpu-torch` (torch._int_mm) backends, including quantization and rescale.
  model   prefill (one plain forward of 1 x 512 tokens) and decode (ms per token over 64 greedy steps with the KV
          cache, core.latency.greedy_decode) of SmolLM2-135M and of a LLaMA-2-7B-shaped model with random weights
          and --layers decoder layers (speed does not depend on weight values), bf16 original vs real-quant (both
          backends); warm-up, median of repeats, peak RSS, weights MiB.
          The prefill is timed without logits_to_keep: with it, transformers slices the last hidden state into a
          [1, 1, 4096] view whose strides make torch.matmul take its bmm path, which copies the transposed
          32000 x 4096 lm_head weight on every call (seconds on this CPU, in the original and the quantized model
          alike); decode steps are not affected.

Every number is a median over --repeats rounds; inside a round the variants run back to back (A, B, C, A, B, C,
...), so the machine's drift (2 shared vCPUs, other jobs) hits all of them alike. The OMP wait policy must be set
before torch starts, so each configuration (policy, torch threads) runs in its own child process. With 2 threads
on a machine whose other vCPU is busy, every OpenMP parallel region of PyTorch can wait a scheduler time slice for
its second thread (~8 ms per op measured); the native kernels use their own pool, which never waits for a worker
that has not started. The 1-thread configuration shows the comparison without that effect.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"qkv/o 4096->4096": (4096, 4096, False), "gate/up 4096->11008": (4096, 11008, False),
          "down 11008->4096 (+transform)": (11008, 4096, True)}
TOKENS = (1, 16, 128, 512)


# --- per-linear ---------------------------------------------------------------------------------------------------


def _linear_variants(k: int, n: int, transform: bool):
    import torch
    import torch.nn.functional as F

    from core.realquant.backends import select_backend
    from core.realquant.modules import RealQuantLinear
    from core.transforms import kron_factors

    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01
    left = right = None
    if transform:
        a, b = kron_factors(k)
        left = torch.linalg.qr(torch.randn(a, a, generator=g))[0].bfloat16()
        right = torch.linalg.qr(torch.randn(b, b, generator=g))[0].bfloat16()
    w_bf16 = w.bfloat16()
    variants = {"bf16": (lambda x: F.linear(x, w_bf16), "bf16", 2 * n * k)}
    variants["fp32 (MKL)"] = (lambda x: F.linear(x, w), "fp32", 4 * n * k)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        variants["fp32 (oneDNN)"] = (lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                     "fp32", 4 * n * k)
    except (RuntimeError, AttributeError):
        pass
    for be in ("cpu", "cpu-torch"):
        backend = select_backend(be, "cpu")
        mod = RealQuantLinear(k, n, codes, scale, None, 4, 4, None, left, right, backend).eval()
        label = f"W4A4 {be}" + (" (native int4)" if be == "cpu" and "qweight_vnni" in dict(mod.named_buffers())
                                 else " (int8-held codes, torch._int_mm)" if be == "cpu-torch" else "")
        nbytes = sum(b.numel() * b.element_size() for b in mod.buffers())
        variants[label] = (mod, "bf16", nbytes)
    return variants


def bench_linear(repeats: int, warmup: int, tokens=TOKENS) -> list[dict]:
    import torch

    rows = []
    for shape, (k, n, transform) in SHAPES.items():
        variants = _linear_variants(k, n, transform)
        for m in tokens:
            xs = {"bf16": torch.randn(m, k).bfloat16()}
            xs["fp32"] = xs["bf16"].float()
            times = {v: [] for v in variants}
            with torch.inference_mode():
                for rnd in range(warmup + repeats):
                    for name, (fn, dt, _) in variants.items():
                        t0 = time.perf_counter()
                        fn(xs[dt])
                        dt_ms = (time.perf_counter() - t0) * 1e3
                        if rnd >= warmup:
                            times[name].append(dt_ms)
            med = {v: statistics.median(t) for v, t in times.items()}
            for name, (_, dt, nbytes) in variants.items():
                rows.append({"shape": shape, "in": k, "out": n, "tokens": m, "variant": name, "ms": med[name],
                             "speedup_vs_bf16": med["bf16"] / med[name], "weight_mib": nbytes / 2 ** 20,
                             "runs_ms": times[name]})
            print(f"  {shape:30s} M={m:<4d} " + "  ".join(f"{v}: {med[v]:.3f}" for v in variants), flush=True)
    return rows


# --- model level ----------------------------------------------------------------------------------------------------


def torch_inference(fn):
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def _llama7b_shaped(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    # small init std: random weights with LLaMA's 0.02 blow the 7B-wide residual stream up to inf in bf16
    cfg.initializer_range = 0.002
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _model_set(name: str, base, backends) -> dict:
    """{"original bf16": ..., "W4A4 <backend> bf16": ...}. Takes ``base`` over (it becomes the last conversion):
    a 4-layer 7B-shaped model in fp32 is 4 GiB, and one copy less keeps the peak within this machine's memory."""
    import copy

    import torch

    from core.config import parse_config
    from core.flat import apply_flat_structure, fold_model
    from core.realquant.convert import convert_model

    models = {"original bf16": copy.deepcopy(base).to(torch.bfloat16)}
    fake = base.float()
    apply_flat_structure(fake, parse_config(None))  # random transforms: speed does not depend on their values
    fold_model(fake)
    for i, be in enumerate(backends):
        src = fake if i == len(backends) - 1 else copy.deepcopy(fake)
        models[f"W4A4 {be} bf16"] = convert_model(src, be).to(torch.bfloat16)
    return models


@torch_inference
def _prefill_ms(model, ids) -> float:
    import time as _t

    t0 = _t.perf_counter()
    model(input_ids=ids, use_cache=True)  # one plain forward: all 512 logits, as the sample's "one forward"
    return (_t.perf_counter() - t0) * 1e3


def bench_model(repeats: int, warmup: int, layers: int, prompt: int, decode: int, backends) -> list[dict]:
    """Prefill: one plain forward of the prompt (``_prefill_ms``). Decode: core.latency.greedy_decode (the
    evaluation code path: one prefill, then ``decode`` single-token steps with the KV cache). Both interleaved."""
    import gc

    import torch

    from core.latency import greedy_decode, model_weights_mb, peak_memory_mb, reset_peak_memory
    from core.models import load_model

    rows = []
    specs = [("SmolLM2-135M", lambda: load_model().model),
             (f"LLaMA-2-7B-shaped, {layers} layers, random weights", lambda: _llama7b_shaped(layers))]
    for name, build in specs:
        base = build()
        models = _model_set(name, base, backends)
        del base
        gc.collect()
        ids = torch.randint(100, 30000, (1, prompt), generator=torch.Generator().manual_seed(0))
        runs = {v: {"prefill": [], "decode": [], "peak": 0.0} for v in models}
        for rnd in range(warmup + repeats):
            for variant, model in models.items():
                reset_peak_memory(torch.device("cpu"))
                p_ms = _prefill_ms(model, ids)
                _, d_s, _ = greedy_decode(model, ids, decode)
                if rnd >= warmup:
                    runs[variant]["prefill"].append(p_ms)
                    runs[variant]["decode"].append(d_s * 1e3 / decode)
                    runs[variant]["peak"] = max(runs[variant]["peak"], peak_memory_mb(torch.device("cpu")))
        ref = {k: statistics.median(runs["original bf16"][k]) for k in ("prefill", "decode")}
        for variant, r in runs.items():
            pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
            rows.append({"model": name, "variant": variant, "prefill_ms": pre, "decode_ms_per_token": dec,
                         "tokens_per_s": 1e3 / dec, "weights_mib": model_weights_mb(models[variant]),
                         "peak_rss_mib": r["peak"], "prefill_speedup": ref["prefill"] / pre,
                         "decode_speedup": ref["decode"] / dec, "prefill_runs_ms": r["prefill"],
                         "decode_runs_ms": r["decode"]})
            print(f"  {name:45s} {variant:24s} prefill {pre:8.1f} ms  decode {dec:7.2f} ms/tok  "
                  f"weights {rows[-1]['weights_mib']:7.0f} MiB", flush=True)
        del models
        gc.collect()
    return rows


# --- driver ---------------------------------------------------------------------------------------------------------


def _child(args) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from core.realquant import native

    kernels = native.load()
    torch.set_num_threads(args._threads)
    out = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "native_kernels": kernels is not None,
           "native_reason": native.unsupported_reason()}
    sections = args.sections.split(",")
    tag = f"{out['omp_wait_policy']}, {out['threads']} threads"
    if "linear" in sections:
        print(f"[{tag}] per-linear, {args.repeats} repeats", flush=True)
        out["linear"] = bench_linear(args.repeats, args.warmup)
    if "model" in sections:
        print(f"[{tag}] model level, {args.model_repeats} repeats", flush=True)
        out["model"] = bench_model(args.model_repeats, 1, args.layers, args.prompt, args.decode,
                                   args.backends.split(","))
    return out


def _print_tables(results: dict) -> None:
    for policy, res in results["runs"].items():
        if "linear" in res:
            print(f"\n### Per-linear, {policy} (ms, median; speedup vs bf16)\n")
            variants = list(dict.fromkeys(r["variant"] for r in res["linear"]))
            print("| shape | M | " + " | ".join(variants) + " |")
            print("|---|---|" + "---|" * len(variants))
            keys = list(dict.fromkeys((r["shape"], r["tokens"]) for r in res["linear"]))
            for shape, m in keys:
                cells = {r["variant"]: r for r in res["linear"] if r["shape"] == shape and r["tokens"] == m}
                print(f"| {shape} | {m} | " + " | ".join(
                    f"{cells[v]['ms']:.3f} ({cells[v]['speedup_vs_bf16']:.2f}x)" for v in variants) + " |")
        if "model" in res:
            print(f"\n### Model level, {policy}\n")
            print("| model | variant | prefill ms (1x512) | decode ms/token | weights MiB | prefill x | decode x |")
            print("|---|---|---|---|---|---|---|")
            for r in res["model"]:
                print(f"| {r['model']} | {r['variant']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                      f"{r['weights_mib']:.0f} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="linear,model", help="linear,model")
    p.add_argument("--configs", default="passive:2,active:2,passive:1",
                   help="comma-separated OMP_WAIT_POLICY:torch threads, each run in its own process")
    p.add_argument("--repeats", type=int, default=15, help="per-linear rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model_repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model (2-4)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--backends", default="cpu,cpu-torch")
    p.add_argument("--json", default=None, help="write all numbers (and every run) here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print("@@RESULT@@" + json.dumps(_child(args)))
        return
    configs = []
    for item in args.configs.split(","):
        policy, _, threads = item.partition(":")
        configs.append((policy.strip().upper(), int(threads or 2)))
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} vCPUs",
               "date": time.strftime("%Y-%m-%d %H:%M"), "args": {k: v for k, v in vars(args).items()
                                                               if not k.startswith("_")}, "runs": {}}
    for policy, threads in configs:
        env = dict(os.environ, OMP_WAIT_POLICY=policy, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        cmd = [sys.executable, __file__, "--_child", "--_threads", str(threads), *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
        lines = proc.stdout.splitlines()
        for line in lines:
            if not line.startswith("@@RESULT@@"):
                print(line)
        found = [ln for ln in lines if ln.startswith("@@RESULT@@")]
        key = f"OMP_WAIT_POLICY={policy}, {threads} thread{'s' if threads > 1 else ''}"
        if proc.returncode != 0 or not found:
            raise SystemExit(f"benchmark child for {key} failed (exit {proc.returncode})")
        results["runs"][key] = json.loads(found[-1][len("@@RESULT@@"):])
    _print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
