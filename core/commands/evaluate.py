"""`python -m core evaluate`: perplexity, lm-eval accuracy, latency and generation for a model, or for a model and
its FlatQuant version rebuilt from a saved matrix file (--flat_matrix_path)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..evaluate import REPORT_KEYS, SECTIONS, add_eval_args, eval_options_from_args, evaluate_pair, summary_lines
from ..progress import ProgressEvent, Reporter
from ..validate import undone_unless_measured


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model (and its FlatQuant version): perplexity, lm-eval tasks, latency, generation",
        description="Evaluate a model; with --flat_matrix_path also its FlatQuant W4A4 version, side by side. "
                    "Results go to OUTPUT_DIR/report.json.")
    p.add_argument("--model_path", default=None, help="local model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--flat_matrix_path", default=None,
                   help="flat_matrices.pth from `quantize`: rebuild the quantized model and compare it to the original")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    p.add_argument("--output_dir", default=None, help="where report.json goes (default: outputs/eval_<time>)")
    add_eval_args(p, default_sections=SECTIONS)
    p.set_defaults(func=run)
    return p


def _printer(event: ProgressEvent) -> None:
    # Perplexity emits one event per batch of windows: print every 10th to keep the log readable.
    if event.stage == "ppl" and event.step is not None and event.step % 10:
        return
    print(f"[{event.elapsed_s:7.1f}s] {event.stage}: {event.message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..models import resolve_model_path
    from ..outputs import check_apart, folder_lock
    from . import job_writes

    output_dir = args.output_dir or str(Path("outputs") / time.strftime("eval_%Y%m%d-%H%M%S"))
    inputs = [("--model_path", resolve_model_path(args.model_path)), ("--flat_matrix_path", args.flat_matrix_path),
              ("--ppl_data", args.ppl_data), ("--tasks_data_dir", args.tasks_data_dir)]
    check_apart(output_dir, inputs, written=job_writes(calibrates=False))
    validate_evaluate_args(args, output_dir)
    # one job per output folder; a run that fails before it measured anything leaves no report
    with folder_lock(output_dir), undone_unless_measured(output_dir, REPORT_KEYS):
        return _evaluate(args, output_dir)


def validate_evaluate_args(args: argparse.Namespace, output_dir: str) -> None:
    """What can be checked before a model loads: every evaluation option, device, model folder, matrix file
    (finite, for this model, and not calibrated on the perplexity text), perplexity text, the accuracy tasks and
    their local files, and the output folder."""
    from ..data import check_recorded_disjoint
    from ..device import resolve_device
    from ..evaluate import check_eval_options, eval_options_from_args
    from ..matrices import calibrated_on
    from ..models import check_model_weights, read_model_folder
    from ..outputs import check_output_dir
    from ..validate import check_matrix_file

    options = eval_options_from_args(args, output_dir=output_dir)  # counts, sections, dtypes
    resolve_device(args.device)
    model_dir, model_cfg = read_model_folder(args.model_path)
    check_model_weights(model_dir, model_cfg)
    if args.flat_matrix_path:
        payload = check_matrix_file(args.flat_matrix_path, model_cfg)
        if "ppl" in options.sections:
            check_recorded_disjoint(calibrated_on(payload), args.ppl_data)
    check_eval_options(options, model_cfg)
    check_output_dir(output_dir, 4 * 2**20)


def _evaluate(args: argparse.Namespace, output_dir: str) -> int:
    reporter = Reporter(_printer)
    quant_config = None
    if args.flat_matrix_path:
        from ..pipeline import QuantizeOptions, run_quantize

        reporter.emit("rebuild_quantized", {"file_path": str(args.flat_matrix_path)})
        # skip_ppl: this command measures perplexity itself, at every --ppl_seqlens value.
        result = run_quantize(QuantizeOptions(model_path=args.model_path, load_matrix=True,
                                              flat_matrix_path=args.flat_matrix_path, device=args.device,
                                              output_dir=output_dir, skip_ppl=True),
                              on_event=reporter.callback, cancel=reporter.cancel)
        original, quantized, tokenizer = result.original.model, result.quantized, result.tokenizer
        quant_config = result.config.to_amct_dict()
    else:
        from ..device import resolve_device
        from ..models import load_model, model_identity
        from ..report import update_report

        reporter.emit("load_original", {"model_path": args.model_path or "smollm2"})
        lm = load_model(args.model_path, device=resolve_device(args.device))
        original, quantized, tokenizer = lm.model, None, lm.tokenizer
        update_report(output_dir, {"model": {"name": lm.name, "path": lm.path, **model_identity(lm.model)}})
    options = eval_options_from_args(args, output_dir=output_dir, quant_config=quant_config)
    results = evaluate_pair(original, quantized, tokenizer, options, reporter)
    for line in summary_lines(results):
        print(line)
    print(f"report: {Path(output_dir) / 'report.json'}")
    if quantized is None:
        print("(original model only: pass --flat_matrix_path to compare with its quantized version)")
    return 0


def main(argv=None) -> int:  # `python -m core.commands.evaluate evaluate ...`: the CLI's own (one-line errors)
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
