"""What one FlatQuant calibration budget costs in arithmetic, and the floor that puts under its time on this machine
(issue 9, acceptance 3: the 5-minute quality budget, 32 x 512 x 5 on SmolLM2, in <= 6 minutes of calibration).

On real data (WikiText-2 validation windows, the inputs of a middle decoder layer of SmolLM2 captured by the
project's pipeline), it counts the floating-point operations of one training step of a FlatQuant layer
(torch.utils.flop_counter: forward, backward, transforms; the layer's float forward for comparison; torch has no
formula for CPU SDPA, so attention's scores and weighted sums, ~8% at 512 tokens, are left out: a lower bound), times
the steps at the given compute dtype (with the calibration loop's settings for a layer of this size: weight recompute
and host-memory keeping), and profiles how much of a step is matrix multiplication. From these:

- the budget's training arithmetic: FLOPs per step x steps per layer x layers;
- the projected training seconds: measured seconds per step x steps (calibration adds the float target pass, input
  capture and folding on top: a lower bound);
- the GEMM rate the target needs: the training FLOPs over the target seconds, against the rate aten::mm reaches in
  the step here.

    python bench/calib_flops.py                     # fp32, the 5-minute budget, 6-minute target
    python bench/calib_flops.py --compute_dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.algorithms.base import run_layer  # noqa: E402
from core.algorithms.flatquant import enable_training, training_loss  # noqa: E402
from core.calibrate import capture_layer_inputs, is_large_layer  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.data import benchmark_data  # noqa: E402
from core.device import compute_dtype, dtype_name, freed_host_memory_kept, machine_line, machine_summary  # noqa: E402
from core.flat import init_weight_clips, iter_transforms, set_weight_recompute, wrap_layer  # noqa: E402
from core.models import decoder_layers, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cali_bsz", type=int, default=4)
    ap.add_argument("--target_s", type=float, default=360.0, help="the calibration time to meet (acceptance 3: 6 min)")
    ap.add_argument("--compute_dtype", default="fp32", help="fp32 | bf16 | auto (this machine's default)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after two warm-up steps)")
    ap.add_argument("--layer", type=int, default=None, help="which decoder layer (default: the middle one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model(dtype=torch.float32)
    dtype = compute_dtype("cpu", None if args.compute_dtype == "auto" else args.compute_dtype)
    dtype = None if dtype == torch.float32 else dtype  # autocast_for: None = no autocast
    samples = benchmark_data(lm.tokenizer, args.cali_bsz, args.seqlen).samples
    layers = decoder_layers(lm.model)
    index = len(layers) // 2 if args.layer is None else args.layer
    x0, kwargs = capture_layer_inputs(lm.model, samples, torch.device("cpu"))
    with torch.no_grad():  # the inputs of layer `index` (the float model's) and its float outputs
        x = x0
        for layer in layers[:index]:
            x = run_layer(layer, x, kwargs)
        layer = layers[index]
        with FlopCounterMode(display=False) as fc:
            target = run_layer(layer, x, kwargs)
    fp_forward_flops = fc.get_total_flops()

    cfg = parse_config()
    large = is_large_layer(layer)  # as core.calibrate decides it
    wrap_layer(layer, index, cfg, None)
    init_weight_clips(layer)
    set_weight_recompute(layer, large)
    enable_training(layer, cfg)
    transforms = list(iter_transforms(layer))

    def step() -> None:  # what core.algorithms.flatquant.train_layer does per step, less the optimizer's update
        training_loss(layer, transforms, x, target, kwargs, dtype).backward()
        for t in transforms:
            t.cache_matrices(False)
        layer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step()
    step_flops = fc.get_total_flops()
    with freed_host_memory_kept(not large):  # as the calibration loop runs a small layer on the CPU
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_s = (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    mm_share = mm_us / total_us

    steps = max(1, args.nsamples // args.cali_bsz) * args.epochs * len(layers)
    train_flops = step_flops * steps
    mm_rate = step_flops / (step_s * mm_share)  # FLOP/s of aten::mm inside the step
    result = {
        "machine": machine_summary(), "threads": torch.get_num_threads(), "compute_dtype": dtype_name(dtype) or "fp32",
        "budget": f"{args.nsamples} x {args.seqlen} x {args.epochs} (batch {args.cali_bsz}), {len(layers)} layers",
        "layer": index, "fp_forward_gflop": round(fp_forward_flops / 1e9, 3),
        "train_step_gflop": round(step_flops / 1e9, 3), "step_over_forward": round(step_flops / fp_forward_flops, 3),
        "step_s": round(step_s, 4), "mm_share_of_step": round(mm_share, 3),
        "mm_gflop_per_s": round(mm_rate / 1e9, 1), "steps": steps, "train_tflop": round(train_flops / 1e12, 2),
        "projected_train_s": round(step_s * steps, 1), "mm_only_s": round(step_s * mm_share * steps, 1),
        "target_s": args.target_s, "needed_gflop_per_s": round(train_flops / args.target_s / 1e9, 1),
    }
    print(f"# {machine_line()}", flush=True)
    print(f"budget {result['budget']}, compute {result['compute_dtype']}, {result['threads']} threads: "
          f"one training step of layer {index} = {result['train_step_gflop']} GFLOP "
          f"({result['step_over_forward']}x its float forward), {result['step_s']} s "
          f"({100 * mm_share:.0f}% in aten::mm at {result['mm_gflop_per_s']} GFLOP/s)")
    print(f"training: {steps} steps = {result['train_tflop']} TFLOP -> {result['projected_train_s']} s projected "
          f"(aten::mm alone {result['mm_only_s']} s); the {args.target_s:.0f} s target needs "
          f"{result['needed_gflop_per_s']} GFLOP/s sustained over the whole step")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
