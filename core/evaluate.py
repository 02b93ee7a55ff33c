"""Evaluation of an original/quantized pair: perplexity, lm-eval accuracy, latency and side-by-side generation.

Used by ``python -m core evaluate``, by ``python -m core quantize --eval ...`` and by the GUI. Each finished section
is merged into ``output_dir/report.json`` at once (a cancelled or failed run keeps what it finished). Schema:

  ppl:        {unit, dataset, tokens, max_windows, dtype, seqlen: 512, original: p, quantized: p, rtn: p (at seqlen),
               <baseline>: p, seqlens: [512, 2048], by_seqlen: {"512": {original, quantized, rtn}, "2048": {...}}}
  accuracy:   {unit: "percent", limit, tasks, metric: {task: "acc_norm"|"acc"}, original: <section>,
               quantized: <section>, <baseline>: <section> (each of EvalOptions.baselines, e.g. rtn, quarot),
               acc: {model: {task: pct, acc_avg}}, delta: {task: quantized - original}}  (<section>: core.accuracy)
  latency:    {units, prompt_tokens, decode_tokens, repeats, original: {...}, quantized: {...}[, quantized_real],
               speedup: {...}}
  generation: {prompt, model_input, chat_template_applied, ..., original: {text, ...}, quantized: {text, ...}}
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .accuracy import DEFAULT_TASKS, AccuracyOptions, check_tasks, evaluate_accuracy, format_acc_line
from .data import check_recorded_disjoint
from .device import COMPUTE_DTYPE_CHOICES, compute_dtype
from .errors import ConfigError, shown
from .generation import GenerationOptions, compare_generation
from .latency import LATENCY_TEXT, latency_input_ids, measure_interleaved, model_device
from .progress import Reporter
from .report import load_report, update_report
from .validate import check_count, check_data_source, check_ppl_seqlens

SECTIONS = ("ppl", "acc", "latency", "gen")
LATENCY_MODELS = ("original", "quantized", "quantized_real")
_SECTION_KEYS = {"ppl": "ppl", "acc": "accuracy", "latency": "latency", "gen": "generation"}
REPORT_KEYS = tuple(_SECTION_KEYS.values())  # report.json's keys of the measured sections
TASK_CONFIG_DIR = "lm_eval_tasks"  # the generated lm-eval task YAMLs, in the output folder


@dataclass
class EvalOptions:
    sections: Sequence[str] = SECTIONS
    output_dir: Optional[str] = None
    # perplexity
    ppl_data: Optional[str] = None  # None = WikiText-2 test from the shared data folder, else the embedded text
    ppl_seqlens: Sequence[int] = (512, 2048)  # 512 = the sample, 2048 = the paper
    ppl_max_windows: Optional[int] = None  # None = the whole text
    ppl_batch_size: int = 4
    ppl_rtn: bool = True  # also the round-to-nearest baseline (same quantizers, no transforms, no clipping)
    # Baselines (names in core.pipeline.BASELINES) compared next to the original and the quantized model in every
    # section that compares models (perplexity and accuracy): a quantize run's --baselines. Built from the
    # original when evaluate_pair is not handed them.
    baselines: Sequence[str] = ()
    quant_config: Optional[dict] = None  # AMCT-style dict for the RTN baseline; None = INT4_FLAT_QUANT_CFG
    # accuracy
    tasks: Sequence[str] = DEFAULT_TASKS
    tasks_data_dir: Optional[str] = None
    limit: Optional[int] = None
    eval_batch_size: int = 8
    # latency
    latency_seqlen: int = 128
    decode_tokens: int = 64
    latency_repeats: int = 3
    latency_real_quant: bool = True  # also time the real-quant (int4) conversion when core.realquant is available
    # Timed copies are cast to this dtype ("bfloat16": the fast path on AVX-512 BF16 CPUs and GPUs/NPUs, and what
    # a deployment runs); None/"none" times the models as loaded.
    latency_dtype: Optional[str] = "auto"  # auto = the compute dtype
    compute_dtype: Optional[str] = None  # auto | bf16 | fp16 | fp32 (core.device.compute_dtype); None = auto
    # generation
    prompt: Optional[str] = None
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        """Every value checked here, before a model loads (the tasks and their files: check_eval_options)."""
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"Unknown --eval section(s) {shown(unknown)}; choose from {', '.join(SECTIONS)}.")
        for seqlen in self.ppl_seqlens:
            check_count("--ppl_seqlens", seqlen, 2)
        check_count("--ppl_max_windows", self.ppl_max_windows, 1, fix="; to skip perplexity leave ppl out of --eval")
        for option, value in (("--limit", self.limit), ("--eval_batch_size", self.eval_batch_size),
                              ("ppl_batch_size", self.ppl_batch_size), ("--latency_seqlen", self.latency_seqlen),
                              ("--decode_tokens", self.decode_tokens), ("--latency_repeats", self.latency_repeats),
                              ("--max_new_tokens", self.max_new_tokens)):
            check_count(option, value, 1)
        compute_dtype("cpu", self.compute_dtype)  # an unknown name is an error before anything runs
        _latency_dtype(self.latency_dtype, torch.device("cpu"), self.compute_dtype)


def check_eval_options(options: EvalOptions, model_cfg: Optional[dict] = None) -> None:
    """What an EvalOptions cannot check on its own, before a model loads: the perplexity text (and, given the
    model's config.json, that some window fits its context) and the accuracy tasks with their local files."""
    if "ppl" in options.sections:
        check_data_source(options.ppl_data, "--ppl_data")
        if model_cfg is not None:
            check_ppl_seqlens(model_cfg, options.ppl_seqlens)
    if "acc" in options.sections:
        check_tasks(options.tasks, options.tasks_data_dir, options.limit)


def build_baseline(name: str, original: nn.Module, quant_config: Optional[dict] = None,
                   num_layers: Optional[int] = None) -> nn.Module:
    """The baseline ``name`` (core.pipeline.BASELINES) of ``original``, quantized with ``quant_config``'s
    quantizers (the first ``num_layers`` decoder layers; all by default)."""
    from .config import parse_config
    from .pipeline import BASELINES

    return BASELINES[name](original, parse_config(quant_config), num_layers).eval().requires_grad_(False)


def build_rtn_model(original: nn.Module, quant_config: Optional[dict] = None,
                    num_layers: Optional[int] = None) -> nn.Module:
    """Round-to-nearest W/A quantization of ``original`` on the FlatQuant code path (shares its weights)."""
    return build_baseline("rtn", original, quant_config, num_layers)


def wrapped_layer_count(model: nn.Module) -> Optional[int]:
    """How many leading decoder layers carry FlatQuant modules (None: all), so the RTN baseline covers the same ones
    as a quick --max_layers run."""
    from .flat import is_wrapped
    from .models import decoder_layers

    layers = decoder_layers(model)
    n = 0
    while n < len(layers) and is_wrapped(layers[n]):
        n += 1
    return None if n == len(layers) else n


def _save(options: EvalOptions, key: str, section: dict) -> None:
    if options.output_dir:
        update_report(options.output_dir, {key: section})


def _models(original: nn.Module, quantized: Optional[nn.Module]) -> dict[str, nn.Module]:
    return {"original": original} if quantized is None else {"original": original, "quantized": quantized}


def evaluate_ppl(models: dict[str, nn.Module], tokenizer, options: EvalOptions, reporter: Reporter) -> dict:
    """Perplexity of every model at every seqlen. The top-level original/quantized/rtn floats (at the first seqlen)
    keep the shape of the quantize pipeline's own "ppl" section; ``by_seqlen`` holds all of them."""
    from .pipeline import ppl_token_ids
    from .perplexity import perplexity_from_ids

    if "quantized" in models and options.output_dir:  # never on the text the run's report says it calibrated on
        calibration = load_report(options.output_dir).get("calibration") or {}
        check_recorded_disjoint(calibration.get("calib_source"), options.ppl_data)
    ids, label = ppl_token_ids(tokenizer, options.ppl_data)
    dtype = compute_dtype(model_device(next(iter(models.values()))), options.compute_dtype)
    seqlens = [int(s) for s in options.ppl_seqlens]
    by_seqlen: dict[str, dict] = {str(s): {} for s in seqlens}

    def section() -> dict:
        return {"unit": "perplexity (exp of the mean next-token NLL over non-overlapping windows; lower is better)",
                "dataset": label, "tokens": int(ids.numel()), "max_windows": options.ppl_max_windows,
                "dtype": str(dtype).replace("torch.", ""), "seqlen": seqlens[0],
                **{name: by_seqlen[str(seqlens[0])].get(name) for name in models},
                "seqlens": seqlens, "by_seqlen": by_seqlen}

    for name, model in models.items():
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        for seqlen in seqlens:
            if max_pos is not None and seqlen > max_pos:
                by_seqlen[str(seqlen)][name] = None  # longer than the model's context: not defined
                continue
            reporter.emit("ppl_start", {"model": name, "seqlen": seqlen})
            value = perplexity_from_ids(model, ids, seqlen=seqlen, batch_size=options.ppl_batch_size,
                                        max_windows=options.ppl_max_windows, reporter=reporter, dtype=dtype,
                                        label=name)
            by_seqlen[str(seqlen)][name] = value
            reporter.emit("ppl_value_seqlen", {"model": name, "seqlen": seqlen, "value": value})
            _save(options, "ppl", section())  # a cancel later in the section keeps the numbers measured so far
    return section()


def evaluate_acc(models: dict[str, nn.Module], tokenizer, options: EvalOptions, reporter: Reporter) -> dict:
    # Keep the generated task YAMLs next to the report: `lm_eval --include_path <them>` reproduces the numbers.
    config_dir = os.path.join(options.output_dir, TASK_CONFIG_DIR) if options.output_dir else None
    acc_opts = AccuracyOptions(tasks=tuple(options.tasks), tasks_data_dir=options.tasks_data_dir, limit=options.limit,
                               batch_size=options.eval_batch_size, task_config_dir=config_dir)
    section: dict = {"unit": "percent", "limit": options.limit, "tasks": list(acc_opts.tasks),
                     "tasks_data_dir": options.tasks_data_dir, "task_config_dir": config_dir,
                     "batch_size": options.eval_batch_size}
    for name, model in models.items():
        section[name] = evaluate_accuracy(model, tokenizer, acc_opts, reporter, label=name)
        section["metric"] = section[name]["metric"]
        section.setdefault("acc", {})[name] = section[name]["acc"]
    if "quantized" in section:
        o, q = section["original"]["acc"], section["quantized"]["acc"]
        section["delta"] = {k: round(q[k] - o[k], 2) for k in o if k in q}
    return section


def _latency_dtype(name: Optional[str], device: torch.device, compute: Optional[str] = None) -> Optional[torch.dtype]:
    if name in (None, "", "none"):
        return None
    if name == "auto":
        return compute_dtype(device, compute)
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"--latency_dtype must be bfloat16, float16, float32 or none, got {name!r}.")
    return dtype


def evaluate_latency(models: dict[str, nn.Module], tokenizer, options: EvalOptions, reporter: Reporter) -> dict:
    dtype = _latency_dtype(options.latency_dtype, model_device(models["original"]), options.compute_dtype)
    timed = {name: _cast_copy(m, dtype) for name, m in models.items()}
    if options.latency_real_quant and "quantized" in models:
        real = _real_quant_copy(models["quantized"])
        if real is not None:
            timed["quantized_real"] = real if dtype is None else real.to(dtype)
    reporter.emit("latency_timing", {"models": list(timed), "repeats": options.latency_repeats})
    ids = latency_input_ids(tokenizer, options.latency_seqlen, text=LATENCY_TEXT)
    results = measure_interleaved(timed, ids, decode_tokens=options.decode_tokens, repeats=options.latency_repeats)
    section = {"units": {"prefill_ms": "ms for one forward of 1 x prompt_tokens", "decode_ms_per_token": "ms",
                         "tokens_per_s": "decode tokens per second", "peak_memory_mb": "MiB (process RSS on cpu, "
                         "max_memory_allocated on cuda/npu)", "weights_mb": "MiB of parameters and buffers"},
               "prompt_tokens": options.latency_seqlen, "decode_tokens": options.decode_tokens,
               "repeats": options.latency_repeats,
               "dtype": str(dtype).replace("torch.", "") if dtype is not None else "as loaded", **results}
    if "quantized_real" in timed:
        from .realquant.convert import model_backend

        section["real_quant_backend"] = model_backend(timed["quantized_real"])
    base = results["original"]
    section["speedup"] = {
        name: {"prefill": base["prefill_ms"] / r["prefill_ms"],
               "decode": (base["decode_ms_per_token"] / r["decode_ms_per_token"]) if r["decode_ms_per_token"] else None,
               "weights_ratio": r["weights_mb"] / base["weights_mb"]}
        for name, r in results.items() if name != "original"}
    return section


def _cast_copy(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    if dtype is None or all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def _real_quant_copy(quantized: nn.Module) -> Optional[nn.Module]:
    """The int4 real-quant version of the fake-quant model, when the real-quant package is installed in core."""
    try:
        from .realquant.convert import convert_model
    except ImportError:
        return None
    return convert_model(copy.deepcopy(quantized), backend="auto")


def evaluate_pair(original: nn.Module, quantized: Optional[nn.Module], tokenizer, options: EvalOptions | None = None,
                  reporter: Reporter | None = None, rtn: Optional[nn.Module] = None,
                  baselines: Optional[dict[str, nn.Module]] = None) -> dict:
    """Run the requested sections on both models (``quantized=None``: the original only) and return
    {ppl, accuracy, latency, generation} (only those asked for); each is also written to the report as it ends.
    ``options.baselines`` join the perplexity and accuracy sections (``baselines`` hands in those already built;
    the others are built from the original and added to it); ``options.ppl_rtn`` adds RTN to perplexity only."""
    options = options or EvalOptions()
    reporter = reporter or Reporter()
    models = _models(original, quantized)
    built = baselines if baselines is not None else {}  # what it builds is added: a caller may keep them
    if rtn is not None and built.get("rtn") is None:
        built["rtn"] = rtn

    def compared(names) -> dict[str, nn.Module]:
        out_models = dict(models)
        for name in names if quantized is not None else ():
            if built.get(name) is None:
                built[name] = build_baseline(name, original, options.quant_config, wrapped_layer_count(quantized))
            out_models[name] = built[name]
        return out_models

    out: dict = {}
    for sec in SECTIONS:  # fixed order: cheap and most-looked-at first
        if sec not in options.sections:
            continue
        reporter.check()
        key = _SECTION_KEYS[sec]
        if sec == "ppl":
            names = list(dict.fromkeys([*options.baselines, *(["rtn"] if options.ppl_rtn else [])]))
            out[key] = evaluate_ppl(compared(names), tokenizer, options, reporter)
        elif sec == "acc":
            out[key] = evaluate_acc(compared(options.baselines), tokenizer, options, reporter)
        elif sec == "latency":
            out[key] = evaluate_latency(models, tokenizer, options, reporter)
        elif sec == "gen":
            out[key] = compare_generation(original, quantized, tokenizer, GenerationOptions(
                prompt=options.prompt, max_new_tokens=options.max_new_tokens), reporter)
        _save(options, key, out[key])
    reporter.emit("eval_done")
    return out


def summary_lines(results: dict) -> list[str]:
    """Human-readable lines for the CLI: the sample's ACC lines, perplexities and latency."""
    lines = []
    acc = results.get("accuracy")
    if acc:
        for name in acc.get("acc") or {}:  # original, quantized, then each baseline
            lines.append(f"[{name}]")
            lines.append(format_acc_line(acc[name]["acc"]))
    ppl = results.get("ppl")
    if ppl:
        for name in next(iter(ppl["by_seqlen"].values()), {}):
                vals = ", ".join(f"seqlen {s}: {row[name]:.3f}" if row.get(name) is not None else f"seqlen {s}: n/a"
                                 for s, row in ppl["by_seqlen"].items())
                lines.append(f"PPL {name} ({ppl['dataset']}): {vals}")
    lat = results.get("latency")
    if lat:
        for name in LATENCY_MODELS:
            r = lat.get(name)
            if r is not None:
                lines.append(f"Latency {name}: prefill {r['prefill_ms']:.1f} ms ({lat['prompt_tokens']} tokens), "
                             f"decode {r['decode_ms_per_token']:.1f} ms/token ({r['tokens_per_s']:.1f} tokens/s), "
                             f"peak {r['peak_memory_mb']:.0f} MiB, weights {r['weights_mb']:.0f} MiB")
    gen = results.get("generation")
    if gen:
        for name in ("original", "quantized"):
            if name in gen:
                lines.append(f"Generation {name} ({gen[name]['tokens_per_s']:.1f} tokens/s): {gen[name]['text']!r}")
    return lines


# --- argparse -----------------------------------------------------------------------------------------------------


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    # The quantize command may already own a flag (e.g. --ppl_data): then it is shared, not added twice.
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def _task_list(value: str) -> list[str]:
    return [t for t in value.replace(" ", ",").split(",") if t]


def _flatten_tasks(value) -> tuple[str, ...]:
    if not value:
        return DEFAULT_TASKS
    out: list[str] = []
    for item in value:
        out.extend(_task_list(item) if isinstance(item, str) else item)
    return tuple(out)


def add_eval_args(parser: argparse.ArgumentParser, default_sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The evaluation options shared by `evaluate` and `quantize`. ``--eval`` alone runs every section."""
    group = parser.add_argument_group("evaluation")
    # default None = "not given" (then default_sections); "--eval" with no value = [] = every section.
    _add(group, "--eval", nargs="*", choices=SECTIONS, default=None, metavar="SECTION",
         help=f"evaluations to run: {' '.join(SECTIONS)} (no value: all; default: "
              f"{' '.join(default_sections) or 'none'})")
    parser.set_defaults(eval_default_sections=list(default_sections))
    _add(group, "--tasks", type=_task_list, nargs="+", default=[list(DEFAULT_TASKS)],
         help="lm-eval task names, comma- or space-separated (default: " + ",".join(DEFAULT_TASKS) + ")")
    _add(group, "--tasks_data_dir", default=None,
         help="folder of local HF-schema task files (e.g. ../shared/data/eval) for offline lm-eval")
    _add(group, "--limit", type=int, default=None, help="lm-eval: first N documents per task")
    _add(group, "--eval_batch_size", type=int, default=8, help="lm-eval batch size")
    _add(group, "--ppl_data", default=None, help="perplexity text: WikiText-2 raw file/folder or any text file")
    _add(group, "--ppl_seqlens", type=int, nargs="+", default=[512, 2048], help="perplexity window lengths")
    _add(group, "--ppl_max_windows", type=int, default=None,
         help="perplexity: at most N windows per seqlen (N >= 1; leave ppl out of --eval to skip it)")
    _add(group, "--no_rtn", action="store_true", help="skip the round-to-nearest perplexity baseline")
    _add(group, "--latency_seqlen", type=int, default=128, help="prompt tokens for the prefill timing")
    _add(group, "--decode_tokens", type=int, default=64, help="decode steps for the decode timing")
    _add(group, "--latency_repeats", type=int, default=3, help="timed rounds (median kept)")
    _add(group, "--latency_dtype", default="auto", help="dtype of the timed copies: auto (the compute dtype) | "
         "bfloat16 | float16 | float32 | none (as loaded)")
    _add(group, "--compute_dtype", default=None, choices=COMPUTE_DTYPE_CHOICES,
         help="matmul dtype of calibration and evaluation (default auto: bf16 where native, i.e. AVX512-BF16/AMX "
              "CPUs and accelerators, else fp32)")
    _add(group, "--prompt", default=None, help="generation prompt (default: the sample's AMCT prompt)")
    _add(group, "--max_new_tokens", type=int, default=64, help="generation length")
    return parser


def eval_options_from_args(args: argparse.Namespace, output_dir: Optional[str] = None,
                           quant_config: Optional[dict] = None) -> EvalOptions:
    sections = getattr(args, "eval", None)
    if sections is None:
        sections = getattr(args, "eval_default_sections", [])
    elif len(sections) == 0:
        sections = list(SECTIONS)
    return EvalOptions(
        sections=tuple(sections),
        output_dir=output_dir if output_dir is not None else getattr(args, "output_dir", None),
        ppl_data=getattr(args, "ppl_data", None),
        ppl_seqlens=tuple(getattr(args, "ppl_seqlens", (512, 2048))),
        ppl_max_windows=getattr(args, "ppl_max_windows", None),
        ppl_rtn=not getattr(args, "no_rtn", False),
        quant_config=quant_config,
        tasks=_flatten_tasks(getattr(args, "tasks", None)),
        tasks_data_dir=getattr(args, "tasks_data_dir", None),
        limit=getattr(args, "limit", None),
        eval_batch_size=getattr(args, "eval_batch_size", 8),
        latency_seqlen=getattr(args, "latency_seqlen", 128),
        decode_tokens=getattr(args, "decode_tokens", 64),
        latency_repeats=getattr(args, "latency_repeats", 3),
        latency_dtype=getattr(args, "latency_dtype", "auto"),
        compute_dtype=getattr(args, "compute_dtype", None),
        prompt=getattr(args, "prompt", None),
        max_new_tokens=getattr(args, "max_new_tokens", 64),
    )
