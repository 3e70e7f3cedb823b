"""The glob matcher behind FQL's ``match()``: ``*``, ``?``, ``[a-z]``, ``[^a-z]`` and ``\\x``.

Owns the pattern syntax, ``BadPattern`` for a pattern that breaks it, and matching a whole
string in time bounded by ``len(text) * len(pattern)``, since patterns may come from events.
Knows nothing of FQL values: strings in, a bool out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass


class BadPattern(Exception):
    """A pattern that breaks the glob syntax; the message says what is wrong."""


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
                raise BadPattern("it ends with '\\'")
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
                raise BadPattern(f"the range {low}-{high} is empty")
        ranges.append((low, high))
    return _CharClass(tuple(ranges), negated), i + 1


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if pattern.startswith("\\", i):
        i += 1
    elif i < len(pattern) and pattern[i] in "-]":
        raise BadPattern(f"'{pattern[i]}' in a [class] must be escaped as '\\{pattern[i]}'")
    if i >= len(pattern):
        raise BadPattern("a '[' is not closed")
    return pattern[i], i + 1


@functools.lru_cache(maxsize=256)
def glob_matcher(pattern: str) -> Callable[[str], bool]:
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
