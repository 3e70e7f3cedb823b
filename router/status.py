"""`router status`: what the queue says about every destination and source, read-only.

Read from the database itself, so it is right whether or not the daemon runs; the daemon adds
what only it knows (delivery rates over the last minute). The JSON shape is the contract for
scripts: ``{"destinations": {NAME: {...}}, "sources": {NAME: {...}}, "journal": {...}}``, and
for each destination ``routed = delivered + dead_lettered + filtered + pending`` always.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import apsw


def collect(
    conn: apsw.Connection,
    path: Path,
    *,
    destinations: Sequence[str],
    sources: Sequence[str],
    now: float,
    rates: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    head = _one(conn, "SELECT coalesce(max(seq), 0) FROM events")
    return {
        "destinations": {name: _destination(conn, name, head, now, rates) for name in destinations},
        "sources": {name: _tallies(conn, "source", name) for name in sources},
        "journal": _journal(conn, path, head, now),
    }


def _destination(
    conn: apsw.Connection,
    name: str,
    head: int,
    now: float,
    rates: Mapping[str, float] | None,
) -> dict[str, Any]:
    counters = conn.execute(
        "SELECT routed, delivered, dead_lettered, filtered FROM counters WHERE destination = ?",
        (name,),
    ).fetchall()
    routed, delivered, dead, filtered = (int(n) for n in counters[0]) if counters else (0,) * 4  # type: ignore[arg-type]
    cursor = _one(conn, "SELECT coalesce(max(seq), 0) FROM cursors WHERE destination = ?", name)
    oldest = _oldest_pending(conn, name, cursor)
    return {
        "routed": routed,
        "delivered": delivered,
        "dead_lettered": dead,
        "filtered": filtered,
        "pending": routed - delivered - dead - filtered,
        "unread": max(0, head - cursor),  # logged, not yet looked at by this destination
        "retrying": _one(conn, "SELECT count(*) FROM retries WHERE destination = ?", name),
        "dead_letters": _one(conn, "SELECT count(*) FROM dead_letters WHERE destination = ?", name),
        "backlog_age_seconds": None if oldest is None else round(max(0.0, now - oldest), 3),
        "rate_per_second": None if rates is None else round(rates.get(name, 0.0), 2),
        "last_error": _last_error(conn, name),
        "held_back": _tallies(conn, "destination", name),
    }


def _oldest_pending(conn: apsw.Connection, name: str, cursor: int) -> float | None:
    """When the oldest event still waiting for this destination arrived."""
    candidates = [
        conn.execute(
            "SELECT received_at FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (cursor,)
        ),
        conn.execute(
            "SELECT min(e.received_at) FROM retries r JOIN events e ON e.seq = r.seq "
            "WHERE r.destination = ?",
            (name,),
        ),
    ]
    found = [float(row[0]) for rows in candidates for row in rows if row[0] is not None]
    return min(found) if found else None


def _last_error(conn: apsw.Connection, name: str) -> dict[str, Any] | None:
    """The latest failed attempt this destination recorded, from its retries or dead letters."""
    latest: dict[str, Any] | None = None
    for sql in (
        "SELECT history FROM retries WHERE destination = ? AND attempts > 0 "
        "ORDER BY due DESC LIMIT 20",
        "SELECT history FROM dead_letters WHERE destination = ? ORDER BY dead_at DESC LIMIT 1",
    ):
        for (history,) in conn.execute(sql, (name,)):
            for attempt in json.loads(str(history))[-1:]:
                if latest is None or attempt["at"] > latest["at"]:
                    latest = attempt
    return latest


def _tallies(conn: apsw.Connection, scope: str, name: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT reason, count FROM tallies WHERE scope = ? AND name = ? ORDER BY reason",
        (scope, name),
    )
    return {str(reason): int(count) for reason, count in rows}


def _journal(conn: apsw.Connection, path: Path, head: int, now: float) -> dict[str, Any]:
    first = conn.execute("SELECT seq, received_at FROM events ORDER BY seq LIMIT 1").fetchall()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return {
        "path": str(path),
        "bytes": size,
        "events": _one(conn, "SELECT count(*) FROM events"),
        "head": head,
        "oldest_age_seconds": round(now - float(first[0][1]), 3) if first else None,  # type: ignore[arg-type]
    }


def _one(conn: apsw.Connection, sql: str, *args: object) -> int:
    value = conn.execute(sql, args).fetchall()[0][0]
    return int(value) if isinstance(value, int | float) else 0


def table(status: Mapping[str, Any]) -> str:
    """The status for people: one line per destination and source."""
    lines = [
        f"{'DESTINATION':<16} {'ROUTED':>9} {'DELIVERED':>9} {'DEAD':>6} {'FILTERED':>9} "
        f"{'PENDING':>8} {'UNREAD':>7} {'AGE':>8} {'RATE/S':>7}  LAST ERROR"
    ]
    for name, d in status["destinations"].items():
        age = "-" if d["backlog_age_seconds"] is None else _duration(d["backlog_age_seconds"])
        rate = "-" if d["rate_per_second"] is None else f"{d['rate_per_second']:g}"
        error = d["last_error"]
        last = "" if error is None else f"{error.get('status') or ''} {error.get('detail', '')}"
        lines.append(
            f"{name:<16} {d['routed']:>9} {d['delivered']:>9} {d['dead_lettered']:>6} "
            f"{d['filtered']:>9} {d['pending']:>8} {d['unread']:>7} {age:>8} {rate:>7}  "
            f"{last.strip()[:60]}"
        )
    lines.append("")
    lines.append(f"{'SOURCE':<16} COUNTS")
    for name, counts in status["sources"].items():
        shown = ", ".join(f"{k} {v}" for k, v in counts.items()) or "nothing yet"
        lines.append(f"{name:<16} {shown}")
    journal = status["journal"]
    lines.append("")
    lines.append(
        f"journal {journal['path']}: {journal['events']} events, {journal['bytes'] / 1e6:.1f} MB"
    )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"
