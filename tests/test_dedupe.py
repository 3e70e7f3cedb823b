"""Ingest dedupe on real queue files: keys flushed into runs, read back after a restart or a
kill, runs dropped whole once the window has passed, and no event lost to a key collision."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import apsw
import pytest
import trio

from router import dedupe
from router.dedupe import Run, needs_new_run, runs_to_drop
from router.events import StoredEvent
from router.journal import Inspector, Journal, open_journal

NOW = 1_800_000_000.0
HOUR = 3600.0


def events(*ids: str) -> list[StoredEvent]:
    return [StoredEvent(m, b'{"messageId":"%s"}' % m.encode()) for m in ids]


async def settled(journal: Journal) -> None:
    """Finish a flush: it runs on the writer thread in slices, between group commits."""
    await journal.flush_dedupe()


def run_tables(path: Path) -> list[str]:
    conn = apsw.Connection(str(path))
    try:
        sql = "SELECT name FROM sqlite_master WHERE name GLOB 'dedupe_run_[0-9]*' ORDER BY name"
        return [str(name) for (name,) in conn.execute(sql)]
    finally:
        conn.close()


def run_rows(path: Path, run: str) -> int:
    conn = apsw.Connection(str(path))
    try:
        return int(conn.execute(f'SELECT count(*) FROM "{run}"').fetchall()[0][0])  # type: ignore[arg-type]
    finally:
        conn.close()


@pytest.fixture
def flush_every_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flushes of 3 keys or more, written a half of the key space a transaction."""
    monkeypatch.setattr(dedupe, "FLUSH_AT", 3)
    monkeypatch.setattr(dedupe, "_BUCKET_BITS", 1)


@pytest.mark.usefixtures("flush_every_3")
async def test_duplicates_are_found_once_their_keys_are_in_a_run(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a", "b", "c", "d"), NOW) == 4  # flushed
        assert await journal.append("app", events("c", "d"), NOW) == 0  # mid-flush
        await settled(journal)
        assert run_tables(path) == ["dedupe_run_1"]
        assert run_rows(path, "dedupe_run_1") == 4
        assert await journal.append("app", events("a", "d", "e"), NOW + 1) == 1
        assert await journal.append("web", events("a"), NOW + 1) == 1  # another source
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("b", "e", "f"), NOW + 2) == 1
    assert Inspector(path).event_count() == 7


async def test_appends_committed_together_are_deduped_against_each_other(tmp_path: Path):
    """Appends queued before the writer takes them share one group commit (stored with one
    statement): a messageId two of them carry is stored once, per source."""
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a"), NOW) == 1
        pending = [
            journal.queue_append("app", events("a", "b"), NOW + 1),
            journal.queue_append("app", events("b", "c", "c"), NOW + 1),
            journal.queue_append("web", events("b"), NOW + 1),
        ]
        assert [await p.result() for p in pending] == [1, 1, 1]
    inspector = Inspector(path)
    assert inspector.event_count() == 4
    assert inspector.tallies("source", "app") == {"accepted": 3, "duplicate": 3}
    assert inspector.tallies("source", "web") == {"accepted": 1}


async def test_keys_still_in_memory_are_read_back_after_a_restart(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a", "b"), NOW) == 2
    assert run_tables(path) == []  # never flushed: the keys were only in memory
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a", "b", "c"), NOW + 1) == 1


def test_keys_survive_a_kill_between_flushes(tmp_path: Path):
    """kill -9 after some flushes and some keys only in memory: every acked messageId is
    still a duplicate after the restart."""
    path = tmp_path / "queue.db"
    script = textwrap.dedent(
        f"""
        import os, sys, trio
        from pathlib import Path
        from router import dedupe
        from router.events import StoredEvent
        from router.journal import open_journal
        dedupe.FLUSH_AT = 250

        async def main():
            async with open_journal(Path({str(path)!r}), dedupe_window=3600) as journal:
                for n in range(0, 1000, 100):
                    ids = [f"m{{i}}" for i in range(n, n + 100)]
                    await journal.append("app", [StoredEvent(m, b"{{}}") for m in ids], {NOW})
                    print(n + 100, flush=True)
                os.kill(os.getpid(), 9)

        trio.run(main)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == -9, run.stderr
    assert run.stdout.split()[-1] == "1000"

    async def again() -> int:
        async with open_journal(path, dedupe_window=HOUR) as journal:
            ids = [f"m{i}" for i in range(1100)]
            return await journal.append("app", events(*ids), NOW + 5)

    assert trio.run(again) == 100  # only m1000..m1099 are new
    assert len(run_tables(path)) == 1
    assert Inspector(path).event_count() == 1100


@pytest.mark.usefixtures("flush_every_3")
async def test_a_run_is_dropped_whole_once_the_window_has_passed(tmp_path: Path):
    path = tmp_path / "queue.db"
    window = 100.0
    async with open_journal(path, dedupe_window=window) as journal:
        assert await journal.append("app", events("a1", "a2", "a3"), NOW) == 3
        await settled(journal)
        assert run_tables(path) == ["dedupe_run_1"]
        assert await journal.append("app", events("b1", "b2", "b3"), NOW + 150) == 3
        await settled(journal)
        assert run_tables(path) == ["dedupe_run_1", "dedupe_run_2"]  # a1..a3 may still repeat
        assert await journal.append("app", events("b1", "a1"), NOW + 160) == 1  # a1: too old
        assert await journal.append("app", events("c1", "c2", "c3"), NOW + 300) == 3
        await settled(journal)
        assert run_tables(path) == ["dedupe_run_2", "dedupe_run_3"]
        assert await journal.append("app", events("c2", "b2"), NOW + 310) == 1  # b2: too old


async def test_a_key_collision_loses_no_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dedupe._Keys, "key", lambda _self, _message_id: 42)
    monkeypatch.setattr(dedupe, "FLUSH_AT", 2)
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a", "b"), NOW) == 2
        assert await journal.append("app", events("c", "c"), NOW) == 1
        assert await journal.append("app", events("d"), NOW) == 1
    assert Inspector(path).event_count() == 4


async def test_a_queue_from_an_older_router_is_keyed_once_and_its_index_dropped(tmp_path: Path):
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=0) as journal:
        assert await journal.append("app", events("a", "b"), NOW) == 2
    conn = apsw.Connection(str(path))
    conn.execute("CREATE INDEX events_by_message ON events(source, message_id)")  # as 0.x did
    conn.close()
    async with open_journal(path, dedupe_window=HOUR) as journal:
        assert await journal.append("app", events("a", "b", "c"), NOW + 1) == 1
    conn = apsw.Connection(str(path))
    try:
        indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    finally:
        conn.close()
    assert ("events_by_message",) not in indexes
    assert run_tables(path) == ["dedupe_run_1"]


@pytest.mark.parametrize(
    ("runs", "now", "dropped"),
    [
        ([], NOW, []),
        ([Run("r1", NOW - 300, NOW - 200)], NOW, []),  # the newest run always stays
        ([Run("r1", NOW - 300, NOW - 200), Run("r2", NOW - 150, NOW)], NOW, ["r1"]),
        ([Run("r1", NOW - 300, NOW - 50), Run("r2", NOW - 40, NOW)], NOW, []),
    ],
)
def test_runs_to_drop(runs: list[Run], now: float, dropped: list[str]) -> None:
    assert [run.name for run in runs_to_drop(runs, now=now, window=100)] == dropped


def test_a_new_run_starts_each_window() -> None:
    assert needs_new_run([], now=NOW, window=100)
    assert not needs_new_run([Run("r1", NOW - 99, NOW)], now=NOW, window=100)
    assert needs_new_run([Run("r1", NOW - 100, NOW)], now=NOW, window=100)


def test_keys_are_the_same_in_every_process() -> None:
    code = "from router.dedupe import dedupe_key; print(dedupe_key('app', 'm1'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert int(other.stdout) == dedupe.dedupe_key("app", "m1")
    assert dedupe.dedupe_key("app", "m1") != dedupe.dedupe_key("web", "m1")


async def test_flushes_keep_up_with_steady_ingest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends one after another leave the writer no idle moment: flushes must still keep up,
    or the keys held in memory (and read back at every start-up) would grow without end."""
    monkeypatch.setattr(dedupe, "FLUSH_AT", 10)
    monkeypatch.setattr(dedupe, "_BUCKET_BITS", 2)
    path = tmp_path / "queue.db"
    async with open_journal(path, dedupe_window=HOUR) as journal:

        async def client(name: str) -> None:
            for n in range(75):
                assert await journal.append("app", events(f"{name}{n}", f"{name}{n}-"), NOW) == 2

        async with trio.open_nursery() as nursery:
            for name in "abcd":
                nursery.start_soon(client, name)
    conn = apsw.Connection(str(path))
    try:
        sql = "SELECT value FROM meta WHERE key = 'dedupe_flushed_seq'"
        flushed = int(conn.execute(sql).fetchall()[0][0])  # type: ignore[arg-type]
    finally:
        conn.close()
    assert flushed >= 600 - 3 * 10  # at most about two flushes' worth still in memory


def test_each_bucket_is_one_stretch_of_the_key_space() -> None:
    """A flush writes a bucket per transaction; sorted within it, the whole run is written in
    key order, so neighbouring keys share pages."""
    keys = [dedupe.dedupe_key("app", f"m{i}") for i in range(2000)] + [-(2**63), 2**63 - 1]
    buckets = [dedupe._bucket(key) for key in sorted(keys)]
    assert buckets == sorted(buckets)
    assert (buckets[0], buckets[-1]) == (0, 2**dedupe._BUCKET_BITS - 1)
