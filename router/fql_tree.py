"""The FQL syntax tree and its canonical text.

Owns the node types that ``fql_parser`` builds and ``fql_compiler`` turns into code, the
spelling rules both directions share (which characters a field name may use unescaped, which
words are reserved), and the printer that gives every tree one canonical text which parses back
to the same tree. Data and string building only: no parsing, no evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any  # None, bool, int, float, str, or a tuple of these (a list literal)


@dataclass(frozen=True, slots=True)
class Path:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # = != < <= > >= in
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Node = Literal | Path | Call | Not | Compare | And | Or

# A field name is written with PLAIN_CHARS as they are and a backslash before any other
# character; a name that is a keyword, or starts with a digit or '-', takes one in front too.
KEYWORDS = frozenset({"and", "or", "in", "true", "false", "null"})
PLAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# -- the printer -----------------------------------------------------------------------------------

# How tightly each node binds; an operand that binds looser than its place needs parentheses.
_BINDING = {Or: 1, And: 2, Compare: 3, Not: 4}


def render(node: Node) -> str:
    match node:
        case Literal(value):
            return _render_literal(value)
        case Path(keys):
            return _render_path(keys)
        case Call(name, args):
            return f"{name}({', '.join(render(arg) for arg in args)})"
        case Not(operand):
            return "!" + _operand(operand, 4)
        case Compare(op, left, right):
            return f"{_operand(left, 4)} {op} {_operand(right, 4)}"
        case And(operands):
            return " and ".join(_operand(o, 3) for o in operands)
        case Or(operands):
            return " or ".join(_operand(o, 2) for o in operands)


def _operand(node: Node, needed: int) -> str:
    text = render(node)
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
    parts = ["".join(c if c in PLAIN_CHARS else "\\" + c for c in key) for key in keys]
    first = parts[0]
    # A leading digit or '-' would read as a number, a lone keyword as the keyword.
    if first[0] in "-0123456789" or (len(parts) == 1 and first in KEYWORDS):
        parts[0] = "\\" + first
    return ".".join(parts)
