"""Progress events and cancellation shared by the CLI (tqdm) and the GUI (live charts)."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from .errors import JobCancelled
from .events import EVENTS, render
from .memory import resident_mb


@dataclass
class ProgressEvent:
    stage: str  # load | data | capture | calibrate | layer_done | fold | ppl | eval | convert | latency | done
    message: str = ""  # English, rendered from the catalogue's template (core.events)
    key: str = ""  # the event's key in core.events.EVENTS; front ends render their language from key + params
    params: dict = field(default_factory=dict)
    layer: Optional[int] = None  # 0-based index of the decoder layer being calibrated
    num_layers: Optional[int] = None
    epoch: Optional[int] = None  # 0-based
    epochs: Optional[int] = None
    step: Optional[int] = None  # 0-based step inside the epoch
    steps: Optional[int] = None  # steps per epoch
    loss: Optional[float] = None
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    rss_mb: Optional[float] = None  # host resident memory of the process when the event was emitted (MiB)
    device_mb: Optional[float] = None  # memory allocated on the cuda/npu device (MiB); None on cpu

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Set from any thread; long loops call ``check()`` once per step and stop with JobCancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobCancelled("Job cancelled by the user; files saved before the cancel are kept.")


class Reporter:
    """Stamps elapsed time on events and forwards them to an optional callback. Every event is one of the
    catalogue's (core.events.EVENTS): ``emit(key, params, **fields)``, its stage and English message come from
    there."""

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
        self.callback = callback
        self.cancel = cancel or CancelToken()
        self.start = time.monotonic()
        self.device = None  # set by the job once its device is known: events then carry device memory too

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def emit(self, key: str, params: Optional[dict] = None, **fields) -> None:
        kind = EVENTS[key]  # an unknown key is a bug wherever it is emitted, with or without a listener
        if self.callback is not None:
            params = dict(params or {})
            mem = resident_mb(self.device)
            fields.setdefault("rss_mb", mem["rss_mb"])
            fields.setdefault("device_mb", mem["device_mb"])
            self.callback(ProgressEvent(stage=kind.stage, message=render(key, params), key=key, params=params,
                                        elapsed_s=self.elapsed(), **fields))

    def check(self) -> None:
        self.cancel.check()
