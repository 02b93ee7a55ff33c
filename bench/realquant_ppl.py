"""Real-quant vs fake-quant quality: perplexity and logits on the same calibrated model.

    python bench/realquant_ppl.py --flat_matrix_path outputs/smollm2/flat_matrices.pth [--model_path smollm2]
                                  [--windows 100] [--seqlen 512] [--backend cpu]

Perplexity on the second half of WikiText-2 test (the quality benchmark's held-out half), fp32, no autocast, of the
original model, the folded fake-quant model as the engine runs it, and its real-quant conversion (integer GEMMs);
then the relative logits difference real vs fake on the first window's prefixes (up to 16 tokens the cpu backend
runs the online transforms in its own kernel, whose float sums differ in order from torch's matmuls).
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
    p.add_argument("--windows", type=int, default=100)
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
    text, label = load_text(args.data or wikitext_test_path())
    ids = tokenize(lm.tokenizer, text)
    ids = ids[ids.numel() // 2:]
    print(f"data: {label}, second half, {args.windows} windows x {args.seqlen}, backend {args.backend}")
    ppl = {}
    for name, model in (("original", lm.model), ("fake", fake), ("real", real)):
        t0 = time.time()
        ppl[name] = perplexity_from_ids(model, ids, args.seqlen, batch_size=4, max_windows=args.windows, dtype=None)
        print(f"PPL {name:8s} {ppl[name]:.4f}   ({time.time() - t0:.0f} s)", flush=True)
    window = ids[: args.seqlen].unsqueeze(0)
    print("\nrelative logits difference real vs fake on the first window's prefixes:")
    print("| prefix tokens | rel. diff | identical |\n|---|---|---|")
    for n in (1, 8, 16, 17, 128, args.seqlen):
        with torch.no_grad():
            ref = fake(input_ids=window[:, :n]).logits
            r = real(input_ids=window[:, :n]).logits
        print(f"| {n} | {float((r - ref).norm() / ref.norm()):.2e} | {torch.equal(r, ref)} |")
    same3 = f"{ppl['real']:.3g}" == f"{ppl['fake']:.3g}"
    print(f"\nreal vs fake PPL equal to 3 significant digits: {same3} ({ppl['real']:.6g} vs {ppl['fake']:.6g})")


if __name__ == "__main__":
    main()
