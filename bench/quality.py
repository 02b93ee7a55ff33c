"""W4A4 quality of the algorithms side by side on SmolLM2 (issue 11, acceptance 1): FP, RTN, QuaRot-RTN, QuaRot-GPTQ,
FlatQuant-RTN and FlatQuant-GPTQ perplexity in one run, each with its calibration seconds, through the project's
layer-wise loop (core.calibrate.calibrate_model with --algorithm / --weight_rounding).

Calibration reads WikiText-2 validation (wiki.valid.tokens), perplexity the whole WikiText-2 test (wiki.test.raw) at
--ppl_seqlen; the two are checked to be different files (core.data.check_disjoint). Everything runs in fp32 (storage
and compute dtype). An X-GPTQ row reuses the X-RTN row's layer states when that row ran in the same invocation (the
transforms/rotation are the same; only the rounding is added), and its seconds are X-RTN's plus the GPTQ pass
(not with --calib_inputs quant, where each layer trains on the outputs of the layers before it as rounded).

    python bench/quality.py                                  # 32 x 512 x 5 epochs (the 5-minute budget), all rows
    python bench/quality.py --use_o_quant --lac              # all seven linears W4A4 + LAC (the reference's runs)
    python bench/quality.py --use_o_quant --lac --quantize_lm_head  # ... and lm_head int8 (every linear quantized)
    python bench/quality.py --methods fp,flatquant-rtn,flatquant-gptq --ppl_max_windows 40
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.calibrate import CALIB_INPUTS, calibrate_model  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.device import machine_line, machine_summary, resolve_device  # noqa: E402
from core.data import benchmark_data  # noqa: E402
from core.gptq import GPTQConfig  # noqa: E402
from core.models import load_model  # noqa: E402
from core.perplexity import perplexity_from_ids  # noqa: E402
from core.pipeline import peak_rss_mb, rtn_model  # noqa: E402
from core.progress import Reporter  # noqa: E402

def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return str(device)


METHODS = ("fp", "rtn", "quarot-rtn", "quarot-gptq", "flatquant-rtn", "flatquant-gptq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cali_bsz", type=int, default=4)
    ap.add_argument("--flat_lr", type=float, default=5e-3)
    ap.add_argument("--use_o_quant", action="store_true",
                    help="all seven linears W4A4 (the reference code's default); default: o_proj FP (AMCT default)")
    ap.add_argument("--lac", action="store_true", help="learnable activation clipping (the reference code's runs "
                    "use it with all seven linears W4A4)")
    ap.add_argument("--quantize_lm_head", action="store_true", help="lm_head out of skip_layers: int8 weights and "
                    "activations (core.flat.wrap_lm_head), in every quantized row")
    ap.add_argument("--calib_inputs", default="fp", choices=CALIB_INPUTS,
                    help="what each layer trains on: the full-precision model's inputs (the reference) or the "
                         "quantized layers' outputs so far (targets stay full precision)")
    ap.add_argument("--act_order", action="store_true", help="GPTQ quantizes columns in order of decreasing "
                    "Hessian diagonal")
    ap.add_argument("--ppl_seqlen", type=int, default=512)
    ap.add_argument("--ppl_max_windows", type=int, default=None, help="first N windows only (quick looks)")
    ap.add_argument("--device", default="cpu", help="where calibration and perplexity run: cpu | cuda | npu | auto")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    device = resolve_device(args.device)
    lm = load_model(args.model_path, dtype=torch.float32)
    data = benchmark_data(lm.tokenizer, args.nsamples, args.seqlen)
    test_file, calib_file, test_ids, samples = data.test_file, data.calib_file, data.test_ids, data.samples
    windows = test_ids.numel() // args.ppl_seqlen
    if args.ppl_max_windows:
        windows = min(windows, args.ppl_max_windows)
    cfg = parse_config()
    cfg.epochs, cfg.cali_bsz, cfg.flat_lr = args.epochs, args.cali_bsz, args.flat_lr
    cfg.use_o_quant, cfg.lac = args.use_o_quant, args.lac
    if args.quantize_lm_head:
        cfg.skip_layers = []
    print(f"# {lm.name} fp32 (storage and compute): PPL@{args.ppl_seqlen} on {windows} windows of {test_file.name} "
          f"({test_ids.numel()} tokens); calibration {args.nsamples} x {args.seqlen} x {args.epochs} epochs from "
          f"{calib_file.name}; o_proj {'W4A4' if args.use_o_quant else 'FP'}; lm_head "
          f"{'W8A8' if args.quantize_lm_head else 'FP'}; LAC {'on' if args.lac else 'off'}; "
          f"training inputs {args.calib_inputs}; GPTQ act_order {'on' if args.act_order else 'off'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device_label(device)}\n"
          f"# {machine_line()}", flush=True)

    def ppl(model) -> float:
        model.to(device)  # SmolLM2 fits any device whole; the models share no tensors with a moved one afterwards
        try:
            return perplexity_from_ids(model, test_ids, args.ppl_seqlen, max_windows=windows, dtype=None)
        finally:
            model.to("cpu")

    results = {"setup": vars(args), "device": device_label(device), "machine": machine_summary(), "windows": windows,
               "ppl": {}, "calibration_seconds": {}}
    states: dict[str, tuple[dict, float]] = {}  # X-rtn's layer states and seconds, reused by X-gptq
    def row(method: str) -> None:
        t0 = time.monotonic()
        seconds = 0.0
        if method == "fp":
            model = lm.model
        elif method == "rtn":
            model = rtn_model(lm.model, cfg, None)
        else:
            algorithm, rounding = method.split("-")
            model = copy.deepcopy(lm.model)
            # with --calib_inputs quant a layer's training inputs depend on the rounding of the layers before it
            reuse = rounding == "gptq" and args.calib_inputs == "fp"
            done, before = states.get(algorithm, ({}, 0.0)) if reuse else ({}, 0.0)
            layer_states: dict[int, dict] = {}
            calibrate_model(model, samples, cfg, device, Reporter(), dtype=None, algorithm=algorithm,
                            weight_rounding=rounding, done_states=done, calib_inputs=args.calib_inputs,
                            gptq=GPTQConfig(act_order=args.act_order),
                            on_layer_done=lambda i, s, _r: layer_states.__setitem__(i, s))
            seconds = before + time.monotonic() - t0
            if rounding == "rtn":
                states[algorithm] = (layer_states, seconds)
        value = ppl(model)
        results["ppl"][method] = value
        results["calibration_seconds"][method] = round(seconds, 1)
        ratio = value / results["ppl"]["fp"] if "fp" in results["ppl"] else float("nan")
        print(f"{method:15s} PPL {value:10.3f}  ({ratio:5.2f}x FP)  calibration {seconds:7.1f}s  "
              f"total {time.monotonic() - t0:7.1f}s  peak RSS {peak_rss_mb():.0f} MB", flush=True)

    for method in methods:  # one failing row (say, a backend missing on this device) does not lose the others
        try:
            row(method)
        except Exception as exc:  # noqa: BLE001 - reported in the output and the JSON, then the next row
            traceback.print_exc()
            results.setdefault("errors", {})[method] = repr(exc)
            print(f"{method:15s} FAILED: {exc!r}", flush=True)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
