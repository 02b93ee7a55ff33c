"""report.json: one file per run, each stage merges its own section into it atomically."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

REPORT_NAME = "report.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    return value


def load_report(output_dir: str | os.PathLike) -> dict:
    path = Path(output_dir) / REPORT_NAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def update_report(output_dir: str | os.PathLike, sections: dict) -> dict:
    """Merge top-level sections (a section given replaces the old one wholesale) and rewrite the file."""
    report = load_report(output_dir)
    report.update(_clean(sections))
    atomic_write_bytes(Path(output_dir) / REPORT_NAME, json.dumps(report, indent=2, sort_keys=False).encode())
    return report
