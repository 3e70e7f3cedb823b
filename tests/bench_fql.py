"""Benchmark FQL evaluation (not a test; pytest does not collect it).

    .venv/bin/python tests/bench_fql.py

Filters run once per event per destination, so events judged per second bounds routing. Each
case parses once, then times ``Expression.matches`` on a dict event and reports the best of
five rounds (the round least disturbed by the rest of the machine).
"""

from __future__ import annotations

import functools
import timeit

from router import fql

ORDER = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u-123",
    "properties": {"total": 250.5, "currency": "EUR", "features": ["discounts", "dark-mode"]},
    "context": {"library": {"name": "analytics.js", "version": "1.0"}},
}
IDENTIFY = {"type": "identify", "userId": "u-123", "traits": {"email": "a@example.com"}}
THREE_CLAUSES = "type = 'track' and event = 'Order Completed' and properties.total > 100"

CASES = [
    ("3 clauses, all true", THREE_CLAUSES, ORDER),
    ("3 clauses, first false", THREE_CLAUSES, IDENTIFY),
    ("in a list literal", "type in ['track', 'page', 'screen']", ORDER),
    ("value in an event list", "'dark-mode' in properties.features", ORDER),
    ("glob, 3 levels deep", "match(context.library.version, '1.*')", ORDER),
    ("or of functions", "contains(lowercase(event), 'order') or length(userId) > 10", ORDER),
]
CALLS = 200_000


def main() -> None:
    for name, text, event in CASES:
        judge = functools.partial(fql.parse(text).matches, event)
        best = min(timeit.repeat(judge, number=CALLS, repeat=5))
        print(f"{name:24} {CALLS / best / 1000:8.0f}k events/s   {text}")


if __name__ == "__main__":
    main()
