"""Tracking plans, as Segment Protocols has them: what a source's events may look like.

A plan (one JSON file per source) holds a JSON Schema per track event name (for ``properties``)
and one each for identify and group (for ``traits``), and three policies: unplanned events are
allowed or blocked, unplanned properties kept or omitted, schema violations block the event, omit
the violating properties, or report them as "Violation Generated" track events. page, screen and
alias events are not planned. This module owns the file format, its validation (``PlanError``
names the file and key) and the decision for one event (``TrackingPlan.apply``, which returns a
``PlanOutcome`` and leaves storing, logging and counting to its caller). Apart from reading the
file in ``load_plan`` it does no I/O, never mutates the event it is given, and never raises for
a JSON-like event.

JSON Schema by jsonschema-rs, measured fastest at collecting every violation with its path
(tests/bench_plans.py, one core, 8-property "Order Completed" schema; valid / invalid events per
second): jsonschema-rs ~1.4M / ~55k (8 violations each), jsonschema ~10k / ~8k, fastjsonschema
~190k / ~420k but it stops at the first error and ignores 2019-09/2020-12 keywords.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from router.errors import RouterError

if TYPE_CHECKING:
    # Imported where a plan is compiled or checked: most configs have no plan, and the daemon
    # starts ~50 ms sooner without it.
    import jsonschema_rs

__all__ = [
    "PlanError",
    "PlanOutcome",
    "TrackingPlan",
    "Violation",
    "load_plan",
    "parse_plan",
]

UnplannedEvents = Literal["allow", "block"]
UnplannedProperties = Literal["keep", "omit"]
OnViolation = Literal["block", "omit", "report"]
ViolationKind = Literal["unplanned_event", "unplanned_property", "schema"]

# The least destructive choice for each policy, as Segment's own defaults: nothing is dropped,
# and violations are made visible.
_DEFAULTS: dict[str, str] = {
    "unplanned_events": "allow",
    "unplanned_properties": "keep",
    "violations": "report",
}
_MODES: dict[str, tuple[str, ...]] = {
    "unplanned_events": get_args(UnplannedEvents),
    "unplanned_properties": get_args(UnplannedProperties),
    "violations": get_args(OnViolation),
}
_KEYS = (*_MODES, "track", "identify", "group")
_MAX_MESSAGE = 300  # library messages quote the offending value, which the client controls
_NEEDS_ESCAPE = re.compile(r"[^A-Za-z0-9_-]")  # escaped as FQL paths are: product\ 1


class PlanError(RouterError):
    """A plan file that cannot be used, located by file and key path.

    ``str(err)`` reads like ``plans/web.json: track.Order Completed: invalid JSON Schema: ...``.
    """

    def __init__(self, message: str, *, file: str, key: str = "") -> None:
        self.message = message
        self.file = file
        self.key = key
        super().__init__(": ".join(part for part in (file, key, message) if part))


@dataclass(frozen=True)
class Violation:
    """One way an event departs from its plan.

    ``path`` is dotted from the event's root, as FQL writes it: ``properties.products.1.sku``.
    ``keyword`` is the JSON Schema keyword that failed (``required``, ``minimum``), or "" for the
    unplanned kinds.
    """

    path: str
    message: str
    kind: ViolationKind
    keyword: str = ""


@dataclass(frozen=True)
class PlanOutcome:
    """What to store for one event.

    ``violations`` lists every departure from the plan whatever the policies (an allowed unplanned
    event and a kept unplanned property are listed too), so a caller can count them; the policies
    decide only ``event`` and ``generated``. ``generated`` holds one "Violation Generated" track
    event per schema violation in report mode: store them after ``event``, without a messageId
    (the ingest path mints one), and do not apply the plan to them again.
    """

    event: dict[str, Any] | None
    violations: tuple[Violation, ...] = ()
    generated: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class _Schema:
    validator: jsonschema_rs.Validator
    declared: frozenset[str]  # the schema's top-level "properties": the planned keys


class TrackingPlan:
    """A parsed plan, every schema compiled once. Built by ``load_plan`` or ``parse_plan``."""

    def __init__(
        self,
        *,
        file: str,
        unplanned_events: UnplannedEvents,
        unplanned_properties: UnplannedProperties,
        violations: OnViolation,
        track: Mapping[str, _Schema],
        identify: _Schema | None,
        group: _Schema | None,
    ) -> None:
        self.file = file
        self.unplanned_events = unplanned_events
        self.unplanned_properties = unplanned_properties
        self.violations = violations
        self.events = frozenset(track)
        self._track = dict(track)
        self._traits = {"identify": identify, "group": group}

    def __repr__(self) -> str:
        return f"<TrackingPlan {self.file} events={len(self.events)}>"

    def apply(self, event: dict[str, Any]) -> PlanOutcome:
        """Check one event against the plan and decide what to store. Pure; never raises."""
        kind = event.get("type")
        if kind == "track":
            name = event.get("event")
            if not isinstance(name, str) or (schema := self._track.get(name)) is None:
                message = _short(f"event {name!r} is not in the tracking plan")
                unplanned = Violation("event", message, "unplanned_event")
                kept = None if self.unplanned_events == "block" else event
                return PlanOutcome(kept, (unplanned,))
            return self._check(event, "properties", schema, name)
        if kind == "identify" or kind == "group":
            traits_schema = self._traits[kind]
            if traits_schema is not None:
                return self._check(event, "traits", traits_schema, kind)
        return PlanOutcome(event)

    def _check(self, event: dict[str, Any], field: str, schema: _Schema, name: str) -> PlanOutcome:
        payload = event.get(field)
        if payload is None:
            payload = {}  # a missing properties object is an empty one, as Segment validates it
        kept = payload
        found: list[Violation] = []
        if isinstance(payload, dict) and not payload.keys() <= schema.declared:
            unplanned = [key for key in payload if key not in schema.declared]
            found = [
                Violation(_join(field, [key]), "not in the tracking plan", "unplanned_property")
                for key in unplanned
            ]
            if self.unplanned_properties == "omit":
                kept = {k: v for k, v in payload.items() if k in schema.declared}
        # Omitting unplanned properties comes first (as in Segment), so a schema that forbids
        # additional properties does not then fail on what was already dropped.
        errors = _validate(schema.validator, kept, field)
        if not errors:
            stored = event if kept is payload else {**event, field: kept}
            return PlanOutcome(stored, tuple(found)) if found else PlanOutcome(stored)
        found.extend(violation for _, violation in errors)
        if self.violations == "block":
            return PlanOutcome(None, tuple(found))
        generated: tuple[dict[str, Any], ...] = ()
        if self.violations == "report":
            generated = tuple(self._violation_event(event, name, v) for _, v in errors)
        elif isinstance(kept, dict):
            # Omit: a violation anywhere inside a property omits the whole top-level property;
            # cutting deeper could leave its parent invalid (a required key gone, an item short).
            bad = {key for key, _ in errors if key is not None}
            if bad & kept.keys():
                kept = {k: v for k, v in kept.items() if k not in bad}
        stored = event if kept is payload else {**event, field: kept}
        return PlanOutcome(stored, tuple(found), generated)

    def _violation_event(
        self, event: dict[str, Any], name: str, violation: Violation
    ) -> dict[str, Any]:
        """A "Violation Generated" track event, with the property names Segment forwards."""
        generated: dict[str, Any] = {"type": "track", "event": "Violation Generated"}
        for identity in ("userId", "anonymousId"):
            if identity in event:
                generated[identity] = event[identity]
        generated["properties"] = {
            "eventName": name,
            "eventType": event.get("type"),
            "eventMessageID": event.get("messageId"),
            "eventTimestamp": event.get("timestamp"),
            "eventSentAt": event.get("sentAt"),
            "trackingPlanName": self.file,
            "violationType": violation.keyword[:1].upper() + violation.keyword[1:],
            "violationField": violation.path,
            "violationDescription": violation.message,
        }
        generated["context"] = {"protocols": {"generated": True}}
        return generated


def _validate(
    validator: jsonschema_rs.Validator, payload: Any, field: str
) -> list[tuple[str | None, Violation]]:
    """Every schema violation, each with the top-level key it lies under (None: the whole).

    jsonschema-rs recurses natively: a self-referencing schema walking an event nested over
    10,000 levels deep overflows its stack (a crash, not an exception). Events come from
    ``decode_json``, which refuses anything deeper than 64 levels (Python's json stops near 1,000).
    """
    import jsonschema_rs

    try:
        if validator.is_valid(payload):  # the common case, ~1.7x faster than iter_errors
            return []
        errors = list(validator.iter_errors(payload))
    except ValueError as exc:
        # A value that has no JSON form, such as a lone surrogate in a string: it cannot be
        # checked, so it cannot pass. msgspec refuses these at ingest; other callers may not.
        return [(None, Violation(field, f"cannot be validated: {exc}", "schema"))]
    found: list[tuple[str | None, Violation]] = []
    for error in errors:
        keyword = error.kind.name
        where = list(error.instance_path)
        kind = error.kind
        # Name the property itself, not the object around it: a missing required key, or each
        # key that additionalProperties refused, so omit mode can drop exactly those.
        if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
            found.append(_located(field, [*where, kind.property], error.message, keyword))
        elif isinstance(
            kind,
            jsonschema_rs.ValidationErrorKind.AdditionalProperties
            | jsonschema_rs.ValidationErrorKind.UnevaluatedProperties,
        ):
            found.extend(
                _located(field, [*where, key], f"{key!r} is not allowed ({keyword})", keyword)
                for key in kind.unexpected
            )
        else:
            found.append(_located(field, where, error.message, keyword))
    return found


def _located(
    field: str, where: list[str | int], message: str, keyword: str
) -> tuple[str | None, Violation]:
    top = where[0] if where and isinstance(where[0], str) else None
    return top, Violation(_join(field, where), _short(message), "schema", keyword)


def _short(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def _join(field: str, where: list[str | int]) -> str:
    parts = [field]
    for part in where:
        text = str(part)
        parts.append(_NEEDS_ESCAPE.sub(lambda m: "\\" + m.group(), text))
    return ".".join(parts)


def load_plan(path: Path) -> TrackingPlan:
    """Read and check a plan file; every schema in it is compiled once, here."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read the plan: {exc}", file=file) from exc
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"invalid JSON: {exc.msg}", file=f"{file}:{exc.lineno}:{exc.colno}"
        ) from exc
    except ValueError as exc:  # from _no_duplicates
        raise PlanError(str(exc), file=file) from exc
    if not isinstance(data, dict):
        raise PlanError(f"a plan is a JSON object, not {_json_type(data)}", file=file)
    return parse_plan(data, file=file)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; in a plan that silently drops an event's schema.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_plan(data: Mapping[str, Any], *, file: str) -> TrackingPlan:
    """Check a decoded plan and compile its schemas. ``file`` names it in errors."""
    unknown = [key for key in data if key not in _KEYS]
    if unknown:
        raise PlanError(
            f"unknown key (expected one of: {', '.join(_KEYS)})", file=file, key=unknown[0]
        )
    modes = {key: _mode(data, key, file) for key in _MODES}
    track = data.get("track", {})
    if not isinstance(track, dict):
        raise PlanError(
            f"expected an object of event name -> JSON Schema, not {_json_type(track)}",
            file=file,
            key="track",
        )
    return TrackingPlan(
        file=file,
        unplanned_events=modes["unplanned_events"],  # type: ignore[arg-type]
        unplanned_properties=modes["unplanned_properties"],  # type: ignore[arg-type]
        violations=modes["violations"],  # type: ignore[arg-type]
        track={name: _compile(schema, file, f"track.{name}") for name, schema in track.items()},
        identify=_compile(data["identify"], file, "identify") if "identify" in data else None,
        group=_compile(data["group"], file, "group") if "group" in data else None,
    )


def _mode(data: Mapping[str, Any], key: str, file: str) -> str:
    value = data.get(key, _DEFAULTS[key])
    if value not in _MODES[key]:
        expected = ", ".join(repr(mode) for mode in _MODES[key])
        raise PlanError(f"unknown mode {value!r} (expected {expected})", file=file, key=key)
    return str(value)


def _compile(schema: Any, file: str, key: str) -> _Schema:
    # jsonschema-rs would read a str as JSON text; a schema is only ever an object or a boolean.
    if not isinstance(schema, dict | bool):
        raise PlanError(
            f"invalid JSON Schema: expected an object or a boolean, not {_json_type(schema)}",
            file=file,
            key=key,
        )
    import jsonschema_rs

    try:
        # Formats asserted whatever the draft (2020-12 only annotates them by default): a plan
        # that says "format": "email" means it. offline: a plan never fetches a remote $ref.
        validator = jsonschema_rs.validator_for(schema, validate_formats=True, offline=True)
    except ValueError as exc:  # jsonschema_rs.ValidationError, or a value with no JSON form
        raise PlanError(f"invalid JSON Schema: {_schema_problem(exc)}", file=file, key=key) from exc
    declared = schema.get("properties") if isinstance(schema, dict) else None
    return _Schema(validator, frozenset(declared) if isinstance(declared, dict) else frozenset())


def _schema_problem(exc: ValueError) -> str:
    import jsonschema_rs

    if isinstance(exc, jsonschema_rs.ValidationError):
        where = "/".join(str(part) for part in exc.instance_path)
        return f"{exc.message} (at /{where})" if where else exc.message
    return str(exc)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")
