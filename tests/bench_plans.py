"""Benchmark JSON Schema validation for tracking plans (not a test; pytest does not collect it).

    .venv/bin/python tests/bench_plans.py [--seconds 1]

Validates a typical plan schema ("Order Completed": required keys, types, an enum, a minimum, a
pattern, a nested object, an array of objects) against a valid event and an invalid one with
eight violations, and prints validations per second for each JSON Schema library installed
(`pip install jsonschema fastjsonschema` to compare; router itself depends on jsonschema-rs
only) and for ``TrackingPlan.apply`` end to end. Collecting *every* violation with its path is
the requirement (omit mode drops each violating property), so each figure collects them all,
except fastjsonschema's, which cannot: it raises at the first error.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

from router.plans import parse_plan

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["order_id", "total", "currency", "products"],
    "properties": {
        "order_id": {"type": "string", "pattern": "^ord_[0-9a-z]{6,}$"},
        "total": {"type": "number", "minimum": 0},
        "revenue": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]},
        "coupon": {"type": ["string", "null"]},
        "affiliation": {"type": "string"},
        "shipping": {
            "type": "object",
            "required": ["method"],
            "properties": {
                "method": {"enum": ["ground", "air"]},
                "cost": {"type": "number", "minimum": 0},
            },
        },
        "products": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku", "price"],
                "properties": {
                    "sku": {"type": "string"},
                    "price": {"type": "number", "minimum": 0},
                    "quantity": {"type": "integer", "minimum": 1},
                },
            },
        },
    },
}
VALID: dict[str, Any] = {
    "order_id": "ord_8f3k2m9q",
    "total": 99.95,
    "revenue": 90.0,
    "currency": "USD",
    "coupon": None,
    "affiliation": "web",
    "shipping": {"method": "ground", "cost": 4.95},
    "products": [
        {"sku": "sku-1", "price": 49.95, "quantity": 1},
        {"sku": "sku-2", "price": 50.0, "quantity": 2},
    ],
}
INVALID: dict[str, Any] = {  # eight violations, three of them nested
    "order_id": "X1",
    "total": -3,
    "currency": "usd",
    "shipping": {"method": "boat", "cost": "free"},
    "products": [{"sku": "sku-1", "price": 1}, {"sku": 5, "quantity": 0}],
}
EXPECTED_VIOLATIONS = 8


def rate(call: Callable[[], object], seconds: float) -> float:
    """Calls per second, timed in rounds so the clock is read rarely."""
    call()  # warm up (lazy compilation, caches)
    done, rounds = 0, 100
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(rounds):
            call()
        done += rounds
    return done / elapsed


def candidates() -> dict[str, tuple[Callable[[Any], int], str]]:
    """name -> (validate returning the number of violations found, what it collects)."""
    found: dict[str, tuple[Callable[[Any], int], str]] = {}
    # Imported by name: the comparison libraries are optional, and jsonschema ships no types.
    if importlib.util.find_spec("jsonschema"):
        jsonschema = importlib.import_module("jsonschema")
        reference = jsonschema.Draft202012Validator(SCHEMA)
        found["jsonschema (iter_errors)"] = (
            lambda event: sum(1 for _ in reference.iter_errors(event)),
            "all",
        )
    if importlib.util.find_spec("fastjsonschema"):
        fastjsonschema = importlib.import_module("fastjsonschema")
        generated = fastjsonschema.compile(SCHEMA)

        def first_error_only(event: Any) -> int:
            try:
                generated(event)
            except fastjsonschema.JsonSchemaValueException:
                return 1
            return 0

        found["fastjsonschema"] = (first_error_only, "first only")
    if importlib.util.find_spec("jsonschema_rs"):
        jsonschema_rs = importlib.import_module("jsonschema_rs")
        rust = jsonschema_rs.validator_for(SCHEMA)
        found["jsonschema-rs (iter_errors)"] = (
            lambda event: sum(1 for _ in rust.iter_errors(event)),
            "all",
        )
        found["jsonschema-rs (is_valid, then iter_errors)"] = (
            lambda event: 0 if rust.is_valid(event) else sum(1 for _ in rust.iter_errors(event)),
            "all",
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core, as the daemon runs

    print(f"{'library':<45} {'valid/s':>10} {'invalid/s':>10}  violations found")
    for name, (validate, collects) in candidates().items():
        assert validate(VALID) == 0, name
        found = validate(INVALID)
        assert found == (EXPECTED_VIOLATIONS if collects == "all" else 1), (name, found)
        valid = rate(functools.partial(validate, VALID), args.seconds)
        invalid = rate(functools.partial(validate, INVALID), args.seconds)
        print(f"{name:<45} {valid:>10,.0f} {invalid:>10,.0f}  {found} ({collects})")

    for mode in ("block", "omit", "report"):
        plan = parse_plan(
            {"violations": mode, "track": {"Order Completed": SCHEMA}}, file="bench.json"
        )
        good = {"type": "track", "event": "Order Completed", "userId": "u1", "properties": VALID}
        bad = {"type": "track", "event": "Order Completed", "userId": "u1", "properties": INVALID}
        assert not plan.apply(good).violations
        assert len(plan.apply(bad).violations) == EXPECTED_VIOLATIONS
        valid = rate(functools.partial(plan.apply, good), args.seconds)
        invalid = rate(functools.partial(plan.apply, bad), args.seconds)
        label = f"TrackingPlan.apply, violations={mode}"
        print(f"{label:<45} {valid:>10,.0f} {invalid:>10,.0f}  {EXPECTED_VIOLATIONS} (all)")


if __name__ == "__main__":
    main()
