"""The CLI's side of the control channel: ask the running daemon, or act alone when none runs.

A running daemon is asked over its admin socket, so there is only ever one writer. With no
daemon, reads open the database read-only, and writes take the data directory's lock (the one
the daemon holds while it runs) and open the queue as its only writer.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import trio

from router import status
from router.admin import AdminApi
from router.config import Config
from router.daemon import data_dir_lock
from router.errors import RouterError
from router.journal import connect, open_journal
from router.pipeline import pipelines
from router.transforms import configured_transforms
from router.units import parse_duration


def ask(config: Config, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon listens."""
    for answer in _exchange(config, request):
        return answer
    return None


def stream(config: Config, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Lines from the daemon until it closes; raises RouterError when no daemon listens."""
    lines = _exchange(config, request)
    first = next(lines, None)
    if first is None:
        raise RouterError(f"router is not running on {config.server.data_dir}")
    yield first
    yield from lines


def _exchange(config: Config, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    path = config.server.admin_socket_path
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return
    except PermissionError as exc:
        conn.close()
        raise RouterError(f"{path}: permission denied (run as the daemon's user)") from exc
    with conn, conn.makefile("rb") as answers:
        conn.sendall(json.dumps(request).encode() + b"\n")
        for line in answers:
            yield json.loads(line)


def offline_status(config: Config) -> dict[str, Any]:
    path = config.server.data_dir / "queue.db"
    if not path.exists():
        raise RouterError(f"no queue at {path}: router has not run with this config yet")
    conn = connect(path, readonly=True)
    try:
        return status.collect(
            conn,
            path,
            destinations=list(config.destinations),
            sources=list(config.sources),
            now=time.time(),
        )
    finally:
        conn.close()


def offline(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    """Do what the daemon would, as the queue's only writer (the daemon is not running)."""

    async def run() -> dict[str, Any]:
        async with open_journal(
            config.server.data_dir / "queue.db",
            synchronous=config.queue.synchronous,
            dedupe_window=config.queue.dedupe_window,
        ) as journal:
            await journal.ensure_cursors(list(config.destinations))
            routed = pipelines(config, configured_transforms(config))
            return await AdminApi(config, journal, routed).handle(request)

    with data_dir_lock(config):
        return trio.run(run)


def act(config: Config, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The answer to a request that may write, and whether a running daemon gave it."""
    answer = ask(config, request)
    if answer is not None:
        return answer, True
    return offline(config, request), False


def parse_time(text: str | None, *, now: float) -> float | None:
    """ISO 8601 (``2026-12-04T10:00:00Z``) or a duration back from now (``2h``, ``30m``)."""
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise RouterError(f"{text!r}: expected ISO 8601 or a duration like '2h'") from exc
    if moment.tzinfo is None:
        raise RouterError(f"{text!r}: give a time zone (e.g. Z or +01:00)")
    return moment.timestamp()
