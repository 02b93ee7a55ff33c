"""Layer-parallel calibration with torchrun (issue 10, acceptance 3): the speed-up of N gloo ranks over one process
on the same machine, and whether the matrices are equal.

Runs `python -m core quantize` on SmolLM2 (or --model_path) as one process with all threads (the usual way to use
the machine), as one process with 1 thread (the reference the ranks must equal: same seed, same thread count per
process), and as `torchrun --standalone --nproc_per_node N ... --distributed` with 1 thread per rank, interleaved
--rounds times. Calibration only (--no_ppl --no_time_diff). Prints the wall seconds of each run, the medians, the
ratios and whether every tensor of the N-rank flat_matrices.pth equals the 1-thread single-process one.

    python bench/distributed.py --nproc 2 --rounds 2 --json /tmp/dist.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.device import machine_line, machine_summary  # noqa: E402


def run(cmd: list[str], threads: int, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    t0 = time.monotonic()
    proc = subprocess.run(cmd + ["--output_dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max_layers", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from core.matrices import MATRIX_FILE, read_matrices

    quantize = [sys.executable, "-m", "core", "quantize", "--nsamples", str(args.nsamples), "--seqlen",
                str(args.seqlen), "--epochs", str(args.epochs), "--no_ppl", "--no_time_diff", "--no_resume",
                "--device", "cpu"]
    if args.model_path:
        quantize += ["--model_path", args.model_path]
    if args.max_layers:
        quantize += ["--max_layers", str(args.max_layers)]
    dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            *quantize[1:], "--distributed"]
    threads = os.cpu_count() or 1
    machine = machine_summary()
    print(f"# {machine_line(machine)}", flush=True)
    print(f"# quantize {args.nsamples} x {args.seqlen} x {args.epochs} epochs, max_layers {args.max_layers}",
          flush=True)
    times: dict[str, list[float]] = {f"single_{threads}t": [], "single_1t": [], f"torchrun_{args.nproc}x1t": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for label, cmd, t in ((f"single_{threads}t", quantize, threads), ("single_1t", quantize, 1),
                                  (f"torchrun_{args.nproc}x1t", dist, 1)):
                seconds = run(cmd, t, tmp / f"{label}_{r}")
                times[label].append(seconds)
                print(f"round {r} {label:16s} {seconds:8.1f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
        ref = read_matrices(tmp / "single_1t_0" / MATRIX_FILE)["layers"]
        got = read_matrices(tmp / f"torchrun_{args.nproc}x1t_0" / MATRIX_FILE)["layers"]
        equal = set(ref) == set(got) and all(
            set(ref[i]) == set(got[i]) and all(ref[i][k].equal(got[i][k]) for k in ref[i]) for i in ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    d = med[f"torchrun_{args.nproc}x1t"]
    result = {"machine": machine, "args": vars(args), "seconds": times, "median_s": med,
              "speedup_vs_single_all_threads": med[f"single_{threads}t"] / d,
              "speedup_vs_single_1_thread": med["single_1t"] / d, "layers": len(ref),
              "matrices_equal_to_single_1_thread": equal}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
