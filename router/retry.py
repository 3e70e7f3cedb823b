"""Retry policy and the per-event delivery decision, as values. Pure: no I/O, no clocks.

The dispatcher reports what happened to an attempt (an ``AttemptResult``) and asks
``decide`` what to do next; it gets back ``Delivered``, ``RetryAt`` or ``DeadLetter`` and
acts on it. Times are wall-clock seconds (``time.time()``): they are stored, and a
monotonic clock means nothing after a restart.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec


class RetryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When to try again and when to give up.

    An event dead-letters only when it has had ``max_attempts`` attempts *and* is older
    than ``max_age`` since its first attempt (RudderStack's rule), so neither a short
    outage nor an endless loop drops data.
    """

    max_attempts: int = 20
    max_age: float = 24 * 3600.0
    initial: float = 1.0
    max_backoff: float = 600.0
    # A Retry-After beyond this is treated as this: a misbehaving receiver must not park
    # events for days.
    max_retry_after: float = 3600.0


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt at one event came to."""

    ok: bool
    retryable: bool = True
    status: int | None = None
    detail: str = ""
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class RetryAt:
    due: float
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    attempts: int


Decision = Delivered | RetryAt | DeadLetter
Jitter = Callable[[float], float]


def full_jitter(ceiling: float) -> float:
    """AWS's "full jitter": a uniform pick in [0, ceiling], so retries spread out."""
    return random.uniform(0.0, ceiling)


def backoff_ceiling(attempts: int, policy: RetryPolicy) -> float:
    """The exponential ceiling after ``attempts`` failed attempts: initial * 2^(n-1), capped."""
    exponent = min(max(attempts - 1, 0), 62)
    return float(min(policy.max_backoff, policy.initial * (2.0**exponent)))


def horizon(policy: RetryPolicy) -> float:
    """The furthest ahead of its decision that ``decide`` can put a retry's due time.

    A stored due time further out than this can only come from a wall clock stepped back
    since the decision (stored due times are wall-clock, so they survive a restart).
    """
    return max(policy.max_backoff, policy.max_retry_after)


def decide(
    result: AttemptResult,
    *,
    attempts: int,
    first_attempt_at: float,
    now: float,
    policy: RetryPolicy,
    jitter: Jitter = full_jitter,
) -> Decision:
    """Decide the fate of an event after its ``attempts``-th attempt (counting this one)."""
    if result.ok:
        return Delivered()
    if not result.retryable:
        return DeadLetter(reason=f"permanent failure: {describe(result)}", attempts=attempts)
    too_many = attempts >= policy.max_attempts
    too_old = now - first_attempt_at >= policy.max_age
    if too_many and too_old:
        return DeadLetter(
            reason=f"gave up after {attempts} attempts over {now - first_attempt_at:.0f}s: "
            f"{describe(result)}",
            attempts=attempts,
        )
    delay = jitter(backoff_ceiling(attempts, policy))
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, policy.max_retry_after))
    return RetryAt(due=now + delay, attempts=attempts)


def describe(result: AttemptResult) -> str:
    status = f"HTTP {result.status}" if result.status is not None else "no response"
    return f"{status}: {result.detail}" if result.detail else status


def classify_status(status: int) -> tuple[bool, bool]:
    """(ok, retryable) for an HTTP status: 2xx ok; 5xx, 408 and 429 retry; the rest is final."""
    if 200 <= status < 300:
        return True, False
    return False, status >= 500 or status in (408, 429)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
