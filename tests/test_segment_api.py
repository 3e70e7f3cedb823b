"""The Segment HTTP API against the real daemon: paths, auth, bodies, CORS, errors, limits.

Each request is checked by what a user would see: the HTTP answer, and what the queue holds
afterwards (read through the journal's read-only Inspector, the same view `router status` uses).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.config import HttpConfig
from router.errors import IngestError
from router.ingress.segment import client_ip, cors_headers, decompress, header_write_key
from router.journal import Inspector
from tests.support import Daemon

# -- pure parts ----------------------------------------------------------------


def basic(key: str, colon: bool = True) -> str:
    return "Basic " + base64.b64encode((key + (":" if colon else "")).encode()).decode()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (basic("wk_1"), "wk_1"),
        (basic("wk_1", colon=False), "wk_1"),
        ("basic " + base64.b64encode(b"wk_1:").decode(), "wk_1"),
        ("Bearer tok", "tok"),
        ("Basic !!!", None),
        (basic(""), None),
        ("Digest x", None),
        (None, None),
    ],
)
def test_write_key_from_the_authorization_header(header: str | None, key: str | None):
    assert header_write_key(header) == key


def test_gzip_and_deflate_bodies_are_inflated():
    data = b'{"a": 1}' * 100
    assert decompress(gzip.compress(data), "gzip", 10_000) == data
    assert decompress(zlib.compress(data), "deflate", 10_000) == data
    assert decompress(data, None, 10_000) == data


@pytest.mark.parametrize(
    ("body", "encoding", "status"),
    [
        (gzip.compress(b"x" * 10_001), "gzip", 413),  # past the limit once inflated
        (gzip.compress(b"x" * 100)[:-10], "gzip", 400),  # truncated
        (b"not gzip at all", "gzip", 400),
        (b"{}", "br", 415),
    ],
)
def test_bad_or_oversized_compressed_bodies_are_refused(body: bytes, encoding: str, status: int):
    with pytest.raises(IngestError) as error:
        decompress(body, encoding, 10_000)
    assert error.value.status == status


TRUSTED = HttpConfig(trusted_proxies=("10.0.0.0/8",)).trusted_networks


@pytest.mark.parametrize(
    ("peer", "forwarded", "ip"),
    [
        ("192.0.2.1", None, "192.0.2.1"),
        ("192.0.2.1", "198.51.100.9", "192.0.2.1"),  # an untrusted peer cannot claim another IP
        ("10.0.0.5", "198.51.100.9", "198.51.100.9"),
        ("10.0.0.5", "6.6.6.6, 198.51.100.9, 10.0.0.7", "198.51.100.9"),  # nearest untrusted hop
        ("10.0.0.5", "10.1.1.1", "10.1.1.1"),
        ("10.0.0.5", "garbage", "10.0.0.5"),
    ],
)
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: str | None, ip: str
):
    assert client_ip(peer, forwarded, TRUSTED) == ip


def test_cors_echoes_allowed_origins_only():
    assert ("Access-Control-Allow-Origin", "http://a.test") in cors_headers("http://a.test", ["*"])
    assert cors_headers("http://b.test", ["http://a.test"]) == []
    assert cors_headers(None, ["*"]) == []


# -- against the daemon ----------------------------------------------------------

CONFIG = """
[http]
trusted_proxies = ["127.0.0.1"]
cors_origins = ["http://app.test"]

[sources.web]
write_key = "wk_web"

[sources.plain]
write_key = "wk_plain"
raw = true

[destinations.out]
type = "stdout"

[[routes]]
to = ["out"]
"""

STRICT = """
[http]
strict_auth = true

[sources.web]
write_key = "wk_web"

[destinations.out]
type = "stdout"

[[routes]]
to = ["out"]
"""


class Api:
    """A client of one running daemon, and a view of what its queue holds."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=10)
        self.inspector = Inspector(daemon.data_dir / "queue.db")
        self.seen = self.inspector.event_count()

    def post(
        self,
        path: str,
        body: Any,
        *,
        key: str | None = "wk_web",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"content-type": "application/json"}
        if key is not None:
            sent["authorization"] = basic(key)
        sent.update(headers or {})
        return self.http.post(path, content=content, headers={k: v for k, v in sent.items() if v})

    def new_events(self) -> list[tuple[str, dict[str, Any]]]:
        """(source, body) of every event stored since the last call."""
        rows = self.inspector.events_after(self.seen, 10_000)
        if rows:
            self.seen = rows[-1].seq
        return [(row.source, json.loads(row.body)) for row in rows]

    def close(self) -> None:
        self.http.close()
        self.inspector.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    daemon = Daemon(tmp_path_factory.mktemp("segment"), CONFIG).start()
    client = Api(daemon)
    yield client
    client.close()
    assert daemon.stop() == 0


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Api]:
    daemon = Daemon(tmp_path, STRICT, queue='max_bytes = "300KiB"').start()
    client = Api(daemon)
    yield client
    client.close()
    daemon.kill()


def ok(response: httpx.Response) -> None:
    assert (response.status_code, response.json()) == (200, {"success": True}), response.text


def track(message_id: str, **extra: Any) -> dict[str, Any]:
    return {"userId": "u1", "event": "Order Completed", "messageId": message_id, **extra}


pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("path", "kind", "body"),
    [
        ("/v1/track", "track", {"event": "Signed Up"}),
        ("/v1/identify", "identify", {"traits": {"plan": "pro"}}),
        ("/v1/page", "page", {"name": "Home"}),
        ("/v1/screen", "screen", {"name": "Cart"}),
        ("/v1/group", "group", {"groupId": "g1"}),
        ("/v1/alias", "alias", {"previousId": "anon-1"}),
        ("/v1/t", "track", {"event": "Signed Up"}),
        ("/v1/i", "identify", {}),
        ("/v1/p", "page", {}),
        ("/v1/s", "screen", {}),
        ("/v1/g", "group", {"groupId": "g1"}),
        ("/v1/a", "alias", {"previousId": "anon-1"}),
    ],
)
def test_each_single_event_path_stores_its_type(api: Api, path: str, kind: str, body: dict):
    ok(api.post(path, {"userId": "u1", "messageId": f"p-{path}", **body}))
    [(source, event)] = api.new_events()
    assert (source, event["type"], event["messageId"]) == ("web", kind, f"p-{path}")
    for key, value in body.items():
        assert event[key] == value


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/b"])
def test_batch_paths_store_every_item_with_the_envelope_merged(api: Api, path: str):
    envelope = {
        "batch": [
            {"type": "track", **track(f"{path}-1")},
            {"type": "identify", "userId": "u1", "messageId": f"{path}-2", "context": {"x": 1}},
        ],
        "context": {"library": {"name": "analytics-python", "version": "2.4"}},
        "integrations": {"All": True},
    }
    ok(api.post(path, envelope))
    events = [event for _, event in api.new_events()]
    assert [e["messageId"] for e in events] == [f"{path}-1", f"{path}-2"]
    assert all(e["context"]["library"]["name"] == "analytics-python" for e in events)
    assert events[1]["context"]["x"] == 1
    assert all(e["integrations"] == {"All": True} for e in events)


@pytest.mark.parametrize(
    ("how", "headers", "body_key"),
    [
        ("basic with colon", {"authorization": basic("wk_web")}, None),
        ("basic without colon", {"authorization": basic("wk_web", colon=False)}, None),
        ("writeKey in the body", {}, "wk_web"),
        ("bearer plus body writeKey", {"authorization": "Bearer session-token"}, "wk_web"),
    ],
)
def test_every_auth_form_reaches_the_source(api: Api, how: str, headers: dict, body_key: str):
    body: dict[str, Any] = {"batch": [{"type": "track", **track(f"auth-{how}")}]}
    if body_key:
        body["writeKey"] = body_key
    ok(api.post("/v1/batch", body, key=None, headers=headers))
    assert [(s, e["messageId"]) for s, e in api.new_events()] == [("web", f"auth-{how}")]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", ""])
def test_json_parses_whatever_the_content_type(api: Api, content_type: str):
    ok(api.post("/v1/t", track(f"ct-{content_type}"), headers={"content-type": content_type}))
    assert len(api.new_events()) == 1


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
def test_compressed_bodies(api: Api, encoding: str, compress: Any):
    body = compress(json.dumps({"batch": [{"type": "track", **track(f"z-{encoding}")}]}).encode())
    ok(api.post("/v1/batch", body, headers={"content-encoding": encoding}))
    assert [e["messageId"] for _, e in api.new_events()] == [f"z-{encoding}"]


def test_a_bad_event_in_a_batch_is_dropped_and_the_rest_stored(api: Api):
    batch = [
        {"type": "track", **track("good-1")},
        {"type": "track", "userId": "u1"},  # no event
        {"type": "nonsense", "userId": "u1"},
        "not an object",
        {"type": "identify", "userId": "u1", "messageId": "good-2"},
    ]
    ok(api.post("/v1/batch", {"batch": batch}))
    assert [e["messageId"] for _, e in api.new_events()] == ["good-1", "good-2"]


def test_a_client_clock_ten_minutes_fast_is_corrected(api: Api):
    fast = datetime.now(UTC) + timedelta(minutes=10)
    event = track("skew", timestamp=(fast - timedelta(seconds=2)).isoformat())
    ok(api.post("/v1/batch", {"batch": [{"type": "track", **event}], "sentAt": fast.isoformat()}))
    [(_, stored)] = api.new_events()
    received = datetime.fromisoformat(stored["receivedAt"])
    corrected = datetime.fromisoformat(stored["timestamp"])
    assert timedelta(seconds=1) < received - corrected < timedelta(seconds=3)
    assert stored["originalTimestamp"] == event["timestamp"]


def test_context_ip_comes_from_the_peer_or_a_trusted_proxy(api: Api):
    ok(api.post("/v1/t", track("ip-peer")))
    ok(api.post("/v1/t", track("ip-proxied"), headers={"x-forwarded-for": "198.51.100.7"}))
    ok(api.post("/v1/t", track("ip-own", context={"ip": "192.0.2.44"})))
    ips = {e["messageId"]: e["context"]["ip"] for _, e in api.new_events()}
    assert ips == {"ip-peer": "127.0.0.1", "ip-proxied": "198.51.100.7", "ip-own": "192.0.2.44"}


def test_a_raw_source_takes_plain_json_in_a_batch(api: Api):
    ok(api.post("/v1/batch", {"batch": [{"sensor": "t1", "celsius": 21.5}]}, key="wk_plain"))
    [(source, event)] = api.new_events()
    assert (source, event) == ("plain", {"sensor": "t1", "celsius": 21.5})


def test_an_unknown_write_key_is_answered_like_segment_and_stores_nothing(api: Api):
    ok(api.post("/v1/t", track("nokey-1"), key="wk_wrong"))
    ok(api.post("/v1/t", track("nokey-2"), key=None))
    assert api.new_events() == []


def test_cors_preflight_and_answers_for_browsers(api: Api):
    preflight = api.http.options(
        "/v1/t",
        headers={
            "origin": "http://app.test",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://app.test"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "x-retry-count"} <= set(allowed.split(", "))
    posted = api.post("/v1/t", track("cors-1"), headers={"origin": "http://app.test"})
    assert posted.headers["access-control-allow-origin"] == "http://app.test"
    elsewhere = api.http.options("/v1/t", headers={"origin": "http://evil.test"})
    assert elsewhere.status_code == 403
    assert "access-control-allow-origin" not in elsewhere.headers
    api.new_events()


BOMB = gzip.compress(b"0" * 50_000_000)  # ~50 KB on the wire, 50 MB inflated


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        ("/v1/batch", b'{"batch": [{"type": "track"', {}, 400, "invalid_json"),
        ("/v1/t", b'{"userId": "\xff\xfe", "event": "E"}', {}, 400, "invalid_json"),
        ("/v1/t", b'{"userId": "\\ud800", "event": "E"}', {}, 400, "invalid_json"),
        ("/v1/t", b'{"userId": "u", "event": "E", "n": NaN}', {}, 400, "invalid_json"),
        ("/v1/t", b'{"userId": "u", "event": "E", "n": 1e999}', {}, 400, "invalid_json"),
        ("/v1/t", b'{"a":' * 70 + b"1" + b"}" * 70, {}, 400, "invalid_json"),
        ("/v1/t", b"[1, 2]", {}, 400, "invalid_event"),
        ("/v1/t", b'"track"', {}, 400, "invalid_event"),
        ("/v1/batch", b'{"type": "track"}', {}, 400, "invalid_batch"),
        ("/v1/batch", b'{"batch": {"type": "track"}}', {}, 400, "invalid_batch"),
        ("/v1/t", b'{"userId": "u"}', {}, 400, "invalid_event"),
        ("/v1/t", json.dumps(track("big", blob="x" * 40_000)).encode(), {}, 413, "event_too_large"),
        ("/v1/batch", b'{"batch": []' + b" " * 600_000 + b"}", {}, 413, "body_too_large"),
        ("/v1/batch", b"\x1f\x8b broken", {"content-encoding": "gzip"}, 400, "invalid_json"),
        ("/v1/batch", BOMB, {"content-encoding": "gzip"}, 413, "body_too_large"),
        (
            "/v1/batch",
            json.dumps({"batch": [{"type": "identify", "userId": "u"}] * 2501}).encode(),
            {},
            413,
            "too_many_events",
        ),
    ],
    ids=[
        "truncated",
        "invalid-utf8",
        "lone-surrogate",
        "nan",
        "huge-number",
        "too-deep",
        "array",
        "string",
        "no-batch",
        "batch-not-list",
        "invalid-single-event",
        "event-over-32kb",
        "body-over-500kb",
        "broken-gzip",
        "gzip-bomb",
        "too-many-events",
    ],
)
def test_bad_input_gets_a_4xx_with_a_reason_and_stores_nothing(
    api: Api, path: str, body: bytes, headers: dict, status: int, code: str
):
    response = api.post(path, body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.json()["message"]
    assert api.new_events() == []
    assert api.http.get("/ready").status_code == 200


def test_wrong_methods_and_paths(api: Api):
    assert api.http.get("/v1/track").status_code == 405
    assert api.post("/v1/nope", track("x")).status_code == 404
    assert api.new_events() == []


def test_strict_auth_refuses_unknown_and_missing_keys_with_401(strict: Api):
    for key in ("wk_wrong", None):
        response = strict.post("/v1/t", track("strict"), key=key)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
    assert strict.new_events() == []
    ok(strict.post("/v1/t", track("strict-ok")))
    assert len(strict.new_events()) == 1


def test_forwarded_for_from_an_untrusted_peer_is_ignored(strict: Api):
    ok(strict.post("/v1/t", track("xff"), headers={"x-forwarded-for": "198.51.100.7"}))
    [(_, event)] = strict.new_events()
    assert event["context"]["ip"] == "127.0.0.1"


def test_a_full_queue_answers_503_with_retry_after_and_recovers_nothing_half_written(strict: Api):
    batch = {"batch": [{"type": "track", **track(f"fill-{i}", pad="p" * 1000)} for i in range(50)]}
    answers = []
    for n in range(40):
        for item in batch["batch"]:
            item["messageId"] = f"fill-{n}-{item['messageId']}"
        response = strict.post("/v1/batch", batch)
        answers.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["code"] == "queue_full"
            assert int(response.headers["retry-after"]) > 0
            break
    assert answers[-1] == 503
    assert set(answers[:-1]) == {200}
    # Every acked batch was committed whole, the refused one not at all. Counted from the
    # source's tallies, not the log: the full queue makes the pruner drop delivered events.
    accepted = strict.inspector.tallies("source", "web")["accepted"]
    assert accepted == 50 * (len(answers) - 1)


def test_errors_the_http_layer_answers_carry_cors_headers(api: Api):
    """A browser sees a 413 for an oversized body (and stops retrying) only with CORS."""
    response = api.post("/v1/t", b"x" * 600_000, headers={"origin": "http://app.test"})
    assert response.status_code == 413
    assert response.headers["access-control-allow-origin"] == "http://app.test"
    assert api.new_events() == []


def test_analytics_js_metrics_are_taken_and_discarded(api: Api):
    response = api.post("/v1/m", {"series": []}, key=None, headers={"origin": "http://app.test"})
    assert (response.status_code, response.json()) == (200, {"success": True})
    assert response.headers["access-control-allow-origin"] == "http://app.test"
    assert api.new_events() == []
