"""FQL text to syntax tree: the tokenizer, the recursive-descent parser and ``FqlError``.

Owns the grammar and every message a user sees for an invalid expression, each naming the
column where it went wrong. Checks what can be checked before any event arrives: function
names and argument counts, nesting depth, and a ``match()`` pattern written as a literal.
Builds ``fql_tree`` nodes and nothing else; it neither evaluates nor prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from router.errors import RouterError
from router.fql_functions import FUNCTIONS
from router.fql_glob import BadPattern, glob_matcher
from router.fql_tree import KEYWORDS, PLAIN_CHARS, And, Call, Compare, Literal, Node, Not, Or, Path


class FqlError(RouterError):
    """An expression that is not valid FQL; ``column`` is 1-based in the expression text."""

    def __init__(self, message: str, column: int) -> None:
        self.message = message
        self.column = column
        super().__init__(f"column {column}: {message}")


# -- tokens ----------------------------------------------------------------------------------------

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
        elif char in PLAIN_CHARS or char in "\\.":
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
    if end < len(text) and (text[end] in PLAIN_CHARS or text[end] in "\\."):
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
    while end < len(text) and (text[end] in PLAIN_CHARS or text[end] in "\\.+"):
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
        if char in PLAIN_CHARS:
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
    if not escaped and len(keys) == 1 and written in KEYWORDS:
        tokens.append(_Token("keyword", written, start + 1))
    else:
        tokens.append(_Token("path", written, start + 1, tuple(keys)))
    return i


# -- the parser ------------------------------------------------------------------------------------


def parse_tree(text: str) -> Node:
    """The tree for FQL text; raises FqlError naming the column and what was expected."""
    return _Parser(text).parse()


class _Parser:
    """Recursive descent: or > and > comparison > ! > value, loosest first."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def parse(self) -> Node:
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

    def disjunction(self) -> Node:
        operands = [self.conjunction()]
        while self.at("keyword", "or"):
            self.take()
            operands.append(self.conjunction())
        # `(a or b) or c` is `a or b or c`: flatten so evaluation makes one call, not two.
        flat = [o for node in operands for o in (node.operands if type(node) is Or else [node])]
        return flat[0] if len(flat) == 1 else Or(tuple(flat))

    def conjunction(self) -> Node:
        operands = [self.comparison()]
        while self.at("keyword", "and"):
            self.take()
            operands.append(self.comparison())
        flat = [o for node in operands for o in (node.operands if type(node) is And else [node])]
        return flat[0] if len(flat) == 1 else And(tuple(flat))

    def comparison(self) -> Node:
        left = self.unary()
        token = self.peek()
        if not _is_comparison(token):
            return left
        self.take()
        node = Compare(token.text, left, self.unary())
        after = self.peek()
        if _is_comparison(after):
            message = f"found {_show(after)}: comparisons do not chain; join them with 'and'"
            raise FqlError(message, after.column)
        return node

    def unary(self) -> Node:
        if self.at("punct", "!"):
            self.nest(self.take())
            operand = self.unary()
            self.depth -= 1
            return Not(operand)
        return self.value()

    def value(self) -> Node:
        before = self.tokens[self.pos - 1].text if self.pos else ""
        token = self.take()
        if token.kind in ("string", "number"):
            return Literal(token.value)
        if token.kind == "keyword" and token.text in ("true", "false", "null"):
            return Literal({"true": True, "false": False, "null": None}[token.text])
        if token.kind == "path":
            return self.call(token) if self.at("punct", "(") else Path(token.value)
        if token.kind == "punct" and token.text == "[":
            return Literal(self.list_literal(token))
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
            if not isinstance(node, Literal):
                raise FqlError("a list holds literal values only", column)
            items.append(node.value)
        self.take()
        self.depth -= 1
        return tuple(items)

    def call(self, name: _Token) -> Node:
        spec = FUNCTIONS.get(name.text)
        if spec is None:
            known = ", ".join(sorted(FUNCTIONS))
            raise FqlError(f"unknown function {name.text!r} (known: {known})", name.column)
        self.nest(self.take())
        args: list[Node] = []
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
        if name.text == "match" and isinstance(args[1], Literal) and type(args[1].value) is str:
            try:
                glob_matcher(args[1].value)
            except BadPattern as exc:
                raise FqlError(f"invalid match() pattern: {exc}", columns[1]) from None
        return Call(name.text, tuple(args))


def _is_comparison(token: _Token) -> bool:
    return token.kind == "op" or (token.kind == "keyword" and token.text == "in")


def _show(token: _Token) -> str:
    return "the end" if token.kind == "end" else repr(token.text)
