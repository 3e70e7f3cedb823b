"""Key paths in a TOML text: ``routes[1].to`` and the line that sets it.

tomllib gives values but no positions; config errors must name file:line. ``KeyLocator`` is a
line scanner, not a parser: tomllib has already accepted the text, so it only follows table
headers, counts ``[[array]]`` entries and skips multi-line values.
"""

from __future__ import annotations

import contextlib
import json
import re

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join_key(prefix: str, key: str) -> str:
    """A key path segment, quoted like TOML when it is not a bare key so paths stay unambiguous."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{prefix}.{part}" if prefix else part


class KeyLocator:
    """Maps key paths (``destinations.hook.retry``, ``routes[1].to``) to the lines that set them.

    A line scanner, not a parser: tomllib has already accepted the text, so it only has to
    follow table headers, count ``[[array]]`` entries and skip multi-line values. Keys inside
    inline tables and arrays fall back to the line of the key that holds them.
    """

    def __init__(self, text: str, *, file: str = "router.toml") -> None:
        self.file = file
        self._lines: dict[str, int] = {}
        self._arrays: dict[str, int] = {}  # array-of-tables path -> index of its last entry
        table = ""
        pending: tuple[str | None, int] = (None, 0)  # an open multi-line string, bracket depth
        for number, line in enumerate(text.splitlines(), start=1):
            if pending != (None, 0):
                pending = _scan_value(line, *pending)
                continue
            stripped = line.lstrip()
            if stripped.startswith("["):
                is_array = stripped.startswith("[[")
                parsed = _parse_key(stripped, 2 if is_array else 1)
                if parsed:
                    table = self._header(parsed[0], is_array, number)
                continue
            parsed = _parse_key(stripped, 0)
            if parsed and stripped[parsed[1] : parsed[1] + 1] == "=":
                path = table
                for part in parsed[0]:
                    path = join_key(path, part)
                    self._lines.setdefault(path, number)
                pending = _scan_value(stripped[parsed[1] + 1 :], None, 0)

    def line_of(self, key_path: str) -> int | None:
        """The line of ``key_path``, else of the nearest enclosing key or table that was written."""
        path = key_path
        while path:
            if path in self._lines:
                return self._lines[path]
            path = _parent(path)
        return None

    def _header(self, parts: list[str], is_array: bool, line: int) -> str:
        path = ""
        for i, part in enumerate(parts):
            path = join_key(path, part)
            if is_array and i == len(parts) - 1:
                self._arrays[path] = self._arrays.get(path, -1) + 1
            self._lines.setdefault(path, line)  # implicit parents: first mention
            if path in self._arrays:
                path += f"[{self._arrays[path]}]"
        self._lines[path] = line  # an explicit header wins over an earlier implicit mention
        return path


_KEY_PART = re.compile(r'[ \t]*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|\'([^\']*)\')[ \t]*')
_BASIC = re.compile(r'"(?:[^"\\]|\\.)*"?')
_LITERAL = re.compile(r"'[^']*'?")
_PARENT = re.compile(r'(?:\[\d+\]|\.?(?:"(?:[^"\\]|\\.)*"|[^."\[\]]+))$')


def _parse_key(text: str, start: int) -> tuple[list[str], int] | None:
    """A dotted key at ``text[start:]``: its parts and the index just after it."""
    parts, pos = [], start
    while match := _KEY_PART.match(text, pos):
        bare, basic, literal = match.groups()
        if basic is not None:
            # A TOML-only escape such as \U0001F600 fails; the raw text is close enough.
            with contextlib.suppress(ValueError):
                basic = json.loads(f'"{basic}"')
        parts.append(bare if bare is not None else basic if basic is not None else literal)
        pos = match.end()
        if text[pos : pos + 1] != ".":
            return parts, pos
        pos += 1
    return None


def _parent(path: str) -> str:
    match = _PARENT.search(path)
    return path[: match.start()] if match else ""


def _scan_value(text: str, quote: str | None, depth: int) -> tuple[str | None, int]:
    """Follow a value through one line: returns the open multi-line quote and bracket depth."""
    i = 0
    while i < len(text):
        if quote:
            if quote == '"""' and text[i] == "\\":
                i += 2
            elif text.startswith(quote, i):
                i, quote = i + 3, None
            else:
                i += 1
            continue
        char = text[i]
        if char == "#":
            break
        if text.startswith(('"""', "'''"), i):
            quote, i = text[i : i + 3], i + 3
            continue
        if char in "\"'":
            match = (_BASIC if char == '"' else _LITERAL).match(text, i)
            i = match.end() if match else len(text)
            continue
        depth += (char in "[{") - (char in "]}")
        i += 1
    return quote, depth
