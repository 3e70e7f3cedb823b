"""The Unix-socket ingress: NDJSON in, one ack line per input line, in order.

Each line is one event or a ``{"batch": [...]}`` envelope. Lines that arrive together
are normalized together and committed in one journal append, then acked together:
``{"ok": true, "count": N}`` only after the commit, ``{"ok": false, "code": ...,
"message": ...}`` for a line that was refused (the connection goes on). The peer's
uid, gid and pid (SO_PEERCRED) go into each Segment event's ``context.peer``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio

from router.admission import admit
from router.errors import IngestError, RouterError
from router.events import StoredEvent, decode_json, normalize, split_envelope
from router.journal import Journal, PendingWrite
from router.metrics import Latencies
from router.plans import TrackingPlan

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4 * 1024 * 1024
READ_BYTES = 256 * 1024
# Reads parsed and queued for commit ahead of the oldest one not yet acked: the next read is
# parsed while the last one commits, and a fast client's reads share one commit.
IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class SocketSource:
    """Where socket events belong and how they are read."""

    name: str
    raw: bool
    plan: TrackingPlan | None = None


@dataclass(slots=True)
class _Read:
    """The complete lines of one read, queued for commit, on their way to their acks."""

    lines: list[_Line]
    early: bytes = b""  # acks owed before these lines (a refused overlong line)
    pending: PendingWrite | None = None
    started: float = 0.0


@dataclass(slots=True)
class _Line:
    """One input line on its way to an ack."""

    events: list[StoredEvent]
    ack: dict[str, Any] | None = None  # set when the line was refused before the commit
    rejected: int = 0
    first_error: str = ""


class SocketInUseError(RouterError):
    pass


def bind_unix_socket(path: Path, mode: int) -> stdlib_socket.socket:
    """Bind ``path``, replacing a stale socket but never deleting anything else."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUseError(
                f"{path} exists and is not a socket; router will not delete it. "
                "Move it away or set server.socket to another path."
            )
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink()  # stale: nobody listens on it
        else:
            raise SocketInUseError(f"{path} is in use: another router is listening on it")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def peer_context(sock: trio.socket.SocketType) -> dict[str, Any]:
    try:
        raw = sock.getsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer": {"pid": pid, "uid": uid, "gid": gid}}


class UnixIngress:
    def __init__(
        self,
        journal: Journal,
        source: SocketSource,
        *,
        clock: Callable[[], float] = time.time,
        latencies: Latencies | None = None,
    ) -> None:
        self._journal = journal
        self.source = source
        self._clock = clock
        self._latencies = latencies or Latencies()

    async def serve(
        self,
        sock: stdlib_socket.socket,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self.handle, [listener], task_status=task_status)

    async def handle(self, stream: trio.SocketStream) -> None:
        context = peer_context(stream.socket)
        to_ack, reads = trio.open_memory_channel[_Read](IN_FLIGHT)
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._ack_in_order, stream, reads)
                async with to_ack:
                    await self._read(stream, context, to_ack)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("socket client went away")

    async def _read(
        self,
        stream: trio.SocketStream,
        context: dict[str, Any],
        to_ack: trio.MemorySendChannel[_Read],
    ) -> None:
        buffer = b""
        oversized = False  # inside a line that is too long: drop bytes up to its newline
        while data := await stream.receive_some(READ_BYTES):
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            early = b""
            if oversized and complete:
                complete[0], oversized = b"", False
                early = _encode_ack(_too_long())
            if len(buffer) > MAX_LINE_BYTES:
                buffer, oversized = b"", True
            if complete or early:
                await to_ack.send(self._queue(complete, context, early))
        if oversized:
            await to_ack.send(_Read([], early=_encode_ack(_too_long())))
        elif buffer.strip():
            await to_ack.send(self._queue([buffer], context, b""))

    async def _ack_in_order(
        self, stream: trio.SocketStream, reads: trio.MemoryReceiveChannel[_Read]
    ) -> None:
        async with reads:
            async for read in reads:
                await stream.send_all(await self._acks(read))

    def _queue(self, raw_lines: list[bytes], context: dict[str, Any], early: bytes) -> _Read:
        """Parse a read's lines and queue their events for commit, in arrival order."""
        received_at = self._clock()
        lines = [self._parse(raw, received_at, context) for raw in raw_lines if raw.strip()]
        tallies: Counter[str] = Counter()
        for line in lines:
            if line.ack is not None:
                tallies[str(line.ack["code"])] += 1
            else:
                tallies["invalid_event"] += line.rejected
                line.events = admit(
                    self.source.plan, line.events, received_at=received_at, tallies=tallies
                )
        events = [event for line in lines if line.ack is None for event in line.events]
        read = _Read(lines, early=early)
        if events or +tallies:
            read.started = trio.current_time()
            read.pending = self._journal.queue_append(
                self.source.name, events, received_at, +tallies
            )
        return read

    async def _acks(self, read: _Read) -> bytes:
        """A read's ack lines, once its events are committed (or refused)."""
        failure: dict[str, Any] | None = None
        if read.pending is not None:
            try:
                await read.pending.result()
                self._latencies.commit.observe(trio.current_time() - read.started)
            except IngestError as exc:
                failure = _error_ack(exc)
            except RouterError as exc:
                log.exception("socket ingest failed")
                failure = {"ok": False, "code": "internal", "message": str(exc)}
        acks = []
        for line in read.lines:
            if line.ack is not None:
                acks.append(line.ack)
            elif failure is not None:
                acks.append(failure)
            else:
                ack: dict[str, Any] = {"ok": True, "count": len(line.events)}
                if line.rejected:
                    ack["rejected"] = line.rejected
                    ack["message"] = line.first_error
                acks.append(ack)
        return read.early + b"".join(_encode_ack(ack) for ack in acks)

    def _parse(self, raw: bytes, received_at: float, context: dict[str, Any]) -> _Line:
        if len(raw) > MAX_LINE_BYTES:
            return _Line([], ack=_too_long())
        try:
            envelope = split_envelope(decode_json(raw))
        except IngestError as exc:
            return _Line([], ack=_error_ack(exc))
        line = _Line([])
        for item in envelope.items:
            try:
                line.events.append(
                    normalize(
                        item,
                        received_at=received_at,
                        sent_at=envelope.sent_at,
                        raw=self.source.raw,
                        context_extra=context,
                    )
                )
            except IngestError as exc:
                line.rejected += 1
                line.first_error = line.first_error or exc.message
        if line.rejected and not line.events:
            error = IngestError(400, "invalid_event", line.first_error)
            return _Line([], ack=_error_ack(error))
        return line


def _error_ack(exc: IngestError) -> dict[str, Any]:
    ack: dict[str, Any] = {"ok": False, "code": exc.code, "message": exc.message}
    if exc.retry_after is not None:
        ack["retry_after"] = exc.retry_after
    return ack


def _too_long() -> dict[str, Any]:
    return _error_ack(IngestError(413, "too_large", f"line longer than {MAX_LINE_BYTES} bytes"))


def _encode_ack(ack: dict[str, Any]) -> bytes:
    return msgspec.json.encode(ack) + b"\n"
