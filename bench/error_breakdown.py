"""Where FlatQuant's W4A4 perplexity loss on SmolLM2 comes from (issue 11: why the best stays above 1.3x FP).

Calibrates FlatQuant-RTN (or loads a finished `flat_matrices.pth` with --flat_matrix_path), then measures perplexity
on the first --windows windows of wiki.test.raw for:
- W4A4 (the quantized model), W4A16 (its activation quantizers off: the weights' share of the loss) and W16A4
  (its weight quantizers off: the activations' share), all with the same trained transforms;
- per decoder layer (on the first --layer_windows windows): the float model with only that layer quantized, and the
  sum of the per-layer log ratios (close to the whole model's when the layers' errors add up).

    python bench/error_breakdown.py                              # 32 x 512 x 5 (the 5-minute budget)
    python bench/error_breakdown.py --flat_matrix_path out/flat_matrices.pth
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.calibrate import calibrate_model  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.data import benchmark_data  # noqa: E402
from core.device import machine_line, machine_summary  # noqa: E402
from core.flat import FlatQuantLinear  # noqa: E402
from core.matrices import load_matrices  # noqa: E402
from core.models import decoder_layers, load_model  # noqa: E402
from core.perplexity import perplexity_from_ids  # noqa: E402
from core.progress import Reporter  # noqa: E402


def without(model: torch.nn.Module, quantizer: str) -> torch.nn.Module:
    """A copy with one kind of quantizer ("act_quantizer" or "weight_quantizer") at 16 bits, i.e. off."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, FlatQuantLinear):
            getattr(m, quantizer).bits = 16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None)
    ap.add_argument("--flat_matrix_path", default=None, help="a finished matrix file instead of calibrating")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--windows", type=int, default=40, help="PPL windows (512 tokens) for the whole-model rows")
    ap.add_argument("--layer_windows", type=int, default=10, help="PPL windows for the per-layer rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model(args.model_path, dtype=torch.float32)
    data = benchmark_data(lm.tokenizer, args.nsamples, args.seqlen)
    ids = data.test_ids
    quant = copy.deepcopy(lm.model)
    t0 = time.monotonic()
    if args.flat_matrix_path:
        load_matrices(args.flat_matrix_path, quant)
        source = args.flat_matrix_path
    else:
        cfg = parse_config()
        cfg.epochs = args.epochs
        calibrate_model(quant, data.samples, cfg, torch.device("cpu"), Reporter(), dtype=None)
        source = f"FlatQuant-RTN {args.nsamples} x {args.seqlen} x {args.epochs} epochs from {data.calib_file.name}"
    print(f"# {lm.name} fp32; {source} ({time.monotonic() - t0:.0f} s); PPL@512 on wiki.test.raw\n# {machine_line()}",
          flush=True)

    def ppl(model, windows):
        return perplexity_from_ids(model, ids, 512, max_windows=windows, dtype=None)

    res = {"source": source, "machine": machine_summary(), "windows": args.windows,
           "layer_windows": args.layer_windows, "ppl": {}, "only_layer": {}}
    fp = res["ppl"]["fp"] = ppl(lm.model, args.windows)
    for name, model in (("w4a4", quant), ("w4a16", without(quant, "act_quantizer")),
                        ("w16a4", without(quant, "weight_quantizer"))):
        value = res["ppl"][name] = ppl(model, args.windows)
        print(f"{name:6s} PPL {value:9.3f}  ({value / fp:.3f}x FP {fp:.3f}, {args.windows} windows)", flush=True)
    fp_l = res["ppl_fp_layer_windows"] = ppl(lm.model, args.layer_windows)
    total = 0.0
    float_layers = decoder_layers(lm.model)
    for i, layer in enumerate(decoder_layers(quant)):
        kept, float_layers[i] = float_layers[i], layer  # the float model with the quantized model's layer i
        try:
            value = res["only_layer"][i] = ppl(lm.model, args.layer_windows)
        finally:
            float_layers[i] = kept
        total += math.log(value / fp_l)
        print(f"only layer {i:2d} quantized: PPL {value:8.3f} ({value / fp_l:.4f}x FP {fp_l:.3f})", flush=True)
    res["sum_log_ratio"] = total
    print(f"sum over layers of log(PPL ratio): {total:.3f} -> {math.exp(total):.3f}x; whole model W4A4 on "
          f"{args.layer_windows} windows: {ppl(quant, args.layer_windows) / fp_l:.3f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
