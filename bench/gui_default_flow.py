"""The newcomer's flow through the GUI: `python app.py`, press Calibrate with the default settings, wait.

Starts app.py on a free port, starts the calibration through the same endpoint the button calls, polls the
job status like the page does, and reports the wall time of the whole job, its stages, the perplexities and
how fast the server answers status polls while the job runs (the page must stay responsive).

    python bench/gui_default_flow.py [--runs_root /tmp/gui_bench_runs] [--epochs N --nsamples N ...]

It prints the CPU, its flags, the compute dtype and the native code path first. The app inherits the environment:
FLATQUANT_COMPUTE_DTYPE=fp32 FLATQUANT_NATIVE_ISA=avx2 FLATQUANT_INT_GEMM=float runs the code paths an AVX2-only CPU
gets (on this CPU's hardware: not a measurement of such a CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    from flatgui.settings import GuiSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs_root", default=None)
    for f in ("epochs", "nsamples", "seqlen", "max_layers", "ppl_windows"):
        p.add_argument(f"--{f}", type=int, default=None)
    args = p.parse_args()
    changes = {k: v for k, v in vars(args).items() if k != "runs_root" and v is not None}
    settings = GuiSettings(**changes)

    from gradio_client import Client
    from gui_server import running_app

    root = Path(args.runs_root or tempfile.mkdtemp(prefix="gui_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    t_app = time.monotonic()
    with running_app(root / "runs", root / "app.log") as url:
        startup = time.monotonic() - t_app
        client = Client(url, verbose=False)
        t0 = time.monotonic()
        msg = client.predict(*settings.values(), "English", api_name="/start_calibration")
        assert msg.startswith("✔"), msg
        polls, stage_first = [], {}
        while True:
            tp = time.perf_counter()
            st = client.predict(api_name="/job_status")
            polls.append((time.perf_counter() - tp) * 1e3)
            for ev in st["events"]:
                stage_first.setdefault(ev["stage"], ev["elapsed_s"])
            if st["status"] != "running":
                break
            time.sleep(1.0)
        wall = time.monotonic() - t0
        report = __import__("json").loads((Path(st["output_dir"]) / "report.json").read_text())
    from core.device import compute_dtype, machine_line
    from core import kernels as native

    print(f"{machine_line()}; compute dtype {str(compute_dtype('cpu')).replace('torch.', '')}; native path "
          f"{native.requested_isa() if native.unsupported_reason() is None else 'none'}")
    print(f"settings: {settings.cli_command('<run>')}")
    print(f"status: {st['status']} {st['error'] or ''}")
    print(f"app startup (process start to first HTTP answer): {startup:.1f} s")
    print(f"job wall time (button to done): {wall:.1f} s; calibration alone: {report['calibration']['seconds']} s")
    print("stage starts (s into the job): " + ", ".join(f"{k} {v:.1f}" for k, v in stage_first.items()))
    ppl = report.get("ppl") or {}
    print(f"PPL (seqlen {ppl.get('seqlen')}, {ppl.get('max_windows')} windows): original {ppl.get('original'):.2f}, "
          f"FlatQuant {ppl.get('quantized'):.2f}, RTN {ppl.get('rtn'):.2f}")
    print(f"status poll round trip during the job: median {statistics.median(polls):.1f} ms, "
          f"max {max(polls):.1f} ms over {len(polls)} polls")


if __name__ == "__main__":
    main()
