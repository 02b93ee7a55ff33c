"""What every tab needs: the runner (jobs + models), the run store (folders + downloads), the component manager."""
from __future__ import annotations

from dataclasses import dataclass, field

from .manager import ComponentManager
from .runner import JobRunner
from .runs import RunStore


@dataclass
class AppContext:
    runner: JobRunner
    store: RunStore
    mgr: ComponentManager = field(default_factory=ComponentManager)
    model_roots: tuple[str, ...] = (".", "models", "~/models")
    poll_seconds: float = 1.0
