"""The HTTP/1.1 ingress server, over real loopback sockets with raw clients (and httpx once)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from router.errors import IngestError
from router.ingress.http import (
    HttpLimits,
    HttpServer,
    Request,
    Response,
    _Protocol,
    serve_http,
)

Start = Callable[..., Awaitable[int]]
Connect = Callable[..., Awaitable["Client"]]


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("kaboom")
    if request.path == "/refuse":
        raise IngestError(429, "rate_limited", "slow down", retry_after=2.5)
    if request.path == "/slow":
        await trio.sleep(0.05)
    fields = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body.decode(),
    }
    return Response(200, json.dumps(fields).encode(), [("X-Served-By", "test")])


@pytest.fixture
async def start(nursery: trio.Nursery, connect: Connect) -> Start:
    async def start(handler: Any = echo, host: str = "127.0.0.1", **limits: Any) -> int:
        serve = partial(serve_http, host, 0, handler, limits=HttpLimits(**limits))
        port: int = await nursery.start(serve)
        return port

    return start


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    clients: list[Client] = []

    async def connect(port: int, host: str = "127.0.0.1") -> Client:
        clients.append(Client(await trio.open_tcp_stream(host, port)))
        return clients[-1]

    yield connect
    for client in clients:
        await client.stream.aclose()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw HTTP/1.1 client: writes exactly the bytes a test gives it, parses replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        with trio.fail_after(5):
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the server
                chunk = b""
        self.buf += chunk
        return bool(chunk)

    async def reply(self, *, head: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            assert await self._fill(), f"closed before a full reply: {self.buf!r}"
        top, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = top.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            assert await self._fill(), "closed mid-body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    async def request(self, data: bytes) -> Reply:
        await self.send(data)
        return await self.reply()

    async def closed(self) -> bool:
        """True when the server closes the connection without sending anything more."""
        while await self._fill():
            pass
        return self.buf == b""


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


CHUNKED = (
    b"POST /v1/track HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
)


async def test_get_echoes_method_path_query_and_headers(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    reply = await client.request(get("/health?verbose=1&x=2", "X-Twice: a\r\nX-Twice: b\r\n"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-served-by"] == "test"
    assert "date" in reply.headers
    seen = reply.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/health", "verbose=1&x=2")
    assert seen["headers"]["x-twice"] == "a, b"
    assert seen["headers"]["host"] == "test"


async def test_post_body_reaches_the_handler(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    reply = await client.request(post("/v1/track", b'{"event":"x"}'))
    assert reply.json()["body"] == '{"event":"x"}'


async def test_keep_alive_serves_three_requests_on_one_connection(
    start: Start, connect: Connect
) -> None:
    client = await connect(await start())
    for i in range(3):
        reply = await client.request(post(f"/r{i}", b"x" * i))
        assert (reply.status, reply.json()["path"]) == (200, f"/r{i}")
        assert "connection" not in reply.headers


async def test_pipelined_requests_are_answered_in_order(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    await client.send(get("/slow") + post("/second", b"2") + get("/third"))
    paths = [(await client.reply()).json()["path"] for _ in range(3)]
    assert paths == ["/slow", "/second", "/third"]


async def test_chunked_body_is_reassembled(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    assert (await client.request(CHUNKED)).json()["body"] == "hello, world"


async def test_request_sent_one_byte_at_a_time(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    for byte in CHUNKED + get("/after"):
        await client.send(bytes([byte]))
        await trio.sleep(0.001)  # let each byte arrive in its own segment
    assert (await client.reply()).json()["body"] == "hello, world"
    assert (await client.reply()).json()["path"] == "/after"


def test_protocol_parses_the_same_fed_one_byte_at_a_time() -> None:
    data = CHUNKED + post("/p?q=1", b"abc") + get("http://test/absolute?z")
    whole = _Protocol(HttpLimits(), None)
    whole.feed(data, 0.0)
    bytewise = _Protocol(HttpLimits(), None)
    for i in range(len(data)):
        bytewise.feed(data[i : i + 1], 0.0)
    assert bytewise.error is None
    assert bytewise.take_ready() == whole.take_ready()
    assert [r.path for r, *_ in _parse(data)] == ["/v1/track", "/p", "/absolute"]


def _parse(data: bytes) -> list[Any]:
    proto = _Protocol(HttpLimits(), None)
    proto.feed(data, 0.0)
    return proto.take_ready()


async def test_big_content_length_gets_413_before_the_body_is_sent(
    start: Start, connect: Connect
) -> None:
    client = await connect(await start(max_body_bytes=1000))
    await client.send(b"POST /v1/batch HTTP/1.1\r\nHost: t\r\nContent-Length: 1000001\r\n\r\n")
    reply = await client.reply()
    assert reply.status == 413
    assert reply.json()["code"] == "body_too_large"
    assert await client.closed()


async def test_chunked_body_over_the_limit_gets_413(start: Start, connect: Connect) -> None:
    client = await connect(await start(max_body_bytes=100))
    chunk = b"50\r\n" + b"x" * 80 + b"\r\n"
    await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    await client.send(chunk)
    assert (await client.reply()).status == 413
    assert await client.closed()


async def test_huge_headers_get_431(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    reply = await client.request(get("/", f"X-Big: {'a' * 20000}\r\n"))
    assert (reply.status, reply.json()["code"]) == (431, "headers_too_large")
    assert await client.closed()


async def test_an_endless_header_line_gets_431(start: Start, connect: Connect) -> None:
    client = await connect(await start(max_header_bytes=1000))
    await client.send(b"GET / HTTP/1.1\r\nX-Endless: " + b"a" * 200_000)
    assert (await client.reply()).status == 431


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 nonsense\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
async def test_malformed_request_gets_400_and_close(
    start: Start, connect: Connect, garbage: bytes
) -> None:
    client = await connect(await start())
    reply = await client.request(garbage)
    assert (reply.status, reply.json()["code"]) == (400, "bad_request")
    assert await client.closed()


async def test_slowloris_headers_time_out_with_408(start: Start, connect: Connect) -> None:
    client = await connect(await start(header_timeout=0.2))
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
    assert (await client.reply()).status == 408
    assert await client.closed()


async def test_silent_connection_is_closed_after_the_header_timeout(
    start: Start, connect: Connect
) -> None:
    client = await connect(await start(header_timeout=0.2))
    assert await client.closed()


async def test_slow_body_times_out_with_408(start: Start, connect: Connect) -> None:
    client = await connect(await start(body_timeout=0.2))
    await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    assert (await client.reply()).status == 408


async def test_idle_keep_alive_connection_is_closed(start: Start, connect: Connect) -> None:
    client = await connect(await start(keepalive_timeout=0.2))
    assert (await client.request(get())).status == 200
    assert await client.closed()


async def test_connections_over_the_cap_get_503_with_retry_after(
    start: Start, connect: Connect
) -> None:
    port = await start(max_connections=1)
    first = await connect(port)
    assert (await first.request(get())).status == 200
    second = await connect(port)
    reply = await second.request(get())
    assert (reply.status, reply.headers["retry-after"]) == (503, "1")
    assert await second.closed()
    assert (await first.request(get())).status == 200


async def test_handler_exception_gets_500_logged_once_and_the_connection_survives(
    start: Start, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    client = await connect(await start())
    with caplog.at_level(logging.ERROR, logger="router.ingress.http"):
        reply = await client.request(get("/boom"))
    assert reply.status == 500
    assert reply.json() == {"code": "internal", "message": "internal server error"}
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert (await client.request(get("/next"))).json()["path"] == "/next"


async def test_ingest_error_from_the_handler_becomes_its_status(
    start: Start, connect: Connect
) -> None:
    client = await connect(await start())
    reply = await client.request(get("/refuse"))
    assert (reply.status, reply.headers["retry-after"]) == (429, "3")
    assert reply.json() == {"code": "rate_limited", "message": "slow down"}


async def test_expect_100_continue(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    await client.send(
        b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await client.reply()).status == 100
    reply = await client.request(b"ok")
    assert (reply.status, reply.json()["body"]) == (200, "ok")


async def test_http_1_0_closes_unless_keep_alive_is_asked_for(
    start: Start, connect: Connect
) -> None:
    port = await start()
    keep = await connect(port)
    for _ in range(2):
        reply = await keep.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert reply.headers["connection"] == "keep-alive"
    once = await connect(port)
    assert (await once.request(b"GET / HTTP/1.0\r\n\r\n")).headers["connection"] == "close"
    assert await once.closed()


async def test_head_has_content_length_but_no_body(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    await client.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")
    reply = await client.reply(head=True)
    assert int(reply.headers["content-length"]) > 0
    assert (await client.request(get("/after"))).json()["path"] == "/after"


async def test_upgrade_is_ignored(start: Start, connect: Connect) -> None:
    client = await connect(await start())
    await client.send(get("/u", "Connection: Upgrade\r\nUpgrade: h2c\r\n") + get("/next"))
    assert (await client.reply()).json()["path"] == "/u"
    assert (await client.reply()).json()["path"] == "/next"


async def test_graceful_close_finishes_the_in_flight_request(
    nursery: trio.Nursery, connect: Connect
) -> None:
    entered = trio.Event()

    async def slow(request: Request) -> Response:
        if request.path == "/slow":
            entered.set()
            await trio.sleep(0.3)
        return Response(200, b'{"done": true}')

    server = HttpServer(slow)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    idle, busy = await connect(port), await connect(port)
    assert (await idle.request(get())).status == 200
    await busy.send(get("/slow"))
    await entered.wait()
    server.close()
    assert await idle.closed()
    reply = await busy.reply()
    assert (reply.status, reply.headers["connection"]) == (200, "close")
    assert await busy.closed()
    await busy.stream.aclose()  # the server waits a moment for our side to close, too
    with trio.fail_after(2):
        await server.wait_closed()
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_shutdown_cancels_what_overruns_the_grace_period(
    nursery: trio.Nursery, connect: Connect
) -> None:
    async def forever(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    server = HttpServer(forever)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    client = await connect(port)
    await client.send(get())
    await trio.sleep(0.05)
    with trio.fail_after(2):
        await server.shutdown(grace=0.1)
    assert await client.closed()


async def test_httpx_client(start: Start) -> None:
    port = await start()
    async with httpx.AsyncClient() as client:
        reply = await client.post(f"http://127.0.0.1:{port}/v1/track", json={"event": "x"})
    assert reply.status_code == 200
    assert json.loads(reply.json()["body"]) == {"event": "x"}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_literal_host(start: Start, connect: Connect) -> None:
    port = await start(host="[::1]")
    client = await connect(port, host="::1")
    assert (await client.request(get())).status == 200
