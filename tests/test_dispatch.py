"""The dispatcher against a real journal file and destinations with behaviour, on trio's
fake clock so that retry timing can be asserted to the virtual second."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from router.destinations.base import AttemptResult, Delivery
from router.dispatch import Dispatcher, DispatchSettings
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import StoredEvent
from router.journal import Inspector, Journal, open_journal
from router.pipeline import Pipeline, Route, TransformFunction
from router.retry import RetryPolicy

BASE_WALL_TIME = 1_800_000_000.0


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    # SQLite calls run on real threads; a zero threshold would jump the clock while one
    # runs. A small real-time threshold only jumps when everything is truly idle.
    return trio.testing.MockClock(autojump_threshold=0.05)


def wall_clock() -> float:
    return BASE_WALL_TIME + trio.current_time()


def no_jitter(ceiling: float) -> float:
    return ceiling


@dataclass
class Scripted:
    """A destination that answers from a script, then succeeds; records attempt times."""

    script: list[BaseException | None] = field(default_factory=list)
    attempts: list[tuple[float, list[str]]] = field(default_factory=list)
    hang: bool = False

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        self.attempts.append((trio.current_time(), [d.message_id for d in batch]))
        if self.hang:
            await trio.sleep_forever()
        if self.script:
            step = self.script.pop(0)
            if step is not None:
                raise step
        return None

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with open_journal(tmp_path / "queue.db", synchronous="normal") as opened:
        yield opened


async def run_dispatcher(
    nursery: trio.Nursery,
    journal: Journal,
    destination: Scripted,
    policy: RetryPolicy,
    function: TransformFunction | None = None,
    **settings: object,
) -> Dispatcher:
    name = "dest"
    cursors = await journal.ensure_cursors([name])
    dispatcher = Dispatcher(
        DispatchSettings(name=name, retry=policy, batch_wait=0, **settings),  # type: ignore[arg-type]
        destination,
        journal,
        cursor=cursors[name],
        pipeline=Pipeline(name, [Route(sources=None, when=None)], function=function),
        clock=wall_clock,
        jitter=no_jitter,
    )
    await nursery.start(dispatcher.run)
    return dispatcher


async def append(journal: Journal, *ids: str) -> None:
    events = [StoredEvent(m, b'{"messageId":"%s"}' % m.encode()) for m in ids]
    await journal.append("app", events, wall_clock())


def attempt_times(destination: Scripted) -> list[float]:
    start = destination.attempts[0][0]
    return [round(at - start, 3) for at, _ in destination.attempts]


async def test_backoff_doubles_from_initial(autojump_clock, journal, nursery, tmp_path):
    destination = Scripted(script=[RetryableDeliveryError("HTTP 503", status=503)] * 3)
    policy = RetryPolicy(initial=1.0, max_backoff=600.0)
    await run_dispatcher(nursery, journal, destination, policy)
    await append(journal, "m1")
    while len(destination.attempts) < 4:
        await trio.sleep(0.5)
    assert attempt_times(destination) == [0.0, 1.0, 3.0, 7.0]
    await trio.sleep(1)
    counters = Inspector(tmp_path / "queue.db").counters("dest")
    assert (counters.routed, counters.delivered, counters.pending) == (1, 1, 0)


async def test_backoff_is_capped(autojump_clock, journal, nursery):
    destination = Scripted(script=[RetryableDeliveryError("down")] * 5)
    policy = RetryPolicy(initial=1.0, max_backoff=3.0)
    await run_dispatcher(nursery, journal, destination, policy)
    await append(journal, "m1")
    while len(destination.attempts) < 6:
        await trio.sleep(0.5)
    assert attempt_times(destination) == [0.0, 1.0, 3.0, 6.0, 9.0, 12.0]


async def test_retry_after_is_honoured(autojump_clock, journal, nursery):
    destination = Scripted(script=[RetryableDeliveryError("429", status=429, retry_after=30)])
    await run_dispatcher(nursery, journal, destination, RetryPolicy(initial=1.0))
    await append(journal, "m1")
    while len(destination.attempts) < 2:
        await trio.sleep(0.5)
    assert attempt_times(destination) == [0.0, 30.0]


async def test_dead_letter_needs_both_attempts_and_age(autojump_clock, journal, nursery, tmp_path):
    destination = Scripted(script=[RetryableDeliveryError("down", status=503)] * 100)
    policy = RetryPolicy(max_attempts=3, max_age=20.0, initial=1.0, max_backoff=4.0)
    await run_dispatcher(nursery, journal, destination, policy)
    await append(journal, "m1")
    await trio.sleep(60)
    # Attempts at 0, 1, 3, 7, 11, 15, 19, 23: the third attempt (t=3) is too young to die;
    # the first attempt past 20 s of age (t=23) dead-letters.
    assert attempt_times(destination) == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0, 19.0, 23.0]
    inspector = Inspector(tmp_path / "queue.db")
    [dead] = inspector.dead_letters("dest")
    assert dead.attempts == 8
    assert inspector.retries("dest") == []


async def test_permanent_failure_dead_letters_at_once(autojump_clock, journal, nursery, tmp_path):
    destination = Scripted(script=[PermanentDeliveryError("HTTP 400", status=400, detail="no")])
    await run_dispatcher(nursery, journal, destination, RetryPolicy())
    await append(journal, "m1", "m2")
    await trio.sleep(30)
    assert [ids for _, ids in destination.attempts] == [["m1"], ["m2"]]  # m1 never retried
    inspector = Inspector(tmp_path / "queue.db")
    [dead] = inspector.dead_letters("dest")
    assert (dead.message_id, dead.attempts) == ("m1", 1)
    assert '"status":400' in dead.history
    assert inspector.counters("dest").delivered == 1


async def test_a_hanging_destination_times_out_and_retries(autojump_clock, journal, nursery):
    destination = Scripted(hang=True)
    await run_dispatcher(nursery, journal, destination, RetryPolicy(initial=1.0), timeout=5.0)
    await append(journal, "m1")
    while len(destination.attempts) < 3:
        await trio.sleep(0.5)
    # timeout 5 s, then backoff 1 s; timeout 5 s, then backoff 2 s
    assert attempt_times(destination) == [0.0, 6.0, 13.0]


async def test_a_raising_plugin_is_contained_and_retried(autojump_clock, journal, nursery):
    destination = Scripted(script=[ZeroDivisionError("plugin bug")])
    await run_dispatcher(nursery, journal, destination, RetryPolicy(initial=2.0))
    await append(journal, "m1")
    while len(destination.attempts) < 2:
        await trio.sleep(0.5)
    assert attempt_times(destination) == [0.0, 2.0]


async def test_batches_keep_log_order_and_size(autojump_clock, journal, nursery):
    destination = Scripted()
    await run_dispatcher(nursery, journal, destination, RetryPolicy(), batch_size=4)
    await append(journal, *[f"m{i}" for i in range(10)])
    await trio.sleep(1)
    batches = [ids for _, ids in destination.attempts]
    assert batches == [["m0", "m1", "m2", "m3"], ["m4", "m5", "m6", "m7"], ["m8", "m9"]]


async def test_stop_lets_the_batch_in_flight_finish(autojump_clock, journal, nursery, tmp_path):
    class Slow(Scripted):
        async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
            await trio.sleep(3)
            return await super().send(batch)

    destination = Slow()
    dispatcher = await run_dispatcher(nursery, journal, destination, RetryPolicy())
    await append(journal, "m1")
    await trio.sleep(1)
    dispatcher.stop()
    await trio.sleep(5)
    counters = Inspector(tmp_path / "queue.db").counters("dest")
    assert counters.delivered == 1


async def test_a_raising_transform_dead_letters_only_its_event(
    autojump_clock, journal, nursery, tmp_path
):
    def picky(event: dict[str, Any]) -> dict[str, Any]:
        if event["messageId"] == "bad":
            raise KeyError("total")
        return event

    destination = Scripted()
    await run_dispatcher(nursery, journal, destination, RetryPolicy(), function=picky)
    await append(journal, "ok-1", "bad", "ok-2")
    await trio.sleep(5)
    assert [ids for _, ids in destination.attempts] == [["ok-1"], ["ok-2"]]
    [dead] = Inspector(tmp_path / "queue.db").dead_letters("dest")
    assert dead.message_id == "bad"
    assert "transform raised KeyError('total')" in dead.reason


async def test_a_hanging_transform_times_out_and_is_retried(autojump_clock, journal, nursery):
    release = threading.Event()
    calls: list[str] = []

    def stuck_once(event: dict[str, Any]) -> dict[str, Any]:
        calls.append(event["messageId"])
        if len(calls) == 1:
            release.wait()  # a real thread, stuck until the test ends
        return event

    destination = Scripted()
    try:
        await run_dispatcher(
            nursery, journal, destination, RetryPolicy(initial=1.0), stuck_once, timeout=5.0
        )
        await append(journal, "m1")
        while not destination.attempts:
            await trio.sleep(0.5)
        # Stuck for the 5 s timeout, then retried after the 1 s backoff: delivered at 6 s.
        assert destination.attempts[0][0] == pytest.approx(6.0, abs=0.6)
        assert calls == ["m1", "m1"]
    finally:
        release.set()
