"""A lean HTTP/1.1 client for trio: keep-alive requests parsed by httptools, for delivery.

This module owns outbound HTTP on the webhook hot path: URLs, request framing, response
parsing, a keep-alive pool per origin, timeouts and TLS. It does no redirects, proxies,
cookies, content decoding or HTTP/2; httpx stays for the callers that need those.

Why not httpx here: one small POST per request through ``httpx.AsyncClient`` under trio
measured ~650 requests/s, CPU-bound, ~25-40% of it in a readiness check of pooled
connections on every request (encode/httpx#3215) and the anyio/httpcore layers; the same
exchange on httptools and raw sockets runs an order of magnitude faster (DESIGN.md §4).
We skip the readiness check: a request that finds its pooled connection closed by the
server is retried once on a fresh one instead (see ``HttpClient._exchange``).

Layout: ``parse_url`` and ``encode_request`` are pure; ``_ResponseReader`` turns bytes into
one response (httptools callbacks, no I/O); ``_Connection`` is the I/O shell for one socket;
``_Pool`` keeps one origin's connections; ``HttpClient`` ties them to the deadlines.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import httptools
import trio

from router.errors import RouterError

log = logging.getLogger(__name__)

_RECV_SIZE = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Framing is the client's business: a caller's values for these would corrupt the stream.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# Characters a request target may keep as they are; the rest (spaces, non-ASCII) is
# percent-encoded, as httpx does, and existing %XX escapes stay.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"
# The errors that mean "this connection is gone" (reset, broken pipe, closed under us).
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class HttpClientError(RouterError):
    """A request that got no complete response; callers treat it as worth retrying."""


class ConnectError(HttpClientError):
    """No connection: DNS, refused, unreachable, or a failed TLS handshake."""


class RequestTimeout(HttpClientError):
    """The connect deadline or the whole request's deadline passed."""


class ConnectionLost(HttpClientError):
    """The connection broke before the response was complete."""


class ProtocolError(HttpClientError):
    """The server's bytes are not an HTTP/1.x response."""


@dataclass(frozen=True, slots=True)
class Url:
    scheme: str  # "http" or "https"
    host: str  # lower-case, IPv6 without brackets
    port: int
    target: str  # path and query, as sent on the request line
    host_header: str
    # Basic credentials from the URL's userinfo, if any; kept out of reprs and logs.
    authorization: str | None = field(repr=False)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes  # at most the client's ``max_body`` bytes; the rest was read and dropped


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    connections_opened: int
    requests_on_reused_connections: int
    stale_retries: int  # requests that found their pooled connection closed, and went again
    idle_connections: int
    open_connections: int


def parse_url(text: str) -> Url:
    """An http(s) URL, checked once so each request only formats it; ValueError if not."""
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError when malformed or out of range
    except ValueError as exc:
        raise ValueError(f"not an http(s) URL: {text!r} ({exc})") from exc
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError(f"not an http(s) URL: {text!r}")
    port = port or _DEFAULT_PORTS[scheme]
    target = quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_TARGET_SAFE)
    host_header = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        host_header += f":{port}"
    authorization = None
    if parts.username is not None or parts.password is not None:
        # httpx sends a URL's userinfo as Basic auth; keep doing so.
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Url(scheme, host, port, target, host_header, authorization)


def check_header(name: str, value: str) -> None:
    """ValueError for a header that cannot be sent as is (a CR/LF would inject headers)."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name: {name!r}")
    if _BAD_VALUE.search(value):
        raise ValueError(f"header {name!r} contains a line break or NUL")
    value.encode("latin-1")  # UnicodeEncodeError is a ValueError


def encode_request(method: str, url: Url, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request's bytes: head (headers in the caller's order) then body."""
    lines = [f"{method} {url.target} HTTP/1.1"]
    names: set[str] = set()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _FRAMING:
            continue
        check_header(name, value)
        names.add(lowered)
        lines.append(f"{name}: {value}")
    if "host" not in names:
        lines.insert(1, f"host: {url.host_header}")
    if url.authorization is not None and "authorization" not in names:
        lines.append(f"authorization: {url.authorization}")
    if "accept-encoding" not in names:
        # With no Accept-Encoding any coding is acceptable (RFC 9110), and we decode none.
        lines.append("accept-encoding: identity")
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _ResponseReader:
    """Bytes in, one final response out (httptools callbacks; no I/O). 1xx are skipped."""

    def __init__(self, max_body: int) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max_body = max_body
        self._body: list[bytes] = []
        self._kept = 0
        self._until_eof = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.started = False  # any byte seen: from then on, a retry could duplicate work
        self.complete = False
        self.keep_alive = False

    def feed(self, data: bytes) -> bool:
        """True once the final response is complete."""
        self.started = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # junk after the response: keep the answer, drop the connection
                self.keep_alive = False
                return True
            raise ProtocolError(f"malformed response: {exc!r}") from exc
        return self.complete

    def feed_eof(self) -> bool:
        """The server closed: True if that ends the response (a body delimited by the close)."""
        if self._until_eof and not self.complete:
            self.complete = True
            self.keep_alive = False
        return self.complete

    def response(self) -> Response:
        return Response(self.status, self.headers, b"".join(self._body))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: the stream is out of step
            self.keep_alive = False
            return
        self.headers = {}  # after a 1xx, the final response starts afresh

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        self.status = self._parser.get_status_code()
        self._until_eof = (
            self.status >= 200
            and self.status not in (204, 304)
            and "content-length" not in self.headers
            and "transfer-encoding" not in self.headers
        )

    def on_body(self, body: bytes) -> None:
        room = self._max_body - self._kept
        if room > 0 and not self.complete:
            piece = body[:room]
            self._body.append(piece)
            self._kept += len(piece)

    def on_message_complete(self) -> None:
        if self.complete or 100 <= self.status < 200:
            return  # an interim response: the final one follows on the same connection
        self.complete = True
        # Read here: after completion the parser already describes the next message.
        self.keep_alive = self._parser.should_keep_alive()


class _Connection:
    """One socket: a raw trio socket for http, an SSLStream over it for https.

    Raw, because 8 concurrent keep-alive POSTs measured ~10-12k requests per CPU-second this
    way against ~9k through trio.SocketStream (httpx: ~0.9k). Closing is synchronous and
    skips TLS close_notify, which HTTP does not need."""

    __slots__ = ("_sock", "_stream", "idle_since", "requests")

    def __init__(self, sock: trio.socket.SocketType, stream: trio.abc.Stream | None) -> None:
        self._sock = sock
        self._stream = stream
        self.idle_since = 0.0
        self.requests = 0

    async def send_all(self, data: bytes) -> None:
        if self._stream is not None:
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            view = view[await self._sock.send(view) :]

    async def receive(self) -> bytes:
        if self._stream is not None:
            return bytes(await self._stream.receive_some(_RECV_SIZE))
        return await self._sock.recv(_RECV_SIZE)

    def close(self) -> None:
        # A task blocked on this socket wakes with ClosedResourceError (aclose at shutdown).
        self._sock.close()


class _Pool:
    """One origin's connections: at most ``max_connections`` in use, idle ones reused LIFO.

    LIFO keeps the few connections a steady load needs warm and lets a burst's extras go
    idle long enough to expire, instead of cycling through all of them. Expired connections
    are closed when the pool is next used (or by ``aclose``): no task of its own to run."""

    def __init__(self, max_connections: int, max_idle: int, idle_timeout: float) -> None:
        self.slots = trio.Semaphore(max_connections)
        self.idle: deque[_Connection] = deque()  # oldest first
        self.open: set[_Connection] = set()
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout

    def take_idle(self, now: float) -> _Connection | None:
        if self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since < self._idle_timeout:
                return conn
            # The newest has expired, so every older one has too.
            self.idle.append(conn)
            while self.idle:
                self.discard(self.idle.pop())
        return None

    def put_idle(self, conn: _Connection, now: float) -> None:
        conn.idle_since = now
        self.idle.append(conn)
        while self.idle and (
            len(self.idle) > self._max_idle or now - self.idle[0].idle_since >= self._idle_timeout
        ):
            self.discard(self.idle.popleft())

    def discard(self, conn: _Connection) -> None:
        conn.close()
        self.open.discard(conn)

    def close_all(self) -> None:
        for conn in list(self.open):
            self.discard(conn)
        self.idle.clear()


class _Stale(Exception):
    """A reused connection failed before any response byte: the server had closed it."""


class HttpClient:
    """Keep-alive HTTP/1.1 requests to any number of origins, each with its own pool.

    ``timeout`` bounds a whole request (waiting for a pool slot, connecting, sending,
    reading); ``connect_timeout`` bounds opening a connection (TCP and TLS) within it.
    ``timeout=None`` leaves the bound to the caller's own cancel scope (the dispatcher has
    one around every send): a second scope per request costs a fifth of the throughput of
    one-event-per-request delivery, as trio registers and unregisters each deadline.
    ``idle_timeout`` is below Node's 5 s default, the shortest common server keep-alive,
    so we usually drop a connection before the server does."""

    def __init__(
        self,
        *,
        timeout: float | None = 10.0,
        connect_timeout: float | None = None,
        max_connections: int = 256,
        max_idle: int = 64,
        idle_timeout: float = 4.0,
        max_body: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout or timeout or math.inf
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._max_body = max_body
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._urls: dict[str, Url] = {}
        self._closed = False
        self._opened = 0
        self._reused = 0
        self._stale = 0

    async def post(
        self, url: str | Url, body: bytes, headers: Mapping[str, str] | None = None
    ) -> Response:
        return await self.request("POST", url, body, headers)

    async def request(
        self, method: str, url: str | Url, body: bytes, headers: Mapping[str, str] | None = None
    ) -> Response:
        if self._closed:
            raise trio.ClosedResourceError("the HTTP client is closed")
        if isinstance(url, str):
            url = self._parse(url)
        data = encode_request(method, url, headers or {}, body)
        pool = self._pools.get(url.origin)
        if pool is None:
            pool = _Pool(self._max_connections, self._max_idle, self._idle_timeout)
            self._pools[url.origin] = pool
        if self._timeout is None:
            return await self._exchange_in_slot(pool, url, data)
        with trio.move_on_after(self._timeout):
            return await self._exchange_in_slot(pool, url, data)
        raise RequestTimeout(f"no response from {_where(url)} within {self._timeout:g}s")

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connections_opened=self._opened,
            requests_on_reused_connections=self._reused,
            stale_retries=self._stale,
            idle_connections=sum(len(p.idle) for p in self._pools.values()),
            open_connections=sum(len(p.open) for p in self._pools.values()),
        )

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close_all()

    def _parse(self, text: str) -> Url:
        url = self._urls.get(text)
        if url is None:
            url = parse_url(text)
            if len(self._urls) < 1024:  # a destination has one URL; don't grow unbounded
                self._urls[text] = url
        return url

    async def _exchange_in_slot(self, pool: _Pool, url: Url, data: bytes) -> Response:
        # Take a slot without a trip through the scheduler when one is free: the exchange
        # yields anyway, and that trip cost a quarter of one-event-per-request delivery.
        try:
            pool.slots.acquire_nowait()
        except trio.WouldBlock:
            await pool.slots.acquire()
        try:
            return await self._exchange(pool, url, data)
        finally:
            pool.slots.release()

    async def _exchange(self, pool: _Pool, url: Url, data: bytes) -> Response:
        conn = pool.take_idle(trio.current_time())
        if conn is not None:
            self._reused += 1
            try:
                return await self._roundtrip(pool, conn, data)
            except _Stale as exc:
                # Safe to send again: no response byte came back, the usual cause is a server
                # that closed the idle connection just before our request reached it. In the
                # rare case that it did get and process the request and then died, the resend
                # is a duplicate, which at-least-once delivery allows: receivers dedupe by
                # webhook-id / messageId, which stay the same on every try.
                self._stale += 1
                log.debug("stale keep-alive connection where=%s error=%s", _where(url), exc)
        conn = await self._connect(pool, url)
        return await self._roundtrip(pool, conn, data)

    async def _connect(self, pool: _Pool, url: Url) -> _Connection:
        if self._closed:  # aclose() broke our pooled connection; don't open another
            raise trio.ClosedResourceError("the HTTP client is closed")
        try:
            with trio.fail_after(self._connect_timeout):
                conn = await self._open(url)
        except trio.TooSlowError as exc:
            limit = f"{self._connect_timeout:g}s"
            raise RequestTimeout(f"connecting to {_where(url)} took over {limit}") from exc
        pool.open.add(conn)
        self._opened += 1
        return conn

    async def _open(self, url: Url) -> _Connection:
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {_where(url)}: {exc}") from exc
        if url.scheme == "http":
            return _Connection(stream.socket, None)
        tls = trio.SSLStream(
            stream, self._tls_context(), server_hostname=url.host, https_compatible=True
        )
        shaken = False
        try:
            await tls.do_handshake()
            shaken = True
        except trio.BrokenResourceError as exc:
            reason = exc.__cause__ or exc  # the ssl error: certificate, hostname, protocol
            raise ConnectError(f"TLS handshake with {_where(url)} failed: {reason}") from exc
        finally:
            if not shaken:
                stream.socket.close()
        return _Connection(stream.socket, tls)

    def _tls_context(self) -> ssl.SSLContext:
        # Built on first use: loading the system CA store takes milliseconds.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _roundtrip(self, pool: _Pool, conn: _Connection, data: bytes) -> Response:
        reused = conn.requests > 0
        conn.requests += 1
        reader = _ResponseReader(self._max_body)
        try:
            send_error = await _send(conn, data)
            await _read(conn, reader, reused, send_error)
        except BaseException:
            # Mid-exchange (error, timeout, cancellation) the stream is out of step: drop it.
            pool.discard(conn)
            raise
        if reader.keep_alive and send_error is None and not self._closed:
            pool.put_idle(conn, trio.current_time())
        else:
            pool.discard(conn)
        return reader.response()


async def _send(conn: _Connection, data: bytes) -> BaseException | None:
    """The error if sending failed: the server may have answered early (a 413, say) and
    closed, so the caller still reads, to report that answer rather than a broken pipe."""
    try:
        await conn.send_all(data)
    except _BROKEN as exc:
        return exc
    return None


async def _read(
    conn: _Connection, reader: _ResponseReader, reused: bool, send_error: BaseException | None
) -> None:
    while True:
        try:
            chunk = await conn.receive()
        except _BROKEN as exc:
            raise _lost(reader, reused, exc) from exc
        if not chunk:
            if reader.feed_eof():
                return
            raise _lost(reader, reused, send_error)
        if reader.feed(chunk):
            return


def _lost(reader: _ResponseReader, reused: bool, cause: BaseException | None) -> Exception:
    if reused and not reader.started:
        return _Stale(repr(cause) if cause else "closed before answering")
    said = f": {cause!r}" if cause else ""
    if reader.started:
        return ConnectionLost(f"the server closed the connection mid-response{said}")
    return ConnectionLost(f"the server closed the connection without answering{said}")


def _where(url: Url) -> str:
    return f"{url.scheme}://{url.host_header}"
