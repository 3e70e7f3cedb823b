"""FQL syntax tree to a Python closure that judges one event.

Owns evaluation: ``compile_test`` turns a tree into nested closures once, at parse time, so
judging an event makes no decisions about node types. Common shapes (a field compared with a
literal, a string in a list literal, a literal ``match()`` pattern) get hand-written fast paths
that must answer exactly as the general path built on ``fql_values`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from router.fql_functions import FUNCTIONS
from router.fql_glob import glob_matcher
from router.fql_tree import And, Call, Compare, Literal, Node, Not, Or, Path
from router.fql_values import is_number, kind_of, lookup, strictly_equal

_Value = Callable[[Any], Any]
Test = Callable[[Any], bool]

_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "!=": "!="}


def _getter(keys: tuple[str, ...]) -> _Value:
    if len(keys) == 1:
        (key,) = keys

        def get_one(event: Any) -> Any:
            return event.get(key) if type(event) is dict else lookup(event, keys)

        return get_one
    if len(keys) == 2:
        first, second = keys

        def get_two(event: Any) -> Any:
            if type(event) is dict:
                inner = event.get(first)
                if type(inner) is dict:
                    return inner.get(second)
            return lookup(event, keys)

        return get_two
    return lambda event: lookup(event, keys)


def _compile_value(node: Node) -> _Value:
    match node:
        case Literal(value):
            return lambda event: value
        case Path(keys):
            return _getter(keys)
        case Call(name, args):
            return _compile_call(name, args)
    return compile_test(node)


def compile_test(node: Node) -> Test:
    """A function that is True exactly when the node evaluates to the boolean true."""
    match node:
        case And(operands):
            tests = tuple(compile_test(o) for o in operands)
            if len(tests) == 2:
                a, b = tests
                return lambda event: a(event) and b(event)
            if len(tests) == 3:
                a, b, c = tests
                return lambda event: a(event) and b(event) and c(event)
            return lambda event: all(test(event) for test in tests)
        case Or(operands):
            tests = tuple(compile_test(o) for o in operands)
            if len(tests) == 2:
                a, b = tests
                return lambda event: a(event) or b(event)
            return lambda event: any(test(event) for test in tests)
        case Not(operand):
            test = compile_test(operand)
            return lambda event: not test(event)
        case Compare(op, left, right):
            return _compile_compare(op, left, right)
        case Call("contains" | "match"):
            return _compile_value(node)
    value = _compile_value(node)
    return lambda event: value(event) is True


def _compile_compare(op: str, left: Node, right: Node) -> Test:
    if op == "in":
        return _compile_in(left, right)
    if isinstance(left, Literal) and isinstance(right, Path):
        left, right, op = right, left, _FLIPPED[op]
    if isinstance(left, Path) and isinstance(right, Literal):
        fast = _compare_path_to_literal(op, _getter(left.keys), right.value)
        if fast is not None:
            return fast
    a, b = _compile_value(left), _compile_value(right)
    if op == "=":
        return lambda event: strictly_equal(a(event), b(event))
    if op == "!=":
        return lambda event: not strictly_equal(a(event), b(event))
    order = _ORDER[op]

    def ordered(event: Any) -> bool:
        x, y = a(event), b(event)
        return is_number(x) and is_number(y) and bool(order(x, y))

    return ordered


def _compare_path_to_literal(op: str, get: _Value, literal: Any) -> Test | None:
    # The hot path of a typical filter (`type = 'track'`, `properties.total > 100`), written
    # out so each clause costs one dict lookup and one comparison.
    kind = kind_of(literal)
    if op in ("=", "!=") and kind in ("string", "bool", "null"):
        if kind == "string":  # only a str equals a str in Python, so no type check is needed
            equal: Test = lambda event: get(event) == literal  # noqa: E731
        else:
            equal = lambda event: get(event) is literal  # noqa: E731
        return equal if op == "=" else lambda event: not equal(event)
    if kind != "number":
        return None
    if op in ("=", "!="):
        want = op == "="
        return lambda event: (is_number(v := get(event)) and v == literal) is want
    order = _ORDER[op]

    def ordered(event: Any) -> bool:
        value = get(event)
        number_type = type(value)
        if number_type is int or number_type is float:
            return bool(order(value, literal))
        return number_type is not bool and is_number(value) and bool(order(value, literal))

    return ordered


def _compile_in(left: Node, right: Node) -> Test:
    item = _compile_value(left)
    if isinstance(right, Literal) and isinstance(right.value, tuple):
        choices = right.value
        if all(type(c) is str for c in choices):
            strings = frozenset(choices)
            return lambda event: isinstance(v := item(event), str) and v in strings
    values = _compile_value(right)
    if isinstance(left, Literal) and type(left.value) is str:
        # `'dark-mode' in properties.features`: only a str equals a str, so list's own `in`
        # is already strict.
        needle = left.value
        return lambda event: isinstance(h := values(event), list | tuple) and needle in h

    def contained(event: Any) -> bool:
        needle, haystack = item(event), values(event)
        return kind_of(haystack) == "list" and any(strictly_equal(needle, x) for x in haystack)

    return contained


def _compile_call(name: str, args: tuple[Node, ...]) -> _Value:
    function = FUNCTIONS[name][1]
    if name == "match" and isinstance(args[1], Literal) and type(args[1].value) is str:
        matcher, text = glob_matcher(args[1].value), _compile_value(args[0])
        return lambda event: isinstance(s := text(event), str) and matcher(s)
    compiled = [_compile_value(arg) for arg in args]
    if len(compiled) == 1:
        (only,) = compiled
        return lambda event: function(only(event))
    first, second = compiled
    return lambda event: function(first(event), second(event))
