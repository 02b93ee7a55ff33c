"""`python -m core quantize`: calibrate FlatQuant W4A4 (or load matrices), report PPL vs original and RTN."""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..progress import ProgressEvent


def register(subparsers) -> argparse.ArgumentParser:
    from ..options import add_arguments
    from ..pipeline import QuantizeOptions

    p = subparsers.add_parser("quantize", help="calibrate FlatQuant W4A4 and report perplexity",
                              description="Calibrate FlatQuant W4A4 on a model (or load saved matrices), write "
                                          "OUTPUT_DIR/flat_matrices.pth, report.json and quantize.log.")
    add_arguments(p, QuantizeOptions)  # every QuantizeOptions field that is not internal (core/options.py)
    # what the command does after the job (not options of the job itself)
    p.add_argument("--no_time_diff", dest="time_diff", action="store_false",
                   help="skip timing one forward of the original vs the real int4 model")
    p.add_argument("--export", choices=("native", "ascend"), default=None,
                   help="also write OUTPUT_DIR/checkpoint (native int4) or OUTPUT_DIR/ascend (vllm-ascend layout)")
    from ..evaluate import add_eval_args

    add_eval_args(p)  # --eval [sections], --tasks, --tasks_data_dir, --limit, --ppl_data, ...
    p.set_defaults(func=run)
    return p


class _TqdmProgress:
    """Calibration steps as one tqdm bar; other stages as log lines."""

    def __init__(self):
        self.bar = None

    def __call__(self, e: ProgressEvent) -> None:
        if e.stage == "calibrate" and e.step is not None:  # a training step (GPTQ's per-layer event has none)
            total = (e.num_layers or 1) * (e.epochs or 1) * (e.steps or 1)
            if self.bar is None:
                self.bar = tqdm(total=total, desc="calibrate", unit="step", file=sys.stderr, dynamic_ncols=True)
            self.bar.set_postfix_str(" ".join(self._fields(e)))
            self.bar.update(1)
        elif e.stage == "ppl" and e.step is not None:
            return
        else:
            (self.bar.write if self.bar else print)(f"[{e.elapsed_s:7.1f}s] {e.stage}: {e.message}",
                                                    file=sys.stderr)

    @staticmethod
    def _fields(e: ProgressEvent):
        """What the event carries: a GPTQ or RTN layer has no epoch or loss, an algorithm may report neither."""
        if e.layer is not None:
            yield f"layer {e.layer + 1}/{e.num_layers}"
        if e.epoch is not None:
            yield f"ep {e.epoch + 1}"
        if e.loss is not None:
            yield f"loss {e.loss:.4g}"
        if e.rss_mb:
            yield f"rss {e.rss_mb / 1024:.2f}G"

    def close(self):
        if self.bar is not None:
            self.bar.close()


def default_output_dir(model_path) -> str:
    name = "smollm2" if model_path in (None, "smollm2") else model_path.rstrip("/").split("/")[-1]
    return f"outputs/{name}"


def quantize_options_from_args(args: argparse.Namespace):
    """The QuantizeOptions a parsed `quantize` command line stands for (the CLI quantizes in place by default:
    keep_original's CLI default is False; the original is re-read from disk for the time diff and --eval)."""
    from ..options import from_args
    from ..pipeline import QuantizeOptions

    return from_args(QuantizeOptions, args, output_dir=args.output_dir or default_output_dir(args.model_path))


EXPORT_FOLDERS = {"native": "checkpoint", "ascend": "ascend"}  # --export's folder inside OUTPUT_DIR


def check_outputs(args: argparse.Namespace, opts) -> None:
    """Before anything is written: no file the job writes in OUTPUT_DIR, nor the --export folder it replaces, is
    (or holds) one of its inputs."""
    from ..outputs import check_apart
    from . import job_writes

    inputs = opts.inputs(getattr(args, "tasks_data_dir", None))
    check_apart(opts.output_dir, inputs, written=job_writes(calibrates=not opts.load_matrix))
    if args.export:
        folder = Path(opts.output_dir) / EXPORT_FOLDERS[args.export]
        check_apart(folder, inputs, option=f"--export {args.export}'s folder")


def run(args: argparse.Namespace) -> int:
    from ..evaluate import check_eval_options, eval_options_from_args
    from ..outputs import folder_lock, is_other_rank

    opts = quantize_options_from_args(args)
    opts.check()  # the job's own options first: their messages name its flags (e.g. --no_ppl)
    eval_opts = eval_options_from_args(args, output_dir=opts.output_dir)
    if eval_opts.sections:  # --eval's options, before a load
        from ..models import read_model_folder

        check_eval_options(eval_opts, read_model_folder(opts.model_path)[1])
    check_outputs(args, opts)
    # one job per output folder; rank 0 of a distributed job holds the lock for every rank
    with nullcontext() if opts.distributed and is_other_rank() else folder_lock(opts.output_dir):
        return _run(args, opts)


def _run(args: argparse.Namespace, opts) -> int:
    from ..pipeline import run_quantize

    output_dir = opts.output_dir
    if args.export == "ascend":
        from ..realquant.ascend import prepare_quantize

        prepare_quantize(opts)  # W4A4 only; a skip_layers entry splitting q/k/v or gate/up is widened to the group
    progress = _TqdmProgress()
    try:
        result = run_quantize(opts, on_event=progress)
    finally:
        progress.close()
    if result.quantized is None:  # a distributed rank other than 0: rank 0 reports
        return 0
    report = result.report
    original = result.original.model
    eval_wanted = bool(getattr(args, "eval", None) is not None or getattr(args, "eval_default_sections", None))
    if original is None and eval_wanted:
        from ..models import load_model

        original = load_model(args.model_path, dtype=args.dtype).model  # lazily re-read, after the job
    ppl = report.get("ppl")
    if ppl:
        print(f"PPL score (original): {ppl['original']:.4f}")
        for name in opts.baseline_names():
            if ppl.get(name) is not None:
                print(f"PPL score ({name}): {ppl[name]:.4f}")
        print(f"PPL score: {ppl['quantized']:.4f}")
    if args.time_diff:  # part by part; the original's parts from its checkpoint when it was quantized in place
        from ..models import resolve_model_path
        from ..realquant.timing import OriginalParts, report_time_diff

        parts = OriginalParts(result.quantized, original=original,
                              folder=None if original is not None else resolve_model_path(args.model_path))
        td = report_time_diff(parts, result.quantized, result.tokenizer, output_dir)
        print(f"Time diff orig: {td['time_orig_ms']:.2f}")
        print(f"Time diff after real quant: {td['time_real_quant_ms']:.2f}")
    from ..evaluate import eval_options_from_args, evaluate_pair, summary_lines

    eval_opts = eval_options_from_args(args, output_dir=output_dir, quant_config=report.get("config"))
    # the run's baselines (--baselines, none with --no_rtn) sit next to the original and the quantized model in
    # every evaluated section, perplexity and accuracy alike
    eval_opts = replace(eval_opts, ppl_rtn=False, baselines=tuple(opts.baselines_to_run()))
    if eval_opts.sections:
        from ..progress import Reporter

        results = evaluate_pair(original, result.quantized, result.tokenizer, eval_opts,
                                Reporter(progress), baselines=result.extras.get("baselines"))
        for line in summary_lines(results):
            print(line)
    if args.export:
        from ..realquant.ascend import export_quantized

        folder = result.output_dir / EXPORT_FOLDERS[args.export]
        info = export_quantized(result.quantized, result.config, result.tokenizer, result.original.path, folder,
                                args.export)
        print(f"Exported ({args.export}): {info['output_dir']}")
    if args.load_matrix:
        print(f"Loaded {result.matrix_path}; saved {result.output_dir / 'report.json'}")
    else:
        print(f"Saved {result.matrix_path} and {result.output_dir / 'report.json'}")
    print("All done!")
    return 0
