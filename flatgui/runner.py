"""The runner owns the one long device job (and the models it leaves behind) outside any request handler.

Handlers start a job and return at once; every open page polls ``snapshot()`` on a timer. Because the job and
its buffered events live here, not in the page, a reload (or a second browser) reconnects to the running job.
One device job at a time: a second ``start`` raises ``BusyError`` with a message naming the running job.
"""
from __future__ import annotations

import collections
import gc
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from core.errors import FlatQuantError, JobCancelled
from core.progress import CancelToken, ProgressEvent
from core.validate import safe_message

from .joblog import format_entry

log = logging.getLogger("flatgui.runner")

# Step-level events arrive every optimizer step; keep the latest few thousand, but every other event (layer_done,
# stage changes, ppl, ...) is kept for the whole job so charts can be rebuilt after a reload.
MAX_STEP_EVENTS = 4000
MAX_LOG_LINES = 2000
STEP_STAGES = ("calibrate",)


class BusyError(Exception):
    """A device job is already running; the message says which one and how to stop it."""


@dataclass
class Job:
    kind: str  # calibrate | load_matrices | evaluate | generate | export
    title: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    cancel: CancelToken = field(default_factory=CancelToken)
    status: str = "running"  # running | done | failed | cancelled
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    error: Optional[str] = None
    result: Any = None  # small, JSON-able summary; model objects go to JobRunner.workspace
    output_dir: Optional[str] = None
    plan: list = field(default_factory=list)  # the job's stages, for the job-wide bar (flatgui.jobprogress)
    events: list = field(default_factory=list)  # milestone events (dicts)
    step_events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_STEP_EVENTS))
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_LOG_LINES))
    last_event: Optional[dict] = None
    step_count: int = 0  # step events received (the deque keeps only the latest)
    seq: int = 0  # bumped on every change; pages re-render only when it moves
    thread: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.status == "running"


def format_event(ev: dict, lang: str = "en") -> str:
    """One log line per event: '[  12.3s] calibrate  layer 3/30 epoch 1/2 loss 0.0123'. Core's message already
    says where it is; the fields are spelled out only for events without one."""
    return format_entry({"t": ev.get("elapsed_s"), "event": ev}, lang)


def readable_error(exc: BaseException) -> str:
    """FlatQuantError messages are already one line that says what to fix; anything else gets its type name."""
    if isinstance(exc, FlatQuantError):
        return str(exc)
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return (f"Out of memory ({name}): lower nsamples, seqlen or the calibration batch size, or pick a "
                "smaller model.")
    return f"Unexpected error {name}: {text} (details in the server log)."


class JobRunner:
    """Thread-safe owner of the current job, its event buffer and the models the last job produced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: Optional[Job] = None
        # Models from the last calibrate/load job (original LoadedModel, quantized module, tokenizer, ...).
        # Kept here so no model object ever sits in a per-session gr.State.
        self.workspace: dict = {}
        self.history: collections.deque = collections.deque(maxlen=20)  # finished jobs, newest last

    # -- starting and stopping ------------------------------------------------------------------------------

    def start(self, kind: str, target: Callable[[Job], Any], title: str = "", plan: Optional[list] = None) -> Job:
        """Run ``target(job)`` in a background thread; raise BusyError if another job is running."""
        with self._lock:
            if self._job is not None and self._job.running:
                cur = self._job
                raise BusyError(
                    f"Busy: a {cur.kind} job ({cur.title or cur.id}) has been running for "
                    f"{time.time() - cur.started:.0f} s. Wait for it to finish or press Cancel."
                )
            job = Job(kind=kind, title=title or kind, plan=list(plan or []))
            self._job = job
            job.thread = threading.Thread(target=self._run, args=(job, target), name=f"flatquant-{kind}", daemon=True)
        job.thread.start()
        return job

    def run_sync(self, kind: str, target: Callable[[Job], Any], title: str = "", timeout: Optional[float] = None):
        """Start a job and wait for it (short device work such as one generation); re-raise its error."""
        job = self.start(kind, target, title)
        job.thread.join(timeout)
        if job.status == "done":
            return job.result
        if job.status == "running":
            raise BusyError(f"{kind} is still running after {timeout} s; it keeps running in the background.")
        raise FlatQuantError(job.error or f"{kind} {job.status}")

    def cancel(self) -> bool:
        with self._lock:
            job = self._job
        if job is None or not job.running:
            return False
        job.cancel.cancel()
        self._append_log(job, "log_cancel")
        return True

    def wait(self, timeout: Optional[float] = None) -> Optional[Job]:
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return job

    @property
    def busy(self) -> bool:
        job = self._job
        return job is not None and job.running

    @property
    def current(self) -> Optional[Job]:
        return self._job

    def release_models(self) -> None:
        """Drop the models of the previous run before a new one loads its own (memory on small machines)."""
        self.workspace = {}
        gc.collect()

    # -- the job thread -------------------------------------------------------------------------------------

    def _run(self, job: Job, target: Callable[[Job], Any]) -> None:
        try:
            job.result = target(job)
            status, error = "done", None
        except JobCancelled as exc:
            status, error = "cancelled", str(exc)
        except FlatQuantError as exc:
            status, error = "failed", str(exc)
        except BaseException as exc:  # noqa: BLE001 - the server must keep serving whatever a job does
            log.error("job %s (%s) crashed:\n%s", job.id, job.kind, traceback.format_exc())
            status, error = "failed", readable_error(exc)
        error = safe_message(error) if error else error  # a page never shows the server's own paths
        with self._lock:
            job.status, job.error, job.finished = status, error, time.time()
            job.seq += 1
            self.history.append(job)
        self._append_log(job, "log_job_end_error" if error else "log_job_end", kind=job.kind, status=status,
                         error=error or "")

    # -- events ---------------------------------------------------------------------------------------------

    def record(self, job: Job, event: ProgressEvent | dict) -> None:
        """The on_event callback handed to core; safe from any thread."""
        ev = event.to_dict() if isinstance(event, ProgressEvent) else dict(event)
        with self._lock:
            if ev.get("stage") in STEP_STAGES:
                job.step_events.append(ev)
                job.step_count += 1
            else:
                job.events.append(ev)
            job.last_event = ev
            job.log.append({"t": ev.get("elapsed_s"), "event": ev})
            job.seq += 1

    def callback(self, job: Job) -> Callable[[ProgressEvent], None]:
        return lambda event: self.record(job, event)

    def _append_log(self, job: Job, key: str, **fields) -> None:
        """A runner line as an i18n key and its fields, so each page shows it in its own language."""
        with self._lock:
            job.log.append({"t": time.time() - job.started, "key": key, "fields": fields})
            job.seq += 1

    # -- what pages read ------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-able copy of the current job (or an idle marker); pages never touch Job objects directly."""
        with self._lock:
            job = self._job
            if job is None:
                return {"id": None, "status": "idle", "seq": 0, "events": [], "step_events": [], "step_count": 0,
                        "log": [], "log_entries": []}
            end = job.finished or time.time()
            return {
                "id": job.id,
                "kind": job.kind,
                "title": job.title,
                "status": job.status,
                "seq": job.seq,
                "started": job.started,
                "elapsed_s": end - job.started,
                "error": job.error,
                "output_dir": job.output_dir,
                "plan": [dict(p) for p in job.plan],
                "last_event": dict(job.last_event) if job.last_event else None,
                "events": [dict(e) for e in job.events],
                "step_events": [dict(e) for e in job.step_events],
                "step_count": job.step_count,
                "log": [format_entry(e) for e in job.log],
                "log_entries": [dict(e) for e in job.log],
                "result": job.result if isinstance(job.result, (dict, str, type(None))) else None,
            }
