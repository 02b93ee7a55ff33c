"""Output-folder safety, shared by every command that writes: an output never overwrites or removes an input of the
same command, one job at a time per output folder (a lock released when its process dies), failed writes named as
such, and scratch space reserved before it is mapped.

Each refusal is one FlatQuantError line that names the option to change, raised before anything is written."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .errors import OutputError

try:
    import fcntl
except ImportError:  # no flock on this platform: jobs are not locked
    fcntl = None

LOCK_FILE = ".flatquant.lock"
# What each input is, for the messages.
_LABELS = {"--model_path": "the source model", "--flat_matrix_path": "the matrix file",
           "--calib_data": "the calibration data", "--ppl_data": "the perplexity data",
           "--tasks_data_dir": "the task data", "--activation_dir": "the activation folder",
           "--config": "the config file"}
# Errors of a write that ran out of room (or of a failing disk): "free space" is the advice.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}

Inputs = Iterable[tuple[str, Optional[str | os.PathLike]]]


# --- outputs apart from inputs ----------------------------------------------------------------------------------


def _forms(path: str | os.PathLike) -> set[Path]:
    """The path as written (absolute) and with links resolved: a link to an input counts as the input."""
    p = Path(path).expanduser()
    return {Path(os.path.abspath(p)), p.resolve()}


def _label(option: str) -> str:
    return f"{_LABELS.get(option, 'an input')} ({option})"


def check_apart(target: str | os.PathLike, inputs: Inputs, option: str = "--output_dir",
                written: Optional[Sequence[str]] = None) -> None:
    """Refuse an output that would overwrite or remove an input of the same command, before anything is written.

    ``inputs``: (option name, path) pairs; None and paths that do not exist (dataset names) are skipped.
    ``written`` None: ``target`` is replaced or cleared as a whole, so it must not be an input, hold one, or lie
    inside an input folder. ``written`` names: only these entries of ``target`` are written (files, or folders
    replaced as a whole), so none of them may be, or hold, an input."""
    shown = str(target)
    for name, raw in inputs:
        if raw is None or str(raw) == "" or not Path(raw).expanduser().exists():
            continue
        ins = _forms(raw)
        if written is None:
            _check_whole(shown, _forms(target), ins, option, name)
            continue
        for entry in written:
            outs = {t / entry for t in _forms(target)}
            if any(o == i or o in i.parents for o in outs for i in ins):
                raise OutputError(f"{option} {shown!r}: the job writes {entry!r} there, which is {_label(name)}; "
                                  f"choose another {option} or move {name} out of it.")


def _check_whole(shown: str, outs: set[Path], ins: set[Path], option: str, name: str) -> None:
    for o in outs:
        for i in ins:
            if o == i:
                raise OutputError(f"{option} {shown!r} is {_label(name)}; writing there would overwrite it: "
                                  "choose another --output_dir.")
            if o in i.parents:
                raise OutputError(f"{option} {shown!r} holds {_label(name)}; replacing the folder would delete "
                                  "it: choose another --output_dir.")
            if i in o.parents:
                raise OutputError(f"{option} {shown!r} is inside the folder of {_label(name)}; choose an "
                                  "--output_dir outside it.")


# --- one job per output ---------------------------------------------------------------------------------------


_HELD: dict[str, list] = {}  # lock file (real path) -> [fd, depth]: a process re-entering its own lock is let in
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return f"pid {info['pid']}, `{info.get('command', '?')}`, started {info.get('started', '?')}"


def _open_locked(path: Path, option: str, shown: str) -> int:
    """Open and flock ``path`` (created if absent); OutputError naming the holder when another process has it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{option} {shown!r} cannot be written ({exc.strerror or exc}); pick another folder "
                              "or fix its permissions.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(f"{option} {shown!r} is in use by another job ({holder}); wait for it to finish or "
                              f"choose another {option}.") from None
        try:  # the previous holder may have removed the file between our open and our flock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _describe(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only its description is missing


def _acquire(path: Path, option: str, shown: str, command: str) -> str:
    """flock ``path`` for this process (re-entered when it already holds it); returns its registry key."""
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
            return key
        fd = _open_locked(path, option, shown)
        _describe(fd, command)
        _HELD[key] = [fd, 1]
    return key


def _release(key: str) -> None:
    """Undo one _acquire; the last one removes the lock file (when it is still the one locked) and unlocks it."""
    with _HELD_GUARD:
        held = _HELD[key]
        held[1] -= 1
        if held[1]:
            return
        del _HELD[key]
        fd = held[0]
    try:
        if os.path.samestat(os.fstat(fd), os.stat(key)):
            os.unlink(key)
    except OSError:
        pass
    os.close(fd)


class JobLock:
    """An exclusive lock on an output for the life of a job (``with`` block): ``flock`` on each of ``locks`` (a lock
    file path, and whether it may be skipped when it cannot be created), holding the job's pid, command and start
    time, released (and the files removed) when the block ends or the process dies. A second process is refused
    with one OutputError line naming the holder; the same process may re-enter (the GUI's jobs, a command and the
    export it calls). ``folder``: created when missing, and removed again when the block fails and it holds nothing
    but the job's log (remove_if_only_logs); without it, the parents made for the lock file are
    removed again when they stay empty."""

    def __init__(self, locks: list[tuple[Path, bool]], option: str, shown: str, command: str,
                 folder: Optional[Path] = None):
        self.locks, self.option, self.shown, self.command, self.folder = locks, option, shown, command, folder
        self.created = False
        self.made: list[Path] = []
        self.keys: list[str] = []

    def __enter__(self) -> "JobLock":
        first = self.locks[0][0]
        if self.folder is not None:
            check_output_dir(self.shown)  # a file, not writable: the usual message, before anything is made
            self.created = not self.folder.exists()
        self.made = [d for d in [first.parent, *first.parent.parents] if not d.exists()]
        try:
            first.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.option} {self.shown!r} cannot be created ({exc.strerror or exc}); pick "
                              "another folder.") from exc
        try:
            for path, optional in self.locks if fcntl is not None else ():
                try:
                    self.keys.append(_acquire(path, self.option, self.shown, self.command))
                except OutputError as exc:  # a held lock always refuses; a lock file that cannot be made may not
                    if not (optional and isinstance(exc.__cause__, OSError)):
                        raise
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        while self.keys:
            _release(self.keys.pop())
        if exc_type is not None and self.created:
            try:
                remove_if_only_logs(self.folder, also=(LOCK_FILE,))
            except OSError:
                pass
        if self.folder is None:  # a target's parents made for its lock go again when nothing was put in them
            for d in self.made:
                try:
                    d.rmdir()
                except OSError:
                    break
        return False


def command_line() -> str:
    """This process's command, as the user would type it (no interpreter path)."""
    return "python -m core " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("__main__.py") else \
        f"python {Path(sys.argv[0]).name if sys.argv else ''}".strip()


def _beside(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def folder_lock(folder: str | os.PathLike, option: str = "--output_dir", command: Optional[str] = None) -> JobLock:
    """The lock of a job's output folder: a file inside it (the folder is created when missing), and the export
    lock beside it when its parent is writable (an export that would replace the folder meanwhile is refused)."""
    path = Path(folder).expanduser()
    return JobLock([(path / LOCK_FILE, False), (_beside(path), True)], option, str(folder),
                   command or command_line(), folder=path)


def target_lock(target: str | os.PathLike, option: str = "--output_dir", command: Optional[str] = None) -> JobLock:
    """The lock of a folder that is written elsewhere and renamed into place (an export): a file beside it."""
    path = Path(target).expanduser()
    return JobLock([(_beside(path), False)], option, str(target), command or command_line())


def is_other_rank() -> bool:
    """A torchrun rank other than 0: rank 0 holds the job's lock for all of them."""
    try:
        return int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


# --- failed writes and reserved space -----------------------------------------------------------------------


def write_failure(exc: BaseException) -> Optional[tuple[Optional[int], str]]:
    """(errno, reason) when ``exc`` is a failed write: an OSError, or a library's wrapper of one (safetensors'
    SafetensorError, the tokenizers' Rust errors say 'os error N'); None otherwise."""
    if isinstance(exc, OSError):
        return exc.errno, os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if found:
        code = int(found.group(1))
        return code, os.strerror(code)
    if type(exc).__name__ == "SafetensorError":
        return None, text.splitlines()[0] if text else "SafetensorError"
    return None


def free_space_hint(code: Optional[int]) -> str:
    return "free some space" if code in DISK_ERRNOS else "check the folder's permissions and free space"


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_free_space(folder: str | os.PathLike, nbytes: int, option: str, what: str, fix: str) -> None:
    """Refuse when the disk of ``folder`` (or its nearest existing parent) has less than ``nbytes`` free."""
    free = shutil.disk_usage(nearest_existing(Path(folder).expanduser())).free
    if free < nbytes:
        raise OutputError(f"{option} {str(folder)!r} has {free / 2**20:.1f} MiB free but {what} need "
                          f"{nbytes:,} bytes ({nbytes / 2**20:.1f} MiB); {fix}.")


def reserve_file(path: Path, nbytes: int, option: str, shown: str) -> None:
    """Create ``path`` with ``nbytes`` allocated on disk, so that a mapping of it cannot hit a full disk later
    (a write into a mapped page with no block behind it is SIGBUS, not an error)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            return  # a filesystem that cannot preallocate: mapped as before
        os.close(fd)
        fd = -1
        path.unlink(missing_ok=True)
        raise OutputError(f"{option} {shown!r} has no room for the calibration activations: {nbytes:,} bytes "
                          f"({nbytes / 2**20:.1f} MiB) more are needed there ({os.strerror(exc.errno)}); free "
                          f"space or point {option} at a bigger disk.") from exc
    finally:
        if fd >= 0:
            os.close(fd)


# --- output folders: writable, and removed again when a job wrote nothing but its log ------------------------


_DISPOSABLE = ("quantize.log",)


def check_output_dir(output_dir: str | os.PathLike, needed_bytes: int = 0) -> None:
    """The folder (or its nearest existing parent) is a writable folder with room for needed_bytes."""
    check_writable_folder(output_dir, "--output_dir", needed_bytes)


def check_writable_folder(folder: str | os.PathLike, option: str, needed_bytes: int = 0) -> None:
    """``folder`` (or its nearest existing parent) is a writable folder with room for needed_bytes; ``option`` names
    it in the message (--output_dir, --activation_dir)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {str(folder)!r} is a file, not a folder; pass a folder path.")
    parent = path
    while not parent.exists():
        if parent.is_symlink():  # a link to nowhere: mkdir would fail on it after the model loaded
            raise OutputError(f"{option} {str(folder)!r} goes through {str(parent)!r}, a symbolic link to a missing "
                              "target; point it at a folder that exists or remove the link.")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {str(folder)!r} is inside {str(parent)!r}, which is a file; pass a folder path.")
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise OutputError(f"{option} {str(folder)!r} is not writable (no permission on {str(parent)!r}); pick another "
                          "folder.")
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OutputError(f"Not enough free disk space for {option} {str(folder)!r}: {free / 2**20:.1f} MiB free, the "
                          f"job writes about {needed_bytes / 2**20:.1f} MiB; free some space or pick another folder.")


def _can_create_in(folder: Path) -> bool:
    """A folder can be made in ``folder`` (os.access says yes to root on a read-only or virtual file system)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".flatquant-probe-", dir=folder))
    except OSError:
        return False
    return True


def close_file_logs(folder: Path) -> None:
    """Close log handlers writing into folder (so it can be removed and a later run reopens a fresh file)."""
    folder = str(folder.resolve())
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(folder + os.sep):
                logger.removeHandler(handler)
                handler.close()


def remove_if_only_logs(folder: Path, also: Iterable[str] = ()) -> bool:
    """Remove a folder a job created when it holds nothing but its own log (and the files named in ``also``):
    an early error leaves no folder behind."""
    disposable = set(_DISPOSABLE) | set(also)
    if not folder.is_dir() or any(p.name not in disposable and not p.name.endswith(".tmp")
                                  for p in folder.iterdir()):
        return False
    close_file_logs(folder)
    for p in folder.iterdir():
        p.unlink(missing_ok=True)
    folder.rmdir()
    return True
