"""Run folders: every job writes into <root>/<timestamp>/, and downloads are served only from there."""
from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path
from typing import Optional

from core.report import load_report

MATRIX_NAME = "flat_matrices.pth"
REPORT_NAME = "report.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_ZIP = "quantized_checkpoint.zip"
ASCEND_DIR = "ascend"  # the vllm-ascend (W4A4_FLATQUANT_DYNAMIC) export
ASCEND_ZIP = "ascend_w4a4_flatquant.zip"
ARTIFACT_NAMES = (MATRIX_NAME, REPORT_NAME, CHECKPOINT_ZIP, ASCEND_ZIP)
_RUN_ID = re.compile(r"^\d{8}-\d{6}(-\d+)?$")


class RunStore:
    """Creates, lists and reads run folders under one root; the only place that turns run ids into paths."""

    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def new_run(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = self.root / stamp, 1
        while True:
            try:
                path.mkdir(parents=False, exist_ok=False)
                return path
            except FileExistsError:
                n += 1
                path = self.root / f"{stamp}-{n}"

    def list_runs(self) -> list[str]:
        """Run ids, newest first."""
        if not self.root.is_dir():
            return []
        ids = [p.name for p in self.root.iterdir() if p.is_dir() and _RUN_ID.match(p.name)]
        return sorted(ids, reverse=True)

    def run_dir(self, run_id: Optional[str]) -> Optional[Path]:
        """The folder of a run id, or None; ids that are not plain timestamps never become paths."""
        if not run_id or not _RUN_ID.match(str(run_id)):
            return None
        path = self.root / str(run_id)
        return path if path.is_dir() else None

    def report(self, run_id: Optional[str]) -> dict:
        path = self.run_dir(run_id)
        return load_report(path) if path else {}

    def artifact(self, run_id: Optional[str], name: str) -> Optional[str]:
        """Path of a known artifact inside the run folder, or None if absent. Only ARTIFACT_NAMES are served."""
        if name not in ARTIFACT_NAMES:
            return None
        folder = self.run_dir(run_id)
        if folder is None:
            return None
        path = (folder / name).resolve()
        if path.parent != folder.resolve() or not path.is_file():
            return None
        return str(path)

    def files(self, run_id: Optional[str]) -> list[str]:
        """Every downloadable file of a run (its known artifacts that exist)."""
        return [p for p in (self.artifact(run_id, n) for n in ARTIFACT_NAMES) if p]

    def zip_checkpoint(self, run_id: str, subdir: str = CHECKPOINT_DIR, name: str = CHECKPOINT_ZIP) -> Optional[str]:
        """Zip <run>/checkpoint/ (or <run>/ascend/ into ASCEND_ZIP) so it downloads as one file. Stored, not
        deflated: safetensors of packed int4 and float weights barely compress, and deflate takes minutes."""
        folder = self.run_dir(run_id)
        if folder is None or not (folder / subdir).is_dir():
            return None
        target = folder / name
        tmp = folder / (name + ".partial")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for path in sorted((folder / subdir).rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder).as_posix())
        os.replace(tmp, target)
        return str(target)
