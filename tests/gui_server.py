"""Start `python app.py` on a free 127.0.0.1 port for the GUI tests (gradio_client and the browser test)."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def english_words(text: str, names: set[str]) -> list[str]:
    """Words of two or more Latin letters in ``text`` that are not in ``names`` (a Chinese page or log line may still
    show product, model, format and unit names); identifiers (with _ . / - or digits) count as names."""
    out = []
    for token in text.split():
        if re.search(r"[_./0-9\\-]", token):
            continue
        out += [w for w in re.findall(r"[A-Za-z]{2,}", token) if w.lower() not in names]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(runs_root: str | os.PathLike, log_path: str | os.PathLike, extra_args: tuple = (),
                poll: float = 0.5, timeout: float = 180.0):
    """Yield the app's URL; the server process is stopped (by its pid) when the block ends."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs_root", str(runs_root),
           "--poll", str(poll), *extra_args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):  # up, behind --auth
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {timeout} s:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
