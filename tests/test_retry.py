"""Retry decisions as values: backoff, Retry-After, when to give up, status classes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.retry import (
    AttemptResult,
    DeadLetter,
    Delivered,
    RetryAt,
    RetryPolicy,
    backoff_ceiling,
    classify_status,
    decide,
    full_jitter,
    parse_retry_after,
)

NOW = 1_800_000_000.0
POLICY = RetryPolicy(max_attempts=5, max_age=60.0, initial=1.0, max_backoff=8.0)
FAILED = AttemptResult(ok=False, status=503, detail="down")


def no_jitter(ceiling: float) -> float:
    return ceiling


def after(attempts: int, result: AttemptResult = FAILED, age: float = 0.0) -> object:
    return decide(
        result,
        attempts=attempts,
        first_attempt_at=NOW - age,
        now=NOW,
        policy=POLICY,
        jitter=no_jitter,
    )


def test_success_is_delivered():
    assert after(3, AttemptResult(ok=True)) == Delivered()


@pytest.mark.parametrize(("attempts", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)])
def test_backoff_doubles_and_is_capped(attempts: int, delay: float):
    assert after(attempts) == RetryAt(due=NOW + delay, attempts=attempts)


def test_a_permanent_failure_dead_letters_at_once():
    decision = after(1, AttemptResult(ok=False, retryable=False, status=400, detail="bad"))
    assert decision == DeadLetter(reason="permanent failure: HTTP 400: bad", attempts=1)


@pytest.mark.parametrize(
    ("attempts", "age", "dead"),
    [(5, 59.0, False), (4, 3600.0, False), (5, 60.0, True), (7, 600.0, True)],
)
def test_giving_up_needs_both_attempts_and_age(attempts: int, age: float, dead: bool):
    assert isinstance(after(attempts, age=age), DeadLetter) is dead


def test_retry_after_lengthens_the_wait_but_is_capped():
    asks_30 = AttemptResult(ok=False, status=429, retry_after=30.0)
    assert after(1, asks_30) == RetryAt(due=NOW + 30.0, attempts=1)
    asks_a_week = AttemptResult(ok=False, status=429, retry_after=7 * 86400.0)
    assert after(1, asks_a_week) == RetryAt(due=NOW + POLICY.max_retry_after, attempts=1)
    asks_less = AttemptResult(ok=False, status=503, retry_after=0.5)
    assert after(4, asks_less) == RetryAt(due=NOW + 8.0, attempts=4)  # backoff is longer


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, (True, False)),
        (204, (True, False)),
        (400, (False, False)),
        (401, (False, False)),
        (404, (False, False)),
        (408, (False, True)),
        (429, (False, True)),
        (500, (False, True)),
        (503, (False, True)),
        (301, (False, False)),
    ],
)
def test_status_classes(status: int, expected: tuple[bool, bool]):
    assert classify_status(status) == expected


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("Fri, 15 Jan 2027 08:01:00 GMT", 60.0),
        ("Fri, 15 Jan 2027 07:00:00 GMT", 0.0),  # a date in the past: now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_forms(header: str | None, seconds: float | None):
    assert parse_retry_after(header, now=NOW) == seconds


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=60.0),
    cap=st.floats(min_value=0.001, max_value=86_400.0),
)
def test_the_backoff_ceiling_grows_monotonically_and_never_passes_the_cap(
    attempts: int, initial: float, cap: float
):
    policy = RetryPolicy(initial=initial, max_backoff=cap)
    ceiling = backoff_ceiling(attempts, policy)
    assert 0.0 < ceiling <= cap
    assert backoff_ceiling(attempts + 1, policy) >= ceiling


@given(ceiling=st.floats(min_value=0.0, max_value=86_400.0))
def test_full_jitter_stays_within_the_ceiling(ceiling: float):
    assert 0.0 <= full_jitter(ceiling) <= ceiling
