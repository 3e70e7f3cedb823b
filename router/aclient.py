"""The trio client for router's Unix socket: ``router.client.Client``'s semantics, async.

    async with AsyncClient("router-data/router.sock") as client:
        await client.track("u1", "Signed Up", {"plan": "pro"})
        await client.flush()

It shares the pure parts (building events, the ``Ledger`` of unanswered lines) with the sync
client; what it owns is a background task in its own nursery that writes queued lines, reads
acks and reconnects (rewinding the ledger) when the daemon goes away. Send calls await only
while ``max_pending`` events wait for their acks.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import trio

from router.client import (
    ClientError,
    Ledger,
    Refusal,
    Statistics,
    _Common,
    build_event,
    default_socket,
    encode_line,
    split_acks,
    with_message_id,
)

__all__ = ["AsyncClient", "build_event"]

READ_BYTES = 256 * 1024


class AsyncClient(_Common):
    """Use as ``async with``: entering connects (ClientError ``unavailable`` if it cannot) and
    starts the I/O task; leaving flushes and closes."""

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
        self._changed = trio.Event()  # set (and replaced) whenever the ledger changes
        self._closing = False
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> AsyncClient:
        stream = await self._connect()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._run, stream)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                await self.flush()
            else:
                with trio.move_on_after(5), contextlib.suppress(ClientError):
                    await self.flush()
        finally:
            self._closing = True
            self._notify()
            await self._stack.aclose()

    # -- the public calls

    async def send(self, event: Mapping[str, Any]) -> str:
        return await self._send_built(with_message_id(event))

    async def send_batch(self, events: Iterable[Mapping[str, Any]], **envelope: Any) -> list[str]:
        items = [with_message_id(e) for e in events]
        ids = tuple(item["messageId"] for item in items)
        await self._enqueue(encode_line({**envelope, "batch": items}), ids)
        return list(ids)

    async def flush(self) -> None:
        """Wait until every event sent so far is answered; raise the refusals since the last
        flush as one ClientError. Bound it with a cancel scope (``trio.fail_after``)."""
        while self._ledger.waiting:
            await self._changed.wait()
        self._ledger.raise_refusals()

    def statistics(self) -> Statistics:
        return self._ledger.statistics()

    # -- internals

    async def _send_built(self, event: dict[str, Any]) -> str:
        message_id: str = event["messageId"]
        await self._enqueue(encode_line(event), (message_id,))
        return message_id

    async def _enqueue(self, data: bytes, message_ids: tuple[str, ...]) -> None:
        while self._ledger.pending_events >= self._max_pending and not self._closing:
            await self._changed.wait()
        if self._closing:
            raise ClientError("closed", "the client is closed")
        self._ledger.add(data, message_ids)
        if len(self._ledger.outbox) == 1:  # only the writer waits for lines
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _connect(self) -> trio.SocketStream:
        try:
            return await trio.open_unix_socket(os.fspath(self.socket_path))
        except OSError as exc:
            raise ClientError(
                "unavailable", f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from exc

    async def _reconnect(self) -> trio.SocketStream | None:
        delay, started = 0.02, trio.current_time()
        while not self._closing:
            try:
                return await self._connect()
            except ClientError as error:
                if trio.current_time() - started > self._reconnect_timeout:
                    self._ledger.give_up("unavailable", error.message)
                    self._notify()
                    while not self._ledger.unacked and not self._closing:
                        await self._changed.wait()
                    started = trio.current_time()
                else:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        return None

    async def _run(self, stream: trio.SocketStream | None) -> None:
        while stream is not None:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, nursery.cancel_scope)
                await self._write(stream)
                nursery.cancel_scope.cancel()
            if self._closing:
                return
            stream = await self._reconnect()
            if stream is not None:
                self._ledger.rewind()

    async def _write(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                self._ledger.release(trio.current_time())
                if self._ledger.outbox:
                    await stream.send_all(self._ledger.take_outbox())
                    continue
                if self._closing:
                    return
                due = self._ledger.next_due()
                with trio.move_on_at(math.inf if due is None else due):
                    await self._changed.wait()
        # A write failed: wait for the reader to see the break and cancel us.
        await trio.sleep_forever()

    async def _read(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        buffer = b""
        try:
            while data := await stream.receive_some(READ_BYTES):
                lines, buffer = split_acks(buffer, data)
                now = trio.current_time()
                for line in lines:
                    self._ledger.answer(line, now)
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except ClientError as error:  # an ack we cannot match: start over on a new connection
            self._ledger.refusals.append(Refusal(error.code, error.message, 0, ()))
        scope.cancel()
