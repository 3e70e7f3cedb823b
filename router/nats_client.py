"""A trio-native NATS connection, just big enough for JetStream publish and pull consume.

Why not nats-py (the official client)? It is asyncio, so under trio it needs its own event loop
on a thread and a hand-over per batch. Measured here (2 cores, nats-server 2.9 with JetStream
on a file store, 100k events of ~330 bytes, acks awaited per batch): nats-py's
``publish_async`` on a thread 12.5-13.3k events/s in batches of 100 and 17-22k in batches of
1000; this client 50-51k and 53-59k. The protocol subset is small (CONNECT, SUB, PUB/HPUB,
MSG/HMSG, PING/PONG) and lives, pure, in ``router.nats_wire``.

A ``Connection`` runs no task of its own: whoever waits for an answer reads the socket (one
reader at a time, under a fair lock) and hands each message to its waiter. So it needs no
nursery and works inside a destination's ``send``. Any failure marks it broken; callers open
a new one (that is the whole reconnect logic: there is no state to restore but the inbox).
Must not: decide retries, or know about events.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from router import nats_wire as wire
from router.errors import RouterError

log = logging.getLogger(__name__)

READ_BYTES = 256 * 1024
_REPLY_SID = 1  # request/reply and PubAcks: _INBOX.<id>.<token>
_PULL_SID = 2  # messages a pull request brings: _INBOX.<id>.pull.<token>
# JetStream API error codes (err_code) router tells apart.
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014


class NatsError(RouterError):
    """The server is unreachable, went away, or answered what we cannot use."""


class JetStreamApiError(NatsError):
    def __init__(self, message: str, *, code: int, err_code: int) -> None:
        self.code = code
        self.err_code = err_code
        super().__init__(message)


class Connection:
    def __init__(self, stream: trio.SocketStream, info: dict[str, Any], name: str) -> None:
        self._stream = stream
        self.info = info
        self.max_payload = int(info.get("max_payload", 1024 * 1024))
        self._parser = wire.Parser()
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()  # trio's Lock is fair: waiting readers take turns
        self._inbox = f"_INBOX.{secrets.token_hex(11)}."
        self._reply_prefix = self._inbox.encode()
        self._pull_prefix = self._reply_prefix + b"pull."
        self._replies: dict[bytes, Callable[[wire.Msg], None]] = {}
        self._acks: dict[bytes, tuple[_Acks, int]] = {}  # PubAcks awaited, by reply token
        self._on_pull: Callable[[wire.Msg], None] | None = None
        self._tokens = 0
        self._pongs = 0
        self.error: str | None = None
        self.server_error = ""  # the last -ERR, for the failure detail when it then hangs up
        self.last_read = trio.current_time()
        self.name = name

    @classmethod
    async def open(cls, address: wire.Address, *, name: str = "router") -> Connection:
        """Connect, authenticate and subscribe our inbox; the caller bounds the time."""
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise NatsError(f"cannot connect to {address.host}:{address.port}: {exc}") from exc
        try:
            info = await _read_info(stream)
            connection = cls(stream, info, name)
            hello = wire.connect(
                name=name, user=address.user, password=address.password, token=address.token
            )
            # CONNECT alone, then its answer: a server refusing it answers -ERR and closes, and
            # closing with our later commands unread would make it a reset, which can take the
            # -ERR (what the operator needs to see) with it.
            await connection.write(hello)
            await connection.ping()  # a refused CONNECT answers -ERR here, not silence
            await connection.write(
                wire.sub(connection._inbox + "*", _REPLY_SID)
                + wire.sub(connection._inbox + "pull.*", _PULL_SID)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await stream.aclose()
            raise NatsError(f"connection to {address.host}:{address.port} failed: {exc}") from exc
        except BaseException:
            await stream.aclose()
            raise
        return connection

    @property
    def broken(self) -> bool:
        return self.error is not None

    async def aclose(self) -> None:
        self.error = self.error or "closed"
        await self._stream.aclose()

    # -- the socket ----------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        self._check()
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._break(f"write failed: {exc!r}")
                raise NatsError(self.error or "write failed") from exc
            except trio.Cancelled:
                # Part of a command may have gone: the stream's framing is lost.
                self._break("a write was cancelled midway")
                raise

    async def read_until(self, done: Callable[[], bool]) -> None:
        """Read and dispatch until ``done()``; raises NatsError if the connection fails."""
        while not done():
            self._check()
            async with self._read_lock:
                if done():
                    return
                self._check()
                await self._read_once()

    async def _read_once(self) -> None:
        try:
            data = await self._stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(f"read failed{self._after_error()}: {exc!r}")
            raise NatsError(self.error or "read failed") from exc
        if not data:
            self._break(f"the server closed the connection{self._after_error()}")
            raise NatsError(self.error or "closed")
        self.last_read = trio.current_time()
        try:
            events = self._parser.feed(data)
        except wire.ProtocolError as exc:
            self._break(f"protocol error: {exc}")
            raise NatsError(self.error or "protocol error") from exc
        owed = 0
        for event in events:
            if type(event) is wire.Msg:
                self._dispatch(event)
            elif type(event) is wire.Ping:
                owed += 1
            elif type(event) is wire.Pong:
                self._pongs += 1
            elif isinstance(event, wire.Err):
                # Most -ERRs close the connection (the read after this one sees it); the
                # message is what the operator needs, so it is kept for the failure detail.
                log.warning("nats server error connection=%s error=%s", self.name, event.message)
                self.server_error = event.message
            elif isinstance(event, wire.Info):
                self.info = event.fields
        if owed:
            await self.write(b"PONG\r\n" * owed)

    def _dispatch(self, msg: wire.Msg) -> None:
        if msg.sid == _REPLY_SID:
            token = msg.subject[len(self._reply_prefix) :]
            pending = self._acks.pop(token, None)
            if pending is not None:
                pending[0].resolve(pending[1], msg)
                return
            handler = self._replies.pop(token, None)
            if handler is not None:  # else: the answer to a request given up on
                handler(msg)
        elif msg.sid == _PULL_SID and self._on_pull is not None:
            self._on_pull(msg)

    def _after_error(self) -> str:
        return f" after -ERR {self.server_error!r}" if self.server_error else ""

    def _check(self) -> None:
        if self.error is not None:
            raise NatsError(self.error)

    def _break(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def _token(self) -> bytes:
        self._tokens += 1
        return b"%x" % self._tokens

    # -- requests ------------------------------------------------------------------

    async def ping(self) -> None:
        """One round trip: proves the server is there and has seen all we wrote before."""
        expected = self._pongs + 1
        await self.write(b"PING\r\n")
        await self.read_until(lambda: self._pongs >= expected)

    async def request(self, subject: str, payload: bytes) -> wire.Msg:
        answers: list[wire.Msg] = []
        token = self._token()
        self._replies[token] = answers.append
        try:
            await self.write(wire.pub(subject.encode(), payload, self._reply_prefix + token))
            await self.read_until(lambda: bool(answers))
        finally:
            self._replies.pop(token, None)
        return answers[0]

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JetStream API call (``$JS.API.<subject>``); raises JetStreamApiError."""
        payload = msgspec.json.encode(body) if body is not None else b""
        answer = await self.request(f"$JS.API.{subject}", payload)
        if answer.status == 503:
            raise NatsError("no responders: is JetStream enabled on the server (-js)?")
        try:
            result: dict[str, Any] = msgspec.json.decode(answer.payload)
        except msgspec.DecodeError as exc:
            raise NatsError(f"unreadable JetStream answer {answer.payload[:80]!r}") from exc
        error = result.get("error") if isinstance(result, dict) else None
        if error:
            raise JetStreamApiError(
                f"JetStream {subject.split('.')[0]}: {error.get('description', error)}",
                code=int(error.get("code", 0)),
                err_code=int(error.get("err_code", 0)),
            )
        return result

    async def publish_acked(
        self,
        messages: Sequence[tuple[bytes, bytes, bytes]],
        results: list[wire.PubAck | None],
        *,
        window: int,
    ) -> None:
        """Publish (subject, header block, payload) messages, each asking for a PubAck, with at
        most ``window`` awaiting theirs; ``results[i]`` is filled as acks arrive, so a caller
        that gives up (or a broken connection) still knows which made it."""
        acks = _Acks(results)
        tokens: list[bytes] = []
        prefix = self._reply_prefix
        sent = 0
        total = len(messages)
        try:
            while sent < total or acks.outstanding:
                if sent < total and acks.outstanding < window:
                    end = min(total, sent + window - acks.outstanding)
                    out = []
                    for index in range(sent, end):
                        subject, headers, payload = messages[index]
                        self._tokens += 1
                        token = b"%x" % self._tokens
                        tokens.append(token)
                        self._acks[token] = (acks, index)
                        out.append(wire.hpub(subject, prefix + token, headers, payload))
                    acks.outstanding += end - sent
                    sent = end
                    await self.write(b"".join(out))
                    continue
                # Top up the window once half of it is back: fewer, larger writes.
                await self.read_until(acks.at_most(0 if sent == total else window // 2))
        finally:
            for token in tokens:
                self._acks.pop(token, None)

    async def fetch(
        self, stream: str, consumer: str, *, batch: int, expires: float
    ) -> list[wire.Msg]:
        """Up to ``batch`` messages, as soon as there are any, waiting at most ``expires``
        seconds for the first. Each message's ``reply`` is the subject to ack it on.

        A pull for ``batch`` messages would hold the ones that came until the batch filled or
        the pull expired; so first take what is there (``no_wait``), and only when that is
        nothing, wait for one message; the next call takes the rest."""
        got = await self._pull(stream, consumer, {"batch": batch, "no_wait": True}, batch)
        if got:
            return got
        return await self._pull(stream, consumer, {"batch": 1, "expires": int(expires * 1e9)}, 1)

    async def _pull(
        self, stream: str, consumer: str, request: dict[str, Any], batch: int
    ) -> list[wire.Msg]:
        token = self._pull_prefix + self._token()
        got: list[wire.Msg] = []
        finished = False

        def on_pull(msg: wire.Msg) -> None:
            nonlocal finished
            if msg.reply is not None and msg.status is None:
                got.append(msg)
            elif msg.subject == token and msg.status in (404, 408, 409):
                # 404 no messages, 408 the request expired, 409 e.g. the consumer was deleted
                finished = True
                if msg.status == 409:
                    log.warning("nats pull ended: %s", msg.description)

        subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}".encode()
        self._on_pull = on_pull
        try:
            await self.write(wire.pub(subject, msgspec.json.encode(request), token))
            await self.read_until(lambda: finished or len(got) >= batch)
        finally:
            self._on_pull = None
        return got

    async def ack(self, messages: Sequence[wire.Msg], verb: bytes = b"+ACK") -> None:
        """Ack (or ``+TERM``) JetStream messages; fire and forget, like the official clients:
        an ack that is lost only means a redelivery, which the journal's dedupe absorbs."""
        data = b"".join(wire.pub(m.reply, verb) for m in messages if m.reply is not None)
        if data:
            await self.write(data)


class _Acks:
    """One ``publish_acked`` call's PubAcks: where each goes, and how many are still out."""

    __slots__ = ("outstanding", "results")

    def __init__(self, results: list[wire.PubAck | None]) -> None:
        self.results = results
        self.outstanding = 0

    def resolve(self, index: int, msg: wire.Msg) -> None:
        self.outstanding -= 1
        if msg.status is not None:
            said = msg.description or "no responders"
            if msg.status == 503:  # nothing subscribes to the subject: no stream takes it
                said = f"{said}: no stream takes this subject"
            error = wire.PubAckError(code=msg.status, description=said)
            self.results[index] = wire.PubAck(error=error)
        elif b'"error"' in msg.payload:
            self.results[index] = wire.pub_ack(msg.payload)
        else:  # the common case, without decoding it: stored (or a duplicate of one stored)
            self.results[index] = wire.STORED

    def at_most(self, low: int) -> Callable[[], bool]:
        return lambda: self.outstanding <= low


async def connect_any(
    addresses: Sequence[wire.Address], *, name: str, each: float, first: int = 0
) -> tuple[Connection, int]:
    """A connection to the first of ``addresses`` (tried in turn from ``first``, each for at
    most ``each`` seconds) that answers; and its index, to start from next time. A server that
    is down refuses at once, one that is cut off costs its ``each``."""
    errors: list[str] = []
    share = each
    for step in range(len(addresses)):
        index = (first + step) % len(addresses)
        address = addresses[index]
        with trio.move_on_after(share):
            try:
                return await Connection.open(address, name=name), index
            except NatsError as exc:
                errors.append(str(exc))
                continue
        errors.append(f"{address.where}: no answer within {share:g}s")
    raise NatsError("; ".join(errors))


async def _read_info(stream: trio.SocketStream) -> dict[str, Any]:
    parser = wire.Parser()
    while True:
        data = await stream.receive_some(READ_BYTES)
        if not data:
            raise NatsError("the server closed the connection before INFO")
        try:
            events = parser.feed(data)
        except wire.ProtocolError as exc:
            raise NatsError(f"not a NATS server: {exc}") from exc
        for event in events:
            if isinstance(event, wire.Info):
                return event.fields
