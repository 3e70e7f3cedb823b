"""What one destination receives of one event: routes, integrations, filters, transforms, PII.

Pure: a ``Pipeline`` is compiled once per destination from the config and then turns a stored
event (its source and JSON body) into either the payload to deliver or the reason it is held
back. The steps run in this order, each on the previous step's output:

1. routes: some route naming the destination takes the event's source and its ``when`` holds;
2. the event's ``integrations`` object (Segment's: ``{"All": false, "hook": true}``);
3. destination filters in Segment's order, whatever the order written: sample, drop, drop
   properties, allow properties;
4. transforms: set, rename, remove, then the Python function if one is configured;
5. privacy last (drop, then hash), so that no earlier step can put a field back.

A condition that cannot be evaluated for an event holds the event back (fail closed): a filter
that errs must not leak what it was meant to keep out. Each hold-back has a reason, counted by
the dispatcher.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from router import fql
from router.config import Config, FilterConfig, PrivacyConfig, TransformConfig
from router.fql_values import lookup, split_path

Event = dict[str, Any]
TransformFunction = Callable[[Event], Event | None]

# Why an event is held back from a destination.
NO_ROUTE = "no_route"  # no route's `when` holds for it
FILTER_ERROR = "filter_error"  # a condition could not be evaluated for it (fail closed)
INTEGRATIONS = "integrations"  # its `integrations` turn the destination off
SAMPLED_OUT = "sampled_out"
DROPPED = "dropped"  # a drop filter matched
TRANSFORM_DROPPED = "transform_dropped"  # the transform function returned None
NOT_AN_OBJECT = "not_an_object"

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Held:
    """The event does not go to this destination, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Route:
    sources: frozenset[str] | None  # None: every source
    when: fql.Expression | None  # None: every event
    index: int = 0  # its place among the config's routes, for messages


class Pipeline:
    """One destination's view of the log. Build with ``Pipeline.for_destination``."""

    def __init__(
        self,
        name: str,
        routes: list[Route],
        filters: tuple[FilterConfig, ...] = (),
        transform: TransformConfig | None = None,
        privacy: PrivacyConfig | None = None,
        function: TransformFunction | None = None,
    ) -> None:
        self.name = name
        self.routes = routes
        self._any_source = any(r.sources is None for r in routes)
        self._sources = frozenset(s for r in routes for s in (r.sources or ()))
        self._needs_event = any(r.when is not None for r in routes)
        self._filters = _order_filters(filters)
        self._transform = transform or TransformConfig()
        self._privacy = privacy or PrivacyConfig()
        self.function = function

    @classmethod
    def for_destination(
        cls, config: Config, name: str, function: TransformFunction | None = None
    ) -> Pipeline:
        routes = [
            Route(
                frozenset(route.sources) if route.sources is not None else None,
                fql.parse(route.when) if route.when is not None else None,
                index,
            )
            for index, route in enumerate(config.routes)
            if name in route.to
        ]
        destination = config.destinations[name]
        return cls(
            name,
            routes,
            destination.filters,
            destination.transform,
            destination.privacy,
            function,
        )

    def takes_source(self, source: str) -> bool:
        """Whether events of ``source`` are routed here at all (before any condition)."""
        return self._any_source or source in self._sources

    def prepare(self, source: str, body: bytes, *, routed: bool = False) -> bytes | Held:
        """The payload to deliver for a stored event, or why it is held back. ``routed``: the
        routes already took it (a retry, or a replay chosen by them or by an operator), so
        only the destination's own steps run."""
        try:
            event = _decode(body)
        except msgspec.DecodeError:
            return Held(NOT_AN_OBJECT)  # stored bodies are valid JSON; this is belt and braces
        if type(event) is not dict:
            return Held(NOT_AN_OBJECT)
        outcome = self.shape(source, event, routed=routed)
        return outcome if isinstance(outcome, Held) else _encode(outcome)

    def routes_take(self, source: str, event: Event) -> bool:
        """Whether some route to this destination takes the event (for choosing a replay)."""
        return self._route(source, event, _ignore) is None

    def shape(
        self,
        source: str,
        event: Event,
        trace: list[str] | None = None,
        *,
        routed: bool = False,
    ) -> Event | Held:
        """Every step on a decoded event (modified in place and returned). With ``trace``,
        each step appends what it did, for `router route`."""
        note = trace.append if trace is not None else _ignore
        held = None if routed else self._route(source, event, note)
        held = held or self._integrations(event, note)
        if held is not None:
            return held
        for index, spec, condition in self._filters:
            result = _apply_filter(spec, condition, event)
            note(f"filters[{index}] ({_describe(spec)}): {result.reason if result else 'passed'}")
            if result is not None:
                return result
        _edit(event, self._transform, note)
        if self.function is not None:
            changed = self.function(event)
            note(f"transform function: {'dropped it' if changed is None else 'applied'}")
            if changed is None:
                return Held(TRANSFORM_DROPPED)
            event = changed
        _protect(event, self._privacy, note)
        return event

    def _route(self, source: str, event: Event, note: Callable[[str], None]) -> Held | None:
        failed = False
        for route in self.routes:
            where = f"routes[{route.index}]"
            if route.sources is not None and source not in route.sources:
                note(f"{where}: does not take source {source!r}")
                continue
            verdict = True if route.when is None else route.when.matches(event)
            if verdict:
                note(f"{where}: takes it" + (f" (when {route.when})" if route.when else ""))
                return None
            note(f"{where}: when {route.when} is " + ("false" if verdict is False else "an error"))
            failed = failed or verdict is None
        return Held(FILTER_ERROR if failed else NO_ROUTE)

    def _integrations(self, event: Event, note: Callable[[str], None]) -> Held | None:
        integrations = event.get("integrations")
        if type(integrations) is not dict or not integrations:
            return None
        own = integrations.get(self.name)
        if own is None:
            default = integrations.get("All", integrations.get("all", True))
            enabled = default is not False
        else:
            # A destination's own entry may be an options object (Segment allows it): on.
            enabled = own is not False
        if not enabled:
            note(f"integrations: turned off for {self.name!r}")
        return None if enabled else Held(INTEGRATIONS)


def _ignore(_step: str) -> None:
    return None


def _describe(spec: FilterConfig) -> str:
    condition = f"if {spec.condition}: " if spec.condition else ""
    if spec.sample is not None:
        return f"{condition}sample {spec.sample.percent:g}% by {spec.sample.by}"
    if spec.drop:
        return f"{condition}drop"
    if spec.drop_properties:
        return f"{condition}drop_properties {list(spec.drop_properties)}"
    return f"{condition}allow_properties {list(spec.allow_properties)}"


# -- filters -------------------------------------------------------------------

_FILTER_ORDER = ("sample", "drop", "drop_properties", "allow_properties")


def _order_filters(
    filters: tuple[FilterConfig, ...],
) -> list[tuple[int, FilterConfig, fql.Expression | None]]:
    compiled = [
        (index, f, fql.parse(f.condition) if f.condition else None)
        for index, f in enumerate(filters)
    ]
    return sorted(compiled, key=lambda item: _FILTER_ORDER.index(item[1].actions[0]))


def _apply_filter(
    spec: FilterConfig, condition: fql.Expression | None, event: Event
) -> Held | None:
    verdict = True if condition is None else condition.matches(event)
    if verdict is None:
        return Held(FILTER_ERROR)
    if not verdict:
        return None
    if spec.drop:
        return Held(DROPPED)
    if spec.sample is not None:
        return (
            None
            if kept_by_sample(event, spec.sample.percent, spec.sample.by)
            else Held(SAMPLED_OUT)
        )
    for path in spec.drop_properties:
        remove_path(event, path)
    if spec.allow_properties:
        _allow_only(event, spec.allow_properties)
    return None


def kept_by_sample(event: Event, percent: float, by: str) -> bool:
    """Deterministic: the same value of ``by`` is always kept or always dropped."""
    value = fql.value_at(event, by)
    if value is None:
        value = event.get("messageId")
    digest = hashlib.blake2b(_encode(value), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < percent * 100


def _allow_only(event: Event, paths: tuple[str, ...]) -> None:
    """Keep, in each object a path names (``properties``, ``traits``, ``context``...), only the
    keys listed for it; objects no path names are left alone."""
    allowed: dict[str, set[str]] = {}
    for path in paths:
        parent, _, key = path.rpartition(".")
        allowed.setdefault(parent, set()).add(key)
    for parent, keys in allowed.items():
        holder = fql.value_at(event, parent) if parent else event
        if type(holder) is dict:
            for key in [k for k in holder if k not in keys]:
                del holder[key]


# -- transforms ----------------------------------------------------------------

Keys = tuple[str, ...]


def _set(event: Event, keys: Keys, value: Any) -> None:
    holder = event
    for key in keys[:-1]:
        child = holder.get(key)
        if type(child) is not dict:
            child = holder[key] = {}
        holder = child
    holder[keys[-1]] = value


def _remove(event: Event, keys: Keys) -> Any:
    holder = lookup(event, keys[:-1]) if len(keys) > 1 else event
    return holder.pop(keys[-1], None) if type(holder) is dict else None


def set_path(event: Event, path: str, value: Any) -> None:
    _set(event, split_path(path), value)


def remove_path(event: Event, path: str) -> Any:
    """Remove the value at ``path``; returns it (None when absent)."""
    return _remove(event, split_path(path))


def _edit(event: Event, transform: TransformConfig, note: Callable[[str], None]) -> None:
    for source, target in transform.rename.items():
        moved = remove_path(event, source)
        if moved is not None:
            set_path(event, target, moved)
            note(f"transform: renamed {source} to {target}")
    for path in transform.remove:
        if remove_path(event, path) is not None:
            note(f"transform: removed {path}")
    for path, value in transform.set.items():
        set_path(event, path, value)
        note(f"transform: set {path}")


# -- privacy -------------------------------------------------------------------


def _is_pattern(path: str) -> bool:
    return any(c in path for c in "*?[")


def _walk(value: Any, keys: Keys = ()) -> Iterator[Keys]:
    """The key path of every field, objects and values alike (lists are values)."""
    if type(value) is dict:
        for key, child in value.items():
            here = (*keys, str(key))
            yield here
            yield from _walk(child, here)


def _matching(event: Event, specs: tuple[str, ...]) -> list[Keys]:
    """Key paths of the fields ``specs`` name: exact paths, and globs over dotted paths."""
    found = [split_path(s) for s in specs if not _is_pattern(s)]
    found = [keys for keys in found if lookup(event, keys) is not None]
    patterns = [s for s in specs if _is_pattern(s)]
    if patterns:
        found += [
            keys
            for keys in _walk(event)
            if any(fnmatch.fnmatchcase(".".join(keys), pattern) for pattern in patterns)
        ]
    return found


def hash_value(value: Any, salt: str) -> str:
    """Salted SHA-256, hex. Strings hash as their text, so the same email hashes the same
    whichever field or destination it came through."""
    text = value if type(value) is str else _encode(value).decode()
    return hashlib.sha256(salt.encode() + text.encode()).hexdigest()


def _protect(event: Event, privacy: PrivacyConfig, note: Callable[[str], None]) -> None:
    if privacy.drop:
        for keys in _matching(event, privacy.drop):
            _remove(event, keys)
            note(f"privacy: dropped {'.'.join(keys)}")
    if privacy.hash and privacy.salt is not None:
        salt = privacy.salt.reveal()
        for keys in _matching(event, privacy.hash):
            value = lookup(event, keys)
            if value is not None:
                _set(event, keys, hash_value(value, salt))
                note(f"privacy: hashed {'.'.join(keys)}")


def pipelines(config: Config, functions: Mapping[str, TransformFunction]) -> dict[str, Pipeline]:
    """A pipeline for every destination (one that no route names still takes replays)."""
    return {
        name: Pipeline.for_destination(
            config,
            name,
            functions.get(config.destinations[name].transform.function or ""),
        )
        for name in config.destinations
    }
