"""Copying the WAL back into the database file, on a thread of its own.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that commit,
and every ack waiting on it, waits while megabytes are copied and synced (the p99 ack latency
at half load was 23-40 ms with it). A PASSIVE checkpoint from a second connection never blocks
the writer, so the writer's commits stay short and the copying overlaps them. The writer's
WAL hook wakes this thread once the log holds ``every_pages``; it also runs once a second, so
an idle queue's log is copied back too.
"""

from __future__ import annotations

import logging
import threading

import apsw

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, conn: apsw.Connection, *, every_pages: int = 1000) -> None:
        self._conn = conn
        self._every_pages = every_pages
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="journal-checkpointer", daemon=True)
        self._thread.start()

    def wal_hook(self, _conn: apsw.Connection, _name: str, pages: int) -> int:
        """Installed on the writer's connection: SQLite calls it after each commit."""
        if pages >= self._every_pages:
            self._wake.set()
        return apsw.SQLITE_OK

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except apsw.BusyError:
                pass  # another checkpoint (the pruner's) holds the lock: it does the same work
            except apsw.Error as exc:
                # Nothing is lost: the frames stay in the WAL and the next round tries again.
                log.warning("queue checkpoint failed: %s", exc)
