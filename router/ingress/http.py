"""A small HTTP/1.1 server: trio on raw sockets, httptools (llhttp) for parsing.

This module owns the wire for HTTP ingress: accepting connections, parsing requests, size limits,
timeouts, keep-alive, pipelining, ``Expect: 100-continue`` and writing responses. It knows nothing
about events, auth or routes: each complete request, with its whole body, goes to one ``Handler``,
and what the handler returns is written back. It does not stream bodies, speak TLS or HTTP/2 (put a
proxy in front for those), or interpret paths.

Why not a framework: hypercorn on trio measured 20x slower here, and raw ``trio.socket`` sockets
beat ``trio.SocketStream`` by ~25% (DESIGN.md §4), so the I/O shell talks to sockets directly.

Layout: ``_Protocol`` turns bytes into requests and protocol errors (httptools callbacks, no I/O,
time passed in); ``_Connection`` is the thin I/O shell for one socket; ``HttpServer`` accepts,
caps the number of connections and drains them on shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import socket as stdlib_socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
import trio

from router.errors import IngestError

logger = logging.getLogger(__name__)

_RECV_SIZE = 65536
_BACKLOG = 4096
# After an error we half-close and read for up to this long before closing: closing a socket
# with unread input sends an RST, which can destroy our answer before the client reads it.
_LINGER = 1.0
_ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO})
_ACCEPT_BACKOFF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Framing is the server's business; a handler's values for these would corrupt the stream.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(slots=True)
class Request:
    method: str
    path: str  # as sent (not percent-decoded), without the query
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    client: tuple[str, int] | None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)  # content-type defaults to JSON


Handler = Callable[[Request], Awaitable[Response]]
# Extra headers for an error the server answers itself (413, 431, 408...), given the headers of
# the request so far: browsers can read no answer without its CORS headers.
ErrorHeaders = Callable[[dict[str, str]], list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 16384
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0  # first byte of a request (or accept) -> end of its headers
    body_timeout: float = 30.0  # end of headers -> end of body; also bounds each response write
    keepalive_timeout: float = 75.0  # idle time between requests
    max_connections: int = 1024


def json_error(
    status: int, code: str, message: str, *, retry_after: float | None = None
) -> Response:
    """The error shape every endpoint uses: ``{"code": ..., "message": ...}``."""
    headers = [] if retry_after is None else [("Retry-After", str(math.ceil(retry_after)))]
    return Response(status, json.dumps({"code": code, "message": message}).encode(), headers)


# Where a connection is in reading a request: between requests (no byte of the next one yet),
# reading the request line and headers, or reading the body.
IDLE, HEAD, BODY = "idle", "head", "body"
_REASONS = {status.value: status.phrase for status in HTTPStatus}

# A parsed request with how to answer it: (request, keep_alive, is_http_1_0, is_head).
_Parsed = tuple[Request, bool, bool, bool]


class _Protocol:
    """Bytes in, complete requests and protocol errors out. httptools calls the ``on_*`` methods."""

    def __init__(self, limits: HttpLimits, client: tuple[str, int] | None) -> None:
        self._limits = limits
        self._client = client
        self._parser = httptools.HttpRequestParser(self)
        self.ready: list[_Parsed] = []  # complete requests, in arrival order
        self.error: IngestError | None = None  # set once; the connection then answers and closes
        self.phase = IDLE
        self.phase_since = 0.0  # when the current phase began, on the caller's clock
        self.continue_pending = False  # the client waits for "100 Continue" before the body
        self._now = 0.0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0  # counted from the parsed parts, for a precise 431
        self._raw_head_bytes = 0  # counted from the input, bounds what httptools buffers
        self._body: list[bytes] = []
        self._body_bytes = 0

    def feed(self, data: bytes, now: float) -> None:
        self._now = now
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # We speak no other protocol, and a server may ignore Upgrade (RFC 9110 §7.8): parse
            # whatever follows as the next request, with a fresh parser (httptools cannot resume).
            self._parser = httptools.HttpRequestParser(self)
            offset: int = exc.args[0]
            if offset < len(data):
                self.feed(data[offset:], now)
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what our callback raised, if it was one of ours
            malformed = IngestError(400, "bad_request", f"malformed request: {exc}")
            self.error = cause if isinstance(cause, IngestError) else malformed
            return
        if self.phase is HEAD:
            self._raw_head_bytes += len(data)
            # httptools buffers an unfinished header line itself; one recv of slack keeps this
            # from ever firing on a head within the limit that merely shares a read with others.
            if self._raw_head_bytes > self._limits.max_header_bytes + _RECV_SIZE:
                self.error = self._head_too_large()

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the request being read (complete or not)."""
        return self._headers

    def take_ready(self) -> list[_Parsed]:
        ready, self.ready = self.ready, []
        return ready

    # httptools callbacks. Raising IngestError here stops the parser; feed() turns it into .error.

    def on_message_begin(self) -> None:
        self.phase, self.phase_since = HEAD, self._now
        self._url = b""
        self._headers = {}
        self._head_bytes = self._raw_head_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            raise self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._limits.max_header_bytes:
            raise self._head_too_large()
        key = name.decode("latin-1").lower()
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.phase, self.phase_since = BODY, self._now
        headers = self._headers
        length = headers.get("content-length")
        # Refuse before reading a byte of the body: the client may not even have sent it yet.
        if length is not None and int(length) > self._limits.max_body_bytes:
            raise self._body_too_large()
        if self._parser.should_upgrade() and (int(length or 0) or "transfer-encoding" in headers):
            # httptools skips the body of an upgrade request; better refuse than lose it.
            raise IngestError(400, "bad_request", "upgrade requests cannot have a body")
        expect = headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise IngestError(417, "expectation_failed", f"cannot meet Expect: {expect}")
            self.continue_pending = self._parser.get_http_version() == "1.1"

    def on_body(self, body: bytes) -> None:
        self.continue_pending = False  # the client did not wait; no point sending it now
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise self._body_too_large()
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        method = parser.get_method().decode("ascii")
        path, _, query = self._url.partition(b"?")
        if not path.startswith(b"/") and path != b"*":  # absolute-form: http://host/path?q
            parsed = httptools.parse_url(self._url)
            path, query = parsed.path or b"/", parsed.query or b""
        body = b"".join(self._body)
        path_text, query_text = path.decode("latin-1"), query.decode("latin-1")
        request = Request(method, path_text, query_text, self._headers, body, self._client)
        keep_alive = parser.should_keep_alive()
        # HTTP/1.0 keeps a connection only when asked to, with a Connection header; the version
        # check is skipped otherwise because it formats a string on every call.
        http10 = keep_alive and "connection" in self._headers and parser.get_http_version() == "1.0"
        self.ready.append((request, keep_alive, http10, method == "HEAD"))
        self.phase, self.phase_since = IDLE, self._now
        self.continue_pending = False

    def _head_too_large(self) -> IngestError:
        limit = self._limits.max_header_bytes
        return IngestError(431, "headers_too_large", f"request head exceeds {limit} bytes")

    def _body_too_large(self) -> IngestError:
        limit = self._limits.max_body_bytes
        return IngestError(413, "body_too_large", f"request body exceeds {limit} bytes")


_date_cache: dict[int, str] = {}  # formatting a date costs about as much as parsing a request


def _render(response: Response, *, keep_alive: bool, http10: bool, head: bool) -> bytes:
    body, status = response.body, response.status
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
    has_type = False
    for name, value in response.headers:
        lower = name.lower()
        if lower in _FRAMING:
            continue
        has_type = has_type or lower == "content-type"
        lines.append(f"{name}: {value}\r\n")
    if body and not has_type:
        lines.append("content-type: application/json\r\n")
    lines.append(f"content-length: {len(body)}\r\n")
    if not keep_alive:
        lines.append("connection: close\r\n")
    elif http10:
        lines.append("connection: keep-alive\r\n")
    second = int(time.time())
    date = _date_cache.get(second)
    if date is None:
        _date_cache.clear()
        date = _date_cache[second] = f"date: {formatdate(second, usegmt=True)}\r\n\r\n"
    lines.append(date)  # ends the head, too
    head_bytes = "".join(lines).encode("latin-1")
    return head_bytes if head else head_bytes + body


class _Connection:
    """The I/O shell for one socket: recv -> protocol -> handler -> send, under deadlines.

    Deadlines are enforced by the server's reaper, which cancels ``scope`` once ``deadline``
    passes: a cancel scope per read and write costs ~5 us each here, as much as parsing a request.
    ``deadline`` is finite only while waiting on the peer, never while the handler runs.
    """

    def __init__(self, server: HttpServer, sock: trio.socket.SocketType, client: Any) -> None:
        self._server = server
        self._limits = server.limits
        self._sock = sock
        self._client: tuple[str, int] | None = (client[0], client[1]) if client else None
        self._proto = _Protocol(server.limits, self._client)
        self._answered = 0
        self._idle_since = trio.current_time()
        self._reading = False
        self.idle = False  # waiting for the first byte of a request: safe to drop on shutdown
        self.deadline = math.inf
        self.scope = trio.CancelScope()
        self.cancelled = False  # scope.cancel_called, without the clock read that property does

    def cancel(self) -> None:
        self.cancelled = True
        self.scope.cancel()

    def close(self) -> None:
        self._sock.close()

    async def run(self) -> None:
        try:
            with self.scope:
                await self._serve()
            if self.scope.cancelled_caught and self._reading and self._proto.phase is not IDLE:
                await self.fail(IngestError(408, "request_timeout", "request too slow"))
        except OSError as exc:
            logger.debug("http connection dropped client=%s error=%r", self._client, exc)
        finally:
            self.close()

    async def _serve(self) -> None:
        proto = self._proto
        while True:
            if proto.phase is IDLE and self._server.closing:
                return
            self.deadline = self._read_deadline()
            self.idle = proto.phase is IDLE
            self._reading = True
            data = await self._sock.recv(_RECV_SIZE)
            self._reading = self.idle = False
            self.deadline = math.inf
            if self.cancelled:
                # Timed out or shut down just as data arrived: drop it, as the peer must expect
                # of any close that races its request on the wire, rather than run the handler
                # in a cancelled scope.
                return
            if not data:
                return
            proto.feed(data, trio.current_time())
            if proto.ready and not await self._answer(proto.take_ready()):
                await self._linger_close()
                return
            if proto.error is not None:
                await self.fail(proto.error)
                return
            if proto.continue_pending:
                proto.continue_pending = False
                await self._send(b"HTTP/1.1 100 Continue\r\n\r\n", trio.current_time())

    def _read_deadline(self) -> float:
        proto, limits = self._proto, self._limits
        if proto.phase is HEAD:
            return proto.phase_since + limits.header_timeout
        if proto.phase is BODY:
            return proto.phase_since + limits.body_timeout
        # A fresh connection that sends nothing is a slowloris, not an idle keep-alive client.
        idle = limits.keepalive_timeout if self._answered else limits.header_timeout
        return self._idle_since + idle

    async def _answer(self, ready: list[_Parsed]) -> bool:
        """Answer complete requests in order, in one write; False when the connection must close."""
        out = []
        keep = True
        for request, keep_alive, http10, head in ready:
            response = await self._call(request)
            keep = keep_alive and not self._server.closing
            out.append(_render(response, keep_alive=keep, http10=http10, head=head))
            if not keep:
                break  # anything pipelined behind it goes unanswered; the client retries it
        now = trio.current_time()
        await self._send(b"".join(out), now)
        self._answered += len(out)
        self._idle_since = now
        return keep

    async def _call(self, request: Request) -> Response:
        try:
            return await self._server.handler(request)
        except IngestError as exc:  # the handler refusing input: an answer, not a failure
            return json_error(exc.status, exc.code, exc.message, retry_after=exc.retry_after)
        except Exception:
            logger.exception("http handler failed method=%s path=%s", request.method, request.path)
            return json_error(500, "internal", "internal server error")

    async def _send(self, data: bytes, now: float) -> None:
        # A peer that reads nothing for this long is gone; don't let it hold the connection.
        self.deadline = now + self._limits.body_timeout
        view = memoryview(data)
        while view:
            sent = await self._sock.send(view)
            view = view[sent:]
        self.deadline = math.inf

    async def fail(self, error: IngestError) -> None:
        """Answer an error and close; may run after ``scope`` was cancelled, so it bounds itself."""
        logger.debug("http request refused status=%d client=%s", error.status, self._client)
        reply = json_error(error.status, error.code, error.message, retry_after=error.retry_after)
        if self._server.error_headers is not None:
            reply.headers.extend(self._server.error_headers(self._proto.headers))
        with trio.move_on_after(_LINGER):
            view = memoryview(_render(reply, keep_alive=False, http10=False, head=False))
            while view:
                view = view[await self._sock.send(view) :]
        await self._linger_close()

    async def _linger_close(self) -> None:
        with trio.move_on_after(_LINGER), contextlib.suppress(OSError):
            self._sock.shutdown(trio.socket.SHUT_WR)
            while await self._sock.recv(_RECV_SIZE):
                pass


class HttpServer:
    """Accepts connections and serves each in its own task; ``close()`` drains them.

    Usage: ``port = await nursery.start(server.serve, host, 0)``, later
    ``await server.shutdown(grace=10)``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: HttpLimits = HttpLimits(),
        error_headers: ErrorHeaders | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.error_headers = error_headers
        self.closing = False
        self._connections: set[_Connection] = set()
        self._rejecting = 0
        self._accept_scope = trio.CancelScope()
        self._reaper_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        inherited: stdlib_socket.socket | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind (or take ``inherited``, a listening socket from socket activation), report the
        bound port through ``task_status``, serve until closed or cancelled."""
        if inherited is not None:
            listener = trio.socket.from_stdlib_socket(inherited)
        else:
            listener = await _bind(host, port)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reap)
                task_status.started(listener.getsockname()[1])
                logger.info("http listening address=%s", listener.getsockname())
                with self._accept_scope:
                    await self._accept_loop(listener, nursery)
                listener.close()  # refuse new connections while the old ones drain
        finally:
            listener.close()
            self._closed.set()

    def close(self) -> None:
        """Stop accepting, drop idle connections, answer in-flight requests with ``close``."""
        self.closing = True
        self._accept_scope.cancel()
        for conn in self._connections:
            if conn.idle:
                conn.cancel()
        self._stop_reaper_if_drained()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def shutdown(self, grace: float) -> None:
        """``close()``, give in-flight requests ``grace`` seconds, then cancel what remains."""
        self.close()
        with trio.move_on_after(grace):
            await self._closed.wait()
        if not self._closed.is_set() and self._nursery is not None:
            logger.warning("http shutdown grace expired connections=%d", len(self._connections))
            self._nursery.cancel_scope.cancel()
        await self._closed.wait()

    async def _reap(self) -> None:
        """Cancel connections past their deadline; timeouts may fire up to one tick late."""
        limits = self.limits
        shortest = min(limits.header_timeout, limits.body_timeout, limits.keepalive_timeout)
        tick = min(1.0, max(0.01, shortest / 4))
        with self._reaper_scope:
            while True:
                await trio.sleep(tick)
                now = trio.current_time()
                for conn in self._connections:
                    if conn.deadline <= now:
                        conn.cancel()

    def _stop_reaper_if_drained(self) -> None:
        if self.closing and not self._connections:
            self._reaper_scope.cancel()  # the last task in the nursery: serve() can return

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIP:
                    continue
                if exc.errno not in _ACCEPT_BACKOFF:
                    raise
                logger.warning("http accept failed, backing off error=%s", exc)
                await trio.sleep(0.1)
                continue
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, addr)
            if len(self._connections) < self.limits.max_connections:
                self._connections.add(conn)
                nursery.start_soon(self._run, conn)
            elif self._rejecting < self.limits.max_connections:
                self._rejecting += 1
                nursery.start_soon(self._reject, conn)
            else:  # under a flood even polite refusals must not pile up
                sock.close()

    async def _run(self, conn: _Connection) -> None:
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            self._stop_reaper_if_drained()

    async def _reject(self, conn: _Connection) -> None:
        """Over the connection cap: answer 503 without reading the request, and close."""
        try:
            await conn.fail(IngestError(503, "overloaded", "too many connections", retry_after=1))
        except OSError:
            pass  # it was only a courtesy
        finally:
            conn.close()
            self._rejecting -= 1


async def _bind(host: str, port: int) -> trio.socket.SocketType:
    host = host.strip("[]")  # "[::1]", as IPv6 literals are written in URLs
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    family, type_, proto, _, addr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind(addr)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    limits: HttpLimits = HttpLimits(),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` (0 picks a port) until cancelled; see ``HttpServer``."""
    await HttpServer(handler, limits=limits).serve(host, port, task_status=task_status)
