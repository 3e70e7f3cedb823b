"""The journal on real SQLite files: commits, dedupe, restarts, damage, a full queue."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import apsw
import pytest
import trio

from router.errors import JournalError, QueueFullError
from router.events import StoredEvent
from router.journal import (
    BatchRecord,
    DeadRow,
    Inspector,
    Journal,
    LoggedEvent,
    RetryRow,
    open_journal,
)
from router.retention import age_cutoff, choose, prune_bound, under_pressure

NOW = 1_800_000_000.0


def events(*ids: str) -> list[StoredEvent]:
    return [StoredEvent(m, b'{"messageId":"%s"}' % m.encode()) for m in ids]


async def test_appended_events_survive_a_restart(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        assert await journal.ensure_cursors(["hook"]) == {"hook": 0}
        assert await journal.append("app", events("a", "b"), NOW) == 2
        assert journal.head == 2
        await journal.record(BatchRecord("hook", cursor=1, routed=1, delivered=1))
    async with open_journal(path) as journal:
        assert journal.head == 2
        assert await journal.ensure_cursors(["hook", "new"]) == {"hook": 1, "new": 2}
        rows = await journal.reader().events_after(0, 10)
        assert [(r.seq, r.source, r.message_id) for r in rows] == [(1, "app", "a"), (2, "app", "b")]


async def test_duplicates_inside_the_window_are_stored_once(tmp_path: Path):
    async with open_journal(tmp_path / "queue.db", dedupe_window=3600) as journal:
        assert await journal.append("app", events("a", "a", "b"), NOW) == 2
        assert await journal.append("app", events("a"), NOW + 3599) == 0
        assert await journal.append("other", events("a"), NOW) == 1  # per source
        assert await journal.append("app", events("a"), NOW + 3601) == 1  # window passed
    assert Inspector(tmp_path / "queue.db").event_count() == 4


async def test_with_dedupe_off_repeats_are_stored_and_the_dedupe_tables_go(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=3600) as journal:
        assert await journal.append("app", events("a"), NOW) == 1
    async with open_journal(path, dedupe_window=0) as journal:
        assert await journal.append("app", events("a", "a"), NOW) == 2
    assert _dedupe_runs(path) == 0
    async with open_journal(path, dedupe_window=3600) as journal:  # on again: keyed again
        assert await journal.append("app", events("a"), NOW + 1) == 0
        assert await journal.append("app", events("b"), NOW + 1) == 1
    assert _dedupe_runs(path) == 1
    assert Inspector(path).event_count() == 4


def _dedupe_runs(path: Path) -> int:
    conn = apsw.Connection(str(path))
    try:
        sql = "SELECT count(*) FROM sqlite_master WHERE name GLOB 'dedupe_run_[0-9]*'"
        return int(conn.execute(sql).fetchall()[0][0])  # type: ignore[arg-type]
    finally:
        conn.close()


async def test_a_failing_write_in_a_group_of_appends_fails_alone(tmp_path: Path):
    # A first write holds the writer thread, so everything after it commits as one group.
    def hold(_conn: apsw.Connection) -> None:
        time.sleep(0.3)

    def broken(_conn: apsw.Connection) -> None:
        raise TypeError("a bug in one operation")

    results: dict[str, object] = {}

    async def append(name: str) -> None:
        results[name] = await journal.append("app", events(name), NOW)

    async def write_broken() -> None:
        with pytest.raises(JournalError, match="a bug"):
            await journal.write(broken)
        results["broken"] = "refused"

    async with open_journal(tmp_path / "queue.db") as journal:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.write, hold)
            await trio.sleep(0.05)
            for name in ("a", "b"):
                nursery.start_soon(append, name)
            nursery.start_soon(write_broken)
            for name in ("c", "d"):
                nursery.start_soon(append, name)
        assert results == {"a": 1, "b": 1, "c": 1, "d": 1, "broken": "refused"}
    inspector = Inspector(tmp_path / "queue.db")
    assert inspector.event_count() == 4
    assert inspector.tallies("source", "app") == {"accepted": 4}


async def test_the_wal_is_copied_back_while_the_writer_goes_on(tmp_path: Path):
    # The checkpointer thread, not the writer's commits, copies the WAL into the database once
    # it passes 1000 pages; without it the file would stay empty and the WAL grow without end.
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        for n in range(40):
            await journal.append(
                "app", [StoredEvent(f"m{n}-{i}", b"x" * 3000) for i in range(100)], NOW
            )
        with trio.fail_after(10):
            while path.stat().st_size < 8 * 1024**2:  # 12 MB appended
                await trio.sleep(0.05)
        assert await journal.append("app", events("after"), NOW) == 1


async def test_concurrent_appends_all_commit(tmp_path: Path):
    async with open_journal(tmp_path / "queue.db") as journal:
        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(journal.append, "app", events(f"m{n}"), NOW)
        assert journal.head == 200
    assert Inspector(tmp_path / "queue.db").event_count() == 200


async def test_a_full_queue_refuses_and_stores_nothing(tmp_path: Path):
    async with open_journal(tmp_path / "queue.db", max_bytes=64 * 1024) as journal:
        big = [StoredEvent(f"m{n}", b"x" * 2000) for n in range(100)]
        await journal.append("app", big, NOW)
        with pytest.raises(QueueFullError) as refused:
            await journal.append("app", events("late"), NOW)
        assert refused.value.status == 503
        assert refused.value.retry_after
        assert journal.head == 100


async def test_a_damaged_database_is_refused_not_replaced(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        for n in range(50):
            await journal.append("app", [StoredEvent(f"m{n}", b"y" * 3000)], NOW)
    data = bytearray(path.read_bytes())
    for offset in range(8192, len(data) - 4096, 4096):
        data[offset + 8 : offset + 200] = b"\xff" * 192
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged"):
        async with open_journal(path):
            pass
    assert path.read_bytes() == bytes(data)


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path):
    path = tmp_path / "queue.db"
    path.write_bytes(b"this is a text file, not a queue\n" * 200)
    with pytest.raises(JournalError, match="queue"):
        async with open_journal(path):
            pass


async def test_outcomes_and_cursor_commit_together(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        await journal.append("app", events("a", "b", "c"), NOW)
        await journal.ensure_cursors(["hook"])
        await journal.record(BatchRecord("hook", cursor=3, routed=3, delivered=3))
    inspector = Inspector(path)
    counters = inspector.counters("hook")
    assert (counters.routed, counters.delivered, counters.pending) == (3, 3, 0)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    assert conn.execute("SELECT seq FROM cursors WHERE destination='hook'").fetchall() == [(3,)]


# -- retention: what the pruner may delete (pure) -------------------------------------------

DAY = 86400.0


@pytest.mark.parametrize(
    ("rows", "pinned", "pressure", "more", "deleted", "finished"),
    [
        # old rows go, the first young one ends the scan (the log is in arrival order)
        ([(1, 10.0), (2, 20.0), (3, 150.0), (4, 30.0)], set(), False, True, [1, 2], True),
        # a row in a retry set stays; the scan goes on past it
        ([(1, 10.0), (2, 20.0), (3, 30.0)], {2}, False, False, [1, 3], True),
        # the slice was cut at its size: more to look at later
        ([(1, 10.0), (2, 20.0)], set(), False, True, [1, 2], False),
        # under pressure age does not matter, retries still do
        ([(1, 10.0), (2, 150.0), (3, 160.0)], {3}, True, False, [1, 2], True),
        ([], set(), False, False, [], True),
    ],
)
def test_choose_takes_old_unpinned_rows_in_order(rows, pinned, pressure, more, deleted, finished):
    choice = choose(rows, pinned, cutoff=100.0, pressure=pressure, more=more)
    assert (choice.delete, choice.finished) == (deleted, finished)


def test_choose_counts_what_only_pressure_took():
    rows = [(1, 10.0), (2, 150.0), (3, 170.0)]
    choice = choose(rows, set(), cutoff=100.0, pressure=True, more=True)
    assert (choice.forced, choice.newest_forced, choice.scanned_to) == (2, 170.0, 3)


def test_the_bound_is_the_slowest_cursor_or_the_whole_log_without_destinations():
    assert prune_bound([7, 3, 9], head=12) == 3
    assert prune_bound([], head=12) == 12


def test_pruning_never_reaches_into_the_dedupe_window():
    assert age_cutoff(NOW, retention=7 * DAY, dedupe_window=DAY) == NOW - 7 * DAY
    assert age_cutoff(NOW, retention=3600, dedupe_window=DAY) == NOW - DAY


def test_pressure_starts_above_90_percent_and_goes_on_down_to_80():
    assert not under_pressure(900, 1000, relieving=False)
    assert under_pressure(901, 1000, relieving=False)
    assert under_pressure(850, 1000, relieving=True)
    assert not under_pressure(800, 1000, relieving=True)


def test_the_retention_rules_stay_pure():
    code = (
        "import sys, router.retention; "
        "bad = {'trio', 'sqlite3', 'apsw'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# -- retention on a real queue -----------------------------------------------------------------


def sized(prefix: str, n: int, size: int = 1000) -> list[StoredEvent]:
    return [StoredEvent(f"{prefix}{i}", b"x" * size) for i in range(n)]


def seqs(path: Path) -> list[int]:
    return [e.seq for e in Inspector(path).events_after(0, 1_000_000)]


def live_bytes(path: Path) -> int:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchall()[0][0]
            for name in ("page_count", "freelist_count", "page_size")
        )
        return int((pages - free) * size)
    finally:
        conn.close()


def dead(event_seq: int, body: bytes) -> DeadRow:
    return DeadRow(LoggedEvent(event_seq, "app", f"m{event_seq}", NOW, body), "gave up", 3, "[]")


async def test_prune_keeps_what_a_cursor_a_retry_or_retention_still_needs(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        await journal.ensure_cursors(["hook", "slow"])
        await journal.append("app", events(*(f"old{n}" for n in range(1, 7))), NOW - 8 * DAY)
        await journal.append("app", events("young7", "young8"), NOW - 3600)
        retry = RetryRow(2, due=NOW, attempts=1, first_attempt_at=NOW, history="[]")
        await journal.record(
            BatchRecord("hook", cursor=8, retries=[retry], dead=[dead(3, b'{"kept":1}')])
        )
        await journal.record(BatchRecord("slow", cursor=4))

        report = await journal.prune(now=NOW, retention=7 * DAY)
        # 1, 3, 4 are old and both destinations are past them; 2 waits in hook's retries;
        # 5, 6 are past hook's cursor but not slow's; 7, 8 are younger than retention
        assert (report.pruned, report.forced, report.pressure) == (3, 0, False)
        assert report.complete
        assert seqs(path) == [2, 5, 6, 7, 8]

        await journal.record(BatchRecord("slow", cursor=8))
        assert (await journal.prune(now=NOW, retention=7 * DAY)).pruned == 2
        assert seqs(path) == [2, 7, 8]
        # a dead letter keeps its own copy of the event once the log has let it go
        letters = Inspector(path).dead_letters("hook")
        assert [(d.seq, d.body) for d in letters] == [(3, b'{"kept":1}')]
        assert journal.head == 8


async def test_without_destinations_old_events_go_and_the_head_stays(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        await journal.append("app", events("a", "b", "c"), NOW - 8 * DAY)
        assert (await journal.prune(now=NOW, retention=7 * DAY)).pruned == 3
        assert seqs(path) == []
        assert journal.head == 3
    async with open_journal(path) as journal:
        assert journal.head == 3  # seqs never go back, even with the log empty
        assert await journal.ensure_cursors(["new"]) == {"new": 3}
        await journal.append("app", events("d"), NOW)
        assert seqs(path) == [4]


async def test_prune_leaves_the_dedupe_window_alone(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=DAY) as journal:
        await journal.append("app", events("a"), NOW - 2 * 3600)
        assert (await journal.prune(now=NOW, retention=3600)).pruned == 0
        assert await journal.append("app", events("a"), NOW) == 0  # still a duplicate


async def test_disk_pressure_prunes_delivered_history_oldest_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "queue.db"
    limit = 400 * 1024
    async with open_journal(path, max_bytes=limit) as journal:
        await journal.ensure_cursors(["hook"])
        while live_bytes(path) <= 0.85 * limit:
            await journal.append("app", sized(f"a{journal.head}-", 10), NOW - 3600)
        await journal.record(BatchRecord("hook", cursor=journal.head))
        # young and under 90%: nothing goes
        assert (await journal.prune(now=NOW, retention=7 * DAY)).pruned == 0

        while live_bytes(path) <= 0.92 * limit:
            await journal.append("app", sized(f"b{journal.head}-", 10), NOW - 60)
        head = journal.head
        await journal.record(BatchRecord("hook", cursor=head - 20))
        report = await journal.prune(now=NOW, retention=7 * DAY, step=20)

        assert report.pressure
        assert report.forced == report.pruned > 0
        assert report.forced_up_to == NOW - 3600  # only the older history was needed
        assert 0.7 * limit < report.live_bytes <= 0.8 * limit  # down to 80%, a step at most
        left = seqs(path)
        assert left == list(range(left[0], head + 1))  # oldest first; undelivered all kept
        assert any("younger than retention" in r.getMessage() for r in caplog.records)


async def test_a_full_queue_takes_events_again_after_pruning_without_a_restart(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, max_bytes=256 * 1024) as journal:
        await journal.ensure_cursors(["hook"])
        refused = trio.Event()

        async def watch() -> None:
            await journal.wait_refused()
            refused.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await fill_until_refused(journal)
            with trio.fail_after(5):
                await refused.wait()  # the pruner's cue

        # nothing delivered yet: pressure cannot make room, and says so
        report = await journal.prune(now=NOW, retention=7 * DAY)
        assert (report.pruned, report.pressure) == (0, True)
        with pytest.raises(QueueFullError):
            await journal.append("app", events("late"), NOW)

        await journal.record(BatchRecord("hook", cursor=journal.head))
        report = await journal.prune(now=NOW, retention=7 * DAY)
        assert report.pruned > 0
        assert report.freed_bytes > 0
        assert await journal.append("app", events("late"), NOW) == 1


async def test_a_database_made_before_auto_vacuum_still_prunes_and_refills(tmp_path: Path):
    path = tmp_path / "queue.db"
    legacy = apsw.Connection(str(path))
    legacy.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    legacy.close()
    async with open_journal(path, max_bytes=256 * 1024) as journal:
        await journal.append("app", sized("a", 300), NOW - 8 * DAY)
        with pytest.raises(QueueFullError):
            await journal.append("app", sized("b", 300), NOW)
        report = await journal.prune(now=NOW, retention=7 * DAY)
        assert report.pruned == 300
        assert report.reclaimed_bytes == 0  # its file cannot shrink...
        assert await journal.append("app", sized("b", 300), NOW) == 300  # ...but is reused
    conn = apsw.Connection(str(path))
    assert conn.execute("PRAGMA auto_vacuum").fetchall() == [(0,)]


async def test_the_file_shrinks_after_pruning(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path) as journal:
        await journal.append("app", sized("m", 2000), NOW - 8 * DAY)
        await journal.append("app", sized("n", 50), NOW)
    full = path.stat().st_size
    async with open_journal(path) as journal:
        assert (await journal.prune(now=NOW, retention=7 * DAY)).pruned == 2000
        assert path.stat().st_size < full / 10  # shrunk and checkpointed while still open
    conn = apsw.Connection(str(path))
    assert conn.execute("PRAGMA auto_vacuum").fetchall() == [(2,)]  # INCREMENTAL
    assert conn.execute("PRAGMA freelist_count").fetchall() == [(0,)]
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert len(seqs(path)) == 50


# -- a full disk -------------------------------------------------------------------------------


def integrity(path: Path) -> list[tuple[str]]:
    conn = apsw.Connection(str(path))
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()  # type: ignore[return-value]
    finally:
        conn.close()


async def fill_until_refused(journal: Journal, size: int = 2000) -> int:
    """Append one event at a time until the queue refuses; returns how many were acked."""
    for n in range(10_000):
        try:
            await journal.append("app", sized(f"f{journal.head}-", 1, size), NOW)
        except QueueFullError:
            return n
    raise AssertionError("the queue never filled")


async def test_a_full_disk_refuses_whole_events_and_ingest_resumes(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, max_page_count=80) as journal:
        await journal.ensure_cursors(["hook"])
        acked = await fill_until_refused(journal)
        assert acked > 10
        with pytest.raises(QueueFullError, match="disk"):
            await journal.append("app", sized("big", 20), NOW)
        assert Inspector(path).event_count() == acked  # nothing half-written
        assert integrity(path) == [("ok",)]
        assert Inspector(path).tallies("source", "app") == {"accepted": acked}

        # room comes back: a bigger allowance...
        await journal.write(lambda conn: conn.execute("PRAGMA max_page_count = 120").fetchall())
        assert await journal.append("app", sized("more", 5), NOW) == 5
        # ...or pruning what has been delivered
        more = await fill_until_refused(journal)
        await journal.record(BatchRecord("hook", cursor=journal.head))
        assert (await journal.prune(now=NOW + 8 * DAY, retention=7 * DAY)).pruned > 0
        assert await journal.append("app", sized("after", 5), NOW) == 5
    assert Inspector(path).event_count() == 5  # all the rest was delivered and pruned
    assert Inspector(path).tallies("source", "app")["accepted"] == acked + 5 + more + 5
    assert integrity(path) == [("ok",)]


async def one_group(journal: Journal, calls: dict[str, Callable[[], Awaitable[object]]]):
    """Run ``calls`` (in this order) as one group commit; returns each one's result or error."""
    gate = threading.Event()
    outcomes: dict[str, object] = {}

    async def run(name: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            outcomes[name] = await call()
        except QueueFullError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        # hold the writer, so that the calls queue up behind and go in one group
        nursery.start_soon(journal.write, lambda _conn: gate.wait())
        await trio.sleep(0.05)
        for name, call in calls.items():
            nursery.start_soon(run, name, call)
            await trio.sleep(0.01)
        gate.set()
    return outcomes


async def test_a_full_disk_fails_only_the_writes_that_did_not_fit(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, max_page_count=80) as journal:
        await journal.ensure_cursors(["hook"])
        await fill_until_refused(journal, size=200)
        # Room for the small appends below, whatever the pages' layout: the newest event's.
        await journal.write(
            lambda conn: conn.execute(
                "DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)"
            )
        )
        base = Inspector(path).event_count()
        # A big dead letter is one row: on SQLITE_FULL, SQLite throws away the whole
        # transaction under it, not just the statement, so the small append before it in the
        # same commit must run again, or it would be acked without being stored.
        big_letter = DeadRow(LoggedEvent(1, "app", "m1", NOW, b"x" * 100_000), "r", 1, "[]")
        calls = {
            "small": lambda: journal.append("app", sized(f"s{journal.head}", 1, 10), NOW),
            "big": lambda: journal.append("app", sized(f"b{journal.head}", 50), NOW),
            "dead": lambda: journal.record(BatchRecord("hook", dead=[big_letter])),
            "record": lambda: journal.record(BatchRecord("hook", routed=1)),
        }
        for order in (["small", "big", "dead", "record"], ["dead", "big", "record", "small"]):
            outcomes = await one_group(journal, {name: calls[name] for name in order})
            assert isinstance(outcomes["big"], QueueFullError), order
            assert isinstance(outcomes["dead"], QueueFullError), order
            assert outcomes["small"] == 1, order
            assert outcomes["record"] is None, order
        assert Inspector(path).event_count() == base + 2
        assert Inspector(path).counters("hook").routed == 2
        assert Inspector(path).dead_letters() == []
    assert integrity(path) == [("ok",)]


async def test_a_failing_operation_fails_alone_and_the_writer_lives_on(tmp_path: Path):
    def broken(_conn: apsw.Connection) -> None:
        raise TypeError("a bug in one operation")

    async with open_journal(tmp_path / "queue.db") as journal:
        with pytest.raises(JournalError, match="a bug"):
            await journal.write(broken)
        assert await journal.append("app", events("a"), NOW) == 1


def _mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


async def test_a_really_full_filesystem_refuses_and_recovers_when_space_returns(tmp_path: Path):
    disk = tmp_path / "small"
    _mount_tmpfs(disk, "2m")
    try:
        path = disk / "queue.db"
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 1024 * 1024)
        async with open_journal(path) as journal:
            acked = await fill_until_refused(journal)
            assert acked > 10
            with pytest.raises(QueueFullError, match="disk"):
                await journal.append("app", sized("late", 5), NOW)
            assert Inspector(path).event_count() == acked
            assert integrity(path) == [("ok",)]
            ballast.unlink()  # space returns
            assert await journal.append("app", sized("late", 5), NOW) == 5
        assert Inspector(path).event_count() == acked + 5
        assert integrity(path) == [("ok",)]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


async def test_retries_parked_past_the_horizon_count_as_due(tmp_path: Path):
    """After the wall clock steps back, due times lie hours ahead; the horizon releases them."""
    async with open_journal(tmp_path / "queue.db") as journal:
        await journal.ensure_cursors(["hook"])
        await journal.append("app", events("a", "b", "c"), NOW)
        retries = [
            RetryRow(1, due=NOW + 1, attempts=1, first_attempt_at=NOW, history="[]"),
            RetryRow(2, due=NOW + 3 * 3600, attempts=1, first_attempt_at=NOW, history="[]"),
            RetryRow(3, due=NOW - 1, attempts=1, first_attempt_at=NOW, history="[]"),
        ]
        await journal.record(BatchRecord("hook", cursor=3, retries=retries))
        reader = journal.reader()

        due, next_due = await reader.due_retries("hook", NOW, 10, frozenset())
        assert ([p.event.seq for p in due], next_due) == ([3], NOW + 1)
        due, next_due = await reader.due_retries("hook", NOW, 10, frozenset(), horizon=600)
        assert ([p.event.seq for p in due], next_due) == ([3, 2], NOW + 1)
        due, next_due = await reader.due_retries("hook", NOW, 1, frozenset({3}), horizon=600)
        assert ([p.event.seq for p in due], next_due) == ([2], None)
