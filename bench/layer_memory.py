"""Device memory of calibrating ONE decoder layer of a LLaMA-2-7B- or Qwen3-8B-shaped model (issue 10, acceptance
5: target "one layer in fp32 + activations + 2 GiB").

On cuda/npu it records torch.<device>.max_memory_allocated around core.calibrate.calibrate_model on a one-layer
model with random bf16 weights on the host (the layer goes to the device, is upcast to fp32, trained for one
epoch of nsamples x seqlen at cali_bsz 4, folded and sent back), in well under a minute per shape:

    python bench/layer_memory.py --device cuda --json layer_memory_cuda.json      # both shapes

On cpu there is no allocator counter, so a TorchDispatchMode (LiveTensorBytes) counts the bytes of every tensor
storage an op creates while it is alive, as a device allocator would (views and in-place results are not new
memory), and reports the peak and what was alive at it, grouped by the op that made it. The captured activations
(host tensors on an accelerator) are made outside the count, and the two device copies of a batch (inputs and
targets; no copy on cpu) are added, so the number stands for what max_memory_allocated would be:

    python bench/layer_memory.py --device cpu --shape llama2-7b          # ~2.5 GiB RSS, a few minutes on 2 vCPU
    python bench/layer_memory.py --device cpu --shape llama2-7b --scale 4  # hidden/4, intermediate/4: seconds

``--counter rss`` (cpu) measures what the host job pays instead: the process's resident memory, sampled every 5 ms
by a thread and charged to the phase of the layer's calibration then running (full-precision forward, wrapping,
clip search, training forward/optimizer step, backward, folding, write-back), as peak GiB above the RSS before the
layer; allocator caching and page reuse included, so this is the number a 7B job's peak RSS adds to its weights:

    python bench/layer_memory.py --device cpu --shape llama2-7b --counter rss
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from scale import SHAPES, one_layer_model  # noqa: E402  bench/scale.py

from core import quantizer  # noqa: E402
from core import calibrate  # noqa: E402
from core.calibrate import SMALL_LAYER_PARAMS, calibrate_model  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.memory import ActivationStore, ModelShape  # noqa: E402
from core.progress import Reporter  # noqa: E402

MIB = 2 ** 20
GIB = 2 ** 30


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive (a device allocator's
    memory_allocated, without its block rounding), and at that peak the live storages grouped by label."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.now = 0
        self.peak = 0
        self.at_peak: dict[int, tuple[int, str]] = {}

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, ""))
        self.now -= size

    def _track(self, t: torch.Tensor, label: str) -> None:
        st = t.untyped_storage()
        key, size = st.data_ptr(), st.nbytes()
        if size == 0 or key in self.live:
            return
        node = torch._C._current_autograd_node()
        phase = f"backward of {node.name()}" if node is not None else "forward"
        self.live[key] = (size, f"{phase}: {label}")
        self.now += size
        weakref.finalize(st, self._free, key)
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = dict(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            alias = returns[i].alias_info if i < len(returns) else None
            if alias is None:  # a view or an in-place result is not new memory
                self._track(t, f"{func.__name__} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return out

    def breakdown(self, top: int = 25) -> list[tuple[str, float, int]]:
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for size, label in self.at_peak.values():
            groups[label][0] += size
            groups[label][1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        return [(label, round(size / MIB, 1), count) for label, (size, count) in rows]


class PhaseRSS:
    """Peak RSS per phase: a sampling thread charges the current RSS to the phase label that wrapped functions (and
    Tensor.backward) set while they run."""

    PHASES = ((calibrate, "fp_forward_with_stats", "fp forward"), (calibrate, "to_device", "to device (upcast)"),
              (calibrate, "to_host", "write-back"))

    def __init__(self):
        import threading

        from core.algorithms import flatquant

        self.phase = "other"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._patched = []
        for mod, name, label in self.PHASES + ((flatquant, "wrap_layer", "wrap"),
                                               (flatquant, "init_weight_clips", "clip search"),
                                               (flatquant, "train_layer", "train: forward + step"),
                                               (flatquant, "fold_layer", "fold")):
            self._wrap(mod, name, label)
        self._wrap(torch.Tensor, "backward", "train: backward")

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def run(*args, **kwargs):
            prev, self.phase = self.phase, label
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = prev
        self._patched.append((owner, name, fn))
        setattr(owner, name, run)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now, phase = self.rss(), self.phase
            if now > self.peaks.get(phase, 0):
                self.peaks[phase] = now
            time.sleep(0.005)

    def __enter__(self) -> "PhaseRSS":
        self.before = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for owner, name, fn in self._patched:
            setattr(owner, name, fn)


class UncountedStore(ActivationStore):
    """The captured activations: host memory on an accelerator, so outside the device count."""

    def empty(self, shape, dtype=torch.float32):
        with _disable_current_modes():
            return super().empty(shape, dtype)


def measure(name: str, device: torch.device, nsamples: int, seqlen: int, epochs: int, scale: int,
            blocks: str = "native", counter: str = "tensors") -> dict:
    model, mcfg = one_layer_model(name, scale)
    shape = ModelShape.from_config(mcfg)
    cfg = parse_config()
    cfg.epochs, cfg.cali_bsz = epochs, 4
    samples = torch.randint(0, 1024, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    layer_fp32 = shape.layer_params() * 4
    batch = min(cfg.cali_bsz, nsamples) * seqlen * shape.hidden * 4  # one batch of inputs (or of targets), fp32
    rec = {"shape": name, "scale": scale, "hidden": shape.hidden, "intermediate": shape.intermediate,
           "nsamples": nsamples, "seqlen": seqlen, "epochs": epochs, "device": str(device), "blocks": blocks,
           "layer_fp32_mib": round(layer_fp32 / MIB, 1),
           "target_mib": round((layer_fp32 + 2 * batch + 2 * GIB) / MIB, 1)}
    # a scaled-down layer gets the full shape's policy (recompute in backward above core.calibrate's threshold)
    calibrate.SMALL_LAYER_PARAMS = SMALL_LAYER_PARAMS // scale ** 2
    t0 = time.monotonic()
    if device.type == "cpu" and counter == "rss":
        with PhaseRSS() as phases:
            calibrate_model(model, samples, cfg, device, Reporter())
        peak = max(phases.peaks.values())
        rec.update({"counter": "process RSS above the RSS before the layer, sampled every 5 ms",
                    "rss_before_gib": round(phases.before / GIB, 3), "peak_mib": round((peak - phases.before) / MIB, 1),
                    "peak_by_phase_gib": {k: round((v - phases.before) / GIB, 3) for k, v in
                                          sorted(phases.peaks.items(), key=lambda kv: -kv[1])}})
        rec.pop("target_mib")
    elif device.type == "cpu":
        tracker = LiveTensorBytes()
        with tracker:
            calibrate_model(model, samples, cfg, device, Reporter(), store=UncountedStore())
        copies = 2 * batch  # x and target: views of the host activations on cpu, device copies elsewhere
        rec.update({"counter": "LiveTensorBytes (cpu proxy) + batch copies",
                    "peak_mib": round((tracker.peak + copies) / MIB, 1),
                    "tracked_peak_mib": round(tracker.peak / MIB, 1), "batch_copies_mib": round(copies / MIB, 1),
                    "at_peak": tracker.breakdown()})
    else:
        mod = getattr(torch, device.type)
        mod.synchronize()
        mod.reset_peak_memory_stats(device)
        before = mod.memory_allocated(device)
        calibrate_model(model, samples, cfg, device, Reporter())
        mod.synchronize()
        rec.update({"counter": f"torch.{device.type}.max_memory_allocated",
                    "peak_mib": round((mod.max_memory_allocated(device) - before) / MIB, 1)})
    rec["seconds"] = round(time.monotonic() - t0, 1)
    if "target_mib" in rec:
        rec["within_target"] = rec["peak_mib"] <= rec["target_mib"]
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="both", choices=(*SHAPES, "both"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--scale", type=int, default=1, help="divide hidden, intermediate and heads by this (cpu checks)")
    ap.add_argument("--json", default=None, help="also write the records here")
    ap.add_argument("--blocks", default="native", choices=("native", "device", "none"),
                    help="cpu proxy: row blocks of the fake-quant node as on cpu (native), as on an accelerator "
                         "(device: what a GPU run does), or none")
    ap.add_argument("--counter", default="tensors", choices=("tensors", "rss"),
                    help="cpu: live tensor bytes (what a device allocator would hold) or process RSS per phase")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.blocks != "native":
        quantizer.BLOCK_ELEMENTS["cpu"] = quantizer.DEVICE_BLOCK_ELEMENTS if args.blocks == "device" else 1 << 62
    records = []
    for name in (list(SHAPES) if args.shape == "both" else [args.shape]):
        rec = measure(name, torch.device(args.device), args.nsamples, args.seqlen, args.epochs, args.scale,
                      args.blocks, args.counter)
        records.append(rec)
        print(json.dumps(rec, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
