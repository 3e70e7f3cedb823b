"""The Segment HTTP API: the paths, auth, bodies and answers the real client libraries expect.

``SegmentApi.handle`` is the only I/O (one journal append per request); everything it decides
is made of pure functions below: which path means what, which write key a request carries, how a
body is decompressed within limits, where the client's IP comes from, and which CORS headers an
origin gets. Wire facts: SEGMENT_API.md §1 and §5.

Answers: exactly ``200 {"success": true}`` after the commit (rudder-sdk-python counts only 200
as success); errors ``{"code", "message"}`` with 400, 401, 413, 415; 503 + ``Retry-After`` when
the queue is full. Inside a batch a bad event is dropped and counted and the rest is stored; on a
single-event path it is a 400, as Segment does.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from router.admission import admit
from router.config import HttpConfig, IPNetwork, SourceConfig
from router.errors import IngestError
from router.events import EVENT_TYPES, StoredEvent, decode_json, normalize, split_envelope
from router.ingress.http import Request, Response, json_error
from router.journal import Journal
from router.metrics import Latencies
from router.plans import TrackingPlan

log = logging.getLogger(__name__)

SINGLE_PATHS = {
    **{f"/v1/{kind}": kind for kind in EVENT_TYPES},
    # analytics.js posts each call to the first letter of its type.
    **{f"/v1/{kind[0]}": kind for kind in EVENT_TYPES},
}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import", "/v1/b"})
# analytics.js posts its own usage metrics here when apiHost is set; taken and discarded, so
# pages using router log no errors (Segment collects them; we have no use for them).
METRICS_PATH = "/v1/m"
CORS_HEADERS = "Authorization, Content-Type, X-Retry-Count"
SUCCESS = b'{"success":true}'


def is_segment_path(path: str) -> bool:
    return path in SINGLE_PATHS or path in BATCH_PATHS or path == METRICS_PATH


# -- pure parts ----------------------------------------------------------------


# A client sends the same header with every request: decode each distinct one once. Bounded, so
# a flood of made-up keys cannot grow it.
@functools.lru_cache(maxsize=1024)
def header_write_key(authorization: str | None) -> str | None:
    """The write key in ``Authorization: Basic base64(key:)`` (the colon is optional), or the
    token of ``Bearer``; None when absent or unreadable."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip() or None
    if scheme != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII input (a 500 once)
        return None
    return decoded.partition(":")[0] or None


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding``, refused past ``limit`` bytes decompressed
    (so a gzip bomb costs us ``limit`` bytes of memory, not its ratio)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise IngestError(415, "unsupported_encoding", f"Content-Encoding {encoding!r}")
    gzipped = "gzip" in encoding
    wbits = 16 + zlib.MAX_WBITS if gzipped else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise IngestError(400, "invalid_json", f"body is not valid {encoding}: {exc}") from exc
        size += len(data)
        if size > limit:
            raise IngestError(413, "body_too_large", f"decompressed body is over {limit} bytes")
        if not inflater.eof:
            raise IngestError(400, "invalid_json", f"{encoding} body is truncated")
        parts.append(data)
        rest = inflater.unused_data
        # Bytes after the end were once ignored, storing a prefix of what was sent. gzip
        # members may follow one another (RFC 1952 §2.2; gunzip joins them); nothing else may.
        if not rest:
            return b"".join(parts)
        if not (gzipped and rest.startswith(b"\x1f\x8b")):
            raise IngestError(400, "invalid_json", f"data after the end of the {encoding} body")


def client_ip(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
    untrusted hop of ``X-Forwarded-For`` (hops further left could be forged by the client)."""
    if peer is None or not forwarded_for or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _within(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def cors_headers(origin: str | None, allowed: Sequence[str]) -> list[tuple[str, str]]:
    """Headers that let a browser at ``origin`` read our answer; none for other origins."""
    if origin is None or ("*" not in allowed and origin not in allowed):
        return []
    # The origin echoed rather than "*": it also works for requests sent with credentials.
    return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]


def preflight(origin: str | None, allowed: Sequence[str]) -> Response:
    headers = cors_headers(origin, allowed)
    if not headers:
        return json_error(403, "forbidden_origin", f"origin {origin!r} is not allowed")
    headers += [
        ("Access-Control-Allow-Methods", "POST, OPTIONS"),
        ("Access-Control-Allow-Headers", CORS_HEADERS),
        ("Access-Control-Max-Age", "86400"),
    ]
    return Response(204, b"", headers)


@dataclass(slots=True)
class Parsed:
    """A request body turned into events to store, and the events refused, by reason."""

    source: SourceConfig | None  # None: no write key, or none that a source holds
    write_key: str | None
    events: list[StoredEvent] = field(default_factory=list)
    refused: list[IngestError] = field(default_factory=list)


def parse_body(
    path: str,
    data: bytes,
    *,
    received_at: float,
    sources: Mapping[str, SourceConfig],
    limits: HttpConfig,
    context_extra: dict[str, object] | None,
    header_key: str | None,
) -> Parsed:
    """Split and normalize a decoded body; ``sources`` maps write keys to sources. Raises
    IngestError for what fails the whole request."""
    body = decode_json(data)
    inferred = SINGLE_PATHS.get(path)
    if inferred is not None and type(body) is not dict:
        raise IngestError(400, "invalid_event", "an event must be a JSON object")
    if inferred is None and (type(body) is not dict or "batch" not in body):
        raise IngestError(400, "invalid_batch", 'expected {"batch": [...]}')
    envelope = split_envelope(body)
    if len(envelope.items) > limits.max_batch_events:
        raise IngestError(
            413,
            "too_many_events",
            f"{len(envelope.items)} events in one batch; the limit is {limits.max_batch_events}",
        )
    # The header's key first; a Bearer token may be a session token, so then the body's.
    write_key = next((k for k in (header_key, envelope.write_key) if k in sources), None)
    source = sources[write_key] if write_key is not None else None
    parsed = Parsed(source, write_key or header_key or envelope.write_key)
    raw_source = source is not None and source.raw
    for item in envelope.items:
        try:
            event = normalize(
                item,
                received_at=received_at,
                sent_at=envelope.sent_at,
                raw=raw_source,
                inferred_type=inferred,
                context_extra=context_extra,
            )
        except IngestError as refused:
            if inferred is not None:
                raise
            parsed.refused.append(refused)
            continue
        if len(event.body) <= limits.max_event_bytes:
            parsed.events.append(event)
            continue
        too_large = IngestError(
            413, "event_too_large", f"event is over {limits.max_event_bytes} bytes"
        )
        if inferred is not None:
            raise too_large
        parsed.refused.append(too_large)
    return parsed


# -- the I/O shell -------------------------------------------------------------


class SegmentApi:
    """Answers the Segment paths; stores through the journal."""

    def __init__(
        self,
        limits: HttpConfig,
        sources: Sequence[SourceConfig],
        journal: Journal,
        *,
        plans: Mapping[str, TrackingPlan] | None = None,
        clock: Callable[[], float] = time.time,
        latencies: Latencies | None = None,
    ) -> None:
        self.limits = limits
        self._by_key = {s.write_key.reveal(): s for s in sources if s.write_key is not None}
        self._journal = journal
        self._plans = plans or {}
        self._latencies = latencies or Latencies()
        self._clock = clock
        self._trusted = limits.trusted_networks
        # Events dropped for want of a known write key. Kept in memory, not in the journal: a
        # flood of unauthenticated requests must not cost a disk commit each.
        self.unauthorized = 0

    def reconfigure(
        self,
        limits: HttpConfig,
        sources: Sequence[SourceConfig],
        plans: Mapping[str, TrackingPlan],
    ) -> None:
        """A reload's new write keys, limits and plans; requests in progress finish as begun."""
        self.limits = limits
        self._by_key = {s.write_key.reveal(): s for s in sources if s.write_key is not None}
        self._plans = plans
        self._trusted = limits.trusted_networks

    async def handle(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        allowed = self.limits.cors_origins
        if request.method == "OPTIONS":
            return preflight(origin, allowed)
        if request.path == METRICS_PATH:
            return Response(200, SUCCESS, cors_headers(origin, allowed))
        try:
            response = await self._ingest(request)
        except IngestError as exc:
            response = json_error(exc.status, exc.code, exc.message, retry_after=exc.retry_after)
        response.headers.extend(cors_headers(origin, allowed))
        return response

    def error_headers(self, headers: dict[str, str]) -> list[tuple[str, str]]:
        """CORS headers for errors the HTTP server answers before a request reaches us."""
        return cors_headers(headers.get("origin"), self.limits.cors_origins)

    async def _ingest(self, request: Request) -> Response:
        if request.method != "POST":
            raise IngestError(405, "method_not_allowed", f"{request.path} takes POST")
        received_at = self._clock()
        limit = self.limits.max_request_bytes
        data = decompress(request.body, request.headers.get("content-encoding"), limit)
        peer = request.client[0] if request.client else None
        ip = client_ip(peer, request.headers.get("x-forwarded-for"), self._trusted)
        parsed = parse_body(
            request.path,
            data,
            received_at=received_at,
            sources=self._by_key,
            limits=self.limits,
            context_extra={"ip": ip} if ip else None,
            header_key=header_write_key(request.headers.get("authorization")),
        )
        source = parsed.source
        if source is None:
            return self._unknown_key(parsed)
        tallies = Counter([refused.code for refused in parsed.refused])
        if parsed.refused:
            log.warning(
                "dropped invalid events source=%s count=%d first=%s",
                source.name,
                len(parsed.refused),
                parsed.refused[0].message,
            )
        plan = self._plans.get(source.name)
        events = admit(plan, parsed.events, received_at=received_at, tallies=tallies)
        if events or tallies:
            started = trio.current_time()
            await self._journal.append(source.name, events, received_at, tallies)
            # What the client waits for its ack: group commit included.
            self._latencies.commit.observe(trio.current_time() - started)
        return Response(200, SUCCESS)

    def _unknown_key(self, parsed: Parsed) -> Response:
        what = "missing write key" if parsed.write_key is None else "unknown write key"
        if self.limits.strict_auth:
            raise IngestError(401, "unauthorized", what)
        # Segment's behaviour: a client with a stale key must not retry forever.
        dropped = len(parsed.events) + len(parsed.refused)
        self.unauthorized += dropped
        log.warning("dropped events without a known write key count=%d reason=%s", dropped, what)
        return Response(200, SUCCESS)
