"""Writing an export folder, shared by both formats (core.realquant.checkpoint's native one and
core.realquant.ascend's vllm-ascend one): the target checks, the staged folder renamed into place when complete, and
the shard writer that streams tensors into ``<stem>.safetensors`` or ``<stem>-0000i-of-0000n.safetensors`` plus
``<stem>.safetensors.index.json`` (the layout transformers and vLLM read)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from ..errors import ExportError

DEFAULT_SHARD_BYTES = 2 * 2 ** 30


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '64KiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
        if not m:
            raise ExportError(f"--shard_size {text!r} is not a size; write e.g. 2GB, 500MB or a byte count.")
        unit = (m.group(2) or "b").rstrip("b").rstrip("i")
        size = int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))
    if size < 1:
        raise ExportError(f"--shard_size must be at least one byte, got {text!r}.")
    return size


def source_dtype(model_path: str | os.PathLike) -> torch.dtype:
    """The dtype a model folder's config.json declares (float32 when it declares none)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def serving_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float parts' default export dtype: the model's own 16-bit dtype, bfloat16 for a float32 checkpoint."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


# --- the target folder --------------------------------------------------------------------------------------------


def check_target(output_dir: str | os.PathLike, source_dir: Optional[str | os.PathLike] = None,
                 overwrite: bool = False) -> Path:
    """Refuse a target that is (inside) the source model's folder, holds the source model, is a file, or exists
    and is not empty without ``overwrite``. Returns the resolved target."""
    target = Path(output_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if target == src or src in target.parents:
            raise ExportError(f"--output_dir {str(output_dir)!r} is the source model's folder or inside it; "
                              "choose a new folder (the source weights would be overwritten).")
        if target in src.parents:
            raise ExportError(f"--output_dir {str(output_dir)!r} contains the source model; choose a new folder.")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--output_dir {str(output_dir)!r} is a file; name a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"--output_dir {str(output_dir)!r} exists and is not empty; choose a new folder or pass "
                          "--overwrite to replace it.")
    return target


class StagedFolder:
    """A temp folder beside ``target``; ``commit()`` renames it into place (replacing an old target). Leaving the
    ``with`` block without commit, or any OSError, removes it."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "StagedFolder":
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise ExportError(f"cannot create the output folder next to {self.target.name!r}: "
                              f"{exc.strerror or exc}.") from exc
        return self

    def commit(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError):
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " Free some space and export again." if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise ExportError(f"writing the export failed ({why}); nothing was written to "
                              f"{self.target.name!r}.{hint}") from exc
        return False


class ShardWriter:
    """Appends tensors to the current shard and writes it once it reaches ``shard_bytes``; ``finish()`` names the
    shards ``<stem>-0000i-of-0000n.safetensors`` with ``<stem>.safetensors.index.json`` (or one ``<stem>.safetensors``
    when a single shard suffices). ``kind`` tags each tensor (the ascend description's types) and counts its bytes."""

    def __init__(self, folder: Path, shard_bytes: int, stem: str):
        self.folder, self.shard_bytes, self.stem = Path(folder), shard_bytes, stem
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []
        self.types: dict[str, Optional[str]] = {}
        self.bytes_by_type: dict[Optional[str], int] = {}
        self.total = 0

    @property
    def index_file(self) -> str:
        return f"{self.stem}.safetensors.index.json"

    def add(self, name: str, tensor: torch.Tensor, kind: Optional[str] = None) -> None:
        if name in self.types:
            raise ExportError(f"tensor {name} exported twice")
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_floating_point():
            # a model's own float tensors may live in its mapped checkpoint file: holding one until the shard is
            # written would keep that file's pages resident (a 7B export held ~15 layers' files). Codes are new.
            tensor = tensor.clone()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.types[name] = kind
        self.bytes_by_type[kind] = self.bytes_by_type.get(kind, 0) + nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        part = f".part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(self.folder / part), metadata={"format": "pt"})
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, give the shards their final names (and the index); returns the file names."""
        self.flush()
        total = len(self.parts)
        names = ([f"{self.stem}.safetensors"] if total == 1 else
                 [f"{self.stem}-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)])
        for (part, _), final in zip(self.parts, names):
            os.replace(self.folder / part, self.folder / final)
        if total > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t: final for (_, tensors), final in zip(self.parts, names) for t in tensors}}
            (self.folder / self.index_file).write_text(json.dumps(index, indent=2))
        return names


__all__ = ["DEFAULT_SHARD_BYTES", "parse_size", "source_dtype", "serving_dtype", "check_target", "StagedFolder",
           "ShardWriter"]
