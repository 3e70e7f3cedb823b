"""`router route`: what each destination would receive of one event, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIG = """
[sources.web]
write_key = "wk"

[destinations.orders]
type = "stdout"
[[destinations.orders.filters]]
if = "properties.total < 10"
drop = true
[destinations.orders.privacy]
hash = ["userId"]
salt = "pepper"

[destinations.archive]
type = "stdout"

[[routes]]
when = "type = 'track' and event = 'Order Completed'"
to = ["orders"]

[[routes]]
to = ["archive"]
"""


def route(tmp_path: Path, event: object, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "router.toml").write_text(CONFIG)
    (tmp_path / "event.json").write_text(json.dumps(event))
    return subprocess.run(
        [sys.executable, "-m", "router", "route", "event.json", "--config", "router.toml", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )


def order(total: float) -> dict[str, object]:
    event = {"type": "track", "userId": "u1", "event": "Order Completed"}
    return {**event, "messageId": "m1", "properties": {"total": total}}


def test_each_destination_shows_its_steps_and_payload(tmp_path: Path):
    result = route(tmp_path, order(50), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)["destinations"]
    orders, archive = shown["orders"], shown["archive"]
    assert orders["delivered"] is True
    assert orders["payload"]["userId"] != "u1"  # hashed
    assert any("privacy: hashed userId" in step for step in orders["steps"])
    assert archive["payload"]["userId"] == "u1"


def test_a_held_back_event_says_why(tmp_path: Path):
    result = route(tmp_path, order(5))
    assert result.returncode == 0, result.stderr
    assert "orders: held back (dropped)" in result.stdout
    assert "archive: delivered" in result.stdout
    result = route(tmp_path, {**order(50), "event": "Signed Up"})
    assert "orders: held back (no_route)" in result.stdout
    assert "when type = 'track' and event = 'Order Completed' is false" in result.stdout


def test_an_event_ingest_would_refuse_is_an_error(tmp_path: Path):
    result = route(tmp_path, {"type": "track", "userId": "u1"})
    assert result.returncode == 2
    assert "refused at ingest: track event requires 'event'" in result.stderr
