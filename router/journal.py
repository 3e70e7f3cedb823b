"""The journal: router's durable queue in one SQLite file (WAL), through apsw.

It owns the schema, the single writer thread and its group commit, and the read
connections. Nothing else opens the database while the daemon runs.

- ``events`` is an append-only log; ``seq`` only grows (AUTOINCREMENT, so pruning the
  newest row can never hand its number out again and slip under a cursor).
- ``cursors`` holds one low-water mark per destination: every event at or below it is
  delivered, filtered, or in ``retries`` / ``dead_letters`` for that destination.
- ``retries`` holds events that failed and wait for their due time; ``dead_letters``
  keeps a copy of each event that gave up, with every attempt's outcome.
- ``counters`` keeps per-destination totals for the conservation check
  (routed = delivered + dead_lettered + filtered + pending).

Every write goes through one thread that takes whatever operations are waiting, applies
each in its own savepoint (so one bad operation fails alone), commits once, and only then
wakes the waiters: many concurrent acks share one fsync.

Space: ingest is refused (503) when the live pages reach ``max_bytes`` or the disk is full,
and takes events again by itself once ``prune`` has deleted what every destination is done
with (router/retention.py decides what may go) and given the pages back.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import apsw
import trio

from router import dedupe
from router.checkpointer import Checkpointer
from router.errors import JournalError, QueueFullError, RouterError
from router.events import StoredEvent
from router.retention import (
    Choice,
    Progress,
    PruneReport,
    age_cutoff,
    choose,
    prune_bound,
    under_pressure,
    warnings,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors(destination TEXT PRIMARY KEY, seq INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retries(
    destination TEXT NOT NULL,
    seq INTEGER NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL,
    first_attempt_at REAL NOT NULL,
    history TEXT NOT NULL,
    PRIMARY KEY(destination, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retries_by_due ON retries(destination, due);
-- The pruner asks "is this slice of the log in anyone's retry set?" without a scan.
CREATE INDEX IF NOT EXISTS retries_by_seq ON retries(seq);
CREATE TABLE IF NOT EXISTS dead_letters(
    destination TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    dead_at REAL NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    history TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY(destination, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters(
    destination TEXT PRIMARY KEY,
    routed INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    filtered INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Why events were held back or refused, by reason: ('destination', 'hook', 'sampled_out').
CREATE TABLE IF NOT EXISTS tallies(
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY(scope, name, reason)
) WITHOUT ROWID;
"""

_TALLY = """
INSERT INTO tallies VALUES (?, ?, ?, ?)
ON CONFLICT DO UPDATE SET count = count + excluded.count
"""

_INSERT = "INSERT INTO events(source, message_id, received_at, body) VALUES (?1, ?2, ?3, ?4)"

# SQLite's own threshold: a checkpoint once the WAL holds this many pages (router/checkpointer.py
# runs it, off the writer thread).
_CHECKPOINT_PAGES = 1000

# The newest seq ever handed out. Not max(seq): the pruner may delete the newest rows, and
# a head that went back would start a new destination's cursor below events restored from
# dead letters (or re-count them as unread).
_HEAD = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"

# A WAL file keeps the size of its largest moment (SQLite reuses it rather than shrinking
# it). Past this limit, it is cut back whenever the log restarts after a checkpoint. Not
# smaller: on a full disk the space the WAL already holds is what lets a prune commit.
_WAL_SIZE_LIMIT = 64 * 1024**2

Synchronous = Literal["full", "normal"]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One row of the log, as the dispatchers read it."""

    seq: int
    source: str
    message_id: str
    received_at: float
    body: bytes


@dataclass(frozen=True, slots=True)
class PendingRetry:
    event: LoggedEvent
    due: float
    attempts: int
    first_attempt_at: float
    history: str


@dataclass(frozen=True, slots=True)
class RetryRow:
    seq: int
    due: float
    attempts: int
    first_attempt_at: float
    history: str


@dataclass(frozen=True, slots=True)
class DeadRow:
    event: LoggedEvent
    reason: str
    attempts: int
    history: str


@dataclass(slots=True)
class BatchRecord:
    """Everything one dispatcher learned from finished work, committed as one unit."""

    destination: str
    cursor: int | None = None
    routed: int = 0
    filtered: int = 0
    delivered: int = 0
    retries: list[RetryRow] = field(default_factory=list)
    retries_done: list[int] = field(default_factory=list)
    dead: list[DeadRow] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)  # filtered events, by reason


@dataclass(frozen=True, slots=True)
class Counters:
    routed: int
    delivered: int
    dead_lettered: int
    filtered: int

    @property
    def pending(self) -> int:
        return self.routed - self.delivered - self.dead_lettered - self.filtered


@dataclass(frozen=True, slots=True)
class DeadLetter:
    destination: str
    seq: int
    source: str
    message_id: str
    dead_at: float
    reason: str
    attempts: int
    history: str
    body: bytes


_Apply = Callable[[apsw.Connection], Any]


@dataclass(frozen=True, slots=True)
class _Append:
    """What ``append`` stores: rows of (source, message_id, received_at, body)."""

    source: str
    rows: list[tuple[str, str, float, bytes]]
    received_at: float
    tallies: dict[str, int]


@dataclass(slots=True)
class _Operation:
    apply: _Apply
    append: _Append | None = None  # an append, which a group commit stores with its neighbours
    result: Any = None
    error: BaseException | None = None
    bare: bool = False  # runs outside any transaction (a checkpoint cannot run inside one)
    finished: bool = False  # set in the trio thread once committed (or failed)
    waiter: trio.lowlevel.Task | None = None  # the task waiting in PendingWrite.result


_STOP = object()


def _refuse_abort(_raise_cancel: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class PendingWrite:
    """A write queued on the writer thread; ``result()`` waits for its commit."""

    __slots__ = ("_op",)

    def __init__(self, op: _Operation) -> None:
        self._op = op

    async def result(self) -> Any:
        """The write's result once committed, or its error. Not cancellable: a caller
        cancelled mid-commit must not be left unsure what was written. (A wait that refuses
        to abort rather than a shielded cancel scope and an Event: those cost a fifth of the
        event loop's time on single-event requests.)"""
        op = self._op
        if not op.finished:
            assert op.waiter is None, "one waiter per write"
            op.waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if op.error is not None:
            raise op.error
        return op.result


def connect(path: Path, *, readonly: bool = False, vfs: str | None = None) -> apsw.Connection:
    """Open the database, mapping "this is not a usable queue" to a clear JournalError.

    ``vfs`` names a registered SQLite VFS other than the default: only tests use it (one that
    simulates power loss by dropping writes not yet synced)."""
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    try:
        conn = apsw.Connection(str(path), flags=flags, vfs=vfs)
        conn.set_busy_timeout(5000)
        conn.execute("PRAGMA foreign_keys = OFF")
    except apsw.Error as exc:
        raise JournalError(f"cannot open the queue database {path}: {exc}") from exc
    return conn


def check_integrity(conn: apsw.Connection, path: Path) -> None:
    """Refuse a damaged database: starting empty beside it would silently lose the backlog."""
    try:
        rows = [row[0] for row in conn.execute("PRAGMA quick_check")]
    except apsw.Error as exc:
        rows = [str(exc)]
    if rows != ["ok"]:
        detail = "; ".join(str(r) for r in rows[:5])
        raise JournalError(
            f"the queue database {path} is damaged ({detail}). router will not start on it, "
            "so that no acked event is silently dropped. Stop here: copy the file aside, try "
            f"`sqlite3 {path} .recover`, or move it away to start with an empty queue."
        )


def _prepare(
    path: Path,
    synchronous: Synchronous,
    max_page_count: int | None = None,
    vfs: str | None = None,
    *,
    dedupe_on: bool = True,
) -> apsw.Connection:
    conn = connect(path, vfs=vfs)
    check_integrity(conn, path)
    try:
        # Before anything creates a table: SQLite fixes auto_vacuum with the first one, so
        # only a new database takes this (and the pruner can then hand free pages back to
        # the filesystem). An older database keeps auto_vacuum = NONE and works the same;
        # its file just never shrinks (freed pages are reused by new events instead).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if mode != "wal":
            raise JournalError(f"{path}: cannot switch the queue to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        # A savepoint's undo pages go to a temporary file by default: an open, writes and a
        # close for every savepoint. In memory they cost nothing (measured: 3x faster appends).
        conn.execute("PRAGMA temp_store = MEMORY")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
        with conn:
            conn.execute(_SCHEMA)
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchall()
            if not version:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif version[0][0] != SCHEMA_VERSION:
                raise JournalError(
                    f"{path}: queue schema version {version[0][0]}, this router "
                    f"reads version {SCHEMA_VERSION}"
                )
            dedupe.prepare(conn, on=dedupe_on)
    except apsw.Error as exc:
        raise JournalError(f"cannot prepare the queue database {path}: {exc}") from exc
    return conn


class Journal:
    """The durable queue. Create with ``open_journal``; all writes go through its thread."""

    def __init__(
        self,
        path: Path,
        conn: apsw.Connection,
        *,
        dedupe_window: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        checkpointer: Checkpointer | None = None,
        recent: dedupe.RecentIds | None = None,
    ) -> None:
        self.path = path
        self._conn = conn
        self._checkpointer = checkpointer
        self._dedupe_window = dedupe_window
        # The writer thread's alone; None when dedupe is off.
        self._recent = recent
        self._max_bytes = max_bytes
        self._clock = clock
        self._ops: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Writes queued by the trio side since the last hand-over. Handed to the writer thread
        # together, once the tasks that are ready have run: one wake-up of the thread per
        # round of the event loop rather than per write (measured: a put per write had the
        # two threads trade the core and the GIL for every single-event request).
        self._outbox: list[_Operation] = []
        self._token = trio.lowlevel.current_trio_token()
        self._head = _scalar(conn, _HEAD)
        self._head_changed = trio.Event()
        self._refused = trio.Event()
        self._disk_full = False  # the writer thread's alone
        # Tallies of the transaction in progress, written once before it commits rather than
        # once per append (the writer thread's alone).
        self._tallies: Counter[tuple[str, str, str]] = Counter()
        # Set at the start of each transaction: appends refused because the queue is full.
        # Measured once per group commit, not per append: the limit may be overshot by one
        # group's worth, which is what a soft limit on a queue of this size can bear.
        self._full: QueueFullError | None = None
        self._page_size = _scalar(conn, "PRAGMA page_size")
        # Only a database created with auto_vacuum = INCREMENTAL (2) can give pages back.
        self._can_shrink = _scalar(conn, "PRAGMA auto_vacuum") == 2
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._thread.start()

    # -- the trio side -------------------------------------------------------

    @property
    def head(self) -> int:
        """The newest committed sequence number."""
        return self._head

    async def wait_beyond(self, seq: int) -> None:
        """Wait until something newer than ``seq`` is committed."""
        while self._head <= seq:
            await self._head_changed.wait()

    async def append(
        self,
        source: str,
        events: Sequence[StoredEvent],
        received_at: float,
        tallies: Mapping[str, int] | None = None,
    ) -> int:
        """Commit ``events``; returns how many were new (the rest were duplicates).

        The source's tallies (``accepted``, ``duplicate``, and the caller's ``tallies``, e.g.
        events refused or blocked) commit in the same transaction. Returns only after the
        commit, so the caller may ack. Shielded: a client that hangs up mid-commit must not
        leave us unsure what was written.
        """
        stored: int = await self.queue_append(source, events, received_at, tallies).result()
        return stored

    def queue_append(
        self,
        source: str,
        events: Sequence[StoredEvent],
        received_at: float,
        tallies: Mapping[str, int] | None = None,
    ) -> PendingWrite:
        """``append`` in two steps: queued now, in call order, and committed by the time
        ``result()`` returns. A reader can parse its next input while this one commits."""
        rows = [(source, e.message_id, received_at, e.body) for e in events]
        append = _Append(source, rows, received_at, dict(tallies or {}))
        return self._queue(lambda conn: self._store(conn, [append])[0], append=append)

    def _store(self, conn: apsw.Connection, appends: Sequence[_Append]) -> list[int]:
        """Insert the events of ``appends`` that are not duplicates, with one statement for
        them all; returns how many each stored. Called with a whole group's appends on the
        fast path (a statement each cost as much again as the rows they insert), with one
        on the careful path."""
        if self._full is not None:
            raise self._full
        recent = self._recent
        kept: Sequence[Sequence[int]]
        if recent is None:
            kept = [range(len(a.rows)) for a in appends]
        else:
            window = self._dedupe_window
            incoming = [(a.source, [r[1] for r in a.rows], a.received_at - window) for a in appends]
            kept, keys = recent.new_events(conn, incoming)
        rows = [a.rows[i] for a, fresh in zip(appends, kept, strict=True) for i in fresh]
        if rows:
            conn.executemany(_INSERT, rows)
            if recent is not None:
                # One writer and AUTOINCREMENT: the rows just inserted have consecutive seqs.
                first = conn.last_insert_rowid() - len(rows) + 1
                recent.remember(keys, first, max(a.received_at for a in appends))
        for append, fresh in zip(appends, kept, strict=True):
            counts = {
                **append.tallies,
                "accepted": len(fresh),
                "duplicate": len(append.rows) - len(fresh),
            }
            for reason, n in counts.items():
                if n:
                    self._tallies["source", append.source, reason] += n
        return [len(fresh) for fresh in kept]

    async def record(self, batch: BatchRecord) -> None:
        """Commit a dispatcher's outcomes (and its cursor) atomically."""
        await self._submit(lambda conn: _apply_record(conn, batch))

    async def ensure_cursors(self, destinations: Sequence[str]) -> dict[str, int]:
        """Cursors for ``destinations``; a new destination starts at the head (new events
        only; `router replay` backfills it)."""

        def apply(conn: apsw.Connection) -> dict[str, int]:
            cursors: dict[str, int] = {}
            for name in destinations:
                conn.execute(
                    "INSERT OR IGNORE INTO cursors VALUES (?, ?)", (name, _scalar(conn, _HEAD))
                )
                conn.execute("INSERT OR IGNORE INTO counters(destination) VALUES (?)", (name,))
                cursors[name] = _scalar(
                    conn, "SELECT seq FROM cursors WHERE destination = ?", (name,)
                )
            return cursors

        result: dict[str, int] = await self._submit(apply)
        return result

    async def write(self, apply: Callable[[apsw.Connection], Any]) -> Any:
        """Run ``apply`` on the writer thread inside a transaction of its own (savepoint);
        returns its result. For operator actions (replay, dead letters): never a second writer.

        ``apply`` must touch only the connection and never end the transaction itself: when
        the disk fills under another operation of the same commit, SQLite may throw the whole
        transaction away, and ``apply`` then runs again in a new one.
        """
        return await self._submit(apply)

    async def wait_refused(self) -> None:
        """Wait until a write is next refused for want of space (the queue at ``max_bytes``
        or the disk full): the pruner's cue not to wait for its next round."""
        await self._refused.wait()

    async def prune(
        self,
        *,
        now: float,
        retention: float,
        max_bytes: int | None = None,
        step: int = 1000,
        max_steps: int = 1000,
        vacuum_pages: int = 256,
    ) -> PruneReport:
        """Delete the events no destination needs any more (router/retention.py says which),
        then give the freed pages back to the filesystem.

        Every step is one short write on the writer thread, deleting at most ``step`` events
        or giving back at most ``vacuum_pages`` pages, so ingest commits between steps.
        Stops when nothing more can go, or after ``max_steps`` steps of each kind (then the
        report is not ``complete``). ``max_bytes`` defaults to the journal's own limit.
        """
        limit = self._max_bytes if max_bytes is None else max_bytes
        cutoff = age_cutoff(now, retention, self._dedupe_window)
        progress = Progress()
        reindexed = False
        for _ in range(max_steps):
            started = trio.current_time()
            prune_step = partial(
                self._prune_step,
                after=progress.after,
                cutoff=cutoff,
                max_bytes=limit,
                relieving=progress.relieving,
                step=step,
            )
            try:
                choice, pressure, freed = await self._submit(prune_step)
            except CorruptIndexError as exc:
                if reindexed:
                    raise
                log.warning("the queue's indexes are damaged; rebuilding them: %s", exc)
                await self._submit(_reindex)
                reindexed = True
                continue
            progress.add(choice, pressure=pressure, freed_pages=freed)
            if progress.complete:
                break
            # Leave the writer to ingest for as long as the step took: a step shares its
            # commit with the appends waiting then, so back-to-back steps would slow every
            # ack to the pruner's pace.
            await trio.sleep(trio.current_time() - started)
        reclaimed = 0
        if self._can_shrink:
            for _ in range(max_steps):
                started = trio.current_time()
                shrunk: int = await self._submit(partial(_give_back, pages=vacuum_pages))
                reclaimed += shrunk
                if shrunk < vacuum_pages:
                    break
                await trio.sleep(trio.current_time() - started)
            if reclaimed:
                # Copy the WAL back now, so that the file shrinks on an idle queue too (a
                # busy one checkpoints every ~1000 pages anyway). PASSIVE never waits for
                # readers, so it holds up ingest no longer than an automatic checkpoint.
                await self._submit(_checkpoint, bare=True)
        live: int = await self._submit(self._live_bytes)
        report = progress.report(
            page_size=self._page_size, reclaimed_pages=reclaimed, live_bytes=live
        )
        for warning in warnings(report, now=now, retention=retention, max_bytes=limit):
            log.warning("%s", warning)
        if report.pruned or report.reclaimed_bytes:
            log.info(
                "pruned events=%d forced=%d freed_bytes=%d reclaimed_bytes=%d complete=%s",
                *(report.pruned, report.forced, report.freed_bytes, report.reclaimed_bytes),
                report.complete,
            )
        return report

    def reader(self) -> Reader:
        return Reader(self.path)

    async def _submit(self, apply: _Apply, *, bare: bool = False) -> Any:
        return await self._queue(apply, bare=bare).result()

    def _queue(
        self, apply: _Apply, *, bare: bool = False, append: _Append | None = None
    ) -> PendingWrite:
        op = _Operation(apply=apply, bare=bare, append=append)
        self._outbox.append(op)
        if len(self._outbox) == 1:
            self._token.run_sync_soon(self._hand_over)
        return PendingWrite(op)

    def _hand_over(self) -> None:
        ops, self._outbox = self._outbox, []
        self._ops.put(ops)

    async def aclose(self) -> None:
        """Finish every queued write, then close the file."""
        self._hand_over()  # what is queued goes first; nothing is queued after the close
        self._ops.put(_STOP)
        await trio.to_thread.run_sync(self._thread.join)
        self._conn.close()
        if self._checkpointer is not None:
            await trio.to_thread.run_sync(self._checkpointer.close)

    # -- the writer thread ---------------------------------------------------

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            ops: list[_Operation] = []
            item = self._ops.get()
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    assert isinstance(item, list)
                    ops += item
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
            if ops:
                self._commit_group(ops)

    def _commit_group(self, ops: list[_Operation]) -> None:
        pending = [op for op in ops if not op.bare]
        while pending:
            pending = self._commit_once(pending)
        for op in ops:
            if op.bare:
                self._apply(op)
        head = _scalar(self._conn, _HEAD)
        try:
            self._token.run_sync_soon(self._finish, ops, head)
        except trio.RunFinishedError:
            log.warning("journal finished writes after the event loop stopped")
        # After the waiters are woken: a flush step delays the next group, not this one's
        # acks. A flush yields to writes that are waiting, as long as it keeps up with them.
        recent = self._recent
        while recent is not None and recent.flush_due:
            if not self._ops.empty() and not recent.flush_behind:
                break
            if not self._flush_step(recent, head):
                break

    def _flush_step(self, recent: dedupe.RecentIds, head: int) -> bool:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            committed = recent.flush_step(conn, head)
            conn.execute("COMMIT")
        except apsw.Error as exc:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            # The keys stay in memory (and in the log, for a restart); tried again after the
            # next commit. Only dedupe's memory grows meanwhile.
            log.warning("could not write dedupe keys; keeping them in memory: %s", exc)
            return False
        committed()
        return True

    async def flush_dedupe(self) -> None:
        """Finish writing the dedupe keys gathered so far, if enough have gathered (tests)."""

        def flush_all(_conn: apsw.Connection) -> None:
            while self._recent is not None and self._recent.flush_due:
                if not self._flush_step(self._recent, _scalar(self._conn, _HEAD)):
                    break

        await self._submit(flush_all, bare=True)

    def _commit_once(self, ops: list[_Operation]) -> list[_Operation]:
        """Commit ``ops`` in one transaction; returns the operations to apply again.

        First without savepoints: four statements per operation cost more than the insert
        they guard, and almost every group succeeds whole. When anything fails, the group
        is rolled back and applied again the careful way (``_commit_isolated``)."""
        conn = self._conn
        try:
            self._begin()
            for is_append, run in itertools.groupby(ops, key=lambda op: op.append is not None):
                run_ops = list(run)
                if is_append:
                    appends = [op.append for op in run_ops if op.append is not None]
                    results: list[Any] = self._store(conn, appends)
                else:
                    results = [op.apply(conn) for op in run_ops]
                for op, result in zip(run_ops, results, strict=True):
                    op.error, op.result = None, result
            self._flush_tallies()
            conn.execute("COMMIT")
        except Exception:  # noqa: BLE001 - the careful path applies it again and reports
            self._tallies.clear()
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            return self._commit_isolated(ops)
        self._note_full(None)
        return []

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        self._full = self._queue_full(self._conn)

    def _flush_tallies(self) -> None:
        if self._tallies:
            rows = [(*key, n) for key, n in self._tallies.items()]
            self._tallies.clear()
            self._conn.executemany(_TALLY, rows)

    def _commit_isolated(self, ops: list[_Operation]) -> list[_Operation]:
        """Apply ``ops`` in one transaction, each in a savepoint of its own so that a failing
        one rolls back alone, and commit. Returns the operations to apply again: on
        SQLITE_FULL (and some I/O errors) SQLite may throw away the whole transaction, not
        just the failing statement. The operation that hit it has failed; those before it
        lost their work through no fault of their own and run again in a new transaction."""
        conn = self._conn
        applied: list[_Operation] = []
        try:
            self._begin()
            for i, op in enumerate(ops):
                self._apply(op)
                if conn.get_autocommit():
                    if isinstance(op.error, QueueFullError):
                        self._note_full(op.error)
                    return applied + ops[i + 1 :]
                if op.error is None:
                    applied.append(op)
            conn.execute("COMMIT")
        except apsw.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing of this group is
            # durable, so nothing of it may be acked.
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            error = _map_error(exc, "queue commit failed")
            if isinstance(error, QueueFullError):
                self._note_full(error)
            else:
                log.exception("queue commit failed")
            for op in ops:
                if op.error is None:
                    op.error = error
        else:
            self._note_full(None)
        return []

    def _note_full(self, error: BaseException | None) -> None:
        """Say when the disk fills up and when there is room again, once each: while it is
        full every write fails, and a line per refusal would bury everything else."""
        if error is not None and not self._disk_full:
            log.warning("the disk holding the queue is full; ingest answers 503: %s", error)
        elif error is None and self._disk_full:
            log.info("the queue has room again; ingest resumed")
        self._disk_full = error is not None

    def _apply(self, op: _Operation) -> None:
        conn = self._conn
        inside = not op.bare
        op.error = None
        try:
            if inside:
                conn.execute("SAVEPOINT op")
            op.result = op.apply(conn)
            self._flush_tallies()
            if inside:
                conn.execute("RELEASE op")
        # Not apsw's ``with conn``: when SQLite has already dropped the transaction, its exit
        # fails on the missing savepoint and hides the FullError we need to answer 503.
        # Anything at all is caught: a bug in one operation must not kill this thread and
        # leave every waiter hanging.
        except Exception as exc:
            self._tallies.clear()
            if inside and not conn.get_autocommit():
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            if not isinstance(exc, RouterError | apsw.FullError):
                log.exception("journal operation failed")
            op.error = _map_error(exc, "queue write failed")

    def _queue_full(self, conn: apsw.Connection) -> QueueFullError | None:
        # Live pages, not the file size: pages freed by the pruner are reused by new events,
        # so ingest resumes by itself once pruning has made room.
        live = self._live_bytes(conn)
        if live < self._max_bytes:
            return None
        return QueueFullError(
            f"the queue holds {live} bytes, at its limit queue.max_bytes = {self._max_bytes}"
        )

    def _live_bytes(self, conn: apsw.Connection) -> int:
        free = _scalar(conn, "PRAGMA freelist_count")
        return (_scalar(conn, "PRAGMA page_count") - free) * self._page_size

    def _prune_step(
        self,
        conn: apsw.Connection,
        *,
        after: int,
        cutoff: float,
        max_bytes: int,
        relieving: bool,
        step: int,
    ) -> tuple[Choice, bool, int]:
        """Delete the next events that may go, looking at no more than ``step`` rows after
        seq ``after``; returns the choice, whether pressure forced it, and the pages freed.
        Cursors, retries and the size are read in the transaction that deletes, so nothing a
        dispatcher takes meanwhile can be pruned under it."""
        pressure = under_pressure(self._live_bytes(conn), max_bytes, relieving=relieving)
        cursors = [int(seq) for (seq,) in conn.execute("SELECT seq FROM cursors")]
        rows: list[tuple[int, float]] = conn.execute(
            "SELECT seq, received_at FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after, prune_bound(cursors, _scalar(conn, _HEAD)), step),
        ).fetchall()  # type: ignore[assignment]
        pinned: set[int] = set()
        if rows:
            sql = "SELECT seq FROM retries WHERE seq BETWEEN ? AND ?"
            pinned = {int(seq) for (seq,) in conn.execute(sql, (rows[0][0], rows[-1][0]))}
        choice = choose(rows, pinned, cutoff=cutoff, pressure=pressure, more=len(rows) == step)
        free_before = _scalar(conn, "PRAGMA freelist_count")
        conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in choice.delete])
        return choice, pressure, _scalar(conn, "PRAGMA freelist_count") - free_before

    def _finish(self, ops: list[_Operation], head: int) -> None:
        """Runs in the trio thread: wake the waiters, the dispatchers and the pruner."""
        for op in ops:
            op.finished = True
            if op.waiter is not None:
                trio.lowlevel.reschedule(op.waiter)
        if head != self._head:
            self._head = head
            self._head_changed.set()
            self._head_changed = trio.Event()
        if any(isinstance(op.error, QueueFullError) for op in ops):
            self._refused.set()
            self._refused = trio.Event()


def _give_back(conn: apsw.Connection, *, pages: int) -> int:
    """Hand up to ``pages`` free pages back to the filesystem; returns how many went. Live
    pages near the end of the file move into the holes, so this costs writes: in small
    steps, like the deletes."""
    before = _scalar(conn, "PRAGMA page_count")
    conn.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
    return before - _scalar(conn, "PRAGMA page_count")


def _checkpoint(conn: apsw.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class CorruptIndexError(JournalError):
    """SQLite found the file damaged while writing (quick_check at start-up does not match
    indexes against rows, so index damage shows up only here)."""


def _map_error(exc: BaseException, doing: str) -> BaseException:
    """The one place where the writer's foreign exceptions get their meaning."""
    if isinstance(exc, RouterError):
        return exc
    if isinstance(exc, apsw.FullError):
        return QueueFullError(f"the disk holding the queue is full: {exc}")
    if isinstance(exc, apsw.CorruptError):
        return CorruptIndexError(f"{doing}: {exc}")
    return JournalError(f"{doing}: {exc}")


def _reindex(conn: apsw.Connection) -> None:
    # Indexes hold nothing that is not in the tables: rebuilding them from the rows repairs
    # index damage without losing an event. Damage in the rows themselves stays an error.
    conn.execute("REINDEX")


def _apply_record(conn: apsw.Connection, batch: BatchRecord) -> None:
    name = batch.destination
    if batch.retries:
        conn.executemany(
            "INSERT OR REPLACE INTO retries VALUES (?, ?, ?, ?, ?, ?)",
            [
                (name, r.seq, r.due, r.attempts, r.first_attempt_at, r.history)
                for r in batch.retries
            ],
        )
    done = batch.retries_done + [d.event.seq for d in batch.dead]
    if done:
        conn.executemany(
            "DELETE FROM retries WHERE destination = ? AND seq = ?", [(name, s) for s in done]
        )
    if batch.dead:
        now = time.time()
        conn.executemany(
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    name,
                    d.event.seq,
                    d.event.source,
                    d.event.message_id,
                    now,
                    d.reason,
                    d.attempts,
                    d.history,
                    d.event.body,
                )
                for d in batch.dead
            ],
        )
    conn.execute(
        "UPDATE counters SET routed = routed + ?, filtered = filtered + ?, "
        "delivered = delivered + ?, dead_lettered = dead_lettered + ? WHERE destination = ?",
        (batch.routed, batch.filtered, batch.delivered, len(batch.dead), name),
    )
    if batch.held:
        conn.executemany(
            _TALLY, [("destination", name, reason, n) for reason, n in batch.held.items()]
        )
    if batch.cursor is not None:
        conn.execute(
            "UPDATE cursors SET seq = max(seq, ?) WHERE destination = ?", (batch.cursor, name)
        )


class Reader:
    """A read-only connection for one task; every call runs on a worker thread."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path, readonly=True)

    async def events_after(self, seq: int, limit: int) -> list[LoggedEvent]:
        return await trio.to_thread.run_sync(self._events_after, seq, limit)

    def _events_after(self, seq: int, limit: int) -> list[LoggedEvent]:
        return _events_after(self._conn, seq, limit)

    async def due_retries(
        self,
        destination: str,
        now: float,
        limit: int,
        skip: frozenset[int],
        *,
        horizon: float | None = None,
    ) -> tuple[list[PendingRetry], float | None]:
        """Retries due by ``now`` (not in ``skip``), and the next due time after those.

        With ``horizon``, a retry due later than ``now + horizon`` counts as due now: no
        decision parks one that far, so the wall clock was stepped back since it was made.
        """
        return await trio.to_thread.run_sync(
            self._due_retries, destination, now, limit, skip, horizon
        )

    def _due_retries(
        self,
        destination: str,
        now: float,
        limit: int,
        skip: frozenset[int],
        horizon: float | None,
    ) -> tuple[list[PendingRetry], float | None]:
        columns = (
            "SELECT e.seq, e.source, e.message_id, e.received_at, e.body, "
            "r.due, r.attempts, r.first_attempt_at, r.history "
            "FROM retries r JOIN events e ON e.seq = r.seq WHERE r.destination = ? "
        )
        if horizon is None:
            cut = float("inf")
            rows = self._conn.execute(
                columns + "ORDER BY r.due LIMIT ?", (destination, limit + len(skip))
            )
        else:  # a full sort, not the index: only while a clock step is being worked off
            cut = now + horizon
            rows = self._conn.execute(
                columns + "ORDER BY CASE WHEN r.due > ? THEN ? ELSE r.due END LIMIT ?",
                (destination, cut, now, limit + len(skip)),
            )
        due: list[PendingRetry] = []
        next_due: float | None = None
        for row in rows:
            if row[0] in skip:
                continue
            if now < row[5] <= cut:
                next_due = row[5]
                break
            if len(due) < limit:
                due.append(PendingRetry(LoggedEvent(*row[:5]), *row[5:]))
        return due, next_due

    def close(self) -> None:
        self._conn.close()


class Inspector:
    """Synchronous read-only views for the CLI and tests (dead letters, counters, cursors)."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path, readonly=True)

    def dead_letters(self, destination: str | None = None) -> list[DeadLetter]:
        sql = "SELECT * FROM dead_letters"
        args: tuple[str, ...] = ()
        if destination is not None:
            sql += " WHERE destination = ?"
            args = (destination,)
        return [DeadLetter(*row) for row in self._conn.execute(sql + " ORDER BY seq", args)]

    def counters(self, destination: str) -> Counters:
        rows = self._conn.execute(
            "SELECT routed, delivered, dead_lettered, filtered FROM counters WHERE destination = ?",
            (destination,),
        ).fetchall()
        if not rows:
            return Counters(0, 0, 0, 0)
        routed, delivered, dead, filtered = (n if isinstance(n, int) else 0 for n in rows[0])
        return Counters(routed, delivered, dead, filtered)

    def retries(self, destination: str) -> list[RetryRow]:
        rows = self._conn.execute(
            "SELECT seq, due, attempts, first_attempt_at, history FROM retries "
            "WHERE destination = ? ORDER BY seq",
            (destination,),
        )
        return [RetryRow(*row) for row in rows]

    def tallies(self, scope: str, name: str) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT reason, count FROM tallies WHERE scope = ? AND name = ?", (scope, name)
        )
        return {str(reason): int(count) for reason, count in rows}

    def event_count(self) -> int:
        return _scalar(self._conn, "SELECT count(*) FROM events")

    def events_after(self, seq: int, limit: int = 1000) -> list[LoggedEvent]:
        return _events_after(self._conn, seq, limit)

    def close(self) -> None:
        self._conn.close()


def _events_after(conn: apsw.Connection, seq: int, limit: int) -> list[LoggedEvent]:
    rows = conn.execute(
        "SELECT seq, source, message_id, received_at, body FROM events "
        "WHERE seq > ? ORDER BY seq LIMIT ?",
        (seq, limit),
    )
    return [LoggedEvent(*row) for row in rows]


def _scalar(conn: apsw.Connection, sql: str, args: tuple[object, ...] = ()) -> int:
    """The one integer a query answers (a count, a max, a pragma)."""
    value = conn.execute(sql, args).fetchall()[0][0]
    assert isinstance(value, int), f"{sql!r} answered {value!r}"
    return value


@asynccontextmanager
async def open_journal(
    path: Path,
    *,
    synchronous: Synchronous = "full",
    dedupe_window: float = 24 * 3600.0,
    max_bytes: int = 10 * 1024**3,
    max_page_count: int | None = None,
    vfs: str | None = None,
) -> AsyncIterator[Journal]:
    """Open (creating if needed) and check the queue, run its writer, close it cleanly.

    ``max_page_count`` caps the file at that many pages (SQLite's own limit, answered like a
    full disk): for tests, and for small devices that want a hard ceiling under
    ``max_bytes``. It cannot go below the pages the file already has.

    ``vfs`` is for tests only: the writer connection goes through that registered SQLite VFS
    (readers keep the default one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dedupe_on = dedupe_window > 0
    conn = await trio.to_thread.run_sync(
        partial(_prepare, path, synchronous, max_page_count, vfs, dedupe_on=dedupe_on)
    )
    recent = None
    if dedupe_on:
        recent = await trio.to_thread.run_sync(dedupe.load, conn, dedupe_window)
    checkpointer = Checkpointer(connect(path, vfs=vfs), every_pages=_CHECKPOINT_PAGES)
    conn.set_wal_hook(checkpointer.wal_hook)  # replaces SQLite's automatic checkpoint
    journal = Journal(
        path,
        conn,
        dedupe_window=dedupe_window,
        max_bytes=max_bytes,
        checkpointer=checkpointer,
        recent=recent,
    )
    try:
        yield journal
    finally:
        with trio.CancelScope(shield=True):
            await journal.aclose()
