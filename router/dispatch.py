"""One dispatcher per destination: read the log from its cursor, batch, send, decide.

Two loops feed one pool of at most ``concurrency`` in-flight batches:

- the live loop reads events after the scan position, keeps those its routes match,
  cuts them into batches and sends them. Each batch owns a *span* of the log; spans
  finish in any order but commit in log order, so the cursor (a low-water mark) only
  moves over spans whose every event is delivered, filtered, retrying or dead.
- the retry loop sends retry-set events whose due time has come.

Each attempt runs under the destination's ``timeout``; an exception from the destination
or a timeout is a retryable failure. ``router.retry.decide`` turns each result into
Delivered / RetryAt / DeadLetter; the journal commits the lot atomically.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import trio

from router.destinations.base import Delivery, Destination
from router.errors import PermanentDeliveryError, QueueFullError, RetryableDeliveryError
from router.journal import (
    BatchRecord,
    DeadRow,
    Journal,
    LoggedEvent,
    PendingRetry,
    Reader,
    RetryRow,
)
from router.metrics import Latencies
from router.pipeline import Held, Pipeline
from router.retry import (
    AttemptResult,
    DeadLetter,
    Delivered,
    Jitter,
    RetryAt,
    RetryPolicy,
    decide,
    full_jitter,
)
from router.retry import horizon as retry_horizon

log = logging.getLogger(__name__)

HISTORY_KEEP = 10
DETAIL_BYTES = 512
# Read this many log rows per scan at least, so a destination that matches few sources
# does not crawl through the log one small batch at a time.
MIN_SCAN = 512


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    name: str
    batch_size: int = 1
    batch_wait: float = 0.2
    concurrency: int = 1
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


_Ready = tuple[LoggedEvent, bytes]  # an event and the payload the pipeline made of it
_Outcome = tuple[LoggedEvent, AttemptResult]


@dataclass(slots=True)
class _Span:
    """A stretch of the log (after ``start``, up to ``end``) handled by one live batch."""

    end: int
    events: list[LoggedEvent]
    routed: int
    filtered: int = 0
    record: BatchRecord | None = None


class Dispatcher:
    def __init__(
        self,
        settings: DispatchSettings,
        destination: Destination,
        journal: Journal,
        *,
        cursor: int,
        pipeline: Pipeline,
        clock: Callable[[], float] = time.time,
        jitter: Jitter = full_jitter,
        latencies: Latencies | None = None,
    ) -> None:
        self.settings = settings
        self._destination = destination
        self._journal = journal
        self._cursor = cursor
        self._pipeline = pipeline
        self._clock = clock
        self._jitter = jitter
        self._latencies = latencies or Latencies()
        self._slots = trio.Semaphore(settings.concurrency)
        self._spans: deque[_Span] = deque()
        self._commit_lock = trio.Lock()
        self._retrying: set[int] = set()
        self._retries_changed = trio.Event()
        self._fetching = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop``; then let batches in flight finish (the caller sets a deadline)."""
        reader = self._journal.reader()
        try:
            async with trio.open_nursery() as senders:
                with self._fetching:
                    task_status.started()
                    async with trio.open_nursery() as loops:
                        loops.start_soon(self._live_loop, reader, senders)
                        loops.start_soon(self._retry_loop, reader, senders)
        finally:
            reader.close()
            with trio.CancelScope(shield=True):
                await self._destination.aclose()

    def set_pipeline(self, pipeline: Pipeline) -> None:
        """New routes (a reload): batches already prepared go as they are; the next use this."""
        self._pipeline = pipeline

    def stop(self) -> None:
        """Stop taking new work; batches in flight go on."""
        self._fetching.cancel()

    # -- live traffic ----------------------------------------------------------

    async def _live_loop(self, reader: Reader, senders: trio.Nursery) -> None:
        scanned = self._cursor
        size = self.settings.batch_size
        while True:
            await self._journal.wait_beyond(scanned)
            if self._journal.head - scanned < size and self.settings.batch_wait > 0:
                with trio.move_on_after(self.settings.batch_wait):
                    while self._journal.head - scanned < size:
                        await self._journal.wait_beyond(self._journal.head)
            rows = await reader.events_after(scanned, max(MIN_SCAN, size))
            if not rows:
                continue
            for span in self._cut_spans(rows):
                try:  # no trip through the scheduler while a slot is free
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    await self._slots.acquire()
                self._spans.append(span)
                senders.start_soon(self._send_span, span)
            scanned = rows[-1].seq

    def _cut_spans(self, rows: list[LoggedEvent]) -> list[_Span]:
        """Split scanned rows into batches; each span reaches to its last row's seq, the
        last span to the end of the scan, so skipped rows are covered too."""
        matched = [row for row in rows if self._pipeline.takes_source(row.source)]
        size = self.settings.batch_size
        spans = [
            _Span(
                end=matched[i + size - 1].seq if i + size < len(matched) else rows[-1].seq,
                events=matched[i : i + size],
                routed=len(matched[i : i + size]),
            )
            for i in range(0, len(matched), size)
        ]
        return spans or [_Span(end=rows[-1].seq, events=[], routed=0)]

    async def _send_span(self, span: _Span) -> None:
        record = BatchRecord(self.settings.name, routed=span.routed, filtered=span.filtered)
        if span.events:
            now = self._clock()
            ready, failed = await self._prepare(span.events, record)
            outcomes = failed + await self._attempt(ready, attempt=1)
            for row, result in outcomes:
                self._judge(record, row, result, attempts=1, first_attempt_at=now, history="[]")
        span.record = record
        await self._commit_finished_spans()

    # -- what the destination receives -------------------------------------------

    async def _prepare(
        self, rows: Sequence[LoggedEvent], record: BatchRecord, *, routed: bool = False
    ) -> tuple[list[_Ready], list[_Outcome]]:
        """Run the pipeline: payloads to send, and events that failed in it. Held-back events
        are counted in ``record``. A transform function runs on a worker thread under the
        destination's timeout, so a function that hangs costs a retry, not the event loop."""
        if self._pipeline.function is None:
            prepared = [self._prepare_one(row, routed) for row in rows]
        else:
            prepared = []
            with trio.move_on_after(self.settings.timeout):
                prepared = await trio.to_thread.run_sync(
                    lambda: [self._prepare_one(row, routed) for row in rows],
                    abandon_on_cancel=True,
                )
            if not prepared:
                detail = f"transform timed out after {self.settings.timeout:g}s"
                log.warning("transform timed out destination=%s", self.settings.name)
                return [], [(row, AttemptResult(ok=False, detail=detail)) for row in rows]
        ready: list[_Ready] = []
        failed: list[_Outcome] = []
        for row, outcome in zip(rows, prepared, strict=True):
            if isinstance(outcome, bytes):
                ready.append((row, outcome))
            elif isinstance(outcome, Held):
                record.filtered += 1
                record.held[outcome.reason] = record.held.get(outcome.reason, 0) + 1
            else:
                failed.append((row, outcome))
        return ready, failed

    def _prepare_one(self, row: LoggedEvent, routed: bool) -> bytes | Held | AttemptResult:
        try:
            return self._pipeline.prepare(row.source, row.body, routed=routed)
        # Containment: a transform function's bug dead-letters its own event, with the error,
        # ready for `router dlq replay` once the function is fixed. Retrying cannot help.
        except Exception as exc:  # noqa: BLE001
            log.warning("transform raised destination=%s error=%r", self.settings.name, exc)
            return AttemptResult(ok=False, retryable=False, detail=f"transform raised {exc!r}")

    async def _commit_finished_spans(self) -> None:
        """Commit the finished spans at the front, in log order, with the new cursor."""
        async with self._commit_lock:
            merged = BatchRecord(self.settings.name)
            released = 0
            while self._spans and self._spans[0].record is not None:
                span = self._spans.popleft()
                _merge(merged, span.record)  # type: ignore[arg-type]
                merged.cursor = span.end
                released += 1
            if not released:
                return
            await self._record(merged)
            self._cursor = merged.cursor or self._cursor
            if merged.retries:
                self._wake_retries()
            for _ in range(released):
                self._slots.release()

    # -- the retry set ---------------------------------------------------------

    async def _retry_loop(self, reader: Reader, senders: trio.Nursery) -> None:
        # A margin over the horizon, so a retry parked at the very end of it is not mistaken
        # for a clock step by the time it takes to read it back.
        furthest = retry_horizon(self.settings.retry) + 60.0
        # While working off retries parked by a clock step: how far ahead a due time can be
        # before it counts as due now. At start, the clock may have been stepped back while
        # the daemon was down, by an unknown amount: only what no decision could produce.
        horizon: float | None = furthest
        drift = self._clock() - trio.current_time()  # wall clock minus monotonic
        while True:
            changed = self._retries_changed
            now = self._clock()
            skip = frozenset(self._retrying)
            name, size = self.settings.name, self.settings.batch_size
            # Due times are wall-clock: after a step back they lie as far ahead as the clock
            # lost, and waiting for them would stall this destination that long.
            previous, drift = drift, now - trio.current_time()
            if drift < previous - 1.0:
                log.warning(
                    "wall clock stepped back destination=%s by=%.0fs", name, previous - drift
                )
                # Seen happen: anything beyond a backoff is parked. A Retry-After longer
                # than max_backoff may be cut short once; better than a stall.
                horizon = self.settings.retry.max_backoff + 1.0
            due, next_due = await reader.due_retries(name, now, size, skip, horizon=horizon)
            if not due:
                horizon = None  # every parked retry is sent or on its way
            if due:
                await self._slots.acquire()
                self._retrying.update(p.event.seq for p in due)
                retried = self._latencies.retried
                retried[self.settings.name] = retried.get(self.settings.name, 0) + len(due)
                senders.start_soon(self._send_retries, due)
                continue
            # From the same reading as the query: a clock stepped back in between must not
            # turn into an hours-long wait.
            wait = 3600.0 if next_due is None else max(0.0, next_due - now)
            with trio.move_on_after(wait):
                await changed.wait()

    async def _send_retries(self, due: list[PendingRetry]) -> None:
        record = BatchRecord(self.settings.name)
        try:
            by_seq = {p.event.seq: p for p in due}
            # The retry set holds what routes already took (or an operator replayed).
            ready, failed = await self._prepare([p.event for p in due], record, routed=True)
            outcomes = failed + await self._attempt(ready, attempt=min(p.attempts for p in due) + 1)
            # Held back now (the config changed since): no longer pending here.
            finished = {row.seq for row, _ in outcomes}
            record.retries_done.extend(seq for seq in by_seq if seq not in finished)
            for row, result in outcomes:
                pending = by_seq[row.seq]
                self._judge(
                    record,
                    pending.event,
                    result,
                    attempts=pending.attempts + 1,
                    first_attempt_at=pending.first_attempt_at,
                    history=pending.history,
                    from_retry_set=True,
                )
            await self._record(record)
        finally:
            self._retrying.difference_update(p.event.seq for p in due)
            self._slots.release()
            self._wake_retries()

    def retries_changed(self) -> None:
        """Someone else (a replay) put events in this destination's retry set: look again."""
        self._wake_retries()

    async def _record(self, record: BatchRecord) -> None:
        """Commit what a batch came to. The disk may be full just now: the outcome is kept and
        committed once there is room (pruning makes some), so delivery keeps draining."""
        waited = False
        while True:
            try:
                await self._journal.record(record)
            except QueueFullError:
                if not waited:
                    log.warning(
                        "cannot record deliveries, disk full destination=%s", self.settings.name
                    )
                    waited = True
                await trio.sleep(1.0)
            else:
                return

    def _wake_retries(self) -> None:
        self._retries_changed.set()
        self._retries_changed = trio.Event()

    # -- one attempt -----------------------------------------------------------

    async def _attempt(self, ready: Sequence[_Ready], *, attempt: int) -> list[_Outcome]:
        """Send once; whatever happens comes back as one AttemptResult per event."""
        if not ready:
            return []
        rows = [row for row, _ in ready]
        started = trio.current_time()
        results = await self._send(ready, attempt)
        self._latencies.delivered_in(self.settings.name, trio.current_time() - started)
        return list(zip(rows, results, strict=True))

    async def _send(self, ready: Sequence[_Ready], attempt: int) -> list[AttemptResult]:
        batch = [
            Delivery(r.seq, r.source, r.message_id, r.received_at, body, attempt)
            for r, body in ready
        ]
        name = self.settings.name
        results: Sequence[AttemptResult] | None = None
        with trio.move_on_after(self.settings.timeout) as scope:
            try:
                results = await self._destination.send(batch)
            except RetryableDeliveryError as exc:
                failure = AttemptResult(
                    ok=False, status=exc.status, detail=_detail(exc), retry_after=exc.retry_after
                )
                results = [failure] * len(batch)
            except PermanentDeliveryError as exc:
                failure = AttemptResult(
                    ok=False, retryable=False, status=exc.status, detail=_detail(exc)
                )
                results = [failure] * len(batch)
            # Containment: a plugin bug must only cost retries of its own events.
            except Exception as exc:  # noqa: BLE001
                log.warning("destination raised destination=%s error=%r", name, exc)
                failure = AttemptResult(ok=False, detail=f"destination raised {exc!r}")
                results = [failure] * len(batch)
        if scope.cancelled_caught:
            detail = f"timed out after {self.settings.timeout:g}s"
            log.warning("destination timed out destination=%s", name)
            return [AttemptResult(ok=False, detail=detail)] * len(batch)
        if results is None:
            return [AttemptResult(ok=True)] * len(batch)
        if len(results) != len(batch):
            log.error("destination returned %d results for %d events", len(results), len(batch))
            detail = "destination returned a wrong number of results"
            return [AttemptResult(ok=False, detail=detail)] * len(batch)
        return list(results)

    def _judge(
        self,
        record: BatchRecord,
        row: LoggedEvent,
        result: AttemptResult,
        *,
        attempts: int,
        first_attempt_at: float,
        history: str,
        from_retry_set: bool = False,
    ) -> None:
        now = self._clock()
        decision = decide(
            result,
            attempts=attempts,
            first_attempt_at=first_attempt_at,
            now=now,
            policy=self.settings.retry,
            jitter=self._jitter,
        )
        if isinstance(decision, Delivered):
            record.delivered += 1
            if from_retry_set:  # a retry, or a replay (which starts at attempt 1)
                record.retries_done.append(row.seq)
            return
        updated = _append_history(history, now, result)
        if isinstance(decision, RetryAt):
            record.retries.append(
                RetryRow(row.seq, decision.due, attempts, first_attempt_at, updated)
            )
        elif isinstance(decision, DeadLetter):
            log.warning(
                "dead-lettered destination=%s message_id=%s reason=%s",
                self.settings.name,
                row.message_id,
                decision.reason,
            )
            record.dead.append(DeadRow(row, decision.reason, attempts, updated))


def _detail(exc: RetryableDeliveryError | PermanentDeliveryError) -> str:
    return f"{exc}: {exc.detail}" if exc.detail else str(exc)


def _append_history(history: str, now: float, result: AttemptResult) -> str:
    entries = msgspec.json.decode(history)
    entries.append(
        {"at": round(now, 3), "status": result.status, "detail": result.detail[:DETAIL_BYTES]}
    )
    return msgspec.json.encode(entries[-HISTORY_KEEP:]).decode()


def _merge(into: BatchRecord, part: BatchRecord) -> None:
    into.routed += part.routed
    into.filtered += part.filtered
    into.delivered += part.delivered
    into.retries.extend(part.retries)
    into.retries_done.extend(part.retries_done)
    into.dead.extend(part.dead)
    for reason, count in part.held.items():
        into.held[reason] = into.held.get(reason, 0) + count
