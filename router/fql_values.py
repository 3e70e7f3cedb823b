"""FQL's value semantics over JSON-shaped events: kinds, strict equality and field lookup.

Owns what FQL thinks a value is (null, bool, number, string, list or object; ``true`` is not
``1``), its strict ``=``, how a dotted path walks an event (anything missing on the way is
null), and ``CannotEvaluate``, the signal that an event cannot be judged. Shared by the
functions and the compiler; knows nothing of syntax.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any


class CannotEvaluate(Exception):
    """This event gives a function a value it cannot judge; ``matches`` answers None."""


_KIND_OF_TYPE: dict[type, str] = {
    type(None): "null",
    bool: "bool",
    int: "number",
    float: "number",
    str: "string",
    list: "list",
    tuple: "list",
    dict: "object",
}


def kind_of(value: Any) -> str | None:
    kind = _KIND_OF_TYPE.get(type(value))
    if kind is not None:
        return kind
    # Subclasses (an IntEnum, a str subclass) are rare in events; bool before int on purpose.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    return "object" if isinstance(value, Mapping) else None


def is_number(value: Any) -> bool:
    return kind_of(value) == "number"


def strictly_equal(a: Any, b: Any) -> bool:
    """FQL's strict '=': same type and equal, all the way down; true is not 1."""
    kind = kind_of(a)
    if kind != kind_of(b) or kind is None:
        return False
    if kind == "list":
        return len(a) == len(b) and all(strictly_equal(x, y) for x, y in zip(a, b, strict=True))
    if kind == "object":
        return bool(a.keys() == b.keys()) and all(strictly_equal(a[key], b[key]) for key in a)
    return bool(a == b)


def lookup(value: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if type(value) is dict or isinstance(value, Mapping):
            value = value.get(key)
        else:
            return None  # a missing field, or a list or scalar on the way: FQL's null
    return value


@functools.lru_cache(maxsize=1024)
def split_path(path: str) -> tuple[str, ...]:
    """FQL's path rules: dots separate keys; ``\\`` escapes the next character."""
    keys: list[str] = []
    key: list[str] = []
    chars = iter(path)
    for char in chars:
        if char == "\\":
            key.append(next(chars, "\\"))
        elif char == ".":
            keys.append("".join(key))
            key = []
        else:
            key.append(char)
    keys.append("".join(key))
    return tuple(keys)


def value_at(event: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted FQL path (``properties.product\\ 1.price``); None when missing."""
    return lookup(event, split_path(path))
