"""Scenario 7 of the reliability suite: bad input against one real daemon.

A corpus of broken bodies, broken HTTP framing and broken compression goes over raw sockets (so
the framing is exactly what we wrote, not what an HTTP client would fix up), then
hypothesis-generated bodies over HTTP and NDJSON streams over the Unix socket. The promise
checked after every input: a 4xx or an error ack, never a 5xx, the daemon still up and ready,
and nothing stored for what was refused (counted through the journal's read-only Inspector).
Valid events inside a mixed batch or stream are stored, exactly those.

Extends ``test_segment_api.py``'s bad-input table rather than repeating it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import itertools
import json
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.errors import IngestError
from router.ingress.segment import decompress, header_write_key
from router.journal import Inspector
from tests.support import Daemon, Receiver

pytestmark = pytest.mark.slow

CONFIG = """
[http]
trusted_proxies = ["127.0.0.1"]

[sources.web]
write_key = "wk_web"

[sources.plain]
write_key = "wk_plain"
raw = true

[sources.sock]
socket = true

[destinations.out]
type = "stdout"

# What was accepted also goes through every FQL function, sampling by an object, privacy and
# transforms on its way to a real receiver: bad input must not hurt delivery either.
[destinations.shaped]
type = "webhook"
url = "{url}"
batch_size = 20
batch_wait = "50ms"
timeout = "5s"

[[destinations.shaped.filters]]
if = "match(context.library.name, 'ch*') or contains(event, 'x') or length(properties.items) > 2"
drop_properties = ["total", "n"]

[[destinations.shaped.filters]]
if = "typeof(properties.total) = 'number' and properties.total > 1e6 or lowercase(userId) = 'x'"
drop = true

[[destinations.shaped.filters]]
if = "snakecase(event) != 'z' and uppercase(name) != 'Z' and titlecase(kebabcase(category)) != 'Z'"
sample = {{ percent = 100, by = "properties" }}

[destinations.shaped.privacy]
hash = ["anonymousId", "*.email", "context.ip"]
drop = ["properties.secret", "traits.*"]
salt = "chaos-salt"

[destinations.shaped.transform]
rename = {{ "properties.total" = "properties.sum" }}
set = {{ "context.seen" = true }}
remove = ["integrations"]

[[routes]]
to = ["out"]

[[routes]]
when = "type in ['track', 'page'] or number(properties.total) >= 0 or bool(traits.x)"
to = ["shaped"]
"""
AUTH = "Basic " + base64.b64encode(b"wk_web:").decode()
MAX_LINE = 4 * 1024 * 1024  # router.ingress.unix.MAX_LINE_BYTES


@dataclass
class Tally:
    """What the scenario sent and what came back, for the summary line."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    closed_silently: int = 0  # the peer hung up mid-request; the server closed without a word
    socket_lines: int = 0
    error_acks: int = 0
    stored_from_refused: int = 0
    crashes: int = 0

    def line(self) -> str:
        fours = sum(n for s, n in self.statuses.items() if 400 <= s < 500)
        fives = sum(n for s, n in self.statuses.items() if s >= 500)
        return (
            f"scenario bad-input: requests={self.requests} 4xx={fours} 5xx={fives} "
            f"crashes={self.crashes} stored_from_refused={self.stored_from_refused} "
            f"2xx={self.statuses[200]} closed_silently={self.closed_silently} "
            f"socket_lines={self.socket_lines} error_acks={self.error_acks}"
        )


class Target:
    """One running daemon, a view of its queue, and the checks every input must pass."""

    def __init__(self, daemon: Daemon, receiver: Receiver) -> None:
        self.daemon = daemon
        self.receiver = receiver
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=10)
        self.inspector = Inspector(daemon.data_dir / "queue.db")
        self.tally = Tally()
        self.seen = self.inspector.event_count()

    def count(self) -> int:
        return self.inspector.event_count()

    def stored_since(self, seq: int) -> list[dict[str, Any]]:
        return [json.loads(row.body) for row in self.inspector.events_after(seq, 100_000)]

    def head(self) -> int:
        rows = self.inspector.events_after(self.seen, 100_000)
        if rows:
            self.seen = rows[-1].seq
        return self.seen

    def alive(self) -> None:
        process = self.daemon.process
        assert process is not None
        if process.poll() is not None:
            self.tally.crashes += 1
            pytest.fail(f"router exited {process.returncode}: {self.daemon.stderr()[-3000:]}")
        assert self.http.get("/ready").status_code == 200

    def answered(self, statuses: list[int | None]) -> None:
        """Count the answers to one input; fail on a 5xx."""
        self.tally.requests += 1
        for status in statuses:
            if status is None:
                self.tally.closed_silently += 1
            else:
                self.tally.statuses[status] += 1
        assert all(s is None or s < 500 for s in statuses), statuses

    def refused(self, before: int) -> None:
        stored = self.count() - before
        self.tally.stored_from_refused += stored
        assert stored == 0, f"{stored} events stored from refused input"

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        sent = {"authorization": AUTH, "content-type": "application/json", **(headers or {})}
        response = self.http.post(path, content=body, headers=sent)
        self.answered([response.status_code])
        return response

    def close(self) -> None:
        self.http.close()
        self.inspector.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    receiver = Receiver()
    config = CONFIG.format(url=receiver.url)
    daemon = Daemon(tmp_path_factory.mktemp("chaos-input"), config).start()
    target = Target(daemon, receiver)
    yield target
    target.close()
    receiver.close()
    assert daemon.stop() == 0, daemon.stderr()[-3000:]
    logs = daemon.stderr()
    assert "Traceback" not in logs, logs[-3000:]
    assert '"level":"error"' not in logs, logs[-3000:]


# -- raw HTTP ----------------------------------------------------------------------


def request(
    path: str,
    body: bytes,
    *,
    headers: tuple[str, ...] = (),
    length: bool = True,
    method: str = "POST",
    close: bool = True,
) -> bytes:
    """A request exactly as written: ``headers`` are raw header lines; ``length`` adds a
    correct Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: router", f"Authorization: {AUTH}"]
    if close:
        lines.append("Connection: close")
    lines += headers
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before reading it all (413)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def statuses(reply: bytes) -> list[int | None]:
    """The status of each response in ``reply``; [None] when the server said nothing."""
    found: list[int | None] = []
    while reply:
        head, sep, rest = reply.partition(b"\r\n\r\n")
        assert sep, f"truncated response: {reply[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ")
        assert version == "HTTP/1.1", status_line
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        size = int(headers.get("content-length", "0"))
        body, reply = rest[:size], rest[size:]
        code = int(status)
        if code >= 400:
            error = json.loads(body)
            assert error["code"], body
            assert error["message"], body
        found.append(code)
    return found or [None]


def valid_track(message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-1",
        "messageId": message_id,
        "properties": {"total": 12.5},
        **extra,
    }


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def chunked(*chunks: bytes, end: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return body + (b"0\r\n\r\n" if end else b"")


GOOD_BATCH = dumps({"batch": [valid_track("framing-good")]})
GOOD_GZIP = gzip.compress(GOOD_BATCH)
TE = ("Transfer-Encoding: chunked",)
REFUSED = frozenset({400})
# The peer hung up before its request was whole: the server closes and says nothing.
CUT_SHORT = frozenset({None, 400, 408})
OK = frozenset({200})


def case(id: str, data: bytes, allowed: frozenset[int | None], stores: int = 0) -> Any:
    return pytest.param(data, allowed, stores, id=id)


def body_case(id: str, path: str, body: bytes, allowed: frozenset[int | None] = REFUSED) -> Any:
    return case(id, request(path, body), allowed)


BODIES = [
    # Truncated JSON at several depths (the table covers one cut).
    *(
        body_case(f"truncated-at-{n}", "/v1/batch", GOOD_BATCH[:n])
        for n in (0, 1, 2, 9, 10, 11, 30, len(GOOD_BATCH) // 2, len(GOOD_BATCH) - 1)
    ),
    body_case("whitespace-only", "/v1/t", b" \r\n\t "),
    body_case("trailing-garbage", "/v1/t", dumps(valid_track("tg")) + b"x"),
    body_case("two-documents", "/v1/t", dumps(valid_track("two")) * 2),
    body_case("utf8-bom", "/v1/t", b"\xef\xbb\xbf" + dumps(valid_track("bom"))),
    body_case("utf16", "/v1/t", json.dumps(valid_track("u16")).encode("utf-16")),
    # Invalid UTF-8 in keys and values, the forms decoders get wrong.
    body_case("utf8-overlong-slash", "/v1/t", b'{"userId": "\xc0\xaf", "event": "E"}'),
    body_case("utf8-encoded-surrogate", "/v1/t", b'{"userId": "\xed\xa0\x80", "event": "E"}'),
    body_case("utf8-past-u10ffff", "/v1/t", b'{"userId": "\xf5\x80\x80\x80", "event": "E"}'),
    body_case("utf8-cut-multibyte", "/v1/t", b'{"userId": "u", "event": "\xe2\x82"}'),
    body_case("utf8-bad-key", "/v1/t", b'{"\xff": 1, "userId": "u", "event": "E"}'),
    body_case("utf8-in-batch-item", "/v1/batch", b'{"batch": [{"userId": "\x80"}]}'),
    # Lone surrogates, as JSON escapes.
    body_case("low-surrogate", "/v1/t", b'{"userId": "\\udc00", "event": "E"}'),
    body_case("high-then-ascii", "/v1/t", b'{"userId": "u", "event": "\\ud800\\u0041"}'),
    body_case("surrogate-in-key", "/v1/t", b'{"\\ud83d": 1, "userId": "u", "event": "E"}'),
    body_case("surrogate-in-batch", "/v1/batch", b'{"batch": [{"event": "\\udfff"}]}'),
    body_case("bad-escape", "/v1/t", b'{"userId": "\\x41", "event": "E"}'),
    body_case("control-char", "/v1/t", b'{"userId": "a\x01b", "event": "E"}'),
    # NaN and Infinity in their spellings.
    *(
        body_case(f"number-{word}", "/v1/t", b'{"userId": "u", "event": "E", "n": %s}' % word)
        for word in (b"Infinity", b"-Infinity", b"nan", b"inf", b"1e400", b"-1e400", b"0x10")
    ),
    body_case(
        "int-of-5000-digits", "/v1/t", b'{"userId": "u", "event": "E", "n": 1%s}' % (b"0" * 5000)
    ),
    # Deep nesting, past the limit in different shapes, and deep enough to hit recursion.
    body_case(
        "deep-arrays",
        "/v1/t",
        b'{"userId": "u", "event": "E", "p": ' + b"[" * 65 + b"]" * 65 + b"}",
    ),
    body_case("deep-in-batch", "/v1/batch", b'{"batch": [' + b"[" * 100 + b"]" * 100 + b"]}"),
    body_case("deep-100k-unclosed", "/v1/batch", b"[" * 100_000),
    body_case("deep-100k", "/v1/batch", b"[" * 100_000 + b"]" * 100_000),
    body_case("deep-objects-50k", "/v1/t", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    # Huge strings: an event over 32 KB is refused; a body over 500 KB is not even read.
    body_case("huge-key", "/v1/t", dumps({**valid_track("hk"), "k" * 40_000: 1}), frozenset({413})),
    body_case(
        "huge-user-id",
        "/v1/t",
        dumps({**valid_track("hu"), "userId": "u" * 40_000}),
        frozenset({413}),
    ),
    body_case(
        "huge-body-string",
        "/v1/batch",
        dumps({"batch": [], "pad": "x" * 600_000}),
        frozenset({413}),
    ),
    # Envelope and item types.
    body_case("batch-null", "/v1/batch", b'{"batch": null}'),
    body_case("batch-string", "/v1/batch", b'{"batch": "[]"}'),
    body_case("batch-number", "/v1/batch", b'{"batch": 5}'),
    body_case("top-level-null", "/v1/batch", b"null"),
    body_case("top-level-number-single", "/v1/t", b"12"),
    body_case("top-level-true-single", "/v1/t", b"true"),
    # Lenient, not refused: a single-event path takes a batch envelope (its items typed as the
    # path says). Recorded here so a change to it is a decision, not an accident.
    case("single-is-a-batch", request("/v1/t", dumps({"batch": [valid_track("sb")]})), OK, 1),
    body_case("duplicate-keys-last-bad", "/v1/t", b'{"userId": "u", "event": "E", "event": 5}'),
    body_case(
        "duplicate-type-last-bad",
        "/v1/batch",
        b'{"batch": [{"type": "track", "type": 1, "userId": "u", "event": "E"}], "batch": 3}',
    ),
]


def framed(
    id: str,
    body: bytes,
    *headers: str,
    allowed: frozenset[int | None] = REFUSED,
    stores: int = 0,
) -> Any:
    """A /v1/batch request whose framing headers are exactly ``headers``."""
    return case(id, request("/v1/batch", body, headers=headers, length=False), allowed, stores)


def encoded(
    id: str, body: bytes, encoding: str, allowed: frozenset[int | None] = REFUSED, stores: int = 0
) -> Any:
    """A /v1/batch request with a correct length and ``Content-Encoding: encoding``."""
    headers = (f"Content-Encoding: {encoding}",) if encoding else ()
    return case(id, request("/v1/batch", body, headers=headers), allowed, stores)


N = len(GOOD_BATCH)
CL = "Content-Length"
FRAMING = [
    framed("content-length-shorter", GOOD_BATCH, f"{CL}: 10"),
    framed("content-length-longer-then-eof", GOOD_BATCH, f"{CL}: {N + 50}", allowed=CUT_SHORT),
    framed("content-length-negative", GOOD_BATCH, f"{CL}: -1"),
    framed("content-length-word", GOOD_BATCH, f"{CL}: ten"),
    framed("content-length-hex", GOOD_BATCH, f"{CL}: 0x20"),
    framed("content-length-plus", GOOD_BATCH, f"{CL}: +{N}"),
    framed("content-length-float", GOOD_BATCH, f"{CL}: {N}.0"),
    framed("content-length-empty", GOOD_BATCH, f"{CL}: "),
    framed("content-length-huge", GOOD_BATCH, f"{CL}: {10**23}", allowed=frozenset({400, 413})),
    framed("content-length-over-limit", b"", f"{CL}: 600000", allowed=frozenset({413})),
    framed("content-length-twice-differing", GOOD_BATCH, f"{CL}: {N}", f"{CL}: 3"),
    framed("content-length-list", GOOD_BATCH, f"{CL}: {N}, {N}"),
    framed("content-length-and-chunked", chunked(GOOD_BATCH), *TE, f"{CL}: {N}"),
    framed("post-without-length-then-eof", GOOD_BATCH, allowed=frozenset({None, 400})),
    framed("chunked-without-end-then-eof", chunked(GOOD_BATCH, end=False), *TE, allowed=CUT_SHORT),
    framed("chunked-cut-mid-chunk", chunked(GOOD_BATCH)[:20], *TE, allowed=CUT_SHORT),
    framed("chunk-size-word", b"zz\r\n" + GOOD_BATCH + b"\r\n0\r\n\r\n", *TE),
    framed("chunk-size-negative", b"-5\r\nhello\r\n0\r\n\r\n", *TE),
    framed("chunk-size-huge", b"f" * 20 + b"\r\nx\r\n", *TE, allowed=frozenset({400, 413})),
    # A declared size is not a body: the peer hangs up long before it is reached.
    framed("chunk-size-over-limit", b"100000\r\n" + b"x" * 1000, *TE, allowed=CUT_SHORT),
    framed("chunk-longer-than-size", b"2\r\n" + GOOD_BATCH + b"\r\n0\r\n\r\n", *TE),
    framed("chunk-without-crlf", b"%x" % N + GOOD_BATCH + b"0\r\n\r\n", *TE),
    framed("chunks-over-limit", chunked(*[b" " * 60_000] * 10), *TE, allowed=frozenset({413})),
    framed(
        "transfer-encoding-unknown",
        GOOD_BATCH,
        "Transfer-Encoding: bogus",
        allowed=frozenset({400, 501}),
    ),
    framed(
        "transfer-encoding-chunked-not-last",
        chunked(GOOD_BATCH),
        "Transfer-Encoding: chunked, gzip",
    ),
    framed("header-without-colon", GOOD_BATCH, "Garbage", f"{CL}: {N}"),
    framed("header-with-nul", GOOD_BATCH, "X-A: b\x00c", f"{CL}: {N}"),
    framed(
        "header-obs-fold",
        GOOD_BATCH,
        "X-A: b",
        " folded",
        f"{CL}: {N}",
        allowed=frozenset({400, 200}),
        stores=1,
    ),
    framed(
        "headers-too-large",
        GOOD_BATCH,
        *(f"X-{i}: {'v' * 100}" for i in range(200)),
        allowed=frozenset({431}),
    ),
    case(
        "tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, REFUSED
    ),
    case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", frozenset({400, 404, 405, 505})),
    case("http-version-9", b"POST /v1/batch HTTP/9.9\r\n\r\n", frozenset({400, 505})),
    case("lf-only-line-endings", request("/v1/batch", b"").replace(b"\r\n", b"\n") + b"{", REFUSED),
    case("target-asterisk", request("*", GOOD_BATCH), frozenset({400, 404})),
    case("target-dot-segments", request("/v1/t/../batch", GOOD_BATCH), frozenset({404})),
    case("target-percent-encoded", request("/v1/%62atch", GOOD_BATCH), frozenset({404})),
    case("method-unknown", request("/v1/batch", GOOD_BATCH, method="BREW"), frozenset({400, 405})),
    framed("expect-unknown", GOOD_BATCH, "Expect: 200-ok", f"{CL}: {N}", allowed=frozenset({417})),
    framed(
        "form-body", b"batch=%5B%5D", "Content-Type: application/x-www-form-urlencoded", f"{CL}: 12"
    ),
    # Not refused, as Segment answers: an unreadable write key is no key, so 200 and nothing kept.
    case(
        "authorization-garbage",
        request("/v1/batch", GOOD_BATCH).replace(AUTH.encode(), b"Basic \xff\xfe!!=="),
        OK,
    ),
    framed(
        "upgrade-with-body", GOOD_BATCH, "Connection: Upgrade", "Upgrade: websocket", f"{CL}: {N}"
    ),
    case(
        "upgrade-then-garbage",
        b"GET /ready HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"\x00\x01garbage\r\n\r\n",
        frozenset({200, 400}),
    ),
    framed(
        "expect-continue-then-eof",
        b"",
        "Expect: 100-continue",
        f"{CL}: {N}",
        allowed=frozenset({100, None, 400, 408}),
    ),
    case("get-with-body", request("/v1/batch", GOOD_BATCH, method="GET"), frozenset({405})),
    case("delete-with-body", request("/v1/t", GOOD_BATCH, method="DELETE"), frozenset({405})),
    framed("transfer-encoding-vtab", chunked(GOOD_BATCH), "Transfer-Encoding: \x0bchunked"),
    # Compression: bombs, lies and breakage.
    encoded("deflate-bomb", zlib.compress(b"[" * 20_000_000, 9), "deflate", frozenset({413})),
    encoded(
        "gzip-bomb-in-a-batch",
        gzip.compress(b'{"batch": [' + b" " * 20_000_000),
        "gzip",
        frozenset({413}),
    ),
    encoded("gzip-bad-crc", GOOD_GZIP[:-8] + b"\0\0\0\0" + GOOD_GZIP[-4:], "gzip"),
    encoded("gzip-header-only", GOOD_GZIP[:10], "gzip"),
    encoded("gzip-empty-body", b"", "gzip"),
    encoded("gzip-of-garbage", gzip.compress(b"\xff\xfe not json"), "gzip"),
    encoded("gzip-twice-declared-once", gzip.compress(GOOD_GZIP), "gzip"),
    encoded("lie-gzip-but-plain", GOOD_BATCH, "gzip"),
    encoded("lie-deflate-but-gzip", GOOD_GZIP, "deflate"),
    encoded("lie-plain-but-gzip", GOOD_GZIP, ""),
    encoded("lie-gzip-gzip", gzip.compress(GOOD_GZIP), "gzip, gzip", frozenset({415})),
    encoded("encoding-br", GOOD_BATCH, "br", frozenset({415})),
    encoded("encoding-garbage", GOOD_BATCH, "\xff\xfe", frozenset({415})),
    encoded("gzip-then-trailing-garbage", GOOD_GZIP + b"garbage", "gzip"),
    encoded("gzip-then-a-short-member", GOOD_GZIP + GOOD_GZIP[:12], "gzip"),
    encoded("deflate-then-trailing-garbage", zlib.compress(GOOD_BATCH) + b"\0", "deflate"),
    # Positive controls: the same machinery, used right, stores the event (once: one messageId).
    framed(
        "control-chunked",
        chunked(*(GOOD_BATCH[i : i + 7] for i in range(0, N, 7))),
        *TE,
        allowed=OK,
        stores=1,
    ),
    encoded(
        "control-gzip-members",
        gzip.compress(GOOD_BATCH[:9]) + gzip.compress(GOOD_BATCH[9:]),
        "gzip",
        OK,
        1,
    ),
    encoded("control-gzip", GOOD_GZIP, "GZIP", OK, 1),
]


@pytest.mark.parametrize(("data", "allowed", "stores"), [*BODIES, *FRAMING])
def test_raw_bad_input_is_refused_and_stores_nothing(
    target: Target, data: bytes, allowed: frozenset[int | None], stores: int
):
    before = target.count()
    answers = statuses(exchange(target.daemon.port, data))
    target.answered(answers)
    assert set(answers) <= allowed, answers
    if stores:
        # Positive controls reuse one messageId: the first stores, the rest are duplicates.
        assert target.count() - before <= stores
    else:
        target.refused(before)
    target.alive()


def test_decompress_joins_gzip_members_and_refuses_trailing_bytes():
    data = GOOD_BATCH
    assert decompress(gzip.compress(data[:5]) + gzip.compress(data[5:]), "gzip", 10_000) == data
    for body, encoding in [
        (GOOD_GZIP + b"garbage", "gzip"),
        (GOOD_GZIP + b"\x1f\x8b", "gzip"),
        (zlib.compress(data) + zlib.compress(data), "deflate"),
    ]:
        with pytest.raises(IngestError) as error:
            decompress(body, encoding, 10_000)
        assert error.value.status == 400
    with pytest.raises(IngestError) as error:  # the limit holds across members
        decompress(gzip.compress(b" " * 6000) * 2, "gzip", 10_000)
    assert error.value.status == 413


def test_bad_requests_pipelined_between_good_ones_cost_only_themselves(target: Target):
    """One write, several requests on a keep-alive connection: a refused body is answered
    400 and the connection goes on; broken framing ends it after the good ones are answered."""
    stamp = time.time_ns()
    good = [dumps({"batch": [valid_track(f"pipe-{stamp}-{n}")]}) for n in range(3)]
    data = b"".join(
        [
            request("/v1/batch", good[0], close=False),
            request("/v1/t", b'{"userId": "\\udc00"}', close=False),
            request(
                "/v1/batch", GOOD_GZIP + b"x", headers=("Content-Encoding: gzip",), close=False
            ),
            request("/v1/batch", good[1], close=False),
            request(
                "/v1/t", dumps(valid_track(f"pipe-{stamp}-nan"))[:-1] + b', "n": NaN}', close=False
            ),
            request("/v1/batch", good[2], close=False),
            b"POST /v1/batch HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            request("/v1/batch", dumps({"batch": [valid_track(f"pipe-{stamp}-lost")]})),
        ]
    )
    head = target.head()
    answers = statuses(exchange(target.daemon.port, data))
    target.answered(answers)
    assert answers == [200, 400, 400, 200, 400, 200, 400]
    stored = [e["messageId"] for e in target.stored_since(head)]
    assert stored == [f"pipe-{stamp}-{n}" for n in range(3)]
    target.head()
    target.alive()


@pytest.mark.parametrize(
    "value", ["Basic \xff\xfe!!==", "Basic é", "Basic  ", "basic d2tfd2ViOg=="]
)
def test_write_key_header_never_raises(value: str):
    assert header_write_key(value) in (None, "wk_web")


# -- wrong types for every field of every event type -----------------------------

ID_WRONG: list[Any] = [{"id": 1}, ["u"], 1.5, True, False]
STR_WRONG: list[Any] = [{"s": 1}, ["s"], 7, 1.5, True]
OBJ_WRONG: list[Any] = [["x"], "text", 7, 1.5, True]
COMMON = {
    "userId": ID_WRONG,
    "anonymousId": ID_WRONG,
    "messageId": [*STR_WRONG, "m" * 100, 10**30, -1],
    "timestamp": STR_WRONG,
    "originalTimestamp": STR_WRONG,
    "sentAt": STR_WRONG,
    "context": OBJ_WRONG,
    "integrations": OBJ_WRONG,
    "type": [7, ["track"], {"type": "track"}, "nonsense", "TRACK", ""],
}
BASES: dict[str, dict[str, Any]] = {
    "track": {"event": "Order Completed", "properties": {"total": 1}},
    "identify": {"traits": {"plan": "pro"}},
    "page": {"name": "Home", "category": "Docs", "properties": {"path": "/"}},
    "screen": {"name": "Cart", "category": "Shop", "properties": {"items": 2}},
    "group": {"groupId": "g1", "traits": {"size": 3}},
    "alias": {"previousId": "anon-1"},
}
OWN = {
    "event": STR_WRONG,
    "name": STR_WRONG,
    "category": STR_WRONG,
    "properties": OBJ_WRONG,
    "traits": OBJ_WRONG,
    "groupId": ID_WRONG,
    "previousId": ID_WRONG,
}
FIELD_CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}")
    for kind, base in BASES.items()
    for name in [*COMMON, *base]
]


def base_event(kind: str, message_id: str) -> dict[str, Any]:
    return {
        "type": kind,
        "userId": "user-1",
        "anonymousId": "anon-1",
        "messageId": message_id,
        "timestamp": "2026-12-01T10:00:00.000Z",
        "context": {"library": {"name": "chaos"}},
        "integrations": {"All": True},
        **BASES[kind],
    }


@pytest.mark.parametrize(("kind", "name"), FIELD_CASES)
def test_a_wrong_type_in_any_field_refuses_that_event_only(target: Target, kind: str, name: str):
    wrong = COMMON.get(name) or OWN[name]
    before = target.count()
    for n, value in enumerate(wrong):
        bad = {**base_event(kind, f"wrong-{kind}-{name}-{n}"), name: value}
        response = target.post(f"/v1/{kind}", dumps(bad))
        assert response.status_code == 400, (value, response.text)
        assert response.json()["code"] == "invalid_event"
    target.refused(before)

    # The same events inside a batch, between good ones: 200, and exactly the good ones stored.
    good = [base_event(kind, f"mixed-{kind}-{name}-{side}-{time.time_ns()}") for side in "ab"]
    bad_items = [
        {**base_event(kind, f"mixed-bad-{kind}-{name}-{n}"), name: value}
        for n, value in enumerate(wrong)
    ]
    head = target.head()
    response = target.post("/v1/batch", dumps({"batch": [good[0], *bad_items, good[1]]}))
    assert (response.status_code, response.json()) == (200, {"success": True})
    stored = target.stored_since(head)
    assert [e["messageId"] for e in stored] == [g["messageId"] for g in good]
    for sent, kept in zip(good, stored, strict=True):
        # As sent, but for the fields router fills: the corrected timestamp and context.ip.
        assert kept["context"] == {**sent["context"], "ip": "127.0.0.1"}
        same = [k for k in sent if k not in ("timestamp", "context")]
        assert {k: kept[k] for k in same} == {k: sent[k] for k in same}
    target.head()
    target.alive()


def test_batch_items_of_every_wrong_type_are_dropped_and_the_rest_kept(target: Target):
    stamp = time.time_ns()
    good = [valid_track(f"items-{stamp}-{n}") for n in range(3)]
    junk: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        10**30,
        "track",
        "",
        [],
        [valid_track("x")],
        {},
    ]
    junk += [{"batch": [valid_track(f"nested-{stamp}")]}, {"type": None, "userId": "u"}]
    head = target.head()
    response = target.post("/v1/batch", dumps({"batch": [good[0], *junk, good[1], *junk, good[2]]}))
    assert (response.status_code, response.json()) == (200, {"success": True})
    assert [e["messageId"] for e in target.stored_since(head)] == [g["messageId"] for g in good]
    target.head()
    target.alive()


@pytest.mark.parametrize(
    "envelope",
    [
        {"context": "text"},
        {"context": ["x"]},
        {"integrations": ["x"]},
        {"integrations": 5},
        {"sentAt": 5},
        {"sentAt": {"at": 1}},
        {"sentAt": "not a date"},
        {"sentAt": "0001-01-01T00:00:00Z"},
        {"sentAt": "9999-12-31T23:59:59.999999+00:00"},
        {"writeKey": 5},
        {"writeKey": ["wk_web"]},
    ],
    ids=repr,
)
def test_wrong_envelope_fields_never_cost_the_events(target: Target, envelope: dict[str, Any]):
    """Envelope fields of the wrong type are ignored; the items are stored (timestamp kept
    when the clock-skew correction cannot be computed)."""
    message_id = f"envelope-{time.time_ns()}"
    event = valid_track(message_id, timestamp="0001-01-01T00:00:00Z")
    head = target.head()
    response = target.post("/v1/batch", dumps({"batch": [event], **envelope}))
    assert (response.status_code, response.json()) == (200, {"success": True})
    [stored] = target.stored_since(head)
    assert stored["messageId"] == message_id
    target.head()
    target.alive()


def test_duplicate_keys_keep_the_last_value(target: Target):
    message_id = f"dup-{time.time_ns()}"
    head = target.head()
    body = b'{"userId": {}, "userId": "u", "event": 5, "event": "E", "messageId": "%s"}'
    response = target.post("/v1/t", body % message_id.encode())
    assert response.status_code == 200, response.text
    [stored] = target.stored_since(head)
    assert (stored["userId"], stored["event"], stored["messageId"]) == ("u", "E", message_id)
    target.head()


def test_huge_numbers_within_json_are_kept_exactly(target: Target):
    message_id = f"bignum-{time.time_ns()}"
    big = 10**300
    head = target.head()
    response = target.post(
        "/v1/t", dumps(valid_track(message_id, properties={"n": big, "m": -big}))
    )
    assert response.status_code == 200, response.text
    [stored] = target.stored_since(head)
    assert stored["properties"] == {"n": big, "m": -big}
    target.head()


def test_good_clients_lose_nothing_while_bad_ones_hammer(target: Target):
    """Bad input from several clients at once with good traffic: every acked event stored,
    nothing else stored, no 5xx on either side."""
    garbage = [p.values[0] for p in [*BODIES, *FRAMING] if 200 not in p.values[1]]
    stamp = time.time_ns()
    stop = time.monotonic() + 3.0
    head = target.head()

    def good(client: int) -> tuple[list[str], list[int]]:
        acked: list[str] = []
        codes: list[int] = []
        with httpx.Client(base_url=target.http.base_url, timeout=10) as http:
            n = 0
            while time.monotonic() < stop:
                ids = [f"busy-{stamp}-{client}-{n}-{i}" for i in range(5)]
                n += 1
                batch = {"batch": [valid_track(i) for i in ids]}
                response = http.post(
                    "/v1/batch", content=dumps(batch), headers={"authorization": AUTH}
                )
                codes.append(response.status_code)
                if response.status_code == 200:
                    acked += ids
        return acked, codes

    def bad(client: int) -> list[int | None]:
        answers: list[int | None] = []
        n = client
        while time.monotonic() < stop:
            answers += statuses(exchange(target.daemon.port, garbage[n % len(garbage)]))
            n += 7
        return answers

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, c) for c in range(4)]
        bads = [pool.submit(bad, c) for c in range(4)]
        results = [f.result() for f in goods]
        refused = [a for f in bads for a in f.result()]
    acked = [i for ids, _ in results for i in ids]
    codes = [c for _, cs in results for c in cs]
    target.tally.requests += len(codes) + len(refused)
    target.tally.statuses.update(codes)
    target.tally.statuses.update(a for a in refused if a is not None)
    target.tally.closed_silently += refused.count(None)
    assert set(codes) == {200}
    assert all(a in (None, 100) or 400 <= a < 500 for a in refused), Counter(refused)
    stored = [e["messageId"] for e in target.stored_since(head)]
    target.tally.stored_from_refused += len([i for i in stored if not i.startswith("busy-")])
    assert sorted(stored) == sorted(acked)
    assert len(acked) > 100
    target.head()
    target.alive()


# -- requests that never finish ---------------------------------------------------


def test_requests_that_stop_mid_body_time_out_with_408(target: Target):
    """A body that never ends (chunked without the last chunk, a Content-Length longer than
    what comes) is answered 408 once the body timeout passes; nothing stored. In parallel,
    so the scenario waits one timeout, not three."""
    partial = [
        request("/v1/batch", chunked(GOOD_BATCH, end=False), headers=TE, length=False),
        request("/v1/batch", GOOD_BATCH, headers=("Content-Length: 100000",), length=False),
        request("/v1/batch", b"ffff\r\n" + GOOD_BATCH, headers=TE, length=False),
    ]

    def hang(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", target.daemon.port), timeout=60) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    before = target.count()
    with ThreadPoolExecutor(len(partial)) as pool:
        replies = list(pool.map(hang, partial))
    for reply in replies:
        answers = statuses(reply)
        target.answered(answers)
        assert answers == [408]
    target.refused(before)
    target.alive()


# -- hypothesis: bodies ---------------------------------------------------------------

FIELD_NAMES = [
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "event",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "groupId",
    "previousId",
    "name",
    "batch",
    "writeKey",
]
TEXT = st.text(
    st.characters() | st.characters(categories=["Cs"]) | st.sampled_from('\x00"\\{}[]'),
    max_size=12,
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.sampled_from(
        ["track", "identify", "page", "screen", "group", "alias", "2026-12-01T10:00:00Z"]
    )
    | TEXT
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | TEXT, children, max_size=6)
    ),
    max_leaves=24,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    value = draw(JSONISH)
    if draw(st.booleans()):
        value = {"batch": draw(st.lists(JSONISH, max_size=5)) if draw(st.booleans()) else value}
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    return data


BODY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_body(
    target: Target, path: str, body: bytes, encoding: str | None = None, key: str = "wk_web"
) -> None:
    before = target.count()
    headers = {"content-encoding": encoding} if encoding else {}
    if key != "wk_web":
        headers["authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    response = target.post(path, gzip.compress(body) if encoding else body, headers)
    if response.status_code == 200:
        # Valid by chance: at most one event per item, and nothing past a 200.
        assert target.count() - before <= max(1, body.count(b"{"))
    else:
        assert 400 <= response.status_code < 500
        assert response.json()["code"]
        target.refused(before)
    target.alive()


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/track", "/v1/t"])
def test_random_bytes_are_refused(target: Target, path: str):
    @BODY_SETTINGS
    @given(body=st.binary(max_size=2048) | st.binary(max_size=64).map(lambda b: b'{"batch": [' + b))
    def run(body: bytes) -> None:
        check_body(target, path, body)

    run()


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/track", "/v1/t"])
def test_random_json_is_refused_or_stored(target: Target, path: str):
    @BODY_SETTINGS
    @given(body=json_bodies(), gzipped=st.booleans())
    def run(body: bytes, gzipped: bool) -> None:
        check_body(target, path, body, "gzip" if gzipped else None)

    run()


TIMESTAMPS = (
    TEXT
    | st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat())
    | st.sampled_from(
        ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999999-14:00", "2026-12-01t10:00:00z"]
    )
)


@BODY_SETTINGS
@given(timestamp=TIMESTAMPS, sent_at=TIMESTAMPS, original=TIMESTAMPS | st.none())
def test_any_timestamp_string_is_kept_and_never_a_5xx(
    target: Target, timestamp: str, sent_at: str, original: str | None
):
    """Timestamps are strings as far as validation goes; the clock-skew correction must cope
    with every one of them (out of range, unparseable, naive, odd zones) and keep the event."""
    event = valid_track(f"ts-{time.time_ns()}", timestamp=timestamp, originalTimestamp=original)
    before = target.count()
    response = target.post(
        "/v1/batch",
        json.dumps({"batch": [event], "sentAt": sent_at}).encode("utf-8", "surrogatepass"),
    )
    if any(0xD800 <= ord(c) <= 0xDFFF for c in timestamp + sent_at + (original or "")):
        assert response.status_code == 400
        target.refused(before)
    else:
        assert response.status_code == 200, response.text
        assert target.count() - before == 1
    target.alive()


HEADER_TEXT = st.text(st.characters(max_codepoint=0xFF, exclude_characters="\r\n"), max_size=40)
HEADER_VALUES = (
    HEADER_TEXT
    | HEADER_TEXT.map(lambda t: "Basic " + t)
    | HEADER_TEXT.map(lambda t: "Bearer " + t)
    | st.binary(max_size=30).map(lambda b: "Basic " + base64.b64encode(b).decode())
    | st.sampled_from(
        ["gzip", "deflate", "identity", "x-gzip", " GZIP ", "", "::1", "1.2.3.4, ::ffff:10.0.0.1"]
    )
)
HEADER_NAMES = [
    "Authorization",
    "X-Forwarded-For",
    "Content-Encoding",
    "Origin",
    "Content-Type",
    "Expect",
]


@BODY_SETTINGS
@given(headers=st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_VALUES, max_size=4))
def test_any_header_value_is_answered_without_a_5xx(target: Target, headers: dict[str, str]):
    """What the Segment layer reads from headers (the write key, the client IP, the encoding,
    CORS) may hold any byte a client can send."""
    lines = tuple(f"{name}: {value}" for name, value in headers.items())
    body = dumps({"batch": [valid_track(f"hdr-{time.time_ns()}")]})
    data = request("/v1/batch", body, headers=lines)
    if "Authorization" in headers:
        data = data.replace(f"Authorization: {AUTH}\r\n".encode(), b"", 1)
    before = target.count()
    answers = statuses(exchange(target.daemon.port, data))
    target.answered(answers)
    stored = target.count() - before
    assert stored <= 1
    if answers != [200]:
        target.refused(before)
    target.alive()


@BODY_SETTINGS
@given(body=json_bodies())
def test_random_json_to_a_raw_source_is_refused_or_stored(target: Target, body: bytes):
    """A raw source takes any JSON object as an event: the other path through normalize."""
    check_body(target, "/v1/batch", body, key="wk_plain")


# -- the Unix socket ------------------------------------------------------------------


def stream(target: Target, data: bytes, pieces: list[int] | None = None) -> list[dict[str, Any]]:
    """Send ``data`` on the Unix socket (split at ``pieces``), half-close, read every ack."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(target.daemon.socket_path))
        cuts = sorted({0, *(p for p in pieces or [] if 0 < p < len(data)), len(data)})
        for start, end in itertools.pairwise(cuts):
            sock.sendall(data[start:end])
        sock.shutdown(socket.SHUT_WR)
        reader = sock.makefile("rb")
        acks = [json.loads(line) for line in reader]
        reader.close()
    return acks


def expected_acks(data: bytes) -> int:
    lines = data.split(b"\n")
    return sum(1 for line in lines if line.strip())


def check_stream(
    target: Target, data: bytes, pieces: list[int] | None = None
) -> list[dict[str, Any]]:
    before = target.count()
    acks = stream(target, data, pieces)
    target.tally.requests += 1
    target.tally.socket_lines += len(acks)
    assert len(acks) == expected_acks(data), acks
    accepted = 0
    for ack in acks:
        if ack["ok"]:
            assert ack["count"] >= 0
            accepted += ack["count"]
        else:
            target.tally.error_acks += 1
            assert ack["code"] != "internal", ack
            assert ack["code"], ack
            assert ack["message"], ack
    stored = target.count() - before
    if accepted == 0:
        target.refused(before)
    assert stored <= accepted
    target.alive()
    return acks


SOCKET_LINES = [
    b'{"type": "track", "userId": "u", "event": "E"',  # truncated
    b'{"type": "track", "userId": "\xff", "event": "E"}',
    b'{"type": "track", "userId": "\\ud800", "event": "E"}',
    b'{"type": "track", "userId": "u", "event": "E", "n": NaN}',
    b"[" * 100 + b"]" * 100,
    b"[" * 200_000,
    b"null",
    b"42",
    b'"text"',
    b"[]",
    b"{}",
    b'{"batch": "x"}',
    b'{"batch": [1, "x", null]}',
    b'{"type": "track", "userId": {}, "event": "E"}',
    b"\x00\x01\x02",
    b"\r",
]


@pytest.mark.parametrize("line", SOCKET_LINES, ids=lambda line: repr(line[:30]))
def test_a_bad_socket_line_gets_an_error_ack(target: Target, line: bytes):
    acks = check_stream(target, line + b"\n")
    if line.strip():
        [ack] = acks
        assert ack["ok"] is False


def test_bad_socket_lines_around_good_ones_in_one_stream(target: Target):
    stamp = time.time_ns()
    good = [dumps(valid_track(f"sock-{stamp}-{n}")) for n in range(4)]
    lines = [good[0], *SOCKET_LINES[:8], good[1], b"", b"   ", good[2], *SOCKET_LINES[8:], good[3]]
    head = target.head()
    acks = check_stream(target, b"\n".join(lines))  # the last line has no newline
    assert [a["ok"] for a in acks] == [
        bool(line.strip()) and line in good for line in lines if line.strip()
    ]
    stored = target.stored_since(head)
    assert [e["messageId"] for e in stored] == [f"sock-{stamp}-{n}" for n in range(4)]
    target.head()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "dribbled"])
def test_a_huge_socket_line_is_refused_and_the_stream_goes_on(target: Target, split: bool):
    stamp = time.time_ns()
    huge = b'{"type": "track", "userId": "u", "event": "' + b"x" * (MAX_LINE + 10) + b'"}'
    good = dumps(valid_track(f"after-huge-{stamp}-{split}"))
    data = good + b"\n" + huge + b"\n" + good.replace(b"after", b"again") + b"\n" + huge
    pieces = list(range(0, len(data), 100_000)) if split else None
    head = target.head()
    acks = check_stream(target, data, pieces)
    assert [a["ok"] for a in acks] == [True, False, True, False]
    assert {a.get("code") for a in acks[1::2]} == {"too_large"}
    assert len(target.stored_since(head)) == 2
    target.head()


def test_clients_that_reset_mid_exchange_hurt_nothing(target: Target):
    """Bad input, then a reset instead of reading the answer (SO_LINGER 0): on both
    listeners, many times, with a partial line or request left behind."""
    before = target.count()
    reset = struct.pack("ii", 1, 0)
    bad_lines = b"\n".join(SOCKET_LINES[:8]) * 50 + b'\n{"type": "tra'
    framing = [p.values[0] for p in FRAMING if 200 not in p.values[1]]
    for n in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(target.daemon.socket_path))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            sock.sendall(bad_lines[: len(bad_lines) * (n + 1) // 30])
        with socket.create_connection(("127.0.0.1", target.daemon.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            data = framing[n % len(framing)]
            with contextlib.suppress(OSError):
                sock.sendall(data[: len(data) * (n + 1) // 30])
        target.tally.requests += 2
    time.sleep(0.2)  # let the daemon see the resets before asking it anything
    target.alive()
    target.refused(before)


LINE = (
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b""))
    | json_bodies().map(lambda b: b.replace(b"\n", b""))
    | st.sampled_from([*SOCKET_LINES[:6], b"", b" ", b"\r", b"\t"])
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    lines=st.lists(LINE, max_size=12),
    terminated=st.booleans(),
    pieces=st.lists(st.integers(0, 4000), max_size=8),
)
def test_random_ndjson_streams_get_one_ack_per_line(
    target: Target, lines: list[bytes], terminated: bool, pieces: list[int]
):
    data = b"\n".join(lines) + (b"\n" if terminated else b"")
    check_stream(target, data, pieces)


def test_summary(target: Target, capsys: pytest.CaptureFixture[str]):
    """Last in the file: the scenario's line for the suite's report."""
    target.alive()
    # Whatever was accepted must not hurt delivery either: every stored event reaches the
    # destination (or is dead-lettered or filtered), and a last one still goes through.
    last = f"last-{time.time_ns()}"
    assert target.post("/v1/t", dumps(valid_track(last))).status_code == 200
    deadline = time.monotonic() + 30
    while last not in target.receiver.delivered_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last in target.receiver.delivered_ids()
    while time.monotonic() < deadline:
        out, shaped = (target.inspector.counters(name) for name in ("out", "shaped"))
        done = out.delivered + out.dead_lettered + out.filtered
        if done == target.count() and shaped.pending == 0:
            break
        time.sleep(0.1)
    assert done == target.count(), out
    assert shaped.pending == 0, shaped
    for name in ("out", "shaped"):
        assert target.inspector.dead_letters(name) == []
    tally = target.tally
    shaped = len(target.receiver.delivered_ids())
    with capsys.disabled():
        print(f"\n{tally.line()} stored={target.count()} delivered_through_filters={shaped}")
    assert tally.crashes == 0
    assert tally.stored_from_refused == 0
    assert not any(s >= 500 for s in tally.statuses)
