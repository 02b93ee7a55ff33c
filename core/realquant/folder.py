"""Writing an export folder, shared by both formats (core.realquant.checkpoint's native one and
core.realquant.ascend's vllm-ascend one): the target checks, the staged folder renamed into place when complete, and
the shard writer that streams tensors into ``<stem>.safetensors`` or ``<stem>-0000i-of-0000n.safetensors`` plus
``<stem>.safetensors.index.json`` (the layout transformers and vLLM read)."""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ExportError
from ..outputs import Inputs, check_apart, free_space_hint, target_lock, write_failure

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


def check_target(output_dir: str | os.PathLike, inputs: Inputs = (), overwrite: bool = False) -> Path:
    """Refuse a target that is, holds or lies inside an input of the export (``inputs``: (option, path) pairs, the
    source model's folder among them), is a file, or exists and is not empty without ``overwrite``. Returns the
    resolved target."""
    check_apart(output_dir, inputs)
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ExportError(f"--output_dir {str(output_dir)!r} is a file; name a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"--output_dir {str(output_dir)!r} exists and is not empty; choose a new folder or pass "
                          "--overwrite to replace it.")
    return target


@contextmanager
def claim_target(output_dir: str | os.PathLike, inputs: Inputs = (), overwrite: bool = False) -> Iterator[Path]:
    """For a whole export job: the target's lock (a second export into it is refused), the leftovers of killed
    exports into it removed, then check_target. Yields the resolved target."""
    with target_lock(output_dir):
        remove_stale_leftovers(Path(output_dir).expanduser().resolve())
        yield check_target(output_dir, inputs, overwrite)


_LEFTOVER = re.compile(r"(partial|old)-(?:(\d+)-)?[0-9a-f]{8}")


def _writer_alive(pid: Optional[str]) -> bool:
    """Whether the process that named a staged folder still runs (a zombie does not); no pid: an older writer."""
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_leftovers(target: Path) -> list[str]:
    """Remove ``.NAME.partial-*`` (a killed export's staged folder) and ``.NAME.old-*`` (a killed commit's previous
    target, renamed back into place when the target is missing) beside ``target`` whose writer is dead. Call it
    holding the target's lock. Returns the names removed or restored."""
    prefix = f".{target.name}."
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return []
    done = []
    for path in entries:
        m = _LEFTOVER.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if m is None or not path.is_dir() or _writer_alive(m.group(2)):
            continue
        if m.group(1) == "old" and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path.name)
    return done


class StagedFolder:
    """A temp folder beside ``target`` (named with this process's pid), written under the target's lock;
    ``commit()`` renames it into place (replacing an old target). Leaving the ``with`` block without commit, or any
    failed write (OSError, safetensors' or the tokenizers' wrapped ones), removes it; a failed write becomes one
    ExportError line."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock = target_lock(target)

    def __enter__(self) -> "StagedFolder":
        self.lock.__enter__()
        try:
            remove_stale_leftovers(self.target)
            self.path.mkdir(parents=True)
        except OSError as exc:
            self.lock.__exit__(type(exc), exc, None)
            raise ExportError(f"cannot create the output folder next to {self.target.name!r}: "
                              f"{exc.strerror or exc}.") from exc
        return self

    def commit(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        try:
            os.replace(self.path, self.target)
        except OSError:
            if old is not None:
                os.replace(old, self.target)  # the previous export stays where it was
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.__exit__(exc_type, exc, tb)
        failed = write_failure(exc) if exc is not None else None
        if failed is not None:
            code, why = failed
            raise ExportError(f"writing the export failed ({why}); nothing was written to {self.target.name!r}: "
                              f"{free_space_hint(code)} and export again.") from exc
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


__all__ = ["DEFAULT_SHARD_BYTES", "parse_size", "source_dtype", "serving_dtype", "check_target", "claim_target",
           "remove_stale_leftovers", "StagedFolder", "ShardWriter"]
