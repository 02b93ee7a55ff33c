"""Real W4A4 latency on this CPU: the fastest float original vs the real-quant model (and optionally llama.cpp's
Q4_0), timed interleaved in one run.

    python bench/latency.py                               # per-linear + 7B-shaped 4-layer model, 2 threads
    python bench/latency.py --isas avx512,avx2            # also the AVX2 code path, forced (labelled as such)
    python bench/latency.py --sections model --llama_cpp /path/to/llama.cpp/build --json /tmp/latency.json

Sections
  linear  one linear at LLaMA-2-7B shapes (4096->4096 q/k/v/o, 4096->11008 gate/up, 11008->4096 down with its
          86x128 online Kronecker transform), M = --tokens (default 1 and 512): the float originals (bf16 where
          this CPU has native bf16, fp32 through MKL and through oneDNN) and RealQuantLinear on the `cpu` backend's
          native code paths of --isas (and `cpu-torch` with --backends cpu,cpu-torch), including the activation
          transform, quantization and rescale. A 256 MiB buffer is written before each timed call, so weights come
          from memory as in a whole model (else a variant that follows one with the same weights finds them in
          L3). Speedups are against the fastest float variant of the same row.
  attention  one decode step's attention of a 7B-shaped layer (32 heads, cache depth --prompt + 1 and 4 x --prompt,
          the compute dtype): PyTorch's SDPA vs core.attention.decode_attention (the models' CPU decode path).
  model   prefill (1 x --prompt tokens through the decoder, logits of the last one: what generate() and
          llama-bench's pp test compute) and decode (ms per token over --decode greedy steps
          with the KV cache after that prompt, core.latency.greedy_decode) of a LLaMA-2-7B-shaped model with
          random weights and --layers decoder layers (speed does not depend on weight values; SmolLM2 too with
          --models 7b,smollm2): the float original in --originals dtypes (auto: this CPU's compute dtype, i.e. bf16
          only where it is native, see core.device.compute_dtype) vs real-quant on each --isas path (float parts
          in the compute dtype). With --llama_cpp DIR, the same model (same shapes, same random weights) is written
          as GGUF, quantized to Q4_0 with DIR's llama-quantize, and llama-bench runs it with the same threads in
          every round (pp = prompt tokens/s, tg = decode tokens/s after a prompt of the same length).

Every number is a median over the rounds; inside a round the variants run back to back (A, B, C, A, B, C, ...), so
the machine's drift (shared vCPUs, other jobs) hits all of them alike. Each configuration (OMP wait policy, torch
threads) runs in its own child process (the policy must be set before torch starts). The JSON and the printout
record the CPU model, its flags, the load average before and after, torch's version and the native code paths.

A code path forced with --isas (e.g. avx2 on an AVX-512 CPU) runs that path's instructions on this CPU: it shows
what the path does, not what a CPU that only has it would do (other caches, clocks and memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"qkv/o 4096->4096": (4096, 4096, False), "gate/up 4096->11008": (4096, 11008, False),
          "down 11008->4096 (+transform)": (11008, 4096, True)}
FLUSH_BYTES = 256 << 20  # written before each timed call: larger than any L3 here


def machine_info() -> dict:
    """core.device.machine_summary plus every flag (the printout shows the key ones) and the Python version."""
    sys.path.insert(0, str(REPO))
    from core.device import cpu_flags, machine_summary

    return dict(machine_summary(), flags=sorted(cpu_flags()), python=platform.python_version())


def _isa_label(isa: str, auto: str) -> str:
    if isa == auto:
        return f"W4A4 cpu [{isa}]"
    return f"W4A4 cpu [{isa} path forced]"


def _resolve_isas(spec: str) -> tuple[list[str], str]:
    from core import kernels as native

    kernels = native.load()
    if kernels is None:
        return [], "none"
    auto = native.requested_isa()
    isas = [auto if s.strip() in ("", "auto") else s.strip() for s in spec.split(",")]
    for isa in isas:
        if isa not in kernels.compiled_isas():
            raise SystemExit(f"error: --isas {isa}: this CPU/build runs {', '.join(kernels.compiled_isas())}")
    return list(dict.fromkeys(isas)), auto


def _with_isa(fn, isa):
    """fn, run on native code path ``isa`` (switched before each call: variants of one round alternate paths)."""
    from core import kernels as native

    kernels = native.load()

    def run(*args, **kwargs):
        kernels.set_isa(isa)
        return fn(*args, **kwargs)

    return run


# --- per-linear ---------------------------------------------------------------------------------------------------


def _linear_variants(k: int, n: int, transform: bool, isas: list[str], auto: str, backends: list[str]):
    import torch
    import torch.nn.functional as F

    from core.device import compute_dtype, native_bf16
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
        left = torch.linalg.qr(torch.randn(a, a, generator=g))[0]
        right = torch.linalg.qr(torch.randn(b, b, generator=g))[0]
    act_dtype = "bf16" if compute_dtype("cpu") == torch.bfloat16 else "fp32"
    variants = {}  # name -> (callable, input dtype key, bytes of weights, is a float original)
    if native_bf16("cpu"):
        w_bf16 = w.bfloat16()
        variants["bf16"] = (lambda x: F.linear(x, w_bf16), "bf16", 2 * n * k, True)
    variants["fp32 (MKL)"] = (lambda x: F.linear(x, w), "fp32", 4 * n * k, True)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        variants["fp32 (oneDNN)"] = (lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                     "fp32", 4 * n * k, True)
    except (RuntimeError, AttributeError):
        pass
    cast = (lambda t: None if t is None else t.to(torch.bfloat16 if act_dtype == "bf16" else torch.float32))
    for be in backends:
        mod = RealQuantLinear(k, n, codes, scale, None, 4, 4, None, cast(left), cast(right),
                              select_backend(be, "cpu")).eval()
        nbytes = sum(b.numel() * b.element_size() for b in mod.buffers())
        if be == "cpu" and "qweight_vnni" in dict(mod.named_buffers()):
            for isa in isas:
                variants[_isa_label(isa, auto)] = (_with_isa(mod, isa), act_dtype, nbytes, False)
        else:
            variants[f"W4A4 {be}"] = (mod, act_dtype, nbytes, False)
    return variants


def bench_attention(repeats: int, warmup: int, depths, dtype) -> list[dict]:
    """One decode step's attention of a LLaMA-2-7B-shaped layer (32 heads of 128, one query token, a cache of
    ``depth`` tokens): PyTorch's SDPA (what transformers' "sdpa" runs) vs core.attention.decode_attention (what the
    "flatquant" attention runs for a CPU decode step), interleaved; max abs difference of their outputs too."""
    import torch
    import torch.nn.functional as F

    from core.attention import decode_attention

    rows = []
    g = torch.Generator().manual_seed(0)
    for depth in depths:
        q = torch.randn(1, 32, 1, 128, generator=g).to(dtype)
        k, v = (torch.randn(1, 32, depth, 128, generator=g).to(dtype) for _ in range(2))
        variants = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                    "decode_attention": lambda: decode_attention(q, k, v, None, None)}
        times = {name: [] for name in variants}
        with torch.inference_mode():
            for rnd in range(warmup + repeats):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    if rnd >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            diff = (variants["sdpa"]().transpose(1, 2).float() - variants["decode_attention"]().float()).abs().max()
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"depth": depth, "dtype": str(dtype).replace("torch.", ""), "sdpa_ms": med["sdpa"],
                     "decode_attention_ms": med["decode_attention"], "speedup": med["sdpa"] / med["decode_attention"],
                     "max_abs_diff": float(diff)})
        print(f"  attention depth {depth:5d} {rows[-1]['dtype']}: sdpa {med['sdpa']:.3f} ms, decode_attention "
              f"{med['decode_attention']:.3f} ms ({rows[-1]['speedup']:.2f}x), max |diff| {float(diff):.2e}",
              flush=True)
    return rows


def bench_linear(repeats: int, warmup: int, tokens, isas, auto, backends) -> list[dict]:
    import torch

    rows = []
    flush = torch.zeros(FLUSH_BYTES // 4)
    for shape, (k, n, transform) in SHAPES.items():
        variants = _linear_variants(k, n, transform, isas, auto, backends)
        for m in tokens:
            xs = {"bf16": torch.randn(m, k).bfloat16()}
            xs["fp32"] = xs["bf16"].float()
            times = {v: [] for v in variants}
            with torch.inference_mode():
                for rnd in range(warmup + repeats):
                    for name, (fn, dt, _, _) in variants.items():
                        # weights come from memory, as in a model much larger than the caches (a 4096 x 11008 int4
                        # matrix fits this CPU's 32 MiB L3: without this, whichever variant runs second is cached)
                        flush.add_(1)
                        t0 = time.perf_counter()
                        fn(xs[dt])
                        dt_ms = (time.perf_counter() - t0) * 1e3
                        if rnd >= warmup:
                            times[name].append(dt_ms)
            med = {v: statistics.median(t) for v, t in times.items()}
            fastest = min((v for v in variants if variants[v][3]), key=lambda v: med[v])
            for name, (_, dt, nbytes, _) in variants.items():
                rows.append({"shape": shape, "in": k, "out": n, "tokens": m, "variant": name, "ms": med[name],
                             "fastest_float": fastest, "speedup_vs_fastest_float": med[fastest] / med[name],
                             "weight_mib": nbytes / 2 ** 20, "runs_ms": times[name]})
            print(f"  {shape:30s} M={m:<4d} " + "  ".join(f"{v}: {med[v]:.3f}" for v in variants), flush=True)
    return rows


# --- model level ----------------------------------------------------------------------------------------------------


def _llama7b_config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    # small init std: random weights with LLaMA's 0.02 blow the 7B-wide residual stream up to inf in bf16
    cfg.initializer_range = 0.002
    return cfg


def _llama7b_shaped(layers: int):
    import torch
    from transformers import LlamaForCausalLM

    from core.attention import use_flatquant_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama7b_config(layers)).eval().requires_grad_(False)
    use_flatquant_attention(model)  # as core.models.load_model does for every model it loads
    return model


_O_QUANT = {"algorithm": {"flatquant": {"use_o_quant": True}}}  # all seven linears W4A4
_LM_HEAD = {"skip_layers": []}  # lm_head int8 (core.flat.wrap_lm_head)
QUANT_CONFIGS = {  # --quant_configs: FlatQuant configs of the W4A4 variants (label suffix, AMCT-style dict)
    "default": ("", None),  # o_proj and lm_head in float, as INT4_FLAT_QUANT_CFG
    "o_quant": (" +o_proj", _O_QUANT),
    "lm_head": (" +int8 lm_head", _LM_HEAD),
    "all": (" +o_proj +int8 lm_head", {**_O_QUANT, **_LM_HEAD}),
}


def _model_set(base, originals: list, isas: list[str], auto: str, backends: list[str],
               quant_configs: list[str]) -> dict:
    """{"original <dtype>": model, "W4A4 cpu [isa]": model, ...}: name -> (callable context, model).
    Takes ``base`` (fp32) over: the float copies are made first, then ``base`` itself becomes the last fake-quant
    model that is converted (a 4-layer 7B-shaped model in fp32 is 4 GiB: one copy less keeps the peak lower)."""
    import copy

    import torch

    from core.config import parse_config
    from core.device import compute_dtype, dtype_name
    from core.algorithms import apply_flat_structure
    from core.flat import fold_model
    from core.realquant.convert import convert_model

    models = {}
    for dt in originals:
        if dt != torch.float32:
            models[f"original {dtype_name(dt)}"] = (None, copy.deepcopy(base).to(dt))
    keep_fp32 = torch.float32 in originals
    fp32_copy = copy.deepcopy(base) if keep_fp32 else None
    real_dtype = compute_dtype("cpu")
    jobs = [(qc, be) for qc in quant_configs for be in backends]
    for i, (qc, be) in enumerate(jobs):
        suffix, cfg = QUANT_CONFIGS[qc]
        src = base if i == len(jobs) - 1 else copy.deepcopy(base)
        apply_flat_structure(src, parse_config(cfg))  # random transforms: speed does not depend on their values
        fold_model(src)
        real = convert_model(src, be).to(real_dtype)
        if be == "cpu" and isas:
            for isa in isas:
                models[_isa_label(isa, auto) + suffix] = (isa, real)
        else:
            models[f"W4A4 {be}{suffix}"] = (None, real)
    if keep_fp32:
        models = {"original float32": (None, fp32_copy), **models}
    return models


def _prefill_ms(model, ids) -> float:
    """Prompt processing as generate() and llama-bench do it: the decoder over every prompt token (KV cache
    filled), logits of the last token only. The last hidden state is sliced by hand: transformers' logits_to_keep
    makes a [1, 1, H] view whose strides send torch.matmul down its bmm path, which copies the transposed lm_head
    weight on every call (seconds at 32000 x 4096, in every model alike)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        hidden = model.model(input_ids=ids, use_cache=True).last_hidden_state
        model.lm_head(hidden[:, -1, :])
        return (time.perf_counter() - t0) * 1e3


# --- llama.cpp -------------------------------------------------------------------------------------------------------


def _llama_tool(root: Path, name: str) -> Path:
    for cand in (root / "bin" / name, root / name, root / "build" / "bin" / name):
        if cand.exists():
            return cand
    raise SystemExit(f"error: --llama_cpp {root}: no {name} under bin/ (build llama.cpp first, see README)")


def write_gguf(model, path: Path) -> None:
    """The HF LLaMA model as an f16 GGUF (llama architecture), with a placeholder 32000-token vocabulary: llama-bench
    needs a loadable vocabulary, not a meaningful one. q/k are not permuted the way convert_hf_to_gguf.py does for
    rope: with random weights the arithmetic is the same."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def arr(t, norm=False):
        return t.detach().float().numpy().astype(np.float32 if norm else np.float16)

    w.add_tensor("token_embd.weight", arr(model.model.embed_tokens.weight))
    for i, layer in enumerate(model.model.layers):
        for hf, gg in names.items():
            mod = layer.get_submodule(hf)
            w.add_tensor(f"blk.{i}.{gg}.weight", arr(mod.weight, norm="norm" in gg))
    w.add_tensor("output_norm.weight", arr(model.model.norm.weight, norm=True))
    w.add_tensor("output.weight", arr(model.lm_head.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prepare_llama_cpp(root: Path, model, workdir: Path) -> Path:
    """GGUF Q4_0 of ``model`` (llama-quantize's Q4_0 recipe: Q4_0 blocks, the output matrix in Q6_K)."""
    f16 = workdir / "model-f16.gguf"
    q4 = workdir / "model-q4_0.gguf"
    write_gguf(model, f16)
    proc = subprocess.run([str(_llama_tool(root, "llama-quantize")), str(f16), str(q4), "Q4_0"],
                          capture_output=True, text=True)
    f16.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: llama-quantize failed: {proc.stderr.strip().splitlines()[-1:]}")
    return q4


def run_llama_bench(root: Path, gguf_path: Path, threads: int, prompt: int, decode: int) -> dict:
    """One llama-bench run (-r 1): prompt tokens/s (pp) and decode tokens/s after a prompt of ``prompt`` tokens
    (tg at depth ``prompt``, where this llama-bench has --n-depth)."""
    exe = _llama_tool(root, "llama-bench")
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    cmd = [str(exe), "-m", str(gguf_path), "-t", str(threads), "-p", str(prompt), "-n", str(decode), "-r", "1",
           "-o", "json"]
    depth = "--n-depth" in help_text or re.search(r"\s-d[, ]", help_text) is not None
    if depth:
        cmd += ["-d", f"0,{prompt}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: llama-bench failed: {proc.stderr.strip().splitlines()[-3:]}")
    out = {"tg_depth": prompt if depth else 0, "build": None}
    for r in json.loads(proc.stdout):
        out["build"] = r.get("build_commit")
        d = r.get("n_depth", 0)
        if r["n_prompt"] == prompt and r["n_gen"] == 0 and d == 0:
            out["prefill_ms"] = prompt / r["avg_ts"] * 1e3
        elif r["n_gen"] == decode and r["n_prompt"] == 0 and d == out["tg_depth"]:
            out["decode_ms_per_token"] = 1e3 / r["avg_ts"]
    return out


def _paired(ref: list, ours: list) -> float:
    """Median over rounds of ref / ours (time ratios of the same round)."""
    return statistics.median(a / b for a, b in zip(ref, ours))


def bench_model(repeats: int, warmup: int, layers: int, prompt: int, decode: int, originals, isas, auto,
                backends, model_names, llama_cpp, threads, quant_configs=("default",)) -> list[dict]:
    """Prefill: the prompt through the decoder, last-token logits (``_prefill_ms``). Decode: core.latency.greedy_decode (the
    evaluation code path: one prefill, then ``decode`` single-token steps with the KV cache). Both interleaved."""
    import gc

    import torch

    from core.latency import greedy_decode, model_weights_mb, peak_memory_mb, reset_peak_memory
    from core.models import load_model

    rows = []
    specs = {"7b": (f"LLaMA-2-7B-shaped, {layers} layers, random weights", lambda: _llama7b_shaped(layers)),
             "smollm2": ("SmolLM2-135M", lambda: load_model().model.float())}
    for key in model_names:
        name, build = specs[key]
        base = build()
        llama = None
        tmp = None
        if llama_cpp and key == "7b":
            tmp = Path(tempfile.mkdtemp(prefix="fq_llama_", dir=os.environ.get("FQ_BENCH_TMP")))
            print(f"  writing GGUF Q4_0 of the same model to {tmp}", flush=True)
            llama = prepare_llama_cpp(Path(llama_cpp), base, tmp)
        models = _model_set(base, originals, isas, auto, backends, list(quant_configs))
        del base
        gc.collect()
        ids = torch.randint(100, 30000, (1, prompt), generator=torch.Generator().manual_seed(0))
        runs = {v: {"prefill": [], "decode": [], "peak": 0.0} for v in models}
        if llama is not None:
            runs["llama.cpp Q4_0"] = {"prefill": [], "decode": [], "peak": 0.0}
        for rnd in range(warmup + repeats):
            for variant, (isa, model) in models.items():
                if isa is not None:
                    from core import kernels as native

                    native.load().set_isa(isa)
                reset_peak_memory(torch.device("cpu"))
                p_ms = _prefill_ms(model, ids)
                _, d_s, _ = greedy_decode(model, ids, decode)
                if rnd >= warmup:
                    runs[variant]["prefill"].append(p_ms)
                    runs[variant]["decode"].append(d_s * 1e3 / decode)
                    runs[variant]["peak"] = max(runs[variant]["peak"], peak_memory_mb(torch.device("cpu")))
            if llama is not None:
                r = run_llama_bench(Path(llama_cpp), llama, threads, prompt, decode)
                if rnd >= warmup:
                    runs["llama.cpp Q4_0"]["prefill"].append(r["prefill_ms"])
                    runs["llama.cpp Q4_0"]["decode"].append(r["decode_ms_per_token"])
                    runs["llama.cpp Q4_0"]["tg_depth"] = r["tg_depth"]
                    runs["llama.cpp Q4_0"]["build"] = r["build"]
        med = {v: {k: statistics.median(r[k]) for k in ("prefill", "decode")} for v, r in runs.items()}
        float_names = [v for v in models if v.startswith("original")]
        fastest = {k: min(float_names, key=lambda v: med[v][k]) for k in ("prefill", "decode")}
        for variant, r in runs.items():
            pre, dec = med[variant]["prefill"], med[variant]["decode"]
            row = {"model": name, "variant": variant, "prefill_ms": pre, "decode_ms_per_token": dec,
                   "tokens_per_s": 1e3 / dec, "prefill_tokens_per_s": prompt / pre * 1e3,
                   "weights_mib": model_weights_mb(models[variant][1]) if variant in models else
                   os.path.getsize(llama) / 2 ** 20, "peak_rss_mib": r["peak"],
                   "fastest_float": fastest,
                   "prefill_speedup": med[fastest["prefill"]]["prefill"] / pre,
                   "decode_speedup": med[fastest["decode"]]["decode"] / dec,
                   "prefill_runs_ms": r["prefill"], "decode_runs_ms": r["decode"]}
            # per-round ratios (variants of a round run back to back): steadier than a ratio of medians when the
            # machine's load swings between rounds
            row["paired_speedup"] = {k: _paired(runs[fastest[k]][k], r[k]) for k in ("prefill", "decode")}
            if llama is not None:
                row["vs_llama_cpp"] = {"prefill": med["llama.cpp Q4_0"]["prefill"] / pre,
                                       "decode": med["llama.cpp Q4_0"]["decode"] / dec}
                row["vs_llama_cpp_paired"] = {k: _paired(runs["llama.cpp Q4_0"][k], r[k])
                                              for k in ("prefill", "decode")}
            if variant == "llama.cpp Q4_0":
                row["llama_tg_depth"], row["llama_build"] = r.get("tg_depth"), r.get("build")
            rows.append(row)
            print(f"  {name:45s} {variant:34s} prefill {pre:8.1f} ms  decode {dec:7.2f} ms/tok  "
                  f"weights {row['weights_mib']:7.0f} MiB", flush=True)
        del models
        gc.collect()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --- driver ---------------------------------------------------------------------------------------------------------


def _child(args) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from core.device import COMPUTE_DTYPES, compute_dtype, dtype_name
    from core import kernels as native

    torch.set_num_threads(args._threads)
    isas, auto = _resolve_isas(args.isas)
    out = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "native_kernels": native.load() is not None,
           "native_reason": native.unsupported_reason(), "native_isa_auto": auto, "native_isas": isas,
           "compute_dtype": dtype_name(compute_dtype("cpu"))}
    sections = args.sections.split(",")
    tag = f"{out['omp_wait_policy']}, {out['threads']} threads"
    backends = args.backends.split(",")
    if "attention" in sections:
        print(f"[{tag}] decode-step attention, {args.repeats} repeats", flush=True)
        out["attention"] = bench_attention(args.repeats, args.warmup, [args.prompt + 1, 4 * args.prompt],
                                           compute_dtype("cpu"))
    if "linear" in sections:
        print(f"[{tag}] per-linear, {args.repeats} repeats", flush=True)
        tokens = [int(t) for t in args.tokens.split(",")]
        out["linear"] = bench_linear(args.repeats, args.warmup, tokens, isas, auto, backends)
    if "model" in sections:
        print(f"[{tag}] model level, {args.model_repeats} repeats", flush=True)
        originals = [compute_dtype("cpu") if o == "auto" else COMPUTE_DTYPES[o] for o in args.originals.split(",")]
        out["model"] = bench_model(args.model_repeats, 1, args.layers, args.prompt, args.decode,
                                   list(dict.fromkeys(originals)), isas, auto, backends, args.models.split(","),
                                   args.llama_cpp, args._threads, args.quant_configs.split(","))
    return out


def _print_tables(results: dict) -> None:
    m = results["machine"]
    print(f"\nCPU: {m['cpu_model']} ({m['machine']}, {m['vcpus']} vCPUs), flags: {' '.join(m['key_flags'])}; "
          f"load average before {m['loadavg'][0]:.2f}, after {results['loadavg_after'][0]:.2f}")
    for policy, res in results["runs"].items():
        if "attention" in res:
            print(f"\n### Decode-step attention, {policy} (LLaMA-2-7B-shaped layer, ms, median)\n")
            print("| cache depth | dtype | SDPA | core.attention | speedup | max abs diff |")
            print("|---:|---|---:|---:|---:|---:|")
            for r in res["attention"]:
                print(f"| {r['depth']} | {r['dtype']} | {r['sdpa_ms']:.3f} | {r['decode_attention_ms']:.3f} | "
                      f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
        if "linear" in res:
            print(f"\n### Per-linear, {policy} (ms, median; speedup vs the fastest float variant of the row)\n")
            variants = list(dict.fromkeys(r["variant"] for r in res["linear"]))
            print("| shape | M | " + " | ".join(variants) + " |")
            print("|---|---|" + "---|" * len(variants))
            keys = list(dict.fromkeys((r["shape"], r["tokens"]) for r in res["linear"]))
            for shape, mm in keys:
                cells = {r["variant"]: r for r in res["linear"] if r["shape"] == shape and r["tokens"] == mm}
                print(f"| {shape} | {mm} | " + " | ".join(
                    f"{cells[v]['ms']:.3f} ({cells[v]['speedup_vs_fastest_float']:.2f}x)" for v in variants) + " |")
        if "model" in res:
            print(f"\n### Model level, {policy} (speedups vs the fastest float original; vs llama.cpp: its time / "
                  f"ours)\n")
            print("(x: ratio of medians / median of per-round ratios)\n")
            print("| model | variant | prefill ms | prefill tok/s | decode ms/token | weights MiB | prefill x | "
                  "decode x | vs llama.cpp prefill | vs llama.cpp decode |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            nan = float("nan")
            for r in res["model"]:
                vl, vp = r.get("vs_llama_cpp") or {}, r.get("vs_llama_cpp_paired") or {}
                ps = r["paired_speedup"]
                print(f"| {r['model']} | {r['variant']} | {r['prefill_ms']:.1f} | {r['prefill_tokens_per_s']:.1f} | "
                      f"{r['decode_ms_per_token']:.2f} | {r['weights_mib']:.0f} | "
                      f"{r['prefill_speedup']:.2f} / {ps['prefill']:.2f} | {r['decode_speedup']:.2f} / "
                      f"{ps['decode']:.2f} | {vl.get('prefill', nan):.2f} / {vp.get('prefill', nan):.2f} | "
                      f"{vl.get('decode', nan):.2f} / {vp.get('decode', nan):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="linear,model", help="linear, model and/or attention (one decode step's "
                   "attention at cache depths --prompt + 1 and 4 x --prompt: SDPA vs core.attention)")
    p.add_argument("--configs", default="passive:2",
                   help="comma-separated OMP_WAIT_POLICY:torch threads, each run in its own process")
    p.add_argument("--isas", default="auto", help="native code paths of the W4A4 variants: auto (the one this CPU "
                   "gets) and/or avx512, avxvnni, avx2, neon, portable (forced; labelled so)")
    p.add_argument("--originals", default="auto", help="dtypes of the float originals: auto (the compute dtype: bf16 "
                   "only where native), fp32, bf16 (comma-separated)")
    p.add_argument("--models", default="7b", help="7b (LLaMA-2-7B-shaped, --layers layers) and/or smollm2")
    p.add_argument("--tokens", default="1,512", help="per-linear token counts")
    p.add_argument("--repeats", type=int, default=15, help="per-linear rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model_repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped model")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--backends", default="cpu", help="cpu (native kernels) and/or cpu-torch")
    p.add_argument("--quant_configs", default="default", help="model section: FlatQuant configs of the W4A4 "
                   f"variants, comma-separated: {', '.join(QUANT_CONFIGS)} (o_quant: o_proj W4A4 too; lm_head: lm_head int8; "
                   "all: both)")
    p.add_argument("--llama_cpp", default=None, help="a llama.cpp build folder (with bin/llama-bench and "
                   "bin/llama-quantize): also time the same model as GGUF Q4_0")
    p.add_argument("--json", default=None, help="write all numbers (and every run) here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = sorted(set(args.quant_configs.split(",")) - set(QUANT_CONFIGS))
    if unknown:
        p.error(f"--quant_configs {','.join(unknown)}: choose from {', '.join(QUANT_CONFIGS)}")
    if args._child:
        print("@@RESULT@@" + json.dumps(_child(args)))
        return
    configs = []
    for item in args.configs.split(","):
        policy, _, threads = item.partition(":")
        configs.append((policy.strip().upper(), int(threads or 2)))
    results = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
               "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": {}}
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
    results["loadavg_after"] = list(os.getloadavg())
    _print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
