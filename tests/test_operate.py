"""Operating router as an operator would: status, replay, dead letters, tail, the HTTP admin API.

The real daemon runs as a subprocess; the CLI is run as a user runs it (`python -m router ...`),
against loopback receivers that fail on purpose.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Daemon, ReceivedRequest, Receiver

pytestmark = pytest.mark.slow

FAST_RETRY = (
    'retry = { max_attempts = 3, max_age = "300ms", initial = "50ms", max_backoff = "100ms" }'
)


def config(*receivers: tuple[str, Receiver], extra: str = "") -> str:
    destinations = "\n".join(
        f"""
        [destinations.{name}]
        type = "webhook"
        url = "{receiver.url}"
        batch_size = 10
        batch_wait = "20ms"
        {FAST_RETRY}
        """
        for name, receiver in receivers
    )
    names = ", ".join(f'"{name}"' for name, _ in receivers)
    return f"""
        [sources.web]
        write_key = "wk"
        {extra}
        {destinations}

        [[routes]]
        to = [{names}]
        """


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def status(daemon: Daemon) -> dict[str, Any]:
    result = cli(daemon, "status", "--json")
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def send(daemon: Daemon, ids: list[str]) -> None:
    batch = [{"type": "track", "userId": "u", "event": "E", "messageId": m} for m in ids]
    response = httpx.post(
        f"http://127.0.0.1:{daemon.port}/v1/batch", json={"batch": batch}, auth=("wk", "")
    )
    assert response.status_code == 200


def settle(daemon: Daemon, destinations: list[str], timeout: float = 30) -> dict[str, Any]:
    """Status once nothing is pending or unread anywhere."""
    deadline = time.monotonic() + timeout
    while True:
        shown = status(daemon)
        busy = [
            n
            for n in destinations
            if shown["destinations"][n]["pending"] or shown["destinations"][n]["unread"]
        ]
        if not busy or time.monotonic() > deadline:
            return shown
        time.sleep(0.2)


def test_conservation_holds_through_random_failures(tmp_path: Path, daemons: list[Daemon]):
    rng = random.Random(7)

    def flaky(_request: ReceivedRequest, _index: int) -> tuple[int, dict[str, str], bytes]:
        return (rng.choice([200, 200, 200, 500, 503, 400]), {}, b"")

    receivers = [("flaky", Receiver(policy=flaky)), ("steady", Receiver())]
    try:
        daemon = Daemon(tmp_path, config(*receivers)).start()
        daemons.append(daemon)
        ids = [f"c-{i}" for i in range(300)]
        for start in range(0, 300, 50):
            send(daemon, ids[start : start + 50])
        shown = settle(daemon, ["flaky", "steady"])
        for name in ("flaky", "steady"):
            d = shown["destinations"][name]
            assert d["routed"] == 300
            assert d["routed"] == d["delivered"] + d["dead_lettered"] + d["filtered"] + d["pending"]
            assert d["pending"] == 0
        flaky_d = shown["destinations"]["flaky"]
        assert flaky_d["dead_lettered"] > 0  # the 400s
        assert flaky_d["dead_letters"] == flaky_d["dead_lettered"]
        # What the receiver acknowledged is what router counts as delivered.
        acked = receivers[0][1].delivered_ids()
        assert len(acked) == len(set(acked)) == flaky_d["delivered"]
        assert set(receivers[1][1].delivered_ids()) == set(ids)
    finally:
        for _, receiver in receivers:
            receiver.close()


def test_replay_of_a_time_range_redelivers_exactly_that_range(
    tmp_path: Path, daemons: list[Daemon]
):
    receiver = Receiver()
    try:
        daemon = Daemon(tmp_path, config(("hook", receiver))).start()
        daemons.append(daemon)
        send(daemon, [f"a-{i}" for i in range(20)])
        receiver.wait_for(20)
        time.sleep(1.2)
        middle_start = time.time()
        send(daemon, [f"b-{i}" for i in range(15)])
        receiver.wait_for(35)
        middle_end = time.time()
        time.sleep(1.2)
        send(daemon, [f"c-{i}" for i in range(10)])
        receiver.wait_for(45)
        before = len(receiver.delivered_ids())

        since = datetime.fromtimestamp(middle_start - 0.2, UTC).isoformat()
        until = datetime.fromtimestamp(middle_end + 0.2, UTC).isoformat()
        dry = cli(daemon, "replay", "--to", "hook", "--since", since, "--until", until, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "15 events would be replayed" in dry.stdout
        time.sleep(0.5)
        assert len(receiver.delivered_ids()) == before  # a dry run sends nothing

        done = cli(daemon, "replay", "--to", "hook", "--since", since, "--until", until)
        assert done.returncode == 0, done.stderr
        assert "15 events queued" in done.stdout
        deadline = time.monotonic() + 30
        while len(receiver.delivered_ids()) < before + 15 and time.monotonic() < deadline:
            time.sleep(0.05)  # the same ids again: wait_for counts distinct ones
        time.sleep(0.5)
        again = receiver.delivered_ids()[before:]
        assert sorted(again) == sorted(f"b-{i}" for i in range(15))
        shown = settle(daemon, ["hook"])["destinations"]["hook"]
        assert (shown["routed"], shown["delivered"], shown["pending"]) == (60, 60, 0)
    finally:
        receiver.close()


def test_dead_letters_replay_to_another_destination(tmp_path: Path, daemons: list[Daemon]):
    broken = Receiver(policy=lambda _r, _i: (400, {}, b'{"error": "no such hook"}'))
    spare = Receiver()
    try:
        body = (
            config(("broken", broken))
            + f"""
        [destinations.spare]
        type = "webhook"
        url = "{spare.url}"
        """
        )
        daemon = Daemon(tmp_path, body).start()
        daemons.append(daemon)
        send(daemon, ["d-1", "d-2", "d-3"])
        shown = settle(daemon, ["broken"])
        assert shown["destinations"]["broken"]["dead_letters"] == 3
        assert shown["destinations"]["broken"]["last_error"]["status"] == 400

        listed = json.loads(cli(daemon, "dlq", "list", "--json").stdout)
        assert {d["message_id"] for d in listed} == {"d-1", "d-2", "d-3"}
        shown_one = cli(daemon, "dlq", "show", str(listed[0]["id"]))
        assert "400" in shown_one.stdout
        assert "no such hook" in shown_one.stdout

        moved = cli(daemon, "dlq", "replay", "--destination", "broken", "--to", "spare")
        assert "3 dead letters replayed" in moved.stdout, moved.stderr
        assert sorted(spare.wait_for(3)) == ["d-1", "d-2", "d-3"]
        after = settle(daemon, ["broken", "spare"])["destinations"]
        assert after["broken"]["dead_letters"] == 0
        for d in after.values():
            assert d["routed"] == d["delivered"] + d["dead_lettered"] + d["filtered"] + d["pending"]
        assert after["spare"]["delivered"] == 3

        purge = cli(daemon, "dlq", "purge")
        assert purge.returncode == 2
        assert "--all" in purge.stderr
    finally:
        broken.close()
        spare.close()


def test_status_and_dead_letters_work_without_the_daemon(tmp_path: Path, daemons: list[Daemon]):
    broken = Receiver(policy=lambda _r, _i: (400, {}, b""))
    try:
        daemon = Daemon(tmp_path, config(("hook", broken))).start()
        daemons.append(daemon)
        send(daemon, ["o-1", "o-2"])
        settle(daemon, ["hook"])
        assert daemon.stop() == 0
        offline = status(daemon)
        assert offline["running"] is False
        assert offline["destinations"]["hook"]["dead_lettered"] == 2
        assert offline["sources"]["web"]["accepted"] == 2
        replayed = cli(daemon, "dlq", "replay")
        assert "2 dead letters replayed" in replayed.stdout, replayed.stderr
        pending = status(daemon)["destinations"]["hook"]
        assert (pending["pending"], pending["dead_lettered"], pending["retrying"]) == (2, 0, 2)
    finally:
        broken.close()


def test_tail_shows_events_as_they_pass(tmp_path: Path, daemons: list[Daemon]):
    receiver = Receiver()
    try:
        daemon = Daemon(tmp_path, config(("hook", receiver))).start()
        daemons.append(daemon)
        tail = subprocess.Popen(
            [sys.executable, "-m", "router", "tail", "--config", str(daemon.config_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[dict[str, Any]] = []
        reader = threading.Thread(
            target=lambda: lines.extend(json.loads(line) for line in tail.stdout or [])
        )
        reader.start()
        time.sleep(1.5)  # the tail connects before the events arrive
        send(daemon, ["t-1", "t-2"])
        receiver.wait_for(2)
        time.sleep(0.5)
        tail.terminate()
        tail.wait(timeout=10)
        reader.join(timeout=10)
        assert tail.stdout is not None
        tail.stdout.close()
        assert [line["event"]["messageId"] for line in lines] == ["t-1", "t-2"]
        assert lines[0]["source"] == "web"
    finally:
        receiver.close()


def test_the_http_admin_api_needs_its_token(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", "s3cret")
    receiver = Receiver()
    try:
        daemon = Daemon(
            tmp_path, config(("hook", receiver)), server='admin_token = "env:ROUTER_ADMIN_TOKEN"'
        ).start()
        daemons.append(daemon)
        url = f"http://127.0.0.1:{daemon.port}/admin"
        assert httpx.post(url, json={"op": "status"}).status_code == 401
        wrong = httpx.post(url, json={"op": "status"}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = httpx.post(url, json={"op": "status"}, headers={"authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert "hook" in right.json()["destinations"]
        admin_socket = daemon.data_dir / "admin.sock"
        assert admin_socket.stat().st_mode & 0o777 == 0o600
    finally:
        receiver.close()


def test_metrics_are_valid_prometheus_text_and_agree_with_status(
    tmp_path: Path, daemons: list[Daemon]
):
    receiver = Receiver(policy=lambda _r, i: (500, {}, b"") if i == 0 else (200, {}, b""))
    try:
        daemon = Daemon(tmp_path, config(("hook", receiver))).start()
        daemons.append(daemon)
        send(daemon, ["m-1", "m-2"])
        httpx.post(
            f"http://127.0.0.1:{daemon.port}/v1/t",
            json={"userId": "u", "event": "E"},
            auth=("x", ""),
        )
        receiver.wait_for(2)
        settle(daemon, ["hook"])
        response = httpx.get(f"http://127.0.0.1:{daemon.port}/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        hook = (("destination", "hook"),)
        assert samples["router_destination_delivered_total", hook] == 2
        assert samples["router_destination_routed_total", hook] == 2
        assert samples["router_destination_pending", hook] == 0
        assert samples["router_destination_retried_total", hook] >= 1
        assert (
            samples["router_source_events_total", (("outcome", "accepted"), ("source", "web"))] == 2
        )
        assert samples["router_unauthorized_events_total", ()] == 1
        assert samples["router_commit_seconds_count", ()] >= 1
        assert samples["router_delivery_seconds_count", hook] >= 2
    finally:
        receiver.close()


def test_a_full_queue_refuses_then_recovers_by_itself(tmp_path: Path, daemons: list[Daemon]):
    """Over max_bytes ingest answers 503; once the destination drains, pruning makes room
    and ingest resumes without a restart. Every acked event is delivered."""
    down = threading.Event()
    down.set()
    receiver = Receiver(policy=lambda _r, _i: (503, {}, b"") if down.is_set() else (200, {}, b""))
    try:
        body = config(("hook", receiver)).replace(
            FAST_RETRY, 'retry = { initial = "100ms", max_backoff = "200ms" }'
        )
        daemon = Daemon(tmp_path, body, queue='max_bytes = "400KiB"\nretention = "1h"').start()
        daemons.append(daemon)
        url = f"http://127.0.0.1:{daemon.port}/v1/batch"
        acked: list[str] = []
        refused = None
        for n in range(200):
            ids = [f"f-{n}-{i}" for i in range(20)]
            batch = [
                {
                    "type": "track",
                    "userId": "u",
                    "event": "E",
                    "messageId": m,
                    "properties": {"pad": "x" * 400},
                }
                for m in ids
            ]
            response = httpx.post(url, json={"batch": batch}, auth=("wk", ""))
            if response.status_code == 503:
                refused = response
                break
            assert response.status_code == 200
            acked += ids
        assert refused is not None, "the queue never filled"
        assert refused.json()["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) > 0

        down.clear()  # the receiver is back: deliveries drain, pruning makes room
        deadline = time.monotonic() + 60
        while True:
            batch = [{"type": "track", "userId": "u", "event": "E", "messageId": "after-full"}]
            response = httpx.post(url, json={"batch": batch}, auth=("wk", ""))
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200
        acked.append("after-full")
        delivered = set(receiver.wait_for(len(acked), timeout=60))
        assert not set(acked) - delivered
        shown = settle(daemon, ["hook"])["destinations"]["hook"]
        assert (
            shown["routed"]
            == shown["delivered"] + shown["dead_lettered"] + shown["filtered"] + shown["pending"]
        )
    finally:
        receiver.close()
