"""Segment's warehouse layout as data: an event in, rows for named tables out.

This module owns the naming (snake_case identifiers capped at Postgres' 63 bytes), which
tables an event lands in (``tracks`` plus one table per event name, ``identifies`` plus
``users``, ``pages``, ``screens``, ``groups``, ``aliases``), how properties, traits and
context flatten into columns, the type a new column gets, and what happens to a value that
does not fit its column. It is pure: no database, no clock (the load time is an argument).

Type choices, so that a batch never fails because of the shape of its data:
- a JSON number makes a ``double precision`` column (ints and floats alike: a column made by
  ``1`` would otherwise refuse a later ``1.5``), a bool a ``boolean``, a string, a list or
  anything else ``text`` (lists as JSON); the standard time fields are ``timestamptz``;
- a new column whose values in one batch disagree in kind becomes ``text``;
- a later value that does not fit an existing column (``"n/a"`` into a number column) is
  written as NULL there, and the value itself goes to the ``router_discards`` table with the
  table, column and row id, as RudderStack's ``rudder_discards`` does: nothing is lost and
  nothing retries forever; ``text`` columns take every value;
- columns router did not create and does not know (``integer``, ``jsonb``, ``uuid``...) get the
  value as text and Postgres casts it; a value that does not cast fails only its own event.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

__all__ = [
    "DISCARDS_TABLE",
    "MAX_IDENTIFIER_BYTES",
    "Discard",
    "Kind",
    "Row",
    "TablePlan",
    "event_table",
    "identifier",
    "kind_of_type",
    "plan_table",
    "rows_for",
    "schema_for",
    "snake_case",
]

Kind = Literal["text", "number", "boolean", "timestamp", "other"]
MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: Postgres would silently truncate longer names
DISCARDS_TABLE = "router_discards"

TYPE_TABLES = {
    "track": "tracks",
    "identify": "identifies",
    "page": "pages",
    "screen": "screens",
    "group": "groups",
    "alias": "aliases",
}
USERS_TABLE = "users"
RESERVED_TABLES = frozenset({*TYPE_TABLES.values(), USERS_TABLE, DISCARDS_TABLE})

# The columns of Segment's layout that are not data: their kinds are fixed, and a property or
# trait that collides with one in its table is renamed (``properties_id``) rather than dropped.
STANDARD_KINDS: dict[str, Kind] = {
    "id": "text",
    "received_at": "timestamp",
    "sent_at": "timestamp",
    "timestamp": "timestamp",
    "original_timestamp": "timestamp",
    "uuid_ts": "timestamp",
    "user_id": "text",
    "anonymous_id": "text",
    "event": "text",
    "event_text": "text",
    "name": "text",
    "category": "text",
    "group_id": "text",
    "previous_id": "text",
}
# The type router creates a column with, by kind.
SQL_TYPES: dict[Kind, str] = {
    "text": "text",
    "number": "double precision",
    "boolean": "boolean",
    "timestamp": "timestamptz",
    "other": "text",
}
_UDT_KINDS: dict[str, Kind] = {
    "text": "text",
    "varchar": "text",
    "bpchar": "text",
    "citext": "text",
    "float8": "number",
    "float4": "number",
    "numeric": "number",
    "bool": "boolean",
    "timestamptz": "timestamp",
    "timestamp": "timestamp",
}


def kind_of_type(udt_name: str) -> Kind:
    """The kind of an existing column from ``information_schema.columns.udt_name``."""
    return _UDT_KINDS.get(udt_name, "other")


# --- names -----------------------------------------------------------------------------------

_CAMEL_LOWER_UPPER = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")
_NOT_WORD = re.compile(r"[\W_]+")


@functools.lru_cache(maxsize=16384)  # names repeat in every event: compute each once
def snake_case(name: str) -> str:
    """``Order Completed`` -> ``order_completed``, ``orderId`` -> ``order_id``; may be ''."""
    spaced = _CAMEL_ACRONYM.sub(r"\1_\2", _CAMEL_LOWER_UPPER.sub(r"\1_\2", name))
    return _NOT_WORD.sub("_", spaced).strip("_").lower()


@functools.lru_cache(maxsize=16384)
def identifier(name: str) -> str:
    """A safe column/table/schema name: at most 63 bytes, never empty, not digit-first.

    A name past the limit keeps its head and gains 8 hex digits of a hash of the whole name,
    so two long names that share a head stay two columns, the same way on every run.
    """
    if not name:
        return "_"
    if name[0].isdigit():
        name = "_" + name
    raw = name.encode()
    if len(raw) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    head = raw[: MAX_IDENTIFIER_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}_{digest}"


def _segment(key: str) -> str:
    """One key of a nested path; a key with no letters or digits is named by its hash."""
    return snake_case(key) or "_" + hashlib.sha1(key.encode()).hexdigest()[:8]


def schema_for(source: str) -> str:
    """The schema of a router source: its name, snake_cased (Segment names it after the source)."""
    return identifier(_segment(source))


def event_table(event: str) -> str:
    """The table of a track event's properties; never one of the layout's own tables."""
    name = identifier(_segment(event))
    return "_" + name if name in RESERVED_TABLES else name


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects joined with ``_`` into snake_case column names; nulls and empty objects
    leave no column. When two paths make one name (``a_b`` and ``a.b``), the later wins."""
    out: dict[str, Any] = {}
    _flatten_into(out, value, prefix)
    return out


def _flatten_into(out: dict[str, Any], value: Mapping[str, Any], prefix: str) -> None:
    for key, item in value.items():
        path = f"{prefix}_{_segment(str(key))}" if prefix else _segment(str(key))
        if isinstance(item, dict):
            _flatten_into(out, item, path)
        elif item is not None:
            out[identifier(path)] = item


# --- events to rows --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    table: str
    values: dict[str, Any]


def rows_for(
    event: Any, *, message_id: str, received_at: float, loaded_at: datetime
) -> list[Row] | None:
    """The rows one event makes, or None when it is not a Segment event (no known ``type``)."""
    if not isinstance(event, dict) or event.get("type") not in TYPE_TABLES:
        return None
    kind = event["type"]
    base: dict[str, Any] = {
        "id": message_id,
        "received_at": event.get("receivedAt")
        or datetime.fromtimestamp(received_at, UTC).isoformat(),
        "sent_at": event.get("sentAt"),
        "timestamp": event.get("timestamp"),
        "original_timestamp": event.get("originalTimestamp"),
        "user_id": event.get("userId"),
        "anonymous_id": event.get("anonymousId"),
        "uuid_ts": loaded_at,
    }
    context = event.get("context")
    contextual = (flatten(context, "context") if isinstance(context, dict) else {}, "")
    if kind == "track":
        name = str(event.get("event", ""))
        table = event_table(name)
        base |= {"event": table, "event_text": name}
        properties = (flatten(_mapping(event.get("properties"))), "properties")
        return [
            Row("tracks", _row(base, contextual)),
            Row(table, _row(base, contextual, properties)),
        ]
    if kind in ("page", "screen"):
        base |= {"name": event.get("name"), "category": event.get("category")}
        properties = (flatten(_mapping(event.get("properties"))), "properties")
        return [Row(TYPE_TABLES[kind], _row(base, contextual, properties))]
    if kind == "identify":
        traits = _mapping(context.get("traits") if isinstance(context, dict) else None)
        flat = (flatten({**traits, **_mapping(event.get("traits"))}), "traits")
        rows = [Row("identifies", _row(base, contextual, flat))]
        if base["user_id"] not in (None, ""):
            user = {"id": base["user_id"], "received_at": base["received_at"], "uuid_ts": loaded_at}
            rows.append(Row(USERS_TABLE, _row(user, flat)))
        return rows
    if kind == "group":
        base["group_id"] = event.get("groupId")
        group_traits = (flatten(_mapping(event.get("traits"))), "traits")
        return [Row("groups", _row(base, contextual, group_traits))]
    base["previous_id"] = event.get("previousId")
    return [Row("aliases", _row(base, contextual))]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# Data never takes these names, in any table: their kind is fixed, and a ``timestamp`` trait
# made into a timestamptz column would discard every value that is not a time.
_TIME_COLUMNS = frozenset(name for name, kind in STANDARD_KINDS.items() if kind == "timestamp")


def _row(standard: dict[str, Any], *data: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """The standard columns (nulls left out), then each part of data with its prefix for names
    that collide: the row's own standard columns (a page's ``name``, but an identify's ``name``
    trait stays ``name``) and the time columns."""
    reserved = standard.keys() | _TIME_COLUMNS
    merged = {name: value for name, value in standard.items() if value is not None}
    for part, prefix in data:
        for name, value in part.items():
            column = identifier(f"{prefix}_{name}") if name in reserved else name
            merged.setdefault(column, value)
    return merged


# --- rows to a table's write -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Discard:
    """A value that did not fit its column: the column holds NULL, this row holds the value."""

    table: str
    column: str
    row_id: str
    value: str


@dataclass(frozen=True, slots=True)
class TablePlan:
    """What writing some rows into one table takes: columns to add first, then the rows."""

    table: str
    add: dict[str, Kind]  # new columns and the kind each is created with
    columns: tuple[str, ...]
    kinds: tuple[Kind, ...]
    types: tuple[str, ...]  # the column's type as Postgres names it (for casts to "other")
    rows: list[tuple[Any, ...]]
    discards: list[Discard] = field(default_factory=list)

    def sql_type(self, column: str) -> str:
        return SQL_TYPES[self.add[column]]


def plan_table(
    table: str, rows: Sequence[Mapping[str, Any]], known: Mapping[str, str], *, upsert: bool
) -> TablePlan:
    """Plan one table's write. ``known``: its existing columns and their udt names, or empty
    when the table does not exist yet. With ``upsert``, rows with one id merge into one, the
    newer (by ``received_at``) winning per column."""
    if upsert:
        rows = _merge_by_id(rows)
    seen: dict[str, Any] = {"id": None}
    for row in rows:
        seen.update(row)  # in C: the columns in order of first appearance
    names = list(seen)
    add = {name: _infer(name, rows) for name in names if name not in known}
    kinds = tuple(kind_of_type(known[n]) if n in known else add[n] for n in names)
    types = tuple(known.get(n, SQL_TYPES[add.get(n, "text")]) for n in names)
    converters = [_CONVERTERS[kind] for kind in kinds]
    planned: list[tuple[Any, ...]] = []
    discards: list[Discard] = []
    for row in rows:
        get = row.get
        values: list[Any] = []
        for name, convert in zip(names, converters, strict=True):
            value = get(name)
            if value is not None:
                converted = convert(value)
                if converted is _MISFIT:
                    discards.append(Discard(table, name, str(get("id")), _as_text(value)))
                    converted = None
                value = converted
            values.append(value)
        planned.append(tuple(values))
    return TablePlan(table, add, tuple(names), kinds, types, planned, discards)


def _infer(name: str, rows: Iterable[Mapping[str, Any]]) -> Kind:
    standard = STANDARD_KINDS.get(name)
    if standard is not None:
        return standard
    kinds = {_kind_of_value(row[name]) for row in rows if row.get(name) is not None}
    return kinds.pop() if len(kinds) == 1 else "text"


def _kind_of_value(value: Any) -> Kind:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, datetime):
        return "timestamp"
    return "text"


_MISFIT = object()  # what a converter returns for a value its column cannot hold


def coerce(kind: Kind, value: Any) -> tuple[bool, Any]:
    """(True, the value as the column takes it) or (False, None) when it does not fit."""
    converted = _CONVERTERS[kind](value)
    return (False, None) if converted is _MISFIT else (True, converted)


def _as_number(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            return _MISFIT
        return number if math.isfinite(number) else _MISFIT
    return _MISFIT


def _as_boolean(value: Any) -> Any:
    return value if isinstance(value, bool) else _MISFIT


def _as_timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return _parse_time(value)
    return _MISFIT


@functools.lru_cache(maxsize=4096)  # the events of a batch share their receivedAt
def _parse_time(text: str) -> Any:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return _MISFIT
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _as_text(value: Any) -> str:
    if type(value) is str:
        # Postgres text cannot hold NUL; U+FFFD keeps the position visible.
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return msgspec.json.encode(value).decode()


_CONVERTERS: dict[Kind, Callable[[Any], Any]] = {
    "text": _as_text,
    "other": _as_text,
    "number": _as_number,
    "boolean": _as_boolean,
    "timestamp": _as_timestamp,
}


def _merge_by_id(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    ordered = sorted(rows, key=lambda row: str(row.get("received_at", "")))
    for row in ordered:
        merged.setdefault(str(row["id"]), {}).update(row)
    # In id order: concurrent batches then lock the same users in the same order (no deadlock).
    return [merged[user_id] for user_id in sorted(merged)]
