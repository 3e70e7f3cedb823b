"""Operator actions on the queue: replay a time range, and move or purge dead letters.

Each action is a function of one SQLite connection inside one transaction, so it runs the same
on the daemon's writer thread (the daemon is running) or on a connection the CLI opened as the
only writer (it is not). Replayed events go into the destination's retry set, due now or spread
by a rate: the dispatcher's retry loop sends them through the destination's pipeline (routes,
filters, transforms, privacy) like live traffic, and a restart in the middle loses nothing.

Conservation (``routed = delivered + dead_lettered + filtered + pending``) holds across every
action: a replay routes its events again; a dead letter moved back to its destination is pending
again (no longer dead); one moved to another destination leaves this one's books entirely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apsw
import msgspec

from router import fql

_decode = msgspec.json.Decoder().decode

Where = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """Which logged events a replay takes."""

    since: float  # received_at, inclusive
    until: float  # received_at, exclusive
    source: str | None = None
    where: fql.Expression | None = None  # an FQL condition on the event; errors do not match


def select_replay(
    conn: apsw.Connection,
    chosen: ReplayRange,
    cursor: int,
    routes_take: Callable[[str, dict[str, Any]], bool] | None = None,
) -> list[int]:
    """The seqs of the events ``chosen`` selects that the destination's routes take, up to
    ``cursor``: events past a destination's cursor have not been handled yet, and live
    traffic will send them."""
    sql = (
        "SELECT seq, source, body FROM events "
        "WHERE received_at >= ? AND received_at < ? AND seq <= ?"
    )
    args: list[Any] = [chosen.since, chosen.until, cursor]
    if chosen.source is not None:
        sql += " AND source = ?"
        args.append(chosen.source)
    rows = conn.execute(sql + " ORDER BY seq", args)
    return [
        int(seq)
        for seq, source, body in rows
        if _matches(chosen.where, routes_take, str(source), body)
    ]


def _matches(
    where: fql.Expression | None,
    routes_take: Callable[[str, dict[str, Any]], bool] | None,
    source: str,
    body: Any,
) -> bool:
    if where is None and routes_take is None:
        return True
    try:
        event = _decode(body)
    except msgspec.DecodeError:
        return False
    if type(event) is not dict:
        return False
    if where is not None and where.matches(event) is not True:
        return False
    return routes_take is None or routes_take(source, event)


def queue_replay(
    conn: apsw.Connection, destination: str, seqs: list[int], *, now: float, rate: float | None
) -> int:
    """Put ``seqs`` in ``destination``'s retry set, due now or ``rate`` per second. Events
    already waiting there keep their place. Returns how many were queued."""
    before = conn.total_changes()
    # Only events still in the log: pruning may have taken one since it was selected.
    conn.executemany(
        "INSERT OR IGNORE INTO retries SELECT ?1, ?2, ?3, 0, ?4, '[]' "
        "WHERE EXISTS (SELECT 1 FROM events WHERE seq = ?2)",
        ((destination, seq, now + (i / rate if rate else 0.0), now) for i, seq in enumerate(seqs)),
    )
    queued = conn.total_changes() - before
    conn.execute(
        "UPDATE counters SET routed = routed + ? WHERE destination = ?", (queued, destination)
    )
    return queued


def dead_seqs(conn: apsw.Connection, destination: str, seqs: list[int] | None) -> list[int]:
    """The dead letters of ``destination`` named by ``seqs`` (None: all of them)."""
    rows = conn.execute(
        "SELECT seq FROM dead_letters WHERE destination = ? ORDER BY seq", (destination,)
    )
    found = [int(seq) for (seq,) in rows]
    return found if seqs is None else [s for s in found if s in set(seqs)]


def replay_dead_letters(
    conn: apsw.Connection,
    destination: str,
    seqs: list[int] | None,
    *,
    to: str | None,
    now: float,
) -> int:
    """Send dead letters again: back to ``destination`` or on to ``to``. They leave the dead
    letters now; if they fail again, they come back with a fresh history of attempts."""
    target = to or destination
    moved = 0
    for seq in dead_seqs(conn, destination, seqs):
        if not _event_exists(conn, seq) and not _restore_event(conn, destination, seq):
            continue
        conn.execute(
            "INSERT OR IGNORE INTO retries VALUES (?, ?, ?, 0, ?, '[]')", (target, seq, now, now)
        )
        conn.execute(
            "DELETE FROM dead_letters WHERE destination = ? AND seq = ?", (destination, seq)
        )
        moved += 1
    if target == destination:
        conn.execute(
            "UPDATE counters SET dead_lettered = dead_lettered - ? WHERE destination = ?",
            (moved, destination),
        )
    else:
        conn.execute(
            "UPDATE counters SET routed = routed - ?, dead_lettered = dead_lettered - ? "
            "WHERE destination = ?",
            (moved, moved, destination),
        )
        conn.execute("INSERT OR IGNORE INTO counters(destination) VALUES (?)", (target,))
        conn.execute(
            "UPDATE counters SET routed = routed + ? WHERE destination = ?", (moved, target)
        )
    return moved


def _event_exists(conn: apsw.Connection, seq: int) -> bool:
    return bool(conn.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchall())


def _restore_event(conn: apsw.Connection, destination: str, seq: int) -> bool:
    """Put a pruned event back in the log from the dead letter's copy of it, so the retry
    set (which points into the log) can send it."""
    rows = conn.execute(
        "SELECT source, message_id, dead_at, body FROM dead_letters "
        "WHERE destination = ? AND seq = ?",
        (destination, seq),
    ).fetchall()
    if not rows:
        return False
    source, message_id, dead_at, body = rows[0]
    conn.execute(
        "INSERT INTO events(seq, source, message_id, received_at, body) VALUES (?, ?, ?, ?, ?)",
        (seq, source, message_id, dead_at, body),
    )
    return True


def purge_dead_letters(conn: apsw.Connection, destination: str, seqs: list[int] | None) -> int:
    """Discard dead letters. They still count as dead-lettered: they did die."""
    chosen = dead_seqs(conn, destination, seqs)
    conn.executemany(
        "DELETE FROM dead_letters WHERE destination = ? AND seq = ?",
        ((destination, seq) for seq in chosen),
    )
    return len(chosen)
