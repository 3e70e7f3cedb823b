"""Routing against the real daemon: FQL routes, sampling, PII controls, a transform function.

Events go in over HTTP as a Segment library would send them; what each loopback receiver gets
is what a user would see.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.journal import Inspector
from tests.support import Daemon, Receiver

pytestmark = pytest.mark.slow

SALT = "salt-for-tests"

TRANSFORM_PLUGIN = """
def tier(event):
    if event.get("properties", {}).get("test") is True:
        return None
    total = event.get("properties", {}).get("total", 0)
    event.setdefault("properties", {})["tier"] = "gold" if total >= 100 else "standard"
    return event

TRANSFORMS = {"tier": tier}
"""


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    started = {name: Receiver() for name in ("orders", "everything", "sampled")}
    yield started
    for receiver in started.values():
        receiver.close()


def config(receivers: dict[str, Receiver]) -> str:
    return f"""
        [sources.web]
        write_key = "wk_web"

        [sources.app]
        write_key = "wk_app"

        [destinations.orders]
        type = "webhook"
        url = "{receivers["orders"].url}"
        batch_size = 50
        batch_wait = "20ms"
        [destinations.orders.transform]
        function = "tier"
        remove = ["context.ip"]
        [destinations.orders.privacy]
        hash = ["userId", "*email"]
        salt = "env:PII_SALT"

        [destinations.everything]
        type = "webhook"
        url = "{receivers["everything"].url}"
        batch_size = 50
        batch_wait = "20ms"

        [destinations.sampled]
        type = "webhook"
        url = "{receivers["sampled"].url}"
        batch_size = 50
        batch_wait = "20ms"
        [[destinations.sampled.filters]]
        sample = {{ percent = 25, by = "userId" }}
        [[destinations.sampled.filters]]
        if = "type = 'identify'"
        drop = true

        [[routes]]
        from = ["web"]
        when = "type = 'track' and event = 'Order Completed' and properties.total > 0"
        to = ["orders"]

        [[routes]]
        to = ["everything", "sampled"]
        """


def post(port: int, key: str, events: list[dict[str, Any]]) -> None:
    auth = base64.b64encode(f"{key}:".encode()).decode()
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/batch",
        json={"batch": events},
        headers={"authorization": f"Basic {auth}"},
    )
    assert response.status_code == 200, response.text


def track(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"t-{n}",
        "userId": f"user-{n % 40}",
        "event": "Order Completed",
        "properties": {"total": n, "email": f"buyer{n}@example.com"},
        "context": {"traits": {"email": f"buyer{n}@example.com"}},
        **fields,
    }


def test_routes_filters_transforms_and_pii_end_to_end(
    tmp_path: Path, receivers: dict[str, Receiver], monkeypatch: pytest.MonkeyPatch
):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tiers.py").write_text(TRANSFORM_PLUGIN)
    monkeypatch.setenv("PII_SALT", SALT)
    daemon = Daemon(tmp_path, config(receivers), server=f'plugin_dirs = ["{plugins}"]').start()
    try:
        web = [track(n) for n in range(200)]
        web += [track(1000, event="Signed Up"), track(1001, properties={"total": 5, "test": True})]
        web += [
            {"type": "identify", "messageId": f"i-{n}", "userId": f"user-{n}"} for n in range(20)
        ]
        app = [track(2000 + n) for n in range(30)]
        post(daemon.port, "wk_web", web)
        post(daemon.port, "wk_app", app)

        everything = receivers["everything"].wait_for(len(web) + len(app))
        assert len(everything) == len(web) + len(app)

        # orders: web Order Completed with total > 0 (t-0 has total 0), minus what the
        # function drops; user ids and emails hashed; context.ip removed; tier added.
        expected = {f"t-{n}" for n in range(1, 200)}
        got = receivers["orders"].wait_for(len(expected))
        time.sleep(0.5)
        assert set(receivers["orders"].delivered_ids()) == expected
        for request in receivers["orders"].requests:
            text = request.body.decode()
            assert "@example.com" not in text
            assert '"ip"' not in text
            for event in json.loads(text)["batch"]:
                assert event["userId"] != f"user-{int(event['messageId'][2:]) % 40}"
                assert len(event["userId"]) == 64
                assert event["properties"]["tier"] in ("gold", "standard")
        assert len(got) == len(expected)

        # sampled: whole users kept or not, identifies dropped.
        time.sleep(1)
        sampled = receivers["sampled"].requests
        events = [e for r in sampled for e in json.loads(r.body)["batch"]]
        assert all(e["type"] == "track" for e in events)
        kept_users = {e["userId"] for e in events}
        all_users = {e["userId"] for e in web + app if e["type"] == "track"}
        for event in web + app:
            if event["type"] == "track" and event["userId"] in kept_users:
                assert event["messageId"] in {e["messageId"] for e in events}
        assert 0 < len(kept_users) < len(all_users)

        inspector = Inspector(daemon.data_dir / "queue.db")
        orders = inspector.counters("orders")
        assert orders.routed == len(web)  # every web event was considered
        assert orders.delivered == len(expected)
        assert orders.filtered == len(web) - len(expected)
        held = inspector.tallies("destination", "orders")
        assert held == {"no_route": len(web) - len(expected) - 1, "transform_dropped": 1}
        assert inspector.tallies("destination", "sampled")["dropped"] > 0
        inspector.close()
    finally:
        daemon.stop()


PLAN = {
    "unplanned_events": "block",
    "unplanned_properties": "omit",
    "violations": "report",
    "track": {
        "Order Completed": {
            "type": "object",
            "properties": {"total": {"type": "number", "minimum": 0}, "currency": {}},
            "required": ["total"],
        }
    },
}


def test_a_tracking_plan_blocks_omits_and_reports_at_ingest(
    tmp_path: Path, receivers: dict[str, Receiver]
):
    (tmp_path / "web-plan.json").write_text(json.dumps(PLAN))
    body = f"""
        [sources.web]
        write_key = "wk_web"
        plan = "web-plan.json"

        [destinations.everything]
        type = "webhook"
        url = "{receivers["everything"].url}"
        batch_size = 50
        batch_wait = "20ms"

        [[routes]]
        to = ["everything"]
        """
    daemon = Daemon(tmp_path, body).start()
    try:
        post(
            daemon.port,
            "wk_web",
            [
                track(1, properties={"total": 10, "currency": "EUR", "secret": "x"}),
                track(2, properties={"total": -5}),
                track(3, event="Unplanned Thing"),
                {"type": "identify", "messageId": "i-1", "userId": "u1"},
            ],
        )
        received = receivers["everything"]
        received.wait_for(4)  # t-1, t-2, its Violation Generated, i-1
        time.sleep(0.5)
        events = {e.get("messageId"): e for r in received.requests for e in r.events()}
        assert "t-3" not in events  # blocked: reaches no destination
        assert events["t-1"]["properties"] == {"total": 10, "currency": "EUR"}  # omitted
        assert events["t-2"]["properties"] == {"total": -5}  # kept, and reported
        [violation] = [e for e in events.values() if e.get("event") == "Violation Generated"]
        assert violation["properties"]["eventMessageID"] == "t-2"
        assert violation["properties"]["violationField"] == "properties.total"
        assert "i-1" in events
        tallies = Inspector(daemon.data_dir / "queue.db").tallies("source", "web")
        assert tallies["blocked_by_plan"] == 1
        assert tallies["accepted"] == 4
    finally:
        daemon.stop()
