"""Real-quant vs fake-quant quality: perplexity and logits on the same calibrated model.

    python bench/realquant_ppl.py --flat_matrix_path outputs/smollm2/flat_matrices.pth [--model_path smollm2]
                                  [--windows 16] [--seqlen 512] [--backend cpu]

Perplexity on the second half of WikiText-2 test (the quality benchmark's held-out half), fp32, no autocast, for
  fake fp32   the folded fake-quant model as the engine runs it
  fake fp64   the same model with its float matmuls in float64 (the quantizers still compute their scales in fp32):
              how far the fake model moves from rounding alone, the yardstick for the next line
  real        the real-quant conversion (integer GEMMs), in fp32
and the relative logits difference real vs fake (and fake fp64 vs fake) on the first window, prefix by prefix.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None)
    p.add_argument("--flat_matrix_path", required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--data", default=None, help="default: ../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args()

    import torch

    from core.data import load_text, tokenize, wikitext_test_path
    from core.matrices import load_matrices
    from core.models import load_model
    from core.perplexity import perplexity_from_ids
    from core.realquant import convert_model

    lm = load_model(args.model_path)
    fake = copy.deepcopy(lm.model)
    load_matrices(args.flat_matrix_path, fake)
    fake.eval()
    real = convert_model(copy.deepcopy(fake), args.backend)
    fake64 = copy.deepcopy(fake).double()
    text, label = load_text(args.data or wikitext_test_path())
    ids = tokenize(lm.tokenizer, text)
    ids = ids[ids.numel() // 2:]
    print(f"data: {label}, second half, {args.windows} windows x {args.seqlen}")
    ppl = {}
    for name, model in (("original", lm.model), ("fake fp32", fake), ("fake fp64", fake64), ("real", real)):
        t0 = time.time()
        ppl[name] = perplexity_from_ids(model, ids, args.seqlen, batch_size=4, max_windows=args.windows, dtype=None)
        print(f"PPL {name:10s} {ppl[name]:.4f}   ({time.time() - t0:.0f} s)", flush=True)
    window = ids[: args.seqlen].unsqueeze(0)
    print("\nrelative logits difference on the first window's prefixes (fake fp32 is the reference):")
    print("| prefix tokens | real | fake fp64 |\n|---|---|---|")
    for n in (8, 32, 128, args.seqlen):
        with torch.no_grad():
            ref = fake(input_ids=window[:, :n]).logits
            r = real(input_ids=window[:, :n]).logits
            f64 = fake64(input_ids=window[:, :n]).logits.float()
        rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
        print(f"| {n} | {rel(r):.2e} | {rel(f64):.2e} |")
    same3 = f"{ppl['real']:.3g}" == f"{ppl['fake fp32']:.3g}"
    print(f"\nreal vs fake fp32 PPL equal to 3 significant digits: {same3} "
          f"({ppl['real']:.4g} vs {ppl['fake fp32']:.4g}; fake fp64 {ppl['fake fp64']:.4g})")


if __name__ == "__main__":
    main()
