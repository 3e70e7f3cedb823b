"""The journal on real SQLite files: commits, dedupe, restarts, damage, a full queue."""

from __future__ import annotations

import os
import subprocess
import threading
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
    open_journal,
)

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


def sized(prefix: str, n: int, size: int = 1000) -> list[StoredEvent]:
    return [StoredEvent(f"{prefix}{i}", b"x" * size) for i in range(n)]


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

        # room comes back
        await journal.write(lambda conn: conn.execute("PRAGMA max_page_count = 120").fetchall())
        assert await journal.append("app", sized("more", 5), NOW) == 5
    assert Inspector(path).event_count() == acked + 5
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
