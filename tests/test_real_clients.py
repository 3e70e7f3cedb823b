"""The real Segment client libraries, unmodified, send through router to a webhook receiver, and
every event they generate arrives there exactly once with its fields intact.

analytics-python and rudder-sdk-python run in this process. analytics-node and analytics.js run
under node from tests/clients/ (``npm ci --prefix tests/clients``); analytics.js runs in headless
Chromium, on a page served from another loopback origin, so it posts cross-origin through CORS.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import rudderstack.analytics.request
import segment.analytics.request
from rudderstack.analytics import Client as RudderClient
from segment.analytics import Client as SegmentClient

from router.journal import Inspector
from tests.support import Daemon, Receiver

pytestmark = pytest.mark.slow

WRITE_KEY = "wk_real_clients"
CLIENTS = Path(__file__).parent / "clients"
CHROMIUM = Path("/usr/bin/chromium")

# Values that a careless re-encoding would change: non-ASCII text, a float, nesting, false, null.
PROPERTIES = {
    "total": 12.5,
    "currency": "EUR",
    "note": "naïve café ☕ 東京",
    "items": [{"sku": "a-1", "qty": 2}, {"sku": "b-7", "qty": 1}],
    "gift": False,
    "coupon": None,
}
TRAITS = {"email": "ada@example.com", "plan": "pro", "logins": 3}


def router_config(receiver_url: str, http: str = "") -> str:
    # strict_auth: a client whose write key router does not recognise gets a 401 and reports an
    # error, instead of a 200 for an event that was silently dropped.
    return f"""
        [http]
        strict_auth = true
        {http}

        [sources.web]
        write_key = "{WRITE_KEY}"

        [destinations.hook]
        type = "webhook"
        url = "{receiver_url}"
        batch_size = 100
        batch_wait = "20ms"

        [[routes]]
        to = ["hook"]
        """


def start(daemons: list[Daemon], tmp_path: Path, config: str) -> Daemon:
    daemon = Daemon(tmp_path, config)
    daemons.append(daemon)
    return daemon.start()


def field(event: dict[str, Any], path: str) -> Any:
    """``event["context"]["traits"]`` for ``"context.traits"``; None where the path is missing."""
    value: Any = event
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def assert_arrived_exactly_once(
    daemon: Daemon, receiver: Receiver, expected: dict[str, dict[str, Any]]
) -> None:
    """Every messageId in ``expected`` reached the receiver once, and nothing else did; each
    event's fields (dotted paths) hold the values sent."""
    assert len(expected) > 0
    receiver.wait_for(len(expected))
    # A clean stop, then the journal's counters: router stored each event once and has nothing
    # left to send, so no duplicate can still be on its way.
    assert daemon.stop() == 0, daemon.stderr()
    inspector = Inspector(daemon.data_dir / "queue.db")
    counters = inspector.counters("hook")
    inspector.close()
    assert (counters.routed, counters.delivered, counters.pending) == (len(expected),) * 2 + (0,)

    delivered = [event for request in receiver.accepted for event in request.events()]
    assert Counter(event["messageId"] for event in delivered) == dict.fromkeys(expected, 1)
    by_id = {event["messageId"]: event for event in delivered}
    for message_id, fields in expected.items():
        event = by_id[message_id]
        assert {path: field(event, path) for path in fields} == fields, message_id


# --- the Python libraries -------------------------------------------------------------------


@dataclass
class Exchange:
    """One request a library sent and router's answer, as the library's HTTP session saw them."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int
    answer: bytes

    def __str__(self) -> str:
        body = self.body
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        headers = "".join(f"\n  {name}: {value}" for name, value in self.headers.items())
        return (
            f"{self.method} {self.url}{headers}\n  body: {body[:300]!r}...\n"
            f"-> {self.status} {self.answer[:300]!r}"
        )


def record_exchanges(monkeypatch: pytest.MonkeyPatch, session: Any) -> list[Exchange]:
    """Observe the library's own ``requests`` session (each library keeps one at module level)."""
    exchanges: list[Exchange] = []

    def on_response(response: Any, *_args: Any, **_kwargs: Any) -> None:
        request = response.request
        exchanges.append(
            Exchange(
                request.method,
                request.url,
                dict(request.headers),
                request.body or b"",
                response.status_code,
                response.content,
            )
        )

    monkeypatch.setitem(session.hooks, "response", [*session.hooks["response"], on_response])
    return exchanges


def assert_all_answered_success(exchanges: list[Exchange]) -> None:
    # rudder-sdk-python counts only exactly 200 as success and retries the rest.
    assert exchanges, "the library sent nothing"
    for exchange in exchanges:
        ok = exchange.status == 200 and json.loads(exchange.answer or b"null") == {"success": True}
        assert ok, f"router's answer is not 200 {{'success': true}}:\n{exchange}"


def send_python_calls(client: Any, traits_at: str) -> dict[str, dict[str, Any]]:
    """Every call type through a client of analytics-python's API (rudder's is a fork of it);
    returns the expected fields by the messageId the library generated."""
    expected: dict[str, dict[str, Any]] = {}

    def sent(result: tuple[bool, dict[str, Any]], fields: dict[str, Any]) -> None:
        queued, message = result
        assert queued, message
        expected[message["messageId"]] = fields

    for i in range(150):  # more than one batch (100 events or 0.5 s each)
        user, properties = f"user-{i % 7}", {**PROPERTIES, "n": i}
        sent(
            client.track(user_id=user, event="Order Completed", properties=properties),
            {"type": "track", "event": "Order Completed", "userId": user, "properties": properties},
        )
    sent(
        client.identify(user_id="user-1", traits=TRAITS),
        {"type": "identify", "userId": "user-1", traits_at: TRAITS},
    )
    sent(
        client.page(user_id="user-1", category="Docs", name="Install", properties=PROPERTIES),
        {"type": "page", "userId": "user-1", "name": "Install", "properties.total": 12.5},
    )
    sent(
        client.screen(user_id="user-1", name="Cart", properties={"items": 2}),
        {"type": "screen", "userId": "user-1", "name": "Cart", "properties.items": 2},
    )
    sent(
        client.group(user_id="user-1", group_id="org-9", traits={"name": "Acme"}),
        {"type": "group", "userId": "user-1", "groupId": "org-9", "traits": {"name": "Acme"}},
    )
    sent(
        client.alias(previous_id="anon-3", user_id="user-1"),
        {"type": "alias", "userId": "user-1", "previousId": "anon-3"},
    )
    return expected


def test_analytics_python_with_gzip(tmp_path, receiver, daemons, monkeypatch):
    daemon = start(daemons, tmp_path, router_config(receiver.url))
    exchanges = record_exchanges(monkeypatch, segment.analytics.request._session)
    errors: list[Exception] = []
    client = SegmentClient(
        WRITE_KEY,
        host=f"http://127.0.0.1:{daemon.port}",
        gzip=True,
        max_retries=2,  # a broken router fails the test in seconds, not minutes
        on_error=lambda error, _batch: errors.append(error),
    )
    expected = send_python_calls(client, traits_at="traits")
    client.flush()
    client.join()

    assert errors == []
    assert_all_answered_success(exchanges)
    assert {(e.url, e.headers.get("Content-Encoding")) for e in exchanges} == {
        (f"http://127.0.0.1:{daemon.port}/v1/batch", "gzip")
    }
    assert_arrived_exactly_once(daemon, receiver, expected)


def test_rudder_sdk_python(tmp_path, receiver, daemons, monkeypatch):
    daemon = start(daemons, tmp_path, router_config(receiver.url))
    exchanges = record_exchanges(monkeypatch, rudderstack.analytics.request._session)
    errors: list[Exception] = []
    client = RudderClient(
        WRITE_KEY,
        host=f"http://127.0.0.1:{daemon.port}",
        max_retries=2,
        on_error=lambda error, _batch: errors.append(error),
    )
    # rudder puts identify traits in context.traits, not at the top level.
    expected = send_python_calls(client, traits_at="context.traits")
    client.flush()
    client.join()

    assert errors == []
    assert_all_answered_success(exchanges)
    # rudder gzips every request and authenticates with HTTP Basic only (no writeKey in the body).
    assert {e.headers.get("Content-Encoding") for e in exchanges} == {"gzip"}
    assert all("writeKey" not in json.loads(gzip.decompress(e.body)) for e in exchanges)
    assert_arrived_exactly_once(daemon, receiver, expected)


# --- the JavaScript libraries ---------------------------------------------------------------


def run_node(script: str, plan: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Run tests/clients/<script> with the plan on stdin; return the JSON it prints."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; these tests need Node 20 (.ci/run expects it)")
    if not (CLIENTS / "node_modules").is_dir():
        pytest.fail("tests/clients/node_modules is missing: run `npm ci --prefix tests/clients`")
    done = subprocess.run(
        [node, str(CLIENTS / script)],
        input=json.dumps(plan).encode(),
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=CLIENTS,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_analytics_node(tmp_path, receiver, daemons):
    daemon = start(daemons, tmp_path, router_config(receiver.url))
    page = {"userId": "user-1", "category": "Docs", "name": "Install", "properties": PROPERTIES}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("identify", {"userId": "user-1", "traits": TRAITS}),
        *(
            ("track", {"userId": "user-1", "event": f"Step {i}", "properties": PROPERTIES})
            for i in range(40)  # three batches of at most 15
        ),
        ("page", page),
        ("screen", {"userId": "user-1", "name": "Cart"}),
        ("group", {"userId": "user-1", "groupId": "org-9", "traits": TRAITS}),
        ("alias", {"userId": "user-2", "previousId": "user-1"}),
    ]
    result = run_node(
        "node_client.mjs",
        {
            "writeKey": WRITE_KEY,
            "host": f"http://127.0.0.1:{daemon.port}",
            "calls": [{"type": kind, "params": params} for kind, params in calls],
        },
    )

    assert result["errors"] == [], result["exchanges"]
    statuses = [(e["request"]["url"], e["status"]) for e in result["exchanges"]]
    assert set(statuses) == {(f"http://127.0.0.1:{daemon.port}/v1/batch", 200)}
    assert len(statuses) >= 3
    message_ids = result["messageIds"]
    assert None not in message_ids
    expected = {
        message_id: {"type": kind, **params}
        for message_id, (kind, params) in zip(message_ids, calls, strict=True)
    }
    # analytics-node copies a page's category into its properties.
    [page_id] = [m for m, fields in expected.items() if fields["type"] == "page"]
    expected[page_id]["properties"] = PROPERTIES | {"category": "Docs"}
    assert_arrived_exactly_once(daemon, receiver, expected)


class PageServer:
    """The test page and analytics.js's bundle, on a loopback origin of their own."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        shutil.copy(CLIENTS / "page.html", root / "index.html")
        (root / "analytics-next").mkdir()
        bundles = CLIENTS / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
        (root / "analytics-next" / "bundles").symlink_to(bundles)

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=root))
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("batching", [False, True], ids=["per-event", "batching"])
def test_analytics_js_in_chromium_posts_cross_origin(tmp_path, receiver, daemons, batching):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does)")
    page = PageServer(tmp_path / "site")
    try:
        cors = f'cors_origins = ["{page.origin}"]'
        daemon = start(daemons, tmp_path, router_config(receiver.url, http=cors))
        # In the order a site makes them: alias the anonymous visitor to the account, then
        # identify it. (After identify, analytics.js stamps every call, alias included, with the
        # identified user's id, whatever userId an alias call names.)
        calls = [
            {"method": "alias", "args": ["user-1", "anon-7"]},
            {"method": "identify", "args": ["user-1", TRAITS]},
            *({"method": "track", "args": [f"Step {i}", PROPERTIES]} for i in range(5)),
            {"method": "page", "args": ["Docs", "Install", {"plan": "pro"}]},
            {"method": "group", "args": ["org-9", {"name": "Acme"}]},
        ]
        plan = {
            "pageUrl": page.origin + "/",
            "writeKey": WRITE_KEY,
            "apiHost": f"127.0.0.1:{daemon.port}/v1",
            # analytics.js posts each event to /v1/<first letter of its type>; in batching mode
            # it posts to /v1/b, here one batch of all the calls, sent as the last is queued.
            "deliveryStrategy": (
                {"strategy": "batching", "config": {"size": len(calls), "timeout": 60_000}}
                if batching
                else None
            ),
            "calls": calls,
            "chromium": str(CHROMIUM),
        }
        result = run_node("browser_client.mjs", plan)
    finally:
        page.close()

    report = "\n".join(
        [f"{r['method']} {r['url']} -> {r.get('status')}" for r in result["requests"]]
        + result["console"]
    )
    assert result["offLoopback"] == [], report
    assert result["failures"] == [], report
    posts = [r for r in result["requests"] if r["method"] == "POST"]
    sent = [(r["url"].rsplit("/", 1)[1], r["status"]) for r in posts]
    if batching:
        assert sent == [("b", 200)], report
    else:
        assert sent == [(call["method"][0], 200) for call in calls], report
    expected_fields: list[dict[str, Any]] = [
        {"type": "alias", "userId": "user-1", "previousId": "anon-7"},
        {"type": "identify", "userId": "user-1", "traits": TRAITS},
        *(
            {"type": "track", "event": f"Step {i}", "userId": "user-1", "properties": PROPERTIES}
            for i in range(5)
        ),
        {"type": "page", "category": "Docs", "name": "Install", "properties.plan": "pro"},
        {"type": "group", "groupId": "org-9", "userId": "user-1", "traits": {"name": "Acme"}},
    ]
    expected = dict(zip(result["messageIds"], expected_fields, strict=True))
    assert_arrived_exactly_once(daemon, receiver, expected)
