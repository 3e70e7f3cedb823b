"""router.http_client: the pure parts byte by byte, then the pool, timeouts and TLS against
real loopback servers (tiny trio servers that misbehave on cue, and tests.support.Receiver),
then the webhook destination on top of it."""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from router.destinations.base import BuildContext, Delivery
from router.destinations.webhook import WebhookDestination
from router.errors import ConfigError, PermanentDeliveryError, RetryableDeliveryError
from router.http_client import (
    ConnectError,
    ConnectionLost,
    HttpClient,
    ProtocolError,
    RequestTimeout,
    _ResponseReader,
    encode_request,
    parse_url,
)
from tests.support import ReceivedRequest, Receiver

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin", "target", "host_header"),
    [
        ("http://example.com", ("http", "example.com", 80), "/", "example.com"),
        ("HTTPS://Example.COM:443/a?b=1", ("https", "example.com", 443), "/a?b=1", "example.com"),
        ("http://127.0.0.1:8080/hook", ("http", "127.0.0.1", 8080), "/hook", "127.0.0.1:8080"),
        ("http://[::1]:81/x y", ("http", "::1", 81), "/x%20y", "[::1]:81"),
        ("http://h/caf\u00e9?q=%2F", ("http", "h", 80), "/caf%C3%A9?q=%2F", "h"),
    ],
)
def test_parse_url(url: str, origin: tuple[str, str, int], target: str, host_header: str) -> None:
    parsed = parse_url(url)
    assert (parsed.origin, parsed.target, parsed.host_header) == (origin, target, host_header)


@pytest.mark.parametrize("url", ["ftp://h/", "h/path", "http:///nohost", "http://h:99999/"])
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        parse_url(url)


def test_userinfo_becomes_basic_auth_and_stays_out_of_the_repr() -> None:
    url = parse_url("https://user:p%40ss@example.com/")
    assert url.authorization == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert "dXNl" not in repr(url)
    assert b"authorization: Basic dXNlcjpwQHNz\r\n" in encode_request("POST", url, {}, b"")
    mine = encode_request("POST", url, {"Authorization": "Bearer t"}, b"")
    assert b"Basic" not in mine


def test_encode_request_frames_the_body_itself() -> None:
    url = parse_url("http://127.0.0.1:8080/hook?x=1")
    data = encode_request(
        "POST",
        url,
        {"content-type": "application/json", "Content-Length": "999", "connection": "close"},
        b"{}",
    )
    assert data == (
        b"POST /hook?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\ncontent-type: application/json\r\n"
        b"accept-encoding: identity\r\ncontent-length: 2\r\n\r\n{}"
    )
    # A caller's Host wins (virtual hosts behind an IP).
    assert b"\r\nhost: api.example\r\n" in encode_request("POST", url, {"host": "api.example"}, b"")


@pytest.mark.parametrize(
    "headers", [{"x-a": "1\r\nx-injected: 2"}, {"bad name": "v"}, {"x-a": "\u2603"}]
)
def test_encode_request_refuses_headers_that_would_corrupt_the_stream(
    headers: dict[str, str],
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - three different messages
        encode_request("POST", parse_url("http://h/"), headers, b"")


def feed_bytewise(reader: _ResponseReader, data: bytes) -> bool:
    done = False
    for i in range(len(data)):
        done = reader.feed(data[i : i + 1])
    return done


def test_reader_byte_by_byte_skips_1xx_and_decodes_chunks() -> None:
    reader = _ResponseReader(max_body=1000)
    data = (
        b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    assert feed_bytewise(reader, data[:-1]) is False
    assert reader.feed(data[-1:]) is True
    response = reader.response()
    assert response.status == 503
    assert response.headers == {
        "retry-after": "7",
        "x-a": "1, 2",
        "transfer-encoding": "chunked",
    }
    assert response.body == b"hello world"
    assert reader.keep_alive


def test_reader_caps_the_body_but_reads_to_its_end() -> None:
    reader = _ResponseReader(max_body=10)
    assert reader.feed(b"HTTP/1.1 400 Bad\r\ncontent-length: 5000\r\n\r\n" + b"x" * 4999) is False
    assert reader.feed(b"y") is True
    assert reader.response().body == b"x" * 10
    assert reader.keep_alive


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    ],
)
def test_reader_keep_alive(head: bytes, keep_alive: bool) -> None:
    reader = _ResponseReader(max_body=10)
    assert reader.feed(head) is True
    assert reader.keep_alive is keep_alive


def test_reader_body_delimited_by_close() -> None:
    reader = _ResponseReader(max_body=100)
    assert reader.feed(b"HTTP/1.1 200 OK\r\n\r\npartial") is False
    assert reader.feed(b" body") is False
    assert reader.feed_eof() is True
    assert reader.response().body == b"partial body"
    assert not reader.keep_alive


def test_reader_refuses_garbage_and_a_truncated_body() -> None:
    with pytest.raises(ProtocolError):
        _ResponseReader(max_body=10).feed(b"SSH-2.0-OpenSSH_9.2\r\n")
    reader = _ResponseReader(max_body=10)
    reader.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    assert reader.feed_eof() is False


# -- loopback servers -------------------------------------------------------------------


class Peer:
    """The server's side of one connection: reads requests, counts them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def request(self) -> bytes | None:
        """The next request's body, or None when the client closed."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return None
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        length = int(match.group(1)) if match else 0
        self.buffer = rest
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)


@dataclass
class Server:
    port: int = 0
    accepted: int = 0
    requests: int = 0
    open: int = 0
    max_open: int = 0


Handler = Callable[[Peer, Server], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server()

    async def on_connection(stream: trio.SocketStream) -> None:
        server.accepted += 1
        server.open += 1
        server.max_open = max(server.max_open, server.open)
        wrapped: trio.abc.Stream = stream
        try:
            if tls is not None:
                wrapped = trio.SSLStream(stream, tls, server_side=True)
            await handler(Peer(wrapped), server)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away, or refused our certificate
        finally:
            server.open -= 1
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, on_connection, listeners)
        yield server
        nursery.cancel_scope.cancel()


async def answer_all(peer: Peer, server: Server) -> None:
    while await peer.request() is not None:
        server.requests += 1
        await peer.stream.send_all(OK)


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(timeout=5.0)
    yield http
    await http.aclose()


def url(server: Server, scheme: str = "http", host: str = "127.0.0.1") -> str:
    return f"{scheme}://{host}:{server.port}/hook"


# -- the client against real servers ----------------------------------------------------


async def test_many_requests_share_one_keep_alive_connection(client: HttpClient) -> None:
    async with serving(answer_all) as server:
        for i in range(50):
            response = await client.post(url(server), b'{"n":%d}' % i, {"x-n": str(i)})
            assert (response.status, response.body) == (200, b"ok")
    assert (server.accepted, server.requests) == (1, 50)
    stats = client.statistics()
    assert (stats.connections_opened, stats.requests_on_reused_connections) == (1, 49)


async def test_what_a_real_server_receives(client: HttpClient, receiver: Receiver) -> None:
    body = b'{"type":"track","messageId":"m1"}'
    for _ in range(3):
        response = await client.post(receiver.url, body, {"x-custom": "yes"})
        assert response.status == 200
    request = receiver.requests[0]
    assert request.path == "/hook"
    assert request.body == body
    assert request.headers["x-custom"] == "yes"
    assert request.headers["content-length"] == str(len(body))
    assert request.headers["host"] == receiver.url.split("/")[2]
    assert client.statistics().connections_opened == 1


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_pooled_connection_the_server_dropped_is_retried_once_fresh(
    client: HttpClient, how: str
) -> None:
    dropped = trio.Event()

    async def one_then_drop(peer: Peer, server: Server) -> None:
        # Answers as keep-alive, then drops the connection as an idle timeout would.
        if await peer.request() is not None:
            server.requests += 1
            await peer.stream.send_all(OK)
            if how == "reset":
                assert isinstance(peer.stream, trio.SocketStream)
                linger = struct.pack("ii", 1, 0)  # close with RST instead of FIN
                peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await peer.stream.aclose()
            dropped.set()

    async with serving(one_then_drop) as server:
        assert (await client.post(url(server), b"1")).status == 200
        await dropped.wait()
        await trio.sleep(0.05)  # let the FIN/RST reach our socket
        assert (await client.post(url(server), b"2")).status == 200
    # The dead connection never delivered request 2, so the server saw it exactly once.
    assert (server.accepted, server.requests) == (2, 2)
    assert client.statistics().stale_retries == 1


async def test_a_fresh_connection_that_fails_is_not_retried(client: HttpClient) -> None:
    async def hang_up(peer: Peer, server: Server) -> None:
        await peer.request()
        server.requests += 1

    async with serving(hang_up) as server:
        with pytest.raises(ConnectionLost, match="without answering"):
            await client.post(url(server), b"x")
    assert (server.accepted, server.requests) == (1, 1)


async def test_a_response_cut_short_is_an_error_and_not_retried(client: HttpClient) -> None:
    async def half(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            server.requests += 1
            if server.requests == 1:
                await peer.stream.send_all(OK)
            else:
                await peer.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                return

    async with serving(half) as server:
        await client.post(url(server), b"1")
        with pytest.raises(ConnectionLost, match="mid-response"):
            await client.post(url(server), b"2")
    assert server.requests == 2


async def test_chunked_response_in_pieces(client: HttpClient) -> None:
    async def chunked(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            server.requests += 1
            await peer.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.stream.send_all(
                b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nX-Id: 7\r\n\r\n4\r\nab"
            )
            await trio.sleep(0.01)
            await peer.stream.send_all(b"cd\r\n3\r\nefg\r\n0\r\n\r\n")

    async with serving(chunked) as server:
        for _ in range(2):
            response = await client.post(url(server), b"{}")
            assert (response.status, response.body) == (202, b"abcdefg")
            assert response.headers["x-id"] == "7"
    assert server.accepted == 1


async def test_large_response_body_is_capped_and_the_connection_reused() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB

    async def large(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            server.requests += 1
            await peer.stream.send_all(
                b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n" % len(big) + big
            )

    http = HttpClient(timeout=5.0, max_body=3000)
    try:
        async with serving(large) as server:
            for _ in range(3):
                response = await http.post(url(server), b"{}")
                assert (response.status, response.body) == (500, big[:3000])
    finally:
        await http.aclose()
    assert (server.accepted, server.requests) == (1, 3)


async def test_connect_refused(client: HttpClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConnectError, match=f"cannot connect to http://127.0.0.1:{port}"):
            await client.post(f"http://127.0.0.1:{port}/", b"x")


async def test_a_server_that_never_answers_times_out() -> None:
    async def silent(peer: Peer, server: Server) -> None:
        await peer.request()
        server.requests += 1
        await trio.sleep_forever()

    http = HttpClient(timeout=0.3)
    try:
        async with serving(silent) as server:
            started = trio.current_time()
            with pytest.raises(RequestTimeout, match=r"within 0.3s"):
                await http.post(url(server), b"x")
            assert 0.25 < trio.current_time() - started < 2.0
            assert http.statistics().open_connections == 0  # dropped, not pooled
    finally:
        await http.aclose()


async def test_a_tls_handshake_that_never_finishes_is_a_connect_timeout() -> None:
    async def plain_and_silent(peer: Peer, server: Server) -> None:
        await trio.sleep_forever()

    http = HttpClient(timeout=5.0, connect_timeout=0.2)
    try:
        async with serving(plain_and_silent) as server:
            with pytest.raises(RequestTimeout, match="connecting to https://"):
                await http.post(url(server, "https"), b"x")
    finally:
        await http.aclose()


async def test_connection_close_is_honoured(client: HttpClient) -> None:
    async def close_each(peer: Peer, server: Server) -> None:
        if await peer.request() is not None:
            server.requests += 1
            # No content-length: the body ends where the connection does.
            await peer.stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbye")

    async with serving(close_each) as server:
        for _ in range(3):
            response = await client.post(url(server), b"x")
            assert (response.status, response.body) == (200, b"bye")
            assert client.statistics().open_connections == 0
    stats = client.statistics()
    assert (server.accepted, stats.connections_opened, stats.stale_retries) == (3, 3, 0)


async def test_idle_connections_expire() -> None:
    http = HttpClient(timeout=5.0, idle_timeout=0.1)
    try:
        async with serving(answer_all) as server:
            await http.post(url(server), b"1")
            await trio.sleep(0.15)
            await http.post(url(server), b"2")
    finally:
        await http.aclose()
    assert server.accepted == 2
    assert http.statistics().stale_retries == 0  # dropped unused, not tried and failed


async def test_concurrent_requests_are_bounded_by_the_pool() -> None:
    async def slow(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            server.requests += 1
            await trio.sleep(0.05)
            await peer.stream.send_all(OK)

    http = HttpClient(timeout=5.0, max_connections=3)
    statuses: list[int] = []

    async def post(target: str) -> None:
        statuses.append((await http.post(target, b"x")).status)

    try:
        async with serving(slow) as server:
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(post, url(server))
            assert http.statistics().idle_connections == 3
    finally:
        await http.aclose()
    assert statuses == [200] * 12
    assert (server.max_open, server.accepted, server.requests) == (3, 3, 12)


async def test_aclose_closes_pooled_connections() -> None:
    closed = trio.Event()

    async def until_eof(peer: Peer, server: Server) -> None:
        await answer_all(peer, server)
        closed.set()

    http = HttpClient(timeout=5.0)
    async with serving(until_eof) as server:
        await http.post(url(server), b"x")
        await http.aclose()
        with trio.fail_after(2):
            await closed.wait()  # the server read EOF: the socket really closed
        with pytest.raises(trio.ClosedResourceError):
            await http.post(url(server), b"x")


# -- https ------------------------------------------------------------------------------


@dataclass
class Certificate:
    pem: bytes
    cert_file: Path
    key_file: Path


def make_certificate(directory: Path, *names: str) -> Certificate:
    """A self-signed certificate (its own CA) for DNS names and IP addresses."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    # Distinct subjects: OpenSSL finds an issuer by its name.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"router test {names[0]}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(pem, cert_file, key_file)


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Certificate, Certificate]:
    """One for localhost and 127.0.0.1, one for a name we never connect to."""
    pytest.importorskip(
        "cryptography", reason="the https test makes its certificates with 'cryptography'"
    )
    return (
        make_certificate(tmp_path / "right", "localhost", "127.0.0.1"),
        make_certificate(tmp_path / "wrong", "elsewhere.test"),
    )


def server_tls(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert_file, certificate.key_file)
    return context


async def test_https_with_hostname_checking(
    certificates: tuple[Certificate, Certificate],
) -> None:
    right, wrong = certificates
    trusting = ssl.create_default_context(cadata=right.pem.decode() + wrong.pem.decode())
    http = HttpClient(timeout=5.0, ssl_context=trusting)
    default = HttpClient(timeout=5.0)  # the system's CAs, which never signed ours
    try:
        async with serving(answer_all, tls=server_tls(right)) as server:
            for host in ("localhost", "127.0.0.1", "localhost"):
                response = await http.post(url(server, "https", host), b"{}")
                assert (response.status, response.body) == (200, b"ok")
            # localhost and 127.0.0.1 are different origins: a connection each, then reuse.
            assert (http.statistics().connections_opened, server.requests) == (2, 3)
            with pytest.raises(ConnectError, match="certificate verify failed"):
                await default.post(url(server, "https", "localhost"), b"{}")
        # A trusted certificate, but for another name: refused all the same.
        async with serving(answer_all, tls=server_tls(wrong)) as server:
            with pytest.raises(ConnectError, match=r"Hostname mismatch|IP address mismatch"):
                await http.post(url(server, "https"), b"{}")
            assert server.requests == 0
    finally:
        await http.aclose()
        await default.aclose()


# -- the webhook destination on top -----------------------------------------------------


def webhook(tmp_path: Path, timeout: float = 5.0, **options: object) -> WebhookDestination:
    context = BuildContext(
        name="hook",
        type="webhook",
        options=dict(options),
        data_dir=tmp_path,
        timeout=timeout,
        batch_size=1,
    )
    return WebhookDestination(context)


def delivery(message_id: str = "m-1") -> Delivery:
    body = b'{"type":"track","messageId":"%s"}' % message_id.encode()
    return Delivery(1, "web", message_id, 0.0, body, 1)


async def test_webhook_signs_and_sends(tmp_path: Path, receiver: Receiver) -> None:
    hook = webhook(tmp_path, url=receiver.url, secret="s3cret", headers={"X-Team": "data"})
    try:
        assert await hook.send([delivery("m-1")]) is None
        assert await hook.send([delivery("m-2")]) is None
    finally:
        await hook.aclose()
    first = receiver.requests[0]
    assert first.body == delivery("m-1").body
    assert first.headers["webhook-id"] == "m-1"
    assert first.headers["x-team"] == "data"
    assert first.headers["content-type"] == "application/json"
    expected = hmac.new(b"s3cret", first.body, hashlib.sha1).hexdigest()
    assert first.headers["x-signature"] == expected
    assert receiver.delivered_ids() == ["m-1", "m-2"]


async def test_webhook_classifies_answers(tmp_path: Path, receiver: Receiver) -> None:
    answers = [
        (503, {"retry-after": "7"}, b"busy"),
        (400, {}, b"e" * 2000),
    ]

    def policy(_request: ReceivedRequest, index: int) -> tuple[int, dict[str, str], bytes]:
        return answers[index]

    receiver.policy = policy
    hook = webhook(tmp_path, url=receiver.url)
    try:
        with pytest.raises(RetryableDeliveryError) as retry:
            await hook.send([delivery()])
        assert (retry.value.status, retry.value.retry_after, retry.value.detail) == (
            503,
            7.0,
            "busy",
        )
        with pytest.raises(PermanentDeliveryError) as final:
            await hook.send([delivery()])
        assert (final.value.status, final.value.detail) == (400, "e" * 512)
    finally:
        await hook.aclose()


async def test_webhook_maps_transport_failures_to_retryable(tmp_path: Path) -> None:
    async def silent(peer: Peer, server: Server) -> None:
        await trio.sleep_forever()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = webhook(tmp_path, url=f"http://127.0.0.1:{sock.getsockname()[1]}/")
        with pytest.raises(RetryableDeliveryError, match="connection failed"):
            await refused.send([delivery()])
        await refused.aclose()
    # A server that never answers: the dispatcher's cancel scope bounds every send (the
    # webhook keeps no second one), so send must give way to it at once.
    async with serving(silent) as server:
        hung = webhook(tmp_path, timeout=0.2, url=url(server))
        with trio.move_on_after(0.2) as bound:
            await hung.send([delivery()])
        assert bound.cancelled_caught
        await hung.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://example.com/"}, "destinations.hook.url: not an http(s) URL"),
        (
            {"url": "http://h/", "headers": {"x-a": "1\r\nx-b: 2"}},
            "destinations.hook.headers.x-a: header 'x-a' contains a line break",
        ),
    ],
)
def test_webhook_refuses_bad_config(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        webhook(tmp_path, **options)
