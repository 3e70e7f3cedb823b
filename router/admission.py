"""What a source lets into the journal: its tracking plan applied to normalized events.

Runs at ingest, once per event (not once per destination), so a blocked event is never stored
and reaches no destination. Pure apart from reading the plan files at start-up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import msgspec

from router.config import Config, config_error
from router.events import StoredEvent, normalize
from router.plans import PlanError, TrackingPlan, load_plan

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# Source tallies: why events were not stored as sent.
BLOCKED_BY_PLAN = "blocked_by_plan"
PLAN_VIOLATIONS = "plan_violations"


def load_plans(config: Config) -> dict[str, TrackingPlan]:
    """Every source's plan, read and compiled; a bad plan is a config error at its source."""
    plans: dict[str, TrackingPlan] = {}
    for name, source in config.sources.items():
        if source.plan is None:
            continue
        try:
            plans[name] = load_plan(source.plan)
        except PlanError as exc:
            raise config_error(config, f"sources.{name}.plan", str(exc)) from exc
    return plans


def admit(
    plan: TrackingPlan | None,
    events: Iterable[StoredEvent],
    *,
    received_at: float,
    tallies: Counter[str],
) -> list[StoredEvent]:
    """The events to store: each checked against ``plan``, with any Violation Generated events
    right after the event they describe. Blocks and violations are counted in ``tallies``."""
    if plan is None:
        return list(events)
    admitted: list[StoredEvent] = []
    for stored in events:
        outcome = plan.apply(_decode(stored.body))
        tallies[PLAN_VIOLATIONS] += len(outcome.violations)
        if outcome.event is None:
            tallies[BLOCKED_BY_PLAN] += 1
            continue
        if outcome.violations:  # the plan may have omitted properties: store what it kept
            stored = StoredEvent(stored.message_id, _encode(outcome.event))
        admitted.append(stored)
        admitted.extend(normalize(dict(g), received_at=received_at) for g in outcome.generated)
    return admitted
