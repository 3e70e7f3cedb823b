"""Segment's Filter Query Language (FQL): parse once, evaluate per event, print canonically.

Owns the grammar, the value semantics of Segment's "Destination Filter Query Language"
reference, and the glob matcher behind ``match()``. Pure: no I/O, stdlib only, no logging; the
caller decides what a ``None`` verdict (an event the expression cannot judge) costs.

Where the reference is silent we chose, and the tests pin the choice down:

- ``!x``, ``x and y``, ``x or y`` and a bare value as the whole expression treat only the
  boolean ``true`` as true (Segment's own evaluator checks "for literally ``true``").
- ``!`` binds tighter than comparisons: ``!a = b`` is ``(!a) = b``.
- String literals: ``\\'``, ``\\"`` and ``\\\\`` are escapes; any other backslash is kept, so
  ``match(s, 'ab\\*d')`` hands ``ab\\*d`` to the glob, as the reference's example needs.
- ``typeof`` of an object is ``"object"``. ``lowercase``, ``uppercase``, ``snakecase``,
  ``kebabcase`` and ``titlecase`` give ``null`` for anything but a string; the case functions
  change only space characters (and, for titlecase, the letter after one).
- ``string(x)`` is x itself for a string, else x's JSON text. ``bool`` takes Go's
  ``strconv.ParseBool`` spellings (and ``""`` as false), ``number`` takes decimal text.
- The event cannot be judged (``matches`` gives ``None``; Segment "logs an internal error and
  drops the event") when a function gets a type the reference does not give it: ``length`` of
  an object, number or bool, ``number('abc')``, ``bool`` or ``string`` of something else; or
  when a pattern taken from the event is not a valid glob. A pattern written in the expression
  is checked by ``parse``.
- Globs: ``*``, ``?``, ``[abc]``, ``[a-z]``, ``[^a-z]`` (negation, as Segment's glob library
  has it; ``!`` is an ordinary character), ``\\x``; ``-`` and ``]`` inside a class need ``\\``.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.errors import RouterError

__all__ = ["Expression", "FqlError", "parse", "value_at"]


class FqlError(RouterError):
    """An expression that is not valid FQL; ``column`` is 1-based in the expression text."""

    def __init__(self, message: str, column: int) -> None:
        self.message = message
        self.column = column
        super().__init__(f"column {column}: {message}")


# -- the tree --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any  # None, bool, int, float, str, or a tuple of these (a list literal)


@dataclass(frozen=True, slots=True)
class _Path:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _Compare:
    op: str  # = != < <= > >= in
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[_Node, ...]


_Node = _Literal | _Path | _Call | _Not | _Compare | _And | _Or

# -- tokens ----------------------------------------------------------------------------------------

_KEYWORDS = frozenset({"and", "or", "in", "true", "false", "null"})
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_HINTS = {"&": "use 'and'", "|": "use 'or'"}
# Deep enough for any real filter, shallow enough that parsing and evaluating stay far from
# Python's recursion limit (each level costs the parser about six frames).
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # string number path keyword op punct end
    text: str  # as written, for messages
    column: int
    value: Any = None


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "'\"":
            i = _scan_string(text, i, tokens)
        elif (number := _NUMBER.match(text, i)) is not None:
            i = _scan_number(text, number, tokens)
        elif char in _PLAIN or char in "\\.":
            i = _scan_path(text, i, tokens)
        elif char in "()[],":
            tokens.append(_Token("punct", char, i + 1))
            i += 1
        elif text.startswith(("!=", "<=", ">="), i):
            tokens.append(_Token("op", text[i : i + 2], i + 1))
            i += 2
        elif text.startswith("==", i):
            raise FqlError("unexpected '=='; FQL compares with a single '='", i + 1)
        elif char in "=<>":
            tokens.append(_Token("op", char, i + 1))
            i += 1
        elif char == "!":
            tokens.append(_Token("punct", char, i + 1))
            i += 1
        else:
            hint = f"; {_HINTS[char]}" if char in _HINTS else ""
            raise FqlError(f"unexpected character {char!r}{hint}", i + 1)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _scan_string(text: str, start: int, tokens: list[_Token]) -> int:
    quote, chars, i = text[start], [], start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and text[i + 1 : i + 2] in (quote, "\\"):
            chars.append(text[i + 1])
            i += 2
        elif char == quote:
            tokens.append(_Token("string", text[start : i + 1], start + 1, "".join(chars)))
            return i + 1
        else:
            chars.append(char)
            i += 1
    raise FqlError("unterminated string", start + 1)


def _scan_number(text: str, found: re.Match[str], tokens: list[_Token]) -> int:
    start, end = found.span()
    if end < len(text) and (text[end] in _PLAIN or text[end] in "\\."):
        raise FqlError(f"invalid number {_word_at(text, start)!r}", start + 1)
    written = found.group()
    try:
        value: int | float = float(written) if found.group(1, 2) != (None, None) else int(written)
    except ValueError:  # more digits than int() accepts
        raise FqlError(f"number {written[:20]}... is too long", start + 1) from None
    if not math.isfinite(value):
        raise FqlError(f"number {written} is out of range", start + 1)
    tokens.append(_Token("number", written, start + 1, value))
    return end


def _word_at(text: str, start: int) -> str:
    end = start + 1
    while end < len(text) and (text[end] in _PLAIN or text[end] in "\\.+"):
        end += 1
    return text[start:end]


def _scan_path(text: str, start: int, tokens: list[_Token]) -> int:
    keys: list[str] = []
    key: list[str] = []
    escaped = False
    i, n = start, len(text)
    if text[i] == "-":
        raise FqlError("a field name cannot start with '-' unless escaped as '\\-'", i + 1)
    while i < n:
        char = text[i]
        if char in _PLAIN:
            key.append(char)
            i += 1
        elif char == "\\":
            if i + 1 == n:
                raise FqlError("expected a character after '\\'", i + 1)
            key.append(text[i + 1])
            escaped = True
            i += 2
        elif char == ".":
            if not key:
                raise FqlError("expected a field name before '.'", i + 1)
            keys.append("".join(key))
            key = []
            i += 1
        else:
            break
    if not key:
        raise FqlError("expected a field name after '.'", i + 1)
    keys.append("".join(key))
    written = text[start:i]
    if not escaped and len(keys) == 1 and written in _KEYWORDS:
        tokens.append(_Token("keyword", written, start + 1))
    else:
        tokens.append(_Token("path", written, start + 1, tuple(keys)))
    return i


# -- the parser ------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent: or > and > comparison > ! > value, loosest first."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise FqlError("expected an expression", 1)
        node = self.disjunction()
        token = self.peek()
        if token.kind != "end":
            raise FqlError(f"expected an operator or the end, found {_show(token)}", token.column)
        return node

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def at(self, kind: str, text: str) -> bool:
        token = self.tokens[self.pos]
        return token.kind == kind and token.text == text

    def expect(self, text: str, context: str) -> None:
        token = self.take()
        if token.kind != "punct" or token.text != text:
            raise FqlError(f"expected {context}, found {_show(token)}", token.column)

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise FqlError(f"nested more than {_MAX_DEPTH} levels deep", token.column)

    def disjunction(self) -> _Node:
        operands = [self.conjunction()]
        while self.at("keyword", "or"):
            self.take()
            operands.append(self.conjunction())
        # `(a or b) or c` is `a or b or c`: flatten so evaluation makes one call, not two.
        flat = [o for node in operands for o in (node.operands if type(node) is _Or else [node])]
        return flat[0] if len(flat) == 1 else _Or(tuple(flat))

    def conjunction(self) -> _Node:
        operands = [self.comparison()]
        while self.at("keyword", "and"):
            self.take()
            operands.append(self.comparison())
        flat = [o for node in operands for o in (node.operands if type(node) is _And else [node])]
        return flat[0] if len(flat) == 1 else _And(tuple(flat))

    def comparison(self) -> _Node:
        left = self.unary()
        token = self.peek()
        if not _is_comparison(token):
            return left
        self.take()
        node = _Compare(token.text, left, self.unary())
        after = self.peek()
        if _is_comparison(after):
            message = f"found {_show(after)}: comparisons do not chain; join them with 'and'"
            raise FqlError(message, after.column)
        return node

    def unary(self) -> _Node:
        if self.at("punct", "!"):
            self.nest(self.take())
            operand = self.unary()
            self.depth -= 1
            return _Not(operand)
        return self.value()

    def value(self) -> _Node:
        before = self.tokens[self.pos - 1].text if self.pos else ""
        token = self.take()
        if token.kind in ("string", "number"):
            return _Literal(token.value)
        if token.kind == "keyword" and token.text in ("true", "false", "null"):
            return _Literal({"true": True, "false": False, "null": None}[token.text])
        if token.kind == "path":
            return self.call(token) if self.at("punct", "(") else _Path(token.value)
        if token.kind == "punct" and token.text == "[":
            return _Literal(self.list_literal(token))
        if token.kind == "punct" and token.text == "(":
            self.nest(token)
            node = self.disjunction()
            self.expect(")", f"')' to close the '(' at column {token.column}")
            self.depth -= 1
            return node
        expected = f"expected a value after {before!r}" if before else "expected a value"
        found = "" if token.kind == "end" else f", found {_show(token)}"
        raise FqlError(expected + found, token.column)

    def list_literal(self, opening: _Token) -> tuple[Any, ...]:
        self.nest(opening)
        items: list[Any] = []
        while not self.at("punct", "]"):
            if items:
                self.expect(",", "',' or ']'")
            column = self.peek().column
            node = self.value()
            if not isinstance(node, _Literal):
                raise FqlError("a list holds literal values only", column)
            items.append(node.value)
        self.take()
        self.depth -= 1
        return tuple(items)

    def call(self, name: _Token) -> _Node:
        spec = _FUNCTIONS.get(name.text)
        if spec is None:
            known = ", ".join(sorted(_FUNCTIONS))
            raise FqlError(f"unknown function {name.text!r} (known: {known})", name.column)
        self.nest(self.take())
        args: list[_Node] = []
        columns: list[int] = []
        while not self.at("punct", ")"):
            if args:
                self.expect(",", f"',' or ')' in {name.text}()")
            columns.append(self.peek().column)
            args.append(self.disjunction())
        self.take()
        self.depth -= 1
        arity = spec[0]
        if len(args) != arity:
            plural = "s" if arity > 1 else ""
            message = f"{name.text}() takes {arity} argument{plural}, got {len(args)}"
            raise FqlError(message, name.column)
        if name.text == "match" and isinstance(args[1], _Literal) and type(args[1].value) is str:
            try:
                _glob(args[1].value)
            except _BadPattern as exc:
                raise FqlError(f"invalid match() pattern: {exc}", columns[1]) from None
        return _Call(name.text, tuple(args))


def _is_comparison(token: _Token) -> bool:
    return token.kind == "op" or (token.kind == "keyword" and token.text == "in")


def _show(token: _Token) -> str:
    return "the end" if token.kind == "end" else repr(token.text)


# -- the printer -----------------------------------------------------------------------------------

_BINDING = {_Or: 1, _And: 2, _Compare: 3, _Not: 4}


def _render(node: _Node) -> str:
    match node:
        case _Literal(value):
            return _render_literal(value)
        case _Path(keys):
            return _render_path(keys)
        case _Call(name, args):
            return f"{name}({', '.join(_render(arg) for arg in args)})"
        case _Not(operand):
            return "!" + _operand(operand, 4)
        case _Compare(op, left, right):
            return f"{_operand(left, 4)} {op} {_operand(right, 4)}"
        case _And(operands):
            return " and ".join(_operand(o, 3) for o in operands)
        case _Or(operands):
            return " or ".join(_operand(o, 2) for o in operands)


def _operand(node: _Node, needed: int) -> str:
    text = _render(node)
    return f"({text})" if _BINDING.get(type(node), 5) < needed else text


def _render_literal(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, tuple):
        return "[" + ", ".join(_render_literal(item) for item in value) + "]"
    return repr(value)  # int or float; repr round-trips and reads as an FQL number


def _render_path(keys: tuple[str, ...]) -> str:
    parts = ["".join(c if c in _PLAIN else "\\" + c for c in key) for key in keys]
    first = parts[0]
    # A leading digit or '-' would read as a number, a lone keyword as the keyword.
    if first[0] in "-0123456789" or (len(parts) == 1 and first in _KEYWORDS):
        parts[0] = "\\" + first
    return ".".join(parts)


# -- values ----------------------------------------------------------------------------------------


class _CannotEvaluate(Exception):
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


def _kind(value: Any) -> str | None:
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


def _is_number(value: Any) -> bool:
    return _kind(value) == "number"


def _equal(a: Any, b: Any) -> bool:
    """FQL's strict '=': same type and equal, all the way down; true is not 1."""
    kind = _kind(a)
    if kind != _kind(b) or kind is None:
        return False
    if kind == "list":
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if kind == "object":
        return bool(a.keys() == b.keys()) and all(_equal(a[key], b[key]) for key in a)
    return bool(a == b)


def _lookup(value: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if type(value) is dict or isinstance(value, Mapping):
            value = value.get(key)
        else:
            return None  # a missing field, or a list or scalar on the way: FQL's null
    return value


@functools.lru_cache(maxsize=1024)
def _split_path(path: str) -> tuple[str, ...]:
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
    return _lookup(event, _split_path(path))


# -- functions -------------------------------------------------------------------------------------


def _contains(text: Any, part: Any) -> bool:
    return isinstance(text, str) and isinstance(part, str) and part in text


def _match(text: Any, pattern: Any) -> bool:
    if not (isinstance(text, str) and isinstance(pattern, str)):
        return False
    try:
        matcher = _glob(pattern)
    except _BadPattern as exc:
        raise _CannotEvaluate from exc
    return matcher(text)


def _length(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        # Bytes, as Segment counts them; surrogatepass so a lone surrogate counts, not raises.
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list | tuple):
        return len(value)
    raise _CannotEvaluate


def _text_function(change: Callable[[str], str]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        return change(value) if isinstance(value, str) else None

    return apply


def _titlecase(text: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def _typeof(value: Any) -> str:
    kind = _kind(value)
    if kind is None:
        raise _CannotEvaluate
    return kind


_TRUE_TEXT = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE_TEXT = frozenset({"", "0", "f", "F", "false", "FALSE", "False"})
_NUMBER_TEXT = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def _to_bool(value: Any) -> bool:
    kind = _kind(value)
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
    raise _CannotEvaluate


def _to_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if _kind(value) == "object":
        raise _CannotEvaluate
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, a non-JSON value, too deep
        raise _CannotEvaluate from exc


def _to_number(value: Any) -> Any:
    kind = _kind(value)
    if kind in ("number", "null"):
        return value
    if kind != "string" or not _NUMBER_TEXT.fullmatch(value):
        raise _CannotEvaluate
    text = value.strip()
    try:
        number = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError as exc:  # more digits than int() accepts
        raise _CannotEvaluate from exc
    if not math.isfinite(number):
        raise _CannotEvaluate
    return number


_FUNCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
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

# -- globs -----------------------------------------------------------------------------------------


class _BadPattern(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _CharClass:
    ranges: tuple[tuple[str, str], ...]
    negated: bool

    def accepts(self, char: str) -> bool:
        return any(low <= char <= high for low, high in self.ranges) != self.negated


_STAR = None  # in a token list; a str token is one literal character
_ANY = _CharClass((), negated=True)  # '?': the class that excludes nothing
_GlobTokens = tuple[str | _CharClass | None, ...]


def _parse_glob(pattern: str) -> _GlobTokens:
    tokens: list[str | _CharClass | None] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if not tokens or tokens[-1] is not _STAR:  # '**' is '*'; fewer stars, less walking
                tokens.append(_STAR)
        elif char == "?":
            tokens.append(_ANY)
        elif char == "[":
            char_class, i = _parse_class(pattern, i)
            tokens.append(char_class)
        elif char == "\\":
            if i == n:
                raise _BadPattern("it ends with '\\'")
            tokens.append(pattern[i])
            i += 1
        else:
            tokens.append(char)
    return tuple(tokens)


def _parse_class(pattern: str, i: int) -> tuple[_CharClass, int]:
    negated = pattern.startswith("^", i)
    i += negated
    ranges: list[tuple[str, str]] = []
    while not (pattern.startswith("]", i) and ranges):
        low, i = _class_char(pattern, i)
        high = low
        if pattern.startswith("-", i):
            high, i = _class_char(pattern, i + 1)
            if high < low:
                raise _BadPattern(f"the range {low}-{high} is empty")
        ranges.append((low, high))
    return _CharClass(tuple(ranges), negated), i + 1


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if pattern.startswith("\\", i):
        i += 1
    elif i < len(pattern) and pattern[i] in "-]":
        raise _BadPattern(f"'{pattern[i]}' in a [class] must be escaped as '\\{pattern[i]}'")
    if i >= len(pattern):
        raise _BadPattern("a '[' is not closed")
    return pattern[i], i + 1


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> Callable[[str], bool]:
    """A whole-string, case-sensitive matcher; common shapes become plain string operations."""
    tokens = _parse_glob(pattern)
    if all(type(t) is str or t is _STAR for t in tokens):
        stars = [i for i, t in enumerate(tokens) if t is _STAR]
        literal = "".join(t for t in tokens if type(t) is str)
        if not stars:
            return literal.__eq__
        if stars == [0] and len(tokens) > 1:
            return lambda s: s.endswith(literal)
        if stars == [len(tokens) - 1]:
            return lambda s: s.startswith(literal)
        if stars == [0, len(tokens) - 1]:
            return lambda s: literal in s
    return functools.partial(_glob_match, tokens)


def _glob_match(tokens: _GlobTokens, text: str) -> bool:
    # The classic wildcard walk: on a mismatch, let the last '*' swallow one more character.
    # Remembering only the last star is enough and bounds the cost by len(text) * len(tokens),
    # so a hostile pattern taken from an event cannot make it backtrack exponentially.
    t = s = 0
    star_t, star_s = -1, 0
    while s < len(text):
        if t < len(tokens) and tokens[t] is _STAR:
            star_t, star_s = t, s
            t += 1
        elif t < len(tokens) and _accepts(tokens[t], text[s]):
            t += 1
            s += 1
        elif star_t >= 0:
            star_s += 1
            t, s = star_t + 1, star_s
        else:
            return False
    return all(token is _STAR for token in tokens[t:])


def _accepts(token: str | _CharClass | None, char: str) -> bool:
    if isinstance(token, str):
        return token == char
    return token is not None and token.accepts(char)


# -- compiling -------------------------------------------------------------------------------------

_Value = Callable[[Any], Any]
_Test = Callable[[Any], bool]

_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "!=": "!="}


def _getter(keys: tuple[str, ...]) -> _Value:
    if len(keys) == 1:
        (key,) = keys

        def get_one(event: Any) -> Any:
            return event.get(key) if type(event) is dict else _lookup(event, keys)

        return get_one
    if len(keys) == 2:
        first, second = keys

        def get_two(event: Any) -> Any:
            if type(event) is dict:
                inner = event.get(first)
                if type(inner) is dict:
                    return inner.get(second)
            return _lookup(event, keys)

        return get_two
    return lambda event: _lookup(event, keys)


def _compile_value(node: _Node) -> _Value:
    match node:
        case _Literal(value):
            return lambda event: value
        case _Path(keys):
            return _getter(keys)
        case _Call(name, args):
            return _compile_call(name, args)
    return _compile_test(node)


def _compile_test(node: _Node) -> _Test:
    """A function that is True exactly when the node evaluates to the boolean true."""
    match node:
        case _And(operands):
            tests = tuple(_compile_test(o) for o in operands)
            if len(tests) == 2:
                a, b = tests
                return lambda event: a(event) and b(event)
            if len(tests) == 3:
                a, b, c = tests
                return lambda event: a(event) and b(event) and c(event)
            return lambda event: all(test(event) for test in tests)
        case _Or(operands):
            tests = tuple(_compile_test(o) for o in operands)
            if len(tests) == 2:
                a, b = tests
                return lambda event: a(event) or b(event)
            return lambda event: any(test(event) for test in tests)
        case _Not(operand):
            test = _compile_test(operand)
            return lambda event: not test(event)
        case _Compare(op, left, right):
            return _compile_compare(op, left, right)
        case _Call("contains" | "match"):
            return _compile_value(node)
    value = _compile_value(node)
    return lambda event: value(event) is True


def _compile_compare(op: str, left: _Node, right: _Node) -> _Test:
    if op == "in":
        return _compile_in(left, right)
    if isinstance(left, _Literal) and isinstance(right, _Path):
        left, right, op = right, left, _FLIPPED[op]
    if isinstance(left, _Path) and isinstance(right, _Literal):
        fast = _compare_path_to_literal(op, _getter(left.keys), right.value)
        if fast is not None:
            return fast
    a, b = _compile_value(left), _compile_value(right)
    if op == "=":
        return lambda event: _equal(a(event), b(event))
    if op == "!=":
        return lambda event: not _equal(a(event), b(event))
    order = _ORDER[op]

    def ordered(event: Any) -> bool:
        x, y = a(event), b(event)
        return _is_number(x) and _is_number(y) and bool(order(x, y))

    return ordered


def _compare_path_to_literal(op: str, get: _Value, literal: Any) -> _Test | None:
    # The hot path of a typical filter (`type = 'track'`, `properties.total > 100`), written
    # out so each clause costs one dict lookup and one comparison.
    kind = _kind(literal)
    if op in ("=", "!=") and kind in ("string", "bool", "null"):
        if kind == "string":  # only a str equals a str in Python, so no type check is needed
            equal: _Test = lambda event: get(event) == literal  # noqa: E731
        else:
            equal = lambda event: get(event) is literal  # noqa: E731
        return equal if op == "=" else lambda event: not equal(event)
    if kind != "number":
        return None
    if op in ("=", "!="):
        want = op == "="
        return lambda event: (_is_number(v := get(event)) and v == literal) is want
    order = _ORDER[op]

    def ordered(event: Any) -> bool:
        value = get(event)
        number_type = type(value)
        if number_type is int or number_type is float:
            return bool(order(value, literal))
        return number_type is not bool and _is_number(value) and bool(order(value, literal))

    return ordered


def _compile_in(left: _Node, right: _Node) -> _Test:
    item = _compile_value(left)
    if isinstance(right, _Literal) and isinstance(right.value, tuple):
        choices = right.value
        if all(type(c) is str for c in choices):
            strings = frozenset(choices)
            return lambda event: isinstance(v := item(event), str) and v in strings
    values = _compile_value(right)
    if isinstance(left, _Literal) and type(left.value) is str:
        # `'dark-mode' in properties.features`: only a str equals a str, so list's own `in`
        # is already strict.
        needle = left.value
        return lambda event: isinstance(h := values(event), list | tuple) and needle in h

    def contained(event: Any) -> bool:
        needle, haystack = item(event), values(event)
        return _kind(haystack) == "list" and any(_equal(needle, x) for x in haystack)

    return contained


def _compile_call(name: str, args: tuple[_Node, ...]) -> _Value:
    function = _FUNCTIONS[name][1]
    if name == "match" and isinstance(args[1], _Literal) and type(args[1].value) is str:
        matcher, text = _glob(args[1].value), _compile_value(args[0])
        return lambda event: isinstance(s := text(event), str) and matcher(s)
    compiled = [_compile_value(arg) for arg in args]
    if len(compiled) == 1:
        (only,) = compiled
        return lambda event: function(only(event))
    first, second = compiled
    return lambda event: function(first(event), second(event))


# -- the public face -------------------------------------------------------------------------------


class Expression:
    """A parsed FQL expression: immutable, safe to share between threads and destinations."""

    __slots__ = ("_node", "_test", "_text")
    _node: _Node
    _test: _Test
    _text: str

    def __init__(self, node: _Node) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_text", _render(node))
        object.__setattr__(self, "_test", _compile_test(node))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an Expression is immutable")

    def matches(self, event: Mapping[str, Any]) -> bool | None:
        """True or False; None when this event makes the expression impossible to judge."""
        try:
            return self._test(event)
        except (_CannotEvaluate, RecursionError):  # RecursionError: an absurdly deep event
            return None

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"fql.parse({self._text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and self._text == other._text

    def __hash__(self) -> int:
        return hash(self._text)


def parse(text: str) -> Expression:
    """Parse FQL text; raises FqlError naming the column and what was expected there."""
    return Expression(_Parser(text).parse())
