"""Segment's Filter Query Language (FQL): parse once, evaluate per event, print canonically.

The public face: ``parse``, ``Expression``, ``FqlError`` and ``value_at``; other modules import
FQL from here only. The work lives in ``fql_parser`` (text to tree, and the errors),
``fql_tree`` (the nodes and the canonical printer), ``fql_compiler`` (tree to a closure),
``fql_values`` (kinds, strict equality, field lookup), ``fql_functions`` and ``fql_glob`` (the
matcher behind ``match()``). Together they implement Segment's "Destination Filter Query
Language" reference. Pure: no I/O, stdlib only, no logging; the caller decides what a ``None``
verdict (an event the expression cannot judge) costs.

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

from collections.abc import Mapping
from typing import Any

from router.fql_compiler import Test, compile_test
from router.fql_parser import FqlError, parse_tree
from router.fql_tree import Node, render
from router.fql_values import CannotEvaluate, value_at

__all__ = ["Expression", "FqlError", "parse", "value_at"]


class Expression:
    """A parsed FQL expression: immutable, safe to share between threads and destinations."""

    __slots__ = ("_node", "_test", "_text")
    _node: Node
    _test: Test
    _text: str

    def __init__(self, node: Node) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_text", render(node))
        object.__setattr__(self, "_test", compile_test(node))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an Expression is immutable")

    def matches(self, event: Mapping[str, Any]) -> bool | None:
        """True or False; None when this event makes the expression impossible to judge."""
        try:
            return self._test(event)
        except (CannotEvaluate, RecursionError):  # RecursionError: an absurdly deep event
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
    return Expression(parse_tree(text))
