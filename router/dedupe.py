"""Which messageIds the queue has taken lately: ingest's dedupe, without an index on the log.

A duplicate is an event that the same source sent with the same messageId inside the dedupe
window. An index on ``events(source, message_id)`` answers that, but clients' messageIds are
random, so every insert into it dirties a page of its own, and each dirty page is written to
the WAL, fsynced, and written again at the checkpoint: with 100 events per commit it cut
durable appends from ~190k to ~30k rows/s. Instead, like an LSM tree:

- each (source, messageId) becomes a 64-bit key (``dedupe_key``), remembered with its event's
  seq in memory (``RecentIds``) until ``flush_at`` of them have gathered;
- then they are written sorted, in one transaction, into a *run*: a table keyed by that key.
  Sorted bulk inserts share pages, so a flush costs a fraction of a page per event;
- a run takes flushes for one dedupe window, then a new one starts; a run whose newest key is
  older than the window is dropped whole (no per-row deletes, which would be random again).

The keys are not proof: a hit is confirmed against the log by seq (same source and messageId,
received inside the window), so a key collision or a stale key (an event pruned, a
transaction rolled back) never makes a new event look like a duplicate. What is in memory is
not lost in a crash: everything above the last flushed seq is read back from the log at
start-up.

Everything here runs on the journal's writer thread, inside its transactions.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apsw
import msgspec

log = logging.getLogger(__name__)

# Keys gathered in memory before a flush. Bigger flushes share more pages (cheaper per event)
# but hold more memory (~100 bytes a key).
FLUSH_AT = 50_000
# Keys in memory are kept in 2**_BUCKET_BITS buckets by their top bits, so each bucket is
# one stretch of the key space: a flush writes a bucket per transaction (~400 keys, ~1 ms
# here), sorting only that bucket. Sorting all 50,000 at once held the GIL, and so every
# ack, for 25-30 ms (p99 at 6,500 single-event requests/s: 11-54 ms). With 64 buckets p99 was
# 4.2-4.6 ms, with 128 3.4-3.7 ms (dedupe off: 3.2-3.6 ms); 256 halved the slices again but
# doubled a flush's commits for no gain in p99.
_BUCKET_BITS = 7

_RUNS = """
CREATE TABLE IF NOT EXISTS dedupe_runs(
    name TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    newest_at REAL NOT NULL
) WITHOUT ROWID
"""
_RUN_PREFIX = "dedupe_run_"
_FLUSHED = "dedupe_flushed_seq"  # meta: every event at or below it has its key in a run
_CONFIRM = "SELECT source, message_id, received_at FROM events WHERE seq = ?"


def dedupe_key(source: str, message_id: str) -> int:
    """A 64-bit key for (source, messageId), the same in every process (unlike ``hash``)."""
    return _Keys(source).key(message_id)


class _Keys:
    """``dedupe_key`` for many messageIds of one source: the source is hashed once."""

    def __init__(self, source: str) -> None:
        self._prefix = hashlib.blake2b(source.encode() + b"\0", digest_size=8)

    def key(self, message_id: str) -> int:
        h = self._prefix.copy()
        h.update(message_id.encode())
        return int.from_bytes(h.digest(), "little", signed=True)


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    started_at: float
    newest_at: float


def runs_to_drop(runs: Sequence[Run], *, now: float, window: float) -> list[Run]:
    """Runs whose every key is older than the window; never the newest (flushes go there)."""
    return [run for run in runs[:-1] if run.newest_at < now - window]


def needs_new_run(runs: Sequence[Run], *, now: float, window: float) -> bool:
    return not runs or now - runs[-1].started_at >= window


class _KeyMap:
    """key -> seq in buckets by the key's top bits; bucket order is key order."""

    __slots__ = ("buckets", "size")

    def __init__(self) -> None:
        self.buckets: list[dict[int, int]] = [{} for _ in range(1 << _BUCKET_BITS)]
        self.size = 0

    def found(self, keys: Iterable[int]) -> list[tuple[int, int]]:
        """The keys present, with their seqs."""
        if not self.size:
            return []
        buckets = self.buckets
        hits = [(key, buckets[_bucket(key)].get(key)) for key in keys]
        return [(key, seq) for key, seq in hits if seq is not None]

    def set(self, key: int, seq: int) -> None:
        bucket = self.buckets[_bucket(key)]
        self.size += key not in bucket
        bucket[key] = seq


def _bucket(key: int) -> int:
    # Keys are signed 64-bit: the top bits, shifted from -2**(b-1).. up to 0..2**b - 1.
    return (key >> (64 - _BUCKET_BITS)) + (1 << (_BUCKET_BITS - 1))


class RecentIds:
    """The keys of recent events: in memory since the last flush, and in runs before that."""

    def __init__(self, window: float, runs: list[Run], *, flush_at: int | None = None) -> None:
        self._window = window
        self._runs = runs  # oldest first
        self._flush_at = FLUSH_AT if flush_at is None else flush_at
        self._fresh = _KeyMap()  # since the last flush started
        self._writing = _KeyMap()  # the keys the flush in progress writes
        self._unwritten: list[dict[int, int]] = []  # its buckets not yet in the run, in order
        self._unwritten_keys = 0
        self._flush_head = 0  # the log's head when that flush started
        self._newest = max((run.newest_at for run in runs), default=0.0)
        self._lookup = _lookup_sql(runs)

    # -- ingest ----------------------------------------------------------------

    def new_events(
        self, conn: apsw.Connection, incoming: Sequence[tuple[str, Sequence[str], float]]
    ) -> tuple[list[list[int]], list[int]]:
        """For each ``(source, messageIds, since)`` of a group commit: the indexes of its
        events that are not duplicates; and the keys of all of those, in order.

        One lookup serves the whole group: a statement per append cost as much as the insert.
        A messageId repeated within ``incoming`` (same source) counts once (its first)."""
        hashers: dict[str, _Keys] = {}
        keyed = []
        for source, message_ids, since in incoming:
            keys_of = hashers.get(source)
            if keys_of is None:
                keys_of = hashers[source] = _Keys(source)
            keyed.append((source, message_ids, since, [keys_of.key(m) for m in message_ids]))
        all_keys = [key for *_, keys in keyed for key in keys]
        seqs = self._seqs(conn, all_keys)
        if not seqs and len(set(all_keys)) == len(all_keys):
            # The usual group: no key seen before, none twice. Nothing to confirm.
            return [list(range(len(keys))) for *_, keys in keyed], all_keys
        fresh_keys: list[int] = []
        taken: set[tuple[str, str]] = set()
        fresh_of_each: list[list[int]] = []
        for source, message_ids, since, keys in keyed:
            fresh: list[int] = []
            for i, (message_id, key) in enumerate(zip(message_ids, keys, strict=True)):
                if (source, message_id) in taken:
                    continue
                candidates = seqs.get(key)
                if candidates and _any_stored(conn, candidates, source, message_id, since):
                    continue
                taken.add((source, message_id))
                fresh.append(i)
                fresh_keys.append(key)
            fresh_of_each.append(fresh)
        return fresh_of_each, fresh_keys

    def remember(self, keys: Iterable[int], first_seq: int, received_at: float) -> None:
        """The events just inserted, with consecutive seqs from ``first_seq``."""
        fresh = self._fresh
        for seq, key in enumerate(keys, start=first_seq):
            fresh.set(key, seq)
        self._newest = max(self._newest, received_at)

    def _seqs(self, conn: apsw.Connection, keys: list[int]) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for recent in (self._fresh, self._writing):
            for key, seq in recent.found(keys):
                found.setdefault(key, []).append(seq)
        if self._lookup:
            for key, seq in conn.execute(self._lookup, (msgspec.json.encode(keys),)):
                found.setdefault(key, []).append(seq)
        return found

    # -- flushing ------------------------------------------------------------------
    # A flush is written in slices, each in a short transaction of its own between group
    # commits, so no ack waits for a whole flush (~0.3 s per 100k keys). Slices of sorted keys
    # cover neighbouring key ranges, so together they dirty the pages one big flush would.

    @property
    def flush_due(self) -> bool:
        return bool(self._unwritten) or self._fresh.size >= self._flush_at

    @property
    def flush_behind(self) -> bool:
        """Whether the flush must go on even while writes wait: it has to keep up with the
        keys coming in, or memory (and the read-back at start-up) would grow without end."""
        return self._unwritten_keys + self._fresh.size >= self._flush_at

    def flush_step(self, conn: apsw.Connection, head: int) -> Callable[[], None]:
        """Write the next part of a flush in the caller's transaction (``head``: the newest seq
        in the log). Returns what to change in memory once that transaction has committed;
        if it does not commit, nothing changes and the same step is tried again later."""
        if self._unwritten:
            return self._write_slice(conn)
        return self._start_flush(conn, head)

    def _start_flush(self, conn: apsw.Connection, head: int) -> Callable[[], None]:
        """Start or drop runs as the window says, and set the keys in memory aside to be
        written (they are still looked up in memory until they are)."""
        now = self._newest
        runs = list(self._runs)
        for run in runs_to_drop(runs, now=now, window=self._window):
            conn.execute(f'DROP TABLE IF EXISTS "{run.name}"')
            conn.execute("DELETE FROM dedupe_runs WHERE name = ?", (run.name,))
            runs.remove(run)
        if needs_new_run(runs, now=now, window=self._window):
            runs.append(_create_run(conn, started_at=now))

        def started() -> None:
            self._writing, self._fresh = self._fresh, _KeyMap()
            self._unwritten = [bucket for bucket in self._writing.buckets if bucket]
            self._unwritten_keys = self._writing.size
            self._flush_head = head
            self._set_runs(runs)

        return started

    def _write_slice(self, conn: apsw.Connection) -> Callable[[], None]:
        part = self._unwritten[0]
        last = len(self._unwritten) == 1
        current = _write_run(conn, self._runs[-1], part.items(), newest_at=self._newest)
        if last:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_FLUSHED, self._flush_head))

        def written() -> None:
            del self._unwritten[0]
            self._unwritten_keys -= len(part)
            self._runs[-1] = current
            if last:
                self._writing = _KeyMap()

        return written

    def _set_runs(self, runs: list[Run]) -> None:
        self._runs = runs
        self._lookup = _lookup_sql(runs)


def _any_stored(
    conn: apsw.Connection, seqs: list[int], source: str, message_id: str, since: float
) -> bool:
    for seq in seqs:
        for stored_source, stored_id, received_at in conn.execute(_CONFIRM, (seq,)):
            if stored_source == source and stored_id == message_id and received_at >= since:
                return True
    return False


def _lookup_sql(runs: Sequence[Run]) -> str:
    return " UNION ALL ".join(
        f'SELECT j.value, r.seq FROM json_each(?1) AS j JOIN "{run.name}" AS r ON r.key = j.value'
        for run in runs
    )


def _create_run(conn: apsw.Connection, *, started_at: float) -> Run:
    number = 1 + max((_run_number(run.name) for run in _stored_runs(conn)), default=0)
    run = Run(f"{_RUN_PREFIX}{number}", started_at, started_at)
    conn.execute(f'CREATE TABLE "{run.name}"(key INTEGER PRIMARY KEY, seq INTEGER NOT NULL)')
    conn.execute("INSERT INTO dedupe_runs VALUES (?, ?, ?)", (run.name, started_at, started_at))
    return run


def _write_run(
    conn: apsw.Connection, run: Run, keys: Iterable[tuple[int, int]], *, newest_at: float
) -> Run:
    # Sorted: neighbouring keys land on the same page, which is the whole point of a run.
    conn.executemany(f'INSERT OR REPLACE INTO "{run.name}" VALUES (?, ?)', sorted(keys))
    newest_at = max(run.newest_at, newest_at)
    conn.execute("UPDATE dedupe_runs SET newest_at = ? WHERE name = ?", (newest_at, run.name))
    return Run(run.name, run.started_at, newest_at)


def _rows(conn: apsw.Connection, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
    return conn.execute(sql, args).fetchall()


def _one(conn: apsw.Connection, sql: str, args: tuple[object, ...] = ()) -> Any:
    return _rows(conn, sql, args)[0][0]


def _run_number(name: str) -> int:
    return int(name.removeprefix(_RUN_PREFIX))


def _stored_runs(conn: apsw.Connection) -> list[Run]:
    rows = _rows(conn, "SELECT name, started_at, newest_at FROM dedupe_runs")
    runs = [Run(str(name), float(started), float(newest)) for name, started, newest in rows]
    return sorted(runs, key=lambda run: _run_number(run.name))


# -- start-up ----------------------------------------------------------------------


def prepare(conn: apsw.Connection, *, on: bool) -> None:
    """Bring the file's dedupe tables in line with the config (in the caller's transaction):
    with dedupe off there are none; with it on, every event in the log has its key in a run
    or above the flushed seq. Also retires the index older routers kept instead."""
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'events_by_message'"
    ).fetchall():
        conn.execute("DROP INDEX events_by_message")
    conn.execute(_RUNS)
    if not on:
        runs = _stored_runs(conn)
        if runs:
            log.info("dedupe is off (queue.dedupe_window = 0): dropping its tables")
        for run in runs:
            conn.execute(f'DROP TABLE IF EXISTS "{run.name}"')
        conn.execute("DELETE FROM dedupe_runs")
        conn.execute("DELETE FROM meta WHERE key = ?", (_FLUSHED,))
        return
    if conn.execute("SELECT 1 FROM meta WHERE key = ?", (_FLUSHED,)).fetchall():
        return
    _build_first_run(conn)


def _build_first_run(conn: apsw.Connection, *, chunk: int = 200_000) -> None:
    """Key every event already in the log (a queue from an older router, or dedupe just
    turned on) into one run, a sorted chunk at a time; then start-up reads back only newer
    events."""
    head = int(_one(conn, "SELECT coalesce(max(seq), 0) FROM events"))
    if head:
        count = int(_one(conn, "SELECT count(*) FROM events"))
        log.info("dedupe is on: keying the %d messageIds in the queue (once)", count)
        oldest = float(_one(conn, "SELECT min(received_at) FROM events"))
        run = _create_run(conn, started_at=oldest)
        after = 0
        while True:
            rows = _rows(
                conn,
                "SELECT seq, source, message_id, received_at FROM events WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, chunk),
            )
            if not rows:
                break
            keys = [(dedupe_key(source, message_id), seq) for seq, source, message_id, _ in rows]
            newest = max(float(received_at) for *_, received_at in rows)
            run = _write_run(conn, run, keys, newest_at=newest)
            after = int(rows[-1][0])
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_FLUSHED, head))


def load(conn: apsw.Connection, window: float, *, flush_at: int | None = None) -> RecentIds:
    """The dedupe state of a prepared file: its runs, and the keys of the events above the
    flushed seq read back from the log (what was in memory when the daemon stopped)."""
    recent = RecentIds(window, _stored_runs(conn), flush_at=flush_at)
    flushed = _rows(conn, "SELECT value FROM meta WHERE key = ?", (_FLUSHED,))
    after = int(flushed[0][0]) if flushed else 0
    rows = _rows(
        conn,
        "SELECT seq, source, message_id, received_at FROM events WHERE seq > ? ORDER BY seq",
        (after,),
    )
    for seq, source, message_id, received_at in rows:
        recent.remember([dedupe_key(source, message_id)], int(seq), float(received_at))
    return recent
