"""Job-wide progress: one fraction and one ETA across a job's stages (load → calibrate → PPL → evaluation), read
from the runner's event lists. A job's plan (set when it starts) names its stages, their weights and how many
parts each has (e.g. perplexity of 3 models); the fraction inside a stage comes from that stage's events."""
from __future__ import annotations

from typing import Optional

# stage name -> the event stages that belong to it
STAGE_EVENTS = {
    "load": ("load", "data", "capture"),
    "calibrate": ("calibrate", "layer_done", "warning", "fold"),
    "ppl": ("ppl",),
    "acc": ("eval", "acc"),
    "latency": ("latency",),
    "gen": ("gen", "generate"),
    "export": ("convert", "export"),
}


def plan_for(kind: str, *, ppl_parts: int = 0, acc_parts: int = 2, sections: tuple = ()) -> list[dict]:
    """[{stage, weight, parts}] for a job; weights are rough shares of the wall time on a CPU."""
    if kind in ("calibrate", "load_matrices"):
        plan = [{"stage": "load", "weight": 0.05 if kind == "calibrate" else 0.3, "parts": 1}]
        if kind == "calibrate":
            plan.append({"stage": "calibrate", "weight": 0.7, "parts": 1})
        if ppl_parts:
            plan.append({"stage": "ppl", "weight": 0.25 if kind == "calibrate" else 0.7, "parts": ppl_parts})
        return plan
    if kind == "evaluate":
        weights = {"ppl": 1.0, "acc": 3.0, "latency": 1.0, "gen": 0.3}
        parts = {"ppl": ppl_parts, "acc": acc_parts}
        return [{"stage": s, "weight": weights.get(s, 1.0), "parts": parts.get(s, 2)} for s in sections]
    return [{"stage": kind, "weight": 1.0, "parts": 1}]


def _stage_of(event: dict) -> Optional[str]:
    for stage, names in STAGE_EVENTS.items():
        if event.get("stage") in names:
            return stage
    return None


def _within(stage: str, events: list[dict], last: dict, parts: int) -> float:
    """Fraction done inside one stage from its events (the newest step event and the finished parts)."""
    if stage == "calibrate":
        if any(e.get("stage") == "fold" for e in events):  # every layer is calibrated and saved
            return 1.0
        if last.get("stage") not in ("calibrate", "layer_done"):  # e.g. a warning: the last finished layer counts
            done = [e for e in events if e.get("stage") == "layer_done"]
            last = done[-1] if done else {}
        if last.get("layer") is None or not last.get("num_layers"):
            return 0.0
        epochs, steps = last.get("epochs") or 1, last.get("steps") or 1
        if last.get("stage") == "calibrate" and last.get("step") is not None:
            inside = ((last.get("epoch") or 0) + (last["step"] + 1) / steps) / epochs
        else:
            inside = 1.0 if last.get("stage") == "layer_done" else 0.0
        return min(1.0, (last["layer"] + inside) / last["num_layers"])
    if stage == "ppl":
        # one run per model: step events restart at 0 for each; its value's event ends one
        finished = sum(1 for e in events if e.get("key") in ("ppl_value", "ppl_value_seqlen"))
        inside = 0.0
        if last.get("stage") == "ppl" and last.get("step") is not None and last.get("steps"):
            inside = last["step"] / last["steps"]
        return min(1.0, (finished + inside) / max(1, parts))
    if stage == "acc":
        finished = sum(1 for e in events if e.get("key") == "acc_value")
        inside = 0.0
        if last.get("stage") in ("eval", "acc") and last.get("step") is not None and last.get("steps"):
            inside = last["step"] / last["steps"]
        return min(1.0, (finished + inside) / max(1, parts))
    return 0.0


def job_fraction(snap: dict) -> Optional[float]:
    """0..1 over the whole job, or None when the job has no plan (then the page shows no bar)."""
    status = snap.get("status")
    if status == "done":
        return 1.0
    plan = snap.get("plan") or []
    if not plan:
        return None
    events = list(snap.get("events") or [])
    last = snap.get("last_event") or {}
    seen = {_stage_of(e) for e in events} | {_stage_of(last)}
    total = sum(p["weight"] for p in plan) or 1.0
    done = 0.0
    for i, part in enumerate(plan):
        later = {p["stage"] for p in plan[i + 1:]}
        if seen & later:  # a later stage started: this one is over
            done += part["weight"]
            continue
        if part["stage"] in seen:
            stage_events = [e for e in events if _stage_of(e) == part["stage"]]
            done += part["weight"] * _within(part["stage"], stage_events, last, part["parts"])
        break
    return max(0.0, min(1.0, done / total))


def job_eta(snap: dict, fraction: Optional[float]) -> Optional[float]:
    """Seconds left: the calibration's own estimate while it trains, else elapsed scaled by what is left."""
    if snap.get("status") != "running" or fraction is None:
        return None
    elapsed = float(snap.get("elapsed_s") or 0.0)
    if fraction < 0.02 or elapsed < 3:
        return None
    return elapsed * (1.0 - fraction) / fraction
