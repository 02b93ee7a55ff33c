"""`python -m core quantize`: calibrate FlatQuant W4A4 (or load matrices), report PPL vs original and RTN."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ..progress import ProgressEvent


def _bool_flag(parser, name: str, help_on: str) -> None:
    parser.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help_on)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="calibrate FlatQuant W4A4 and report perplexity",
                              description="Calibrate FlatQuant W4A4 on a model (or load saved matrices), write "
                                          "OUTPUT_DIR/flat_matrices.pth, report.json and quantize.log.")
    p.add_argument("--model_path", default=None, help="local model folder, or 'smollm2' (default) for the embedded "
                                                      "SmolLM2-135M-Instruct")
    p.add_argument("--load_matrix", action="store_true", help="load --flat_matrix_path instead of calibrating")
    p.add_argument("--flat_matrix_path", default=None, help="flat_matrices.pth to load")
    p.add_argument("--config", dest="config_file", default=None, help="JSON/YAML config shaped like "
                                                                      "INT4_FLAT_QUANT_CFG")
    p.add_argument("--skip_layers", default=None, help="comma-separated names or name parts kept in full precision "
                                                       "(substring match), e.g. lm_head,layers.0.mlp.down_proj")
    p.add_argument("--no_down_quant", dest="use_down_quant", action="store_false", default=None,
                   help="keep down_proj in full precision (for models sensitive to it)")
    _bool_flag(p, "use_o_quant", "fake-quantize o_proj inputs (off by default)")
    _bool_flag(p, "use_kcache_quant", "fake-quantize the k cache (k_bits, default 4)")
    _bool_flag(p, "use_vcache_quant", "fake-quantize the v cache (v_bits, default 4)")
    p.add_argument("--calib_data", default=None, help="calibration text: WikiText-2 raw file/folder, .txt, a datasets "
                                                      "folder, or name[:config] in the local HF cache (default: "
                                                      "Python's bundled documentation text)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=None, help="default: the config's (15)")
    p.add_argument("--cali_bsz", type=int, default=None, help="default: the config's (4)")
    p.add_argument("--flat_lr", type=float, default=None, help="default: the config's (5e-3)")
    p.add_argument("--max_layers", type=int, default=None, help="calibrate only the first N decoder layers")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    p.add_argument("--ppl_seqlen", type=int, default=512)
    p.add_argument("--no_ppl", dest="skip_ppl", action="store_true", help="skip the perplexity comparison")
    p.add_argument("--no_resume", dest="resume", action="store_false", help="ignore a resume checkpoint")
    p.add_argument("--no_time_diff", dest="time_diff", action="store_false",
                   help="skip timing one forward of the original vs the real int4 model")
    p.add_argument("--seed", type=int, default=0)
    scale = p.add_argument_group("memory and scale")
    scale.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                       help="storage dtype of the loaded model (auto: the checkpoint's torch_dtype); the layer being "
                            "calibrated is upcast to fp32 on the device")
    scale.add_argument("--activation_dir", default=None,
                       help="keep the calibration set's captured activations in files in this folder, not in RAM")
    scale.add_argument("--keep_original", dest="keep_original", action="store_true", default=None,
                       help="keep a float copy of the original for comparisons (default: only when it fits)")
    scale.add_argument("--no_keep_original", dest="keep_original", action="store_false",
                       help="quantize in place; the original and RTN are evaluated first")
    scale.add_argument("--no_memory_check", dest="check_memory", action="store_false",
                       help="start even when the memory estimate says the job will not fit")
    scale.add_argument("--algorithm", default="flatquant", help="layer-wise algorithm: flatquant | rtn | quarot")
    scale.add_argument("--weight_rounding", default="rtn", choices=("rtn", "gptq"),
                       help="rounding of the quantized weights after each layer is folded: rtn (the quantizer's) or "
                            "gptq (on the Hessians of the transformed calibration inputs), under any --algorithm")
    p.add_argument("--baselines", default="rtn",
                   help="comma-separated baselines whose perplexity the report also gives: rtn, quarot "
                        "(default rtn; --no_rtn skips them all)")
    scale.add_argument("--distributed", action="store_true",
                       help="layer-parallel calibration over torchrun ranks (torchrun --nproc_per_node N -m core "
                            "quantize ... --distributed); rank 0 writes the files")
    p.add_argument("--output_dir", default=None, help="default: ./outputs/<model name>")
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
        if e.stage == "calibrate":
            total = (e.num_layers or 1) * (e.epochs or 1) * (e.steps or 1)
            if self.bar is None:
                self.bar = tqdm(total=total, desc="calibrate", unit="step", file=sys.stderr, dynamic_ncols=True)
            rss = f" rss {e.rss_mb / 1024:.2f}G" if e.rss_mb else ""
            self.bar.set_postfix_str(f"layer {e.layer + 1}/{e.num_layers} ep {e.epoch + 1} loss {e.loss:.4g}{rss}")
            self.bar.update(1)
        elif e.stage == "ppl" and e.step is not None:
            return
        else:
            (self.bar.write if self.bar else print)(f"[{e.elapsed_s:7.1f}s] {e.stage}: {e.message}",
                                                    file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from ..pipeline import QuantizeOptions, run_quantize

    name = "smollm2" if args.model_path in (None, "smollm2") else args.model_path.rstrip("/").split("/")[-1]
    output_dir = args.output_dir or f"outputs/{name}"
    opts = QuantizeOptions(
        model_path=args.model_path, config_file=args.config_file, skip_layers=args.skip_layers,
        use_down_quant=args.use_down_quant, use_o_quant=args.use_o_quant, use_kcache_quant=args.use_kcache_quant,
        use_vcache_quant=args.use_vcache_quant, load_matrix=args.load_matrix, flat_matrix_path=args.flat_matrix_path,
        calib_data=args.calib_data, nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs,
        cali_bsz=args.cali_bsz, flat_lr=args.flat_lr, device=args.device, ppl_data=args.ppl_data,
        ppl_seqlen=args.ppl_seqlen, ppl_max_windows=args.ppl_max_windows, skip_ppl=args.skip_ppl,
        skip_rtn=args.no_rtn, output_dir=output_dir, max_layers=args.max_layers, seed=args.seed, resume=args.resume,
        compute_dtype=args.compute_dtype,
        # the CLI quantizes in place by default (the original is re-read from disk for the time diff / --eval)
        dtype=args.dtype, activation_dir=args.activation_dir,
        keep_original=False if args.keep_original is None else args.keep_original,
        check_memory=args.check_memory, algorithm=args.algorithm, distributed=args.distributed,
        weight_rounding=args.weight_rounding, baselines=args.baselines)
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
    if original is None and (args.time_diff or eval_wanted):
        from ..models import load_model

        original = load_model(args.model_path, dtype=args.dtype).model  # lazily re-read, after the job
    ppl = report.get("ppl")
    if ppl:
        print(f"PPL score (original): {ppl['original']:.4f}")
        for name in opts.baseline_names():
            if ppl.get(name) is not None:
                print(f"PPL score ({name}): {ppl[name]:.4f}")
        print(f"PPL score: {ppl['quantized']:.4f}")
    if args.time_diff:
        from ..realquant.convert import report_time_diff

        td = report_time_diff(original, result.quantized, result.tokenizer, output_dir)
        print(f"Time diff orig: {td['time_orig_ms']:.2f}")
        print(f"Time diff after real quant: {td['time_real_quant_ms']:.2f}")
    from ..evaluate import eval_options_from_args, evaluate_pair, summary_lines

    eval_opts = eval_options_from_args(args, output_dir=output_dir, quant_config=report.get("config"))
    if eval_opts.sections:
        from ..progress import Reporter

        results = evaluate_pair(original, result.quantized, result.tokenizer, eval_opts,
                                Reporter(progress), rtn=result.rtn)
        for line in summary_lines(results):
            print(line)
    if args.export:
        from ..realquant.ascend import export_quantized

        folder = result.output_dir / ("ascend" if args.export == "ascend" else "checkpoint")
        info = export_quantized(result.quantized, result.config, result.tokenizer, result.original.path, folder,
                                args.export)
        print(f"Exported ({args.export}): {info['output_dir']}")
    if args.load_matrix:
        print(f"Loaded {result.matrix_path}; saved {result.output_dir / 'report.json'}")
    else:
        print(f"Saved {result.matrix_path} and {result.output_dir / 'report.json'}")
    print("All done!")
    return 0
