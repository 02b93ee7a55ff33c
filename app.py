"""FlatQuant Studio GUI: `python app.py` serves http://127.0.0.1:7860 (see --help)."""
from __future__ import annotations

import argparse
import os
import sys

# Offline by design: set before gradio / transformers / torch are imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FlatQuant Studio: W4A4 FlatQuant calibration GUI (local, offline).")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--runs_root", "--runs-root", default="runs",
                   help="folder that holds runs/<timestamp>/ outputs; the only folder files are served from")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress refreshes in the page")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            sys.exit("--auth must look like user:password")
        auth = (user, password)
    from flatgui.app import build_app, launch

    demo, ctx = build_app(runs_root=args.runs_root, poll_seconds=args.poll)
    print(f"FlatQuant Studio: http://{args.host}:{args.port}  (runs in {ctx.store.root})", flush=True)
    launch(demo, ctx, host=args.host, port=args.port, auth=auth)


if __name__ == "__main__":
    main()
