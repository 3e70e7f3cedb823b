"""`router route`: what each destination would receive of one event, step by step.

Pure apart from running the user's transform functions: the same pipelines as live traffic,
with a trace of every step, so what it prints is what the daemon would do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import msgspec

from router.config import Config
from router.errors import IngestError, RouterError
from router.events import normalize
from router.pipeline import Held, Pipeline, TransformFunction, pipelines
from router.plans import TrackingPlan


@dataclass(slots=True)
class Outcome:
    destination: str
    delivered: bool
    reason: str | None = None  # why it is held back
    steps: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = None


def pick_source(config: Config, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in config.sources:
            raise RouterError(f"unknown source {wanted!r} (known: {', '.join(config.sources)})")
        return wanted
    # The first source written in the file (the implicit socket source comes last).
    return next(iter(config.sources))


def stored_form(config: Config, source: str, event: Any, received_at: float) -> dict[str, Any]:
    """The event as ingest would store it (validated and normalized)."""
    try:
        stored = normalize(
            copy.deepcopy(event), received_at=received_at, raw=config.sources[source].raw
        )
    except IngestError as exc:
        raise RouterError(f"the event would be refused at ingest: {exc.message}") from exc
    result: dict[str, Any] = msgspec.json.decode(stored.body)
    return result


def plan_steps(
    plan: TrackingPlan | None, event: dict[str, Any]
) -> tuple[dict[str, Any] | None, list[str]]:
    """The source's tracking plan on the event: what is stored (None: blocked), and why."""
    if plan is None:
        return event, []
    outcome = plan.apply(event)
    steps = [f"plan {plan.file}: {v.kind} at {v.path}: {v.message}" for v in outcome.violations]
    if outcome.event is None:
        steps.append("plan: blocked; no destination receives it")
    steps += [f"plan: stores a Violation Generated event ({len(outcome.generated)})"] * bool(
        outcome.generated
    )
    return outcome.event, steps


def explain(
    config: Config,
    source: str,
    event: dict[str, Any],
    functions: dict[str, TransformFunction],
) -> list[Outcome]:
    routed = pipelines(config, functions)
    return [_one(name, routed.get(name), source, event) for name in config.destinations]


def _one(name: str, pipeline: Pipeline | None, source: str, event: dict[str, Any]) -> Outcome:
    if pipeline is None or not pipeline.routes:
        return Outcome(name, False, "no_route", ["no route names this destination"])
    steps: list[str] = []
    try:
        result = pipeline.shape(source, copy.deepcopy(event), steps)
    except Exception as exc:  # noqa: BLE001 - the user's transform function; shown, not raised
        return Outcome(name, False, "transform_error", [*steps, f"transform raised {exc!r}"])
    if isinstance(result, Held):
        return Outcome(name, False, result.reason, steps)
    return Outcome(name, True, None, steps, result)
