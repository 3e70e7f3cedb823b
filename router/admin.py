"""The control channel: the CLI asks the running daemon for status, replays and dead letters.

Over ``<data_dir>/admin.sock`` (mode 0600: file permissions are the authentication), one JSON
request per line and one JSON answer per line; ``tail`` answers with a stream of lines instead.
Over HTTP (``POST /admin``) only when ``server.admin_token`` is set, with that bearer token.

Everything that writes goes through the daemon's journal writer, so there is never a second
writer; reads use their own read-only connection on a worker thread.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from router import fql, operations, status
from router.config import Config
from router.errors import IngestError, RouterError
from router.journal import Journal, connect
from router.pipeline import Held, Pipeline

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
RATE_WINDOW = 60.0
TAIL_PER_SECOND = 50  # a sample, not a firehose: the terminal reading it is not a destination


@dataclass(slots=True)
class RateMeter:
    """Delivered events per second per destination over the last minute."""

    samples: deque[tuple[float, dict[str, int]]] = field(default_factory=lambda: deque(maxlen=13))

    def add(self, now: float, delivered: dict[str, int]) -> None:
        self.samples.append((now, delivered))

    def rates(self) -> dict[str, float]:
        if len(self.samples) < 2:
            return {}
        (start, first), (end, last) = self.samples[0], self.samples[-1]
        elapsed = max(end - start, 1e-9)
        return {name: (last[name] - first.get(name, 0)) / elapsed for name in last}


class AdminApi:
    def __init__(
        self,
        config: Config,
        journal: Journal,
        pipelines: dict[str, Pipeline],
        wake: Callable[[str], None] = lambda _destination: None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.pipelines = pipelines
        self._wake = wake  # tells a destination's dispatcher its retry set has new events
        self.meter = RateMeter()
        self._path = config.server.data_dir / "queue.db"

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = {
            "status": self._status,
            "replay": self._replay,
            "dlq_list": self._dlq_list,
            "dlq_replay": self._dlq_replay,
            "dlq_purge": self._dlq_purge,
        }.get(str(op))
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            return {"ok": True, **await handler(request)}
        except RouterError as exc:
            return {"ok": False, "error": str(exc)}

    # -- reads -----------------------------------------------------------------

    async def _read(self, query: Callable[[Any], Any]) -> Any:
        def run() -> Any:
            conn = connect(self._path, readonly=True)
            try:
                return query(conn)
            finally:
                conn.close()

        return await trio.to_thread.run_sync(run)

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        rates = self.meter.rates()
        result: dict[str, Any] = await self._read(
            lambda conn: status.collect(
                conn,
                self._path,
                destinations=list(self.config.destinations),
                sources=list(self.config.sources),
                now=time.time(),
                rates=rates,
            )
        )
        return result

    async def sample_rates(self) -> None:
        """Every 5 s, note how many events each destination has delivered."""
        while True:
            delivered = await self._read(
                lambda conn: {
                    str(name): int(n)
                    for name, n in conn.execute("SELECT destination, delivered FROM counters")
                }
            )
            self.meter.add(trio.current_time(), delivered)
            await trio.sleep(5)

    async def _dlq_list(self, request: dict[str, Any]) -> dict[str, Any]:
        destination = request.get("destination")
        sql = (
            "SELECT destination, seq, source, message_id, dead_at, reason, attempts, history, "
            "body FROM dead_letters" + (" WHERE destination = ?" if destination else "")
        )
        args = (destination,) if destination else ()

        def query(conn: Any) -> list[dict[str, Any]]:
            return [
                {
                    "destination": row[0],
                    "id": row[1],
                    "source": row[2],
                    "message_id": row[3],
                    "dead_at": row[4],
                    "reason": row[5],
                    "attempts": row[6],
                    "history": msgspec.json.decode(row[7]),
                    "event": msgspec.json.decode(row[8]),
                }
                for row in conn.execute(sql + " ORDER BY dead_at, seq", args)
            ]

        return {"dead_letters": await self._read(query)}

    # -- writes ------------------------------------------------------------------

    async def _replay(self, request: dict[str, Any]) -> dict[str, Any]:
        destination = self._destination(request.get("to"))
        chosen = replay_range(request)
        cursor = await self._read(
            lambda conn: conn.execute(
                "SELECT coalesce(max(seq), 0) FROM cursors WHERE destination = ?", (destination,)
            ).fetchall()[0][0]
        )
        pipeline = self.pipelines.get(destination)
        routes_take = pipeline.routes_take if pipeline is not None else None
        seqs: list[int] = await self._read(
            lambda conn: operations.select_replay(conn, chosen, int(cursor), routes_take)
        )
        if request.get("dry_run"):
            return {"matched": len(seqs), "queued": 0}
        rate = request.get("rate")
        queued = await self.journal.write(
            lambda conn: operations.queue_replay(
                conn, destination, seqs, now=time.time(), rate=float(rate) if rate else None
            )
        )
        log.info("replay queued destination=%s events=%d", destination, queued)
        self._wake(destination)
        return {"matched": len(seqs), "queued": queued}

    async def _dlq_replay(self, request: dict[str, Any]) -> dict[str, Any]:
        to = request.get("to")
        if to is not None:
            self._destination(to)
        ids = request.get("ids")
        moved = 0
        for destination in self._destinations(request.get("destination")):
            replay = functools.partial(
                operations.replay_dead_letters,
                destination=destination,
                seqs=ids,
                to=to,
                now=time.time(),
            )
            moved += await self.journal.write(replay)
            self._wake(to or destination)
        return {"replayed": moved}

    async def _dlq_purge(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = request.get("ids")
        purged = 0
        for destination in self._destinations(request.get("destination")):
            purge = functools.partial(
                operations.purge_dead_letters, destination=destination, seqs=ids
            )
            purged += await self.journal.write(purge)
        return {"purged": purged}

    def _destination(self, name: Any) -> str:
        if name not in self.config.destinations:
            known = ", ".join(self.config.destinations)
            raise RouterError(f"unknown destination {name!r} (known: {known})")
        return str(name)

    def _destinations(self, name: Any) -> list[str]:
        return list(self.config.destinations) if name is None else [self._destination(name)]

    # -- tail ------------------------------------------------------------------------

    async def tail(self, request: dict[str, Any], send: Send) -> None:
        """Stream a sample of new events, filtered like ``router tail`` asked, until the
        client goes away."""
        keep = self._tail_filter(request)
        reader = self.journal.reader()
        seen = self.journal.head
        budget, window = TAIL_PER_SECOND, trio.current_time()
        try:
            while True:
                await self.journal.wait_beyond(seen)
                for row in await reader.events_after(seen, 1000):
                    seen = row.seq
                    if trio.current_time() - window >= 1:
                        budget, window = TAIL_PER_SECOND, trio.current_time()
                    shown = keep(row.source, row.body)
                    if shown is None or budget <= 0:
                        continue
                    budget -= 1
                    await send({"seq": row.seq, "source": row.source, "event": shown})
        finally:
            reader.close()

    def _tail_filter(self, request: dict[str, Any]) -> Callable[[str, bytes], Any]:
        source = request.get("source")
        destination = request.get("destination")
        route = request.get("route")
        pipeline = self.pipelines.get(self._destination(destination)) if destination else None
        when = None
        if route is not None:
            index = int(route)
            if not 0 <= index < len(self.config.routes):
                raise RouterError(f"no route {index}: there are {len(self.config.routes)}")
            spec = self.config.routes[index]
            when = (spec.sources, fql.parse(spec.when) if spec.when else None)

        def keep(event_source: str, body: bytes) -> Any:
            if source is not None and event_source != source:
                return None
            event = msgspec.json.decode(body)
            if when is not None:
                sources, condition = when
                if sources is not None and event_source not in sources:
                    return None
                if condition is not None and condition.matches(event) is not True:
                    return None
            if pipeline is not None:
                shaped = pipeline.prepare(event_source, body)
                return None if isinstance(shaped, Held) else msgspec.json.decode(shaped)
            return event

        return keep


def replay_range(request: dict[str, Any]) -> operations.ReplayRange:
    where = request.get("where")
    try:
        condition = fql.parse(where) if where else None
    except fql.FqlError as exc:
        raise RouterError(f"--where: {exc}") from exc
    return operations.ReplayRange(
        since=float(request.get("since") or 0.0),
        until=float(request.get("until") or time.time() + 1),
        source=request.get("source"),
        where=condition,
    )


# -- the socket ----------------------------------------------------------------------


async def serve_admin(
    api: AdminApi,
    sock: Any,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            line = await _read_line(stream)
            if line is None:
                return
            try:
                request = msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                await stream.send_all(_line({"ok": False, "error": f"bad request: {exc}"}))
                return
            if not isinstance(request, dict):
                await stream.send_all(_line({"ok": False, "error": "a request is a JSON object"}))
                return

            async def send(item: dict[str, Any]) -> None:
                await stream.send_all(_line(item))

            try:
                if request.get("op") == "tail":
                    await api.tail(request, send)
                else:
                    await send(await api.handle(request))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except RouterError as exc:
                await send({"ok": False, "error": str(exc)})

    await trio.serve_listeners(handle, [listener], task_status=task_status)


async def _read_line(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes | None:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > limit:
            return data or None
        data += chunk
    return data.split(b"\n", 1)[0]


def _line(item: dict[str, Any]) -> bytes:
    return msgspec.json.encode(item) + b"\n"


def authorized(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def admin_error(status_code: int, message: str) -> IngestError:
    return IngestError(status_code, "admin", message)
