"""Algorithms side by side on SmolLM2 (fp32, CPU): FP, RTN W4A4, QuaRot-RTN W4A4 and QuaRot-GPTQ W4A4 perplexity at
--ppl_seqlen on WikiText-2 test (wiki.test.raw), calibrating (GPTQ only; RTN and QuaRot-RTN need no data) on
WikiText-2 validation (wiki.valid.tokens), which is disjoint from it.

It stands outside the layer-wise pipeline on purpose: its GPTQ is the classic sequential one (each layer's Hessians
from the previous layers' quantized outputs), while the pipeline's (`bench/quality.py`, which has every algorithm
side by side) takes each layer's full-precision inputs, so layers stay independent (resume, torchrun ranges).

    python bench/algorithms.py                          # whole test file (slow on 2 vCPUs)
    python bench/algorithms.py --ppl_max_windows 40     # first 40 windows
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
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.adapters import adapter_for  # noqa: E402
from core.algorithms.quarot import QuaRotConfig, apply_quarot  # noqa: E402
from core.calibrate import capture_layer_inputs, run_layer  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.data import benchmark_data  # noqa: E402
from core.algorithms import apply_flat_structure  # noqa: E402
from core.flat import fold_model, set_quant_enabled  # noqa: E402
from core.gptq import GPTQConfig, gptq_layer  # noqa: E402
from core.models import load_model  # noqa: E402
from core.perplexity import perplexity_from_ids  # noqa: E402

METHODS = ("fp", "rtn", "quarot-rtn", "quarot-gptq")


@torch.no_grad()
def gptq_sequential(model: torch.nn.Module, samples: torch.Tensor, cfg: GPTQConfig) -> dict:
    """Layer by layer: Hessians from the layer's float inputs (quantization off inside the layer), GPTQ on its
    folded linears, then its quantized outputs feed the next layer (as the deployed model computes)."""
    ad = adapter_for(model)
    inps, kwargs = capture_layer_inputs(model, samples, torch.device("cpu"))
    losses = {}
    for i, layer in enumerate(ad.decoder_layers(model)):
        def run(layer=layer):
            for s in range(inps.shape[0]):
                run_layer(layer, inps[s:s + 1], kwargs)
        set_quant_enabled(layer, False)
        losses[i] = gptq_layer(layer, run, ad.linears(), cfg)
        set_quant_enabled(layer, True)
        inps = torch.cat([run_layer(layer, inps[s:s + 1], kwargs) for s in range(inps.shape[0])])
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl_seqlen", type=int, default=512)
    ap.add_argument("--ppl_max_windows", type=int, default=None)
    ap.add_argument("--act_order", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="QuaRot rotation seed")
    ap.add_argument("--no_clip", action="store_true", help="QuaRot without its weight-clip search and 0.9 activation clip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"error: unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")

    lm = load_model()
    data = benchmark_data(lm.tokenizer, args.nsamples, args.seqlen)
    test_file, calib_file, test_ids, samples = data.test_file, data.calib_file, data.test_ids, data.samples
    windows = test_ids.numel() // args.ppl_seqlen
    if args.ppl_max_windows:
        windows = min(windows, args.ppl_max_windows)
    print(f"# {lm.name} fp32: PPL@{args.ppl_seqlen} on {windows} windows of {test_file.name} "
          f"({test_ids.numel()} tokens); GPTQ calibration {args.nsamples} x {args.seqlen} from {calib_file.name}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    cfg = parse_config()

    def ppl(model):
        return perplexity_from_ids(model, test_ids, args.ppl_seqlen, max_windows=windows, dtype=None)

    results = {"setup": vars(args), "windows": windows, "ppl": {}, "calibration_seconds": {}}
    for method in methods:
        t0 = time.monotonic()
        calib_s = 0.0
        if method == "fp":
            model = lm.model
        else:
            model = copy.deepcopy(lm.model)
            if method == "rtn":
                apply_flat_structure(model, cfg, use_transforms=False)
            else:
                qcfg = QuaRotConfig(seed=args.seed)
                if args.no_clip:
                    qcfg.w_clip, qcfg.a_clip = False, None
                apply_quarot(model, cfg, qcfg)
            fold_model(model)
            if method.endswith("gptq"):
                gptq_sequential(model, samples, GPTQConfig(act_order=args.act_order))
                calib_s = time.monotonic() - t0
        value = ppl(model)
        results["ppl"][method] = value
        results["calibration_seconds"][method] = round(calib_s, 1)
        print(f"{method:12s} PPL {value:10.3f}   calibration {calib_s:6.1f}s   total {time.monotonic() - t0:6.1f}s",
              flush=True)
        del model
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
