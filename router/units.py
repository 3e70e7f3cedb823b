"""Human units in config: durations (``200ms``, ``10s``, ``7d``) and sizes (``10GiB``). Pure."""

from __future__ import annotations

import re

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; a bare unit-less string is refused so ``"10"`` is not a guess."""
    match = _NUMBER_UNIT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(
            f"invalid duration {text!r}: expected a number and a unit, "
            "like '200ms', '10s', '5m', '24h' or '7d'"
        )
    return float(match.group(1)) * _DURATION_UNITS[unit]


def parse_size(text: str) -> int:
    """Bytes in ``text``, like ``'10GiB'``, ``'500KB'`` or ``'512B'``."""
    match = _NUMBER_UNIT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number and a unit, "
            "like '512KiB', '100MB' or '10GiB'"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
