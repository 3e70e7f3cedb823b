"""The FQL functions: contains, match, length, the case functions, typeof, bool, string, number.

Owns ``FUNCTIONS``, each name's argument count and implementation, called with already
evaluated arguments. A function given a value the reference does not define for it raises
``CannotEvaluate``; it never guesses. The parser reads the table to check calls; the compiler
calls into it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from router.fql_glob import BadPattern, glob_matcher
from router.fql_values import CannotEvaluate, kind_of


def _contains(text: Any, part: Any) -> bool:
    return isinstance(text, str) and isinstance(part, str) and part in text


def _match(text: Any, pattern: Any) -> bool:
    if not (isinstance(text, str) and isinstance(pattern, str)):
        return False
    try:
        matcher = glob_matcher(pattern)
    except BadPattern as exc:
        raise CannotEvaluate from exc
    return matcher(text)


def _length(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        # Bytes, as Segment counts them; surrogatepass so a lone surrogate counts, not raises.
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list | tuple):
        return len(value)
    raise CannotEvaluate


def _text_function(change: Callable[[str], str]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        return change(value) if isinstance(value, str) else None

    return apply


def _titlecase(text: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def _typeof(value: Any) -> str:
    kind = kind_of(value)
    if kind is None:
        raise CannotEvaluate
    return kind


_TRUE_TEXT = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE_TEXT = frozenset({"", "0", "f", "F", "false", "FALSE", "False"})
_NUMBER_TEXT = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def _to_bool(value: Any) -> bool:
    kind = kind_of(value)
    if kind == "null":
        return False
    if kind == "bool":
        return bool(value)
    if kind == "number":
        return bool(value != 0)
    if kind == "list":
        return len(value) > 0
    if kind == "string" and value in _TRUE_TEXT:
        return True
    if kind == "string" and value in _FALSE_TEXT:
        return False
    raise CannotEvaluate


def _to_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if kind_of(value) == "object":
        raise CannotEvaluate
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, a non-JSON value, too deep
        raise CannotEvaluate from exc


def _to_number(value: Any) -> Any:
    kind = kind_of(value)
    if kind in ("number", "null"):
        return value
    if kind != "string" or not _NUMBER_TEXT.fullmatch(value):
        raise CannotEvaluate
    text = value.strip()
    try:
        number = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError as exc:  # more digits than int() accepts
        raise CannotEvaluate from exc
    if not math.isfinite(number):
        raise CannotEvaluate
    return number


FUNCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    "contains": (2, _contains),
    "match": (2, _match),
    "length": (1, _length),
    "lowercase": (1, _text_function(str.lower)),
    "uppercase": (1, _text_function(str.upper)),
    "snakecase": (1, _text_function(lambda s: s.replace(" ", "_"))),
    "kebabcase": (1, _text_function(lambda s: s.replace(" ", "-"))),
    "titlecase": (1, _text_function(_titlecase)),
    "typeof": (1, _typeof),
    "bool": (1, _to_bool),
    "string": (1, _to_string),
    "number": (1, _to_number),
}
