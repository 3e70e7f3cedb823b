"""``segment``: forward batches to a Segment-compatible ``/v1/batch``: another router (edge to
hub), Segment itself, or RudderStack.

Each request is ``POST {url}/v1/batch`` with ``{"batch": [...], "sentAt": ...}``, HTTP Basic auth
with the write key as user and an empty password, gzip-compressed unless ``gzip = false``. Events
go as stored, messageIds included, so the next hop's dedupe absorbs the duplicates that
at-least-once delivery makes after a lost answer or a crash.

One change is made on the way: an event that carries its client's ``sentAt`` gets it moved later
by the time it waited here. The next hop corrects clock skew as ``timestamp = receivedAt -
(sentAt - originalTimestamp)``; with the original sentAt, an event forwarded an hour late would
be stamped an hour late. Shifted, the next hop arrives at the timestamp this router computed.

Segment's limits (SEGMENT_API.md §1) are applied here, configurable because RudderStack and a
hub router may allow more: a batch larger than ``max_batch_bytes`` or ``max_batch_events`` goes
as several requests; an event larger than ``max_event_bytes`` fails for good on its own (the next
hop would refuse it, or, as Segment and router do inside a batch, drop it while answering 200).

Answers: any 2xx delivers the request's events (router answers exactly 200); 5xx, 408 and 429
retry, with ``Retry-After`` honoured; other 4xx are permanent (401 for a wrong write key when the
hub has ``strict_auth = true``; without it a hub, like Segment, answers 200 and drops them).
"""

from __future__ import annotations

import base64
import functools
import gzip
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import msgspec

from router.destinations.base import (
    AttemptResult,
    BuildContext,
    Delivery,
    delivered,
    permanent_failure,
    retryable_failure,
)
from router.destinations.webhook import EXCERPT_BYTES, USER_AGENT
from router.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from router.retry import classify_status, parse_retry_after
from router.units import parse_size

# Segment: 32 KB per event, 500 KB per request, 2500 events per request. "KB" is read as 1000
# bytes for the request (analytics-python stops at 475,000) and 1024 for the event (it checks
# 32 << 10); both fit router's own ingest defaults (32 KiB, 500 KiB).
SEGMENT_MAX_EVENT_BYTES = 32 * 1024
SEGMENT_MAX_BATCH_BYTES = 500_000
SEGMENT_MAX_BATCH_EVENTS = 2500
MIN_LIMIT_BYTES = 1024
# gzip level 1: JSON still shrinks ~5x, at a fraction of level 6's CPU on the event loop.
GZIP_LEVEL = 1


class SegmentOptions(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    write_key: str
    gzip: bool = True
    headers: dict[str, str] = {}
    # Sizes as in [http]: "32KiB", "4MB", or a number of bytes.
    max_event_bytes: int | str = SEGMENT_MAX_EVENT_BYTES
    max_batch_bytes: int | str = SEGMENT_MAX_BATCH_BYTES
    max_batch_events: Annotated[int, msgspec.Meta(ge=1)] = SEGMENT_MAX_BATCH_EVENTS


# -- pure parts ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """A batch cut to the limits: requests as lists of indexes, and the indexes too large."""

    requests: list[list[int]]
    too_large: list[int]


# '{"batch":[' + '],"sentAt":"2026-01-01T00:00:00.000000+00:00"}', rounded up.
ENVELOPE_BYTES = 64


def split(sizes: Sequence[int], *, max_event: int, max_batch: int, max_events: int) -> Split:
    """Cut events of ``sizes`` bytes into requests, in order, each within ``max_batch`` bytes
    (envelope and commas included) and ``max_events`` events; events over ``max_event`` are
    left out and listed."""
    requests: list[list[int]] = []
    too_large: list[int] = []
    current: list[int] = []
    used = ENVELOPE_BYTES
    for index, size in enumerate(sizes):
        if size > max_event or ENVELOPE_BYTES + size > max_batch:
            too_large.append(index)
            continue
        if current and (used + size + 1 > max_batch or len(current) >= max_events):
            requests.append(current)
            current, used = [], ENVELOPE_BYTES
        current.append(index)
        used += size + 1
    if current:
        requests.append(current)
    return Split(requests, too_large)


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")


def shift_sent_at(body: bytes, held: float) -> bytes:
    """``body`` with its own ``sentAt`` moved ``held`` seconds later (see the module docstring);
    unchanged when it has none, or one that does not parse."""
    if held <= 0 or b'"sentAt"' not in body:
        return body
    event: Any = msgspec.json.decode(body)
    sent = event.get("sentAt") if type(event) is dict else None
    shifted = _shifted(sent, round(held * 1_000_000)) if type(sent) is str else None
    if shifted is None:
        return body
    event["sentAt"] = shifted
    return msgspec.json.encode(event)


@functools.lru_cache(maxsize=1024)
def _shifted(sent: str, held_us: int) -> str | None:
    # Real clients send a sentAt with every event, and the events of one request share it and
    # their time held: cached, the datetime work is done once per request, and the shift costs
    # ~3 us per event (the JSON round trip) instead of ~6.
    try:
        parsed = datetime.fromisoformat(sent)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed + timedelta(microseconds=held_us)).isoformat(timespec="microseconds")


def envelope(bodies: Sequence[bytes], sent_at: str) -> bytes:
    return b'{"batch":[' + b",".join(bodies) + b'],"sentAt":"' + sent_at.encode() + b'"}'


def basic_auth(write_key: str) -> str:
    """Segment's HTTP Basic: the write key as user, an empty password."""
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


def batch_url(base: httpx.URL) -> httpx.URL:
    """``{url}/v1/batch``, keeping a path prefix (a hub behind a proxy at ``/router``)."""
    return base.copy_with(path=base.path.rstrip("/") + "/v1/batch")


# -- the I/O shell -------------------------------------------------------------


class SegmentDestination:
    def __init__(self, context: BuildContext, *, transport: httpx.AsyncBaseTransport | None = None):
        options = context.options_as(SegmentOptions)
        url = httpx.URL(options.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise context.error("url", f"not an http(s) URL: {options.url!r}")
        if not options.write_key:
            raise context.error("write_key", "empty write key")
        self._max_event = _size(context, "max_event_bytes", options.max_event_bytes)
        self._max_batch = _size(context, "max_batch_bytes", options.max_batch_bytes)
        self._options = options
        self._url = batch_url(url)
        self._headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "authorization": basic_auth(options.write_key),
        }
        if options.gzip:
            self._headers["content-encoding"] = "gzip"
        self._headers.update({k.lower(): v for k, v in options.headers.items()})
        self._client = httpx.AsyncClient(
            timeout=context.timeout,
            transport=transport,
            limits=httpx.Limits(max_keepalive_connections=64, max_connections=256),
        )

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        now = time.time()
        bodies = [shift_sent_at(d.body, now - d.received_at) for d in batch]
        cut = split(
            [len(body) for body in bodies],
            max_event=self._max_event,
            max_batch=self._max_batch,
            max_events=self._options.max_batch_events,
        )
        if not cut.too_large and len(cut.requests) == 1:
            await self._post(bodies, now)  # the common case: its errors are the batch's
            return None
        results: list[AttemptResult] = [delivered()] * len(batch)
        for index in cut.too_large:
            limit = min(self._max_event, self._max_batch - ENVELOPE_BYTES)
            detail = f"event is {len(bodies[index])} bytes, over max_event_bytes ({limit})"
            results[index] = permanent_failure(detail)
        retry: AttemptResult | None = None
        for indexes in cut.requests:
            # After a retryable failure the rest would most likely fail alike (the hub is down
            # or asks us to wait): they wait with it rather than each spending a timeout.
            if retry is None:
                result = await self._attempt([bodies[i] for i in indexes], now)
            else:
                result = retry
            if result.retryable and not result.ok:
                retry = result
            for index in indexes:
                results[index] = result
        return None if all(r.ok for r in results) else results

    async def _attempt(self, bodies: Sequence[bytes], now: float) -> AttemptResult:
        """One request's outcome as a value, for a batch sent as several requests."""
        try:
            await self._post(bodies, now)
        except RetryableDeliveryError as exc:
            return retryable_failure(_detail(exc), status=exc.status, retry_after=exc.retry_after)
        except PermanentDeliveryError as exc:
            return permanent_failure(_detail(exc), status=exc.status)
        return delivered()

    async def _post(self, bodies: Sequence[bytes], now: float) -> None:
        content = envelope(bodies, iso(now))
        if self._options.gzip:
            content = gzip.compress(content, compresslevel=GZIP_LEVEL, mtime=0)
        try:
            response = await self._client.post(self._url, content=content, headers=self._headers)
        except httpx.TimeoutException as exc:
            raise RetryableDeliveryError(f"timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise RetryableDeliveryError(f"connection failed: {exc!r}") from exc
        ok, retryable = classify_status(response.status_code)
        if ok:
            return
        status = response.status_code
        detail = response.content[:EXCERPT_BYTES].decode("utf-8", "replace")
        if not retryable:
            raise PermanentDeliveryError(f"HTTP {status}", status=status, detail=detail)
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=time.time())
        raise RetryableDeliveryError(
            f"HTTP {status}", status=status, detail=detail, retry_after=retry_after
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _size(context: BuildContext, key: str, value: int | str) -> int:
    try:
        size = value if isinstance(value, int) else parse_size(value)
    except ValueError as exc:
        raise context.error(key, str(exc)) from exc
    if size < MIN_LIMIT_BYTES:
        raise context.error(key, f"must be at least {MIN_LIMIT_BYTES} bytes")
    return size


def _detail(exc: DeliveryError) -> str:
    return f"{exc}: {exc.detail}" if exc.detail else str(exc)
