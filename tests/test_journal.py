"""The journal on real SQLite files: commits, dedupe, restarts, damage, a full queue."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
import trio

from router.errors import JournalError, QueueFullError
from router.events import StoredEvent
from router.journal import BatchRecord, Inspector, open_journal

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
