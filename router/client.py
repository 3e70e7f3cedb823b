"""Send events to router over its Unix socket, from any Python program. Standard library only.

    from router.client import Client

    with Client("router-data/router.sock") as client:
        client.track("u1", "Signed Up", {"plan": "pro"})
    # leaving the block flushes: every event is committed, or ClientError says why not

The wire is DESIGN.md §3: one JSON event per line, one ack line per line, in order, after the
commit. Sends are pipelined: ``send()`` queues the line and returns; an I/O thread writes what is
queued and a reader thread matches acks to lines in order. Every event carries a ``messageId``
(minted here when absent), so after the daemon restarts the client reconnects and resends every
line not yet acked; the daemon's dedupe stores each one once.

What this module owns: building Segment-shaped events, the ledger of unacked lines (``Ledger``,
pure, shared with the trio client in ``router.aclient``) and the threads of the sync client. It
must not import anything outside the standard library: apps vendor or import it as it is,
which is also why it stays one file, longer than STYLE.md's ~500-line guide.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "ClientError",
    "Ledger",
    "Refusal",
    "Statistics",
    "build_event",
    "encode_line",
]

DEFAULT_SOCKET = Path("router-data/router.sock")
LIBRARY = {"name": "router.client", "version": "1"}
READ_BYTES = 256 * 1024
_FAST_OK = b'{"ok":true,"count":1}'  # the ack of almost every line; skip json.loads for it


@dataclass(frozen=True, slots=True)
class Refusal:
    """Events the daemon refused (or the client gave up on), and why."""

    code: str
    message: str
    count: int
    message_ids: tuple[str, ...]
    retry_after: float | None = None


class ClientError(Exception):
    """The daemon refused events (``code`` is its error code, e.g. ``invalid_event``), or the
    client could not deliver them (``unavailable``, ``timeout``, ``closed``)."""

    def __init__(self, code: str, message: str, refusals: tuple[Refusal, ...] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.refusals = refusals


@dataclass(frozen=True, slots=True)
class Statistics:
    sent: int  # events handed to send()
    acked: int  # events the daemon committed (a duplicate it dropped counts: it is stored)
    refused: int  # events refused, by the daemon or by giving up
    pending: int  # events sent and not yet answered
    reconnects: int
    resent: int  # events written again after a reconnect


# -- building events ------------------------------------------------------------------------


# uuid.uuid4() costs a syscall and a UUID object per event (about 3 us, the largest part of
# building one); a PRNG seeded from os.urandom gives the same version-4 ids 4x faster. Reseeded
# in a forked child: two pre-forked workers sharing a sequence would mint the same ids, and the
# daemon's dedupe would then drop real events.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_V4_CLEAR = 0xFFFFFFFF_FFFF_0FFF_3FFF_FFFFFFFFFFFF
_V4_SET = 0x00000000_0000_4000_8000_000000000000


def new_message_id() -> str:
    """A random RFC 4122 version-4 UUID, as text."""
    h = "%032x" % (_ids.getrandbits(128) & _V4_CLEAR | _V4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso(value: str | dt.datetime | None) -> str:
    if value is None:
        return _now_iso()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


def build_event(
    kind: str,
    *,
    user_id: str | int | None = None,
    anonymous_id: str | int | None = None,
    context: Mapping[str, Any] | None = None,
    integrations: Mapping[str, Any] | None = None,
    timestamp: str | dt.datetime | None = None,
    message_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A Segment call of type ``kind``; ``fields`` are its own (``event``, ``properties``,
    ``traits``, ``name``, ``groupId``, ``previousId``...), None values left out."""
    if user_id in (None, "") and anonymous_id in (None, ""):
        raise ValueError(f"{kind} needs a user_id or an anonymous_id")
    event: dict[str, Any] = {"type": kind}
    if user_id not in (None, ""):
        event["userId"] = user_id
    if anonymous_id not in (None, ""):
        event["anonymousId"] = anonymous_id
    event.update((k, v) for k, v in fields.items() if v is not None)
    event["context"] = {"library": LIBRARY, **(context or {})}
    if integrations is not None:
        event["integrations"] = dict(integrations)
    event["timestamp"] = _iso(timestamp)
    event["messageId"] = message_id or new_message_id()
    return event


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
)


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return _encoder.encode(obj).encode() + b"\n"


def with_message_id(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``event`` that has a messageId (a new uuid4 unless it has one)."""
    copy = dict(event)
    if not isinstance(copy.get("messageId"), str) or not copy["messageId"]:
        copy["messageId"] = new_message_id()
    return copy


# -- the ledger: lines in flight, matched to acks (pure) -----------------------------------


@dataclass(slots=True)
class _Line:
    data: bytes
    message_ids: tuple[str, ...]
    full_since: float | None = None  # when the daemon first answered queue_full for it


@dataclass(slots=True)
class Ledger:
    """Lines sent and not yet answered, in the order the daemon will answer them. No I/O.

    ``outbox`` holds the lines not yet written on the current connection. After a reconnect
    every unanswered line goes back into it (``rewind``), in order, ahead of anything new.
    A line answered ``queue_full`` is ``held`` until its ``retry_after`` has passed, then sent
    again (``release``), for up to ``retry_full_for`` seconds; only then is it refused. Times
    are the caller's clock.
    """

    unacked: deque[_Line] = field(default_factory=deque)
    outbox: list[bytes] = field(default_factory=list)
    pending_events: int = 0
    sent: int = 0
    acked: int = 0
    refused: int = 0
    reconnects: int = 0
    resent: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    held: list[tuple[float, _Line]] = field(default_factory=list)
    retry_full_for: float = 30.0

    @property
    def waiting(self) -> bool:
        """Whether any line still waits for its answer (flush waits while it does)."""
        return bool(self.unacked or self.held)

    def add(self, data: bytes, message_ids: tuple[str, ...]) -> None:
        self.unacked.append(_Line(data, message_ids))
        self.outbox.append(data)
        self.pending_events += len(message_ids)
        self.sent += len(message_ids)

    def take_outbox(self) -> bytes:
        data = b"".join(self.outbox)
        self.outbox.clear()
        return data

    def answer(self, raw: bytes, now: float = 0.0) -> None:
        """Match one ack line to the oldest unanswered line."""
        if not self.unacked:
            raise ClientError("protocol", f"an ack with no line waiting for it: {raw!r}")
        line = self.unacked.popleft()
        n = len(line.message_ids)
        self.pending_events -= n
        if n == 1 and raw == _FAST_OK:
            self.acked += n
            return
        try:
            ack = json.loads(raw)
        except ValueError as exc:
            raise ClientError("protocol", f"an ack that is not JSON: {raw!r}") from exc
        if ack.get("ok"):
            rejected = int(ack.get("rejected", 0))
            taken = int(ack.get("count", n - rejected))
            self.acked += taken
            if rejected:
                self._refuse("invalid_event", str(ack.get("message", "")), rejected, line)
            if n - rejected - taken > 0:  # a tracking plan blocked them: acked, not stored
                blocked = "blocked by the source's tracking plan"
                self._refuse("blocked", blocked, n - rejected - taken, line)
        else:
            code, message = str(ack.get("code", "error")), str(ack.get("message", ""))
            retry_after = ack.get("retry_after")
            if code == "queue_full" and self._hold(line, now, retry_after):
                self.pending_events += n
                return
            self._refuse(code, message, n, line, retry_after)

    def _hold(self, line: _Line, now: float, retry_after: Any) -> bool:
        """Keep a line the daemon had no room for, to send again; False once it is too late."""
        if line.full_since is None:
            line.full_since = now
        elif now - line.full_since >= self.retry_full_for:
            return False
        delay = float(retry_after) if isinstance(retry_after, int | float) else 1.0
        self.held.append((now + min(delay, self.retry_full_for), line))
        return True

    def release(self, now: float) -> None:
        """Held lines whose time has come go out again, after what is queued."""
        if self.held and min(due for due, _ in self.held) <= now:
            due_now = [line for due, line in self.held if due <= now]
            self.held = [(due, line) for due, line in self.held if due > now]
            for line in due_now:
                self.unacked.append(line)
                self.outbox.append(line.data)

    def next_due(self) -> float | None:
        return min((due for due, _ in self.held), default=None)

    def rewind(self) -> None:
        """A new connection: every unanswered line is written again, in order."""
        self.outbox = [line.data for line in self.unacked]
        self.resent += sum(len(line.message_ids) for line in self.unacked)
        self.reconnects += 1

    def give_up(self, code: str, message: str) -> None:
        """Fail every unanswered line (the daemon stayed away, or the client closed)."""
        for line in [*self.unacked, *(line for _, line in self.held)]:
            self._refuse(code, message, len(line.message_ids), line)
        self.unacked.clear()
        self.held.clear()
        self.outbox.clear()
        self.pending_events = 0

    def raise_refusals(self) -> None:
        """Raise the refusals gathered since the last call, if any, as one ClientError."""
        if self.refusals:
            refusals, self.refusals = tuple(self.refusals), []
            first = refusals[0]
            total = sum(r.count for r in refusals)
            message = first.message if total == 1 else f"{first.message} ({total} events refused)"
            raise ClientError(first.code, message, refusals)

    def statistics(self) -> Statistics:
        return Statistics(
            self.sent, self.acked, self.refused, self.pending_events, self.reconnects, self.resent
        )

    def _refuse(
        self, code: str, message: str, count: int, line: _Line, retry_after: Any = None
    ) -> None:
        self.refused += count
        after = float(retry_after) if isinstance(retry_after, int | float) else None
        self.refusals.append(Refusal(code, message, count, line.message_ids, after))


def split_acks(buffer: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """Complete ack lines in ``buffer + data``, and the incomplete rest."""
    *lines, rest = (buffer + data).split(b"\n")
    return lines, rest


def default_socket(path: str | os.PathLike[str] | None) -> Path:
    return Path(path) if path is not None else DEFAULT_SOCKET


# -- the sync client -----------------------------------------------------------------------


class _Common:
    """The Segment calls, in analytics-python's argument order, on top of ``send``."""

    def _send_built(self, event: dict[str, Any]) -> Any:
        raise NotImplementedError

    def track(
        self,
        user_id: str | int | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> Any:
        if not event:
            raise ValueError("track needs an event name")
        return self._send_built(
            build_event("track", user_id=user_id, event=event, properties=properties, **common)
        )

    def identify(
        self,
        user_id: str | int | None = None,
        traits: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> Any:
        return self._send_built(build_event("identify", user_id=user_id, traits=traits, **common))

    def page(
        self,
        user_id: str | int | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        *,
        category: str | None = None,
        **common: Any,
    ) -> Any:
        return self._send_built(
            build_event(
                "page",
                user_id=user_id,
                name=name,
                category=category,
                properties=properties,
                **common,
            )
        )

    def screen(
        self,
        user_id: str | int | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        *,
        category: str | None = None,
        **common: Any,
    ) -> Any:
        return self._send_built(
            build_event(
                "screen",
                user_id=user_id,
                name=name,
                category=category,
                properties=properties,
                **common,
            )
        )

    def group(
        self,
        user_id: str | int | None = None,
        group_id: str | int | None = None,
        traits: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> Any:
        if group_id in (None, ""):
            raise ValueError("group needs a group_id")
        return self._send_built(
            build_event("group", user_id=user_id, groupId=group_id, traits=traits, **common)
        )

    def alias(self, previous_id: str | int, user_id: str | int, **common: Any) -> Any:
        if previous_id in (None, ""):
            raise ValueError("alias needs a previous_id")
        return self._send_built(
            build_event("alias", user_id=user_id, previousId=previous_id, **common)
        )


class Client(_Common):
    """A pipelined, reconnecting, thread-safe client for router's Unix socket.

    ``send`` and the Segment calls return the event's messageId as soon as it is queued (they
    block only while ``max_pending`` events await their acks). ``flush()`` returns when every
    event sent so far is committed, and raises ``ClientError`` (the daemon's code) when any
    was refused since the last flush. If the daemon goes away the client reconnects, with
    backoff, and resends every unanswered line; after ``reconnect_timeout`` seconds without a
    daemon those events are refused with the code ``unavailable``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        max_pending: int = 10_000,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self.socket_path = default_socket(socket_path)
        self._max_pending = max_pending
        self._reconnect_timeout = reconnect_timeout
        self._ledger = Ledger(retry_full_for=reconnect_timeout)
        self._cond = threading.Condition()
        self._closing = False
        self._sock: socket.socket | None = self._connect()  # fail early: wrong path, no daemon
        self._thread = threading.Thread(target=self._run, name="router-client", daemon=True)
        self._thread.start()

    # -- the public calls

    def send(self, event: Mapping[str, Any]) -> str:
        """Queue one event (any JSON object; a messageId is added when it has none)."""
        return self._send_built(with_message_id(event))

    def send_batch(self, events: Iterable[Mapping[str, Any]], **envelope: Any) -> list[str]:
        """Queue events as one ``{"batch": [...]}`` line (one commit, one ack)."""
        items = [with_message_id(e) for e in events]
        ids = tuple(item["messageId"] for item in items)
        self._enqueue(encode_line({**envelope, "batch": items}), ids)
        return list(ids)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event sent so far is answered; raise the refusals since the last
        flush as one ClientError. ``timeout``: ClientError ``timeout`` after that many seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._ledger.waiting:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ClientError(
                        "timeout",
                        f"{self._ledger.pending_events} events not acknowledged after {timeout}s",
                    )
                self._cond.wait(remaining)
            self._ledger.raise_refusals()

    def statistics(self) -> Statistics:
        with self._cond:
            return self._ledger.statistics()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then close the connection. Idempotent."""
        try:
            if not self._closing:
                self.flush(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._shutdown()
            self._thread.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the error that left the block behind a flush error
            with contextlib.suppress(ClientError):
                self.close(timeout=5.0)

    # -- internals

    def _send_built(self, event: dict[str, Any]) -> str:
        message_id: str = event["messageId"]
        self._enqueue(encode_line(event), (message_id,))
        return message_id

    def _enqueue(self, data: bytes, message_ids: tuple[str, ...]) -> None:
        with self._cond:
            while self._ledger.pending_events >= self._max_pending and not self._closing:
                self._cond.wait()
            if self._closing:
                raise ClientError("closed", "the client is closed")
            self._ledger.add(data, message_ids)
            if len(self._ledger.outbox) == 1:  # only the I/O thread waits for lines: wake it
                self._cond.notify_all()  # once, not per event (each wake costs a GIL handoff)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise ClientError(
                "unavailable", f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        return sock

    def _reconnect(self) -> socket.socket | None:
        """Connect again with backoff; None once closing. Gives up on the unanswered events
        (not on the client) after ``reconnect_timeout``."""
        delay, started = 0.02, time.monotonic()
        while True:
            try:
                return self._connect()
            except ClientError as error:
                with self._cond:
                    if self._closing:
                        return None
                    if time.monotonic() - started > self._reconnect_timeout:
                        self._ledger.give_up("unavailable", error.message)
                        self._cond.notify_all()
                        # Wait for new events before trying again.
                        while not self._ledger.unacked and not self._closing:
                            self._cond.wait()
                        started = time.monotonic()
                    else:
                        self._cond.wait(delay)
                        delay = min(delay * 2, 1.0)

    def _run(self) -> None:
        """The I/O thread: write queued lines; on a broken connection, reconnect and rewind."""
        sock = self._sock
        while sock is not None:
            broken = threading.Event()
            reader = threading.Thread(
                target=self._read, args=(sock, broken), name="router-client-acks", daemon=True
            )
            reader.start()
            try:
                while True:
                    with self._cond:
                        while True:
                            self._ledger.release(time.monotonic())
                            if self._ledger.outbox or broken.is_set():
                                break
                            if self._closing:
                                return
                            due = self._ledger.next_due()
                            self._cond.wait(
                                None if due is None else max(0.0, due - time.monotonic())
                            )
                        if broken.is_set():
                            break
                        data = self._ledger.take_outbox()
                    sock.sendall(data)
            except OSError:
                pass  # the reader sees the same break and ends; we rewind below
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                reader.join()
                sock.close()
            sock = self._reconnect()
            with self._cond:
                self._sock = sock
                if sock is not None:
                    self._ledger.rewind()

    def _read(self, sock: socket.socket, broken: threading.Event) -> None:
        buffer = b""
        try:
            while data := sock.recv(READ_BYTES):
                lines, buffer = split_acks(buffer, data)
                with self._cond:
                    now = time.monotonic()
                    for line in lines:
                        self._ledger.answer(line, now)
                    self._cond.notify_all()
        except OSError:
            pass  # a reset is a break like any other
        except ClientError as error:  # the daemon said something we cannot match: start over
            with self._cond:
                self._ledger.refusals.append(Refusal(error.code, error.message, 0, ()))
        finally:
            with self._cond:
                broken.set()
                self._cond.notify_all()

    def _shutdown(self) -> None:
        with self._cond:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
