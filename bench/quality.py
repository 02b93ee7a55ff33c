"""FlatQuant W4A4 quality on SmolLM2 with real WikiText-2: calibrate on the first half of the test split's tokens,
perplexity at --ppl_seqlen on the second half. Prints original, RTN W4A4 and FlatQuant W4A4 PPL, calibration wall
time and peak RSS, for use_down_quant on and/or off.

    python bench/quality.py --nsamples 32 --seqlen 512 --epochs 5
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.calibrate import calibrate_model  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.data import load_text, sample_windows, tokenize, wikitext_test_path  # noqa: E402
from core.matrices import build_payload, save_matrices  # noqa: E402
from core.models import load_model  # noqa: E402
from core.perplexity import perplexity_from_ids  # noqa: E402
from core.pipeline import peak_rss_mb, rtn_model  # noqa: E402
from core.progress import Reporter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cali_bsz", type=int, default=4)
    ap.add_argument("--flat_lr", type=float, default=5e-3)
    ap.add_argument("--down", choices=("on", "off", "both"), default="both")
    ap.add_argument("--ppl_seqlen", type=int, default=512)
    ap.add_argument("--ppl_max_windows", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--timing_only", action="store_true", help="calibrate only (wall time, RSS); no perplexity")
    ap.add_argument("--save_dir", default=None, help="also save each run's flat_matrices_down_<on|off>.pth here")
    args = ap.parse_args()

    wiki = wikitext_test_path()
    if wiki is None:
        raise SystemExit("needs ../shared/data/wikitext-2-raw/wiki.test.raw (or FLATQUANT_DATA_DIR)")
    lm = load_model(args.model_path)
    ids = tokenize(lm.tokenizer, load_text(wiki)[0])
    half = ids.numel() // 2
    calib_ids, test_ids = ids[:half], ids[half:]
    samples = sample_windows(calib_ids, args.nsamples, args.seqlen, seed=0)
    print(f"# {lm.name}: {ids.numel()} WikiText-2 test tokens; calibrate on the first {half}, PPL@{args.ppl_seqlen} "
          f"on the last {test_ids.numel()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)

    def ppl(model):
        if args.timing_only:
            return float("nan")
        return perplexity_from_ids(model, test_ids, args.ppl_seqlen, max_windows=args.ppl_max_windows)

    results = {"setup": vars(args), "original": ppl(lm.model)}
    print(f"original      PPL {results['original']:.3f}", flush=True)
    base_cfg = parse_config()
    base_cfg.epochs, base_cfg.cali_bsz, base_cfg.flat_lr = args.epochs, args.cali_bsz, args.flat_lr
    downs = {"on": [True], "off": [False], "both": [True, False]}[args.down]
    for down in downs:
        cfg = copy.deepcopy(base_cfg)
        cfg.use_down_quant = down
        tag = f"down_{'on' if down else 'off'}"
        rtn = ppl(rtn_model(lm.model, cfg, None))
        model = copy.deepcopy(lm.model)
        t0 = time.monotonic()
        layer_states: dict[int, dict] = {}
        calibrate_model(model, samples, cfg, torch.device("cpu"), Reporter(),
                        on_layer_done=lambda i, state, _result: layer_states.__setitem__(i, state))
        seconds = time.monotonic() - t0
        if args.save_dir:
            meta = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seconds": round(seconds, 1),
                    "data": "first half of WikiText-2 test tokens"}
            saved = save_matrices(Path(args.save_dir) / f"flat_matrices_{tag}.pth",
                                  build_payload(model, cfg, layer_states, complete=True, extra=meta))
            print(f"saved {saved}", flush=True)
        flat = ppl(model)
        results[tag] = {"rtn": rtn, "flatquant": flat, "ratio_to_original": flat / results["original"],
                        "calibration_seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
        print(f"{tag:13s} RTN W4A4 PPL {rtn:.3f} | FlatQuant W4A4 PPL {flat:.3f} "
              f"({flat / results['original']:.2f}x original) | calibration {seconds:.0f}s | "
              f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
        del model
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
