"""Decode into a preallocated KV cache (transformers' StaticCache, what core.latency.greedy_decode uses) vs a dynamic
one (each step concatenates the whole cache again), interleaved in one run, on bench/latency.py's LLaMA-2-7B-shaped
model converted to real W4A4 (random weights; speed does not depend on their values).

    python bench/decode_cache.py                          # every linear quantized (o_proj W4A4 + int8 lm_head)
    python bench/decode_cache.py --quant_config default --layers 4 --prompt 512 --decode 64 --rounds 5
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def main() -> None:
    from latency import QUANT_CONFIGS, _llama7b_shaped

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant_config", default="all", choices=sorted(QUANT_CONFIGS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from core.algorithms import apply_flat_structure
    from core.config import parse_config
    from core.device import compute_dtype, machine_line
    from core.flat import fold_model
    from core.latency import greedy_decode
    from core.realquant.convert import convert_model

    torch.set_num_threads(args.threads)
    print(f"# {machine_line()}; {args.threads} threads, torch {torch.__version__}", flush=True)
    model = _llama7b_shaped(args.layers)
    apply_flat_structure(model, parse_config(QUANT_CONFIGS[args.quant_config][1]))
    fold_model(model)
    model = convert_model(model, "cpu").to(compute_dtype("cpu"))
    ids = torch.randint(100, 30000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    caches = {"static (preallocated)": True, "dynamic (concatenated)": False}
    times: dict[str, list[float]] = {k: [] for k in caches}
    picked = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, preallocate in caches.items():
            _, seconds, picked[name] = greedy_decode(model, ids, args.decode, preallocate)
            if rnd:
                times[name].append(seconds / args.decode * 1e3)
    same = torch.equal(*picked.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"{name:24s} decode {med[name]:7.2f} ms/token  runs {' '.join(f'{x:.1f}' for x in v)}")
    static, dynamic = times.values()
    print(f"paired speedup of the preallocated cache: {statistics.median(d / s for s, d in zip(static, dynamic)):.3f}x;"
          f" same tokens: {same}; {args.quant_config} config, {args.layers} layers, prompt {args.prompt}, "
          f"{args.decode} steps; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
