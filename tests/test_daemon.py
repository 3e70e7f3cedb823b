"""End to end: the real daemon as a subprocess, real sockets, a real webhook receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import standardwebhooks

from router.journal import Inspector
from tests.support import Daemon, ReceivedRequest, Receiver, SocketClient, free_port, track

pytestmark = pytest.mark.slow

FAST_RETRY = 'retry = { max_attempts = 5, max_age = "1s", initial = "50ms", max_backoff = "200ms" }'


def webhook_config(url: str, *, extra: str = "", retry: str = FAST_RETRY) -> str:
    return f"""
        [sources.app]
        socket = true

        [destinations.hook]
        type = "webhook"
        url = "{url}"
        concurrency = 8
        timeout = "5s"
        {retry}
        {extra}

        [[routes]]
        to = ["hook"]
        """


def start(daemons: list[Daemon], tmp_path: Path, config: str) -> Daemon:
    daemon = Daemon(tmp_path, config)
    daemons.append(daemon)
    return daemon.start()


def send_events(path: Path, ids: list[str], per_line: int = 1) -> list[dict[str, object]]:
    client = SocketClient(path)
    acks = []
    for i in range(0, len(ids), per_line):
        chunk = ids[i : i + per_line]
        if per_line == 1:
            client.send(track(chunk[0]))
        else:
            client.send({"batch": [track(m) for m in chunk]})
        acks.append(client.ack())
    client.close()
    return acks


def test_a_thousand_socket_events_reach_the_webhook(tmp_path, receiver, daemons):
    daemon = start(daemons, tmp_path, webhook_config(receiver.url))
    ids = [f"m-{i}" for i in range(1000)]
    acks = send_events(daemon.socket_path, ids[:500])
    acks += send_events(daemon.socket_path, ids[500:], per_line=50)
    assert all(ack["ok"] for ack in acks)
    assert sum(int(ack["count"]) for ack in acks) == 1000
    delivered = receiver.wait_for(1000)
    assert set(delivered) == set(ids)
    assert daemon.stop() == 0


def test_a_receiver_failing_twice_still_gets_everything(tmp_path, daemons):
    def fail_first_two(_request: ReceivedRequest, index: int) -> tuple[int, dict[str, str], bytes]:
        return (500, {}, b"boom") if index < 2 else (200, {}, b"ok")

    receiver = Receiver(policy=fail_first_two)
    try:
        daemon = start(daemons, tmp_path, webhook_config(receiver.url))
        ids = [f"r-{i}" for i in range(20)]
        send_events(daemon.socket_path, ids)
        assert set(receiver.wait_for(20)) == set(ids)
        assert len(receiver.requests) == 22  # two refused attempts, each retried
        assert daemon.stop() == 0
        counters = Inspector(daemon.data_dir / "queue.db").counters("hook")
        assert (counters.routed, counters.delivered, counters.pending) == (20, 20, 0)
    finally:
        receiver.close()


def test_a_400_dead_letters_at_once_with_its_status(tmp_path, daemons):
    receiver = Receiver(policy=lambda _r, _i: (400, {}, b'{"error": "unknown field total"}'))
    try:
        daemon = start(daemons, tmp_path, webhook_config(receiver.url))
        send_events(daemon.socket_path, ["bad-1"])
        inspector = Inspector(daemon.data_dir / "queue.db")
        deadline = time.monotonic() + 10
        while not inspector.dead_letters("hook") and time.monotonic() < deadline:
            time.sleep(0.05)
        [dead] = inspector.dead_letters("hook")
        assert dead.message_id == "bad-1"
        assert dead.attempts == 1
        assert len(receiver.requests) == 1
        [attempt] = json.loads(dead.history)
        assert attempt["status"] == 400
        assert "unknown field total" in attempt["detail"]
        assert json.loads(dead.body)["messageId"] == "bad-1"
        assert inspector.counters("hook").dead_lettered == 1
    finally:
        receiver.close()


def test_signed_requests_verify_with_standard_webhooks(tmp_path, receiver, daemons, monkeypatch):
    secret = "whsec_" + base64.b64encode(b"a 24 byte secret for tests").decode()
    monkeypatch.setenv("HOOK_AUTH", "Bearer t0ken")
    extra = f'secret = "{secret}"\nheaders = {{ Authorization = "env:HOOK_AUTH", X-Team = "data" }}'
    daemon = start(daemons, tmp_path, webhook_config(receiver.url, extra=extra))
    send_events(daemon.socket_path, ["s-1", "s-2", "s-3"])
    receiver.wait_for(3)
    verifier = standardwebhooks.Webhook(secret)
    for request in receiver.requests:
        payload = verifier.verify(request.body, request.headers)
        assert request.headers["webhook-id"] == payload["messageId"]
        expected = hmac.new(secret.encode(), request.body, hashlib.sha1).hexdigest()
        assert request.headers["x-signature"] == expected
        assert request.headers["authorization"] == "Bearer t0ken"
        assert request.headers["x-team"] == "data"
    tampered = receiver.requests[0]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(tampered.body + b" ", tampered.headers)


def test_a_retry_keeps_its_webhook_id(tmp_path, daemons):
    receiver = Receiver(policy=lambda _r, i: (503, {}, b"") if i == 0 else (200, {}, b""))
    try:
        config = webhook_config(receiver.url, extra='secret = "plain-shared-secret"')
        daemon = start(daemons, tmp_path, config)
        send_events(daemon.socket_path, ["same-id"])
        receiver.wait_for(1)
        first, second = receiver.requests
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == "same-id"
    finally:
        receiver.close()


def test_kill_9_during_a_burst_loses_no_acked_event(tmp_path, receiver, daemons):
    config = webhook_config(receiver.url, extra='batch_size = 50\nbatch_wait = "20ms"')
    daemon = start(daemons, tmp_path, config)
    acked: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        sock = SocketClient(daemon.socket_path)
        try:
            for i in range(100_000):
                message_id = f"k-{worker}-{i}"
                sock.send(track(message_id))
                if sock.ack()["ok"]:
                    with lock:
                        acked.append(message_id)
        except (ConnectionError, OSError):
            return
        finally:
            sock.close()

    workers = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    while len(acked) < 2000:
        time.sleep(0.01)
    daemon.kill()
    for worker in workers:
        worker.join()
    restarted = daemon.start()  # same config, same data directory
    delivered = set(receiver.wait_for(len(acked), timeout=60))
    lost = set(acked) - delivered
    print(f"\nkill -9 mid-burst: acked={len(acked)} delivered={len(delivered)} lost={len(lost)}")
    assert not lost
    assert restarted.stop() == 0


class HangingServer:
    """Accepts connections and reads requests, but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        # Stop accepting first (shutdown wakes the blocked accept), or a connection accepted
        # while the others are being closed is left open.
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_dead_and_hanging_destinations_do_not_delay_a_healthy_one(tmp_path, receiver, daemons):
    hanging = HangingServer()
    refused_url = f"http://127.0.0.1:{free_port()}/"
    try:
        config = f"""
            [sources.app]
            socket = true

            [destinations.healthy]
            type = "webhook"
            url = "{receiver.url}"

            [destinations.refused]
            type = "webhook"
            url = "{refused_url}"
            {FAST_RETRY}

            [destinations.hanging]
            type = "webhook"
            url = "{hanging.url}"
            timeout = "60s"

            [[routes]]
            to = ["healthy", "refused", "hanging"]
            """
        daemon = start(daemons, tmp_path, config)
        ids = [f"h-{i}" for i in range(200)]
        started = time.monotonic()
        acks = send_events(daemon.socket_path, ids)
        assert all(a["ok"] for a in acks)
        assert set(receiver.wait_for(200, timeout=10)) == set(ids)
        print(f"\nhealthy destination got 200 events in {time.monotonic() - started:.2f}s")
        assert len(hanging.conns) >= 1  # the hanging destination really was tried
    finally:
        hanging.close()


def test_file_and_stdout_destinations(tmp_path, daemons):
    config = """
        [sources.app]
        socket = true

        [destinations.archive]
        type = "file"
        path = "archive/{source}/{date}.jsonl"
        batch_size = 10

        [destinations.console]
        type = "stdout"

        [[routes]]
        to = ["archive", "console"]
        """
    daemon = start(daemons, tmp_path, config)
    send_events(daemon.socket_path, [f"f-{i}" for i in range(25)])
    day = time.strftime("%Y-%m-%d", time.gmtime())
    archive = daemon.data_dir / "archive" / "app" / f"{day}.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if archive.exists() and len(archive.read_text().splitlines()) == 25:
            break
        time.sleep(0.05)
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [e["messageId"] for e in lines] == [f"f-{i}" for i in range(25)]
    printed = [json.loads(line) for line in daemon.stdout_path.read_text().splitlines()]
    assert {e["messageId"] for e in printed} == {f"f-{i}" for i in range(25)}


def test_socket_acks_errors_and_keeps_the_connection(tmp_path, receiver, daemons):
    daemon = start(daemons, tmp_path, webhook_config(receiver.url))
    client = SocketClient(daemon.socket_path)
    client.send(b"{not json\n")
    bad = client.ack()
    assert bad["ok"] is False
    assert bad["code"] == "invalid_json"
    client.send({"type": "track", "userId": "u"})  # a track without an event name
    assert client.ack()["code"] == "invalid_event"
    client.send(track("after-errors"))
    assert client.ack() == {"ok": True, "count": 1}
    client.close()
    [message_id] = receiver.wait_for(1)
    assert message_id == "after-errors"
    [request] = receiver.requests
    assert request.events()[0]["context"]["peer"]["uid"] == os.getuid()
    assert request.events()[0]["context"]["peer"]["pid"] == os.getpid()


def test_duplicates_are_acked_but_delivered_once(tmp_path, receiver, daemons):
    daemon = start(daemons, tmp_path, webhook_config(receiver.url))
    acks = send_events(daemon.socket_path, ["dup", "dup", "other", "dup"])
    assert [a["ok"] for a in acks] == [True] * 4
    receiver.wait_for(2)
    time.sleep(0.5)
    assert sorted(receiver.delivered_ids()) == ["dup", "other"]


def test_stale_socket_is_replaced_and_a_file_is_refused(tmp_path, receiver, daemons):
    daemon = Daemon(tmp_path, webhook_config(receiver.url))
    daemons.append(daemon)
    daemon.data_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.socket_path))
    stale.close()  # a socket file nobody listens on, as after kill -9
    daemon.start()
    assert daemon.stop() == 0
    assert not daemon.socket_path.exists()  # a clean stop removes its socket

    daemon.socket_path.write_text("precious data\n")
    with pytest.raises(RuntimeError, match="is not a socket"):
        daemon.start()
    assert daemon.socket_path.read_text() == "precious data\n"


def test_a_corrupt_queue_refuses_to_start(tmp_path, receiver, daemons):
    daemon = start(daemons, tmp_path, webhook_config(receiver.url))
    send_events(daemon.socket_path, [f"c-{i}" for i in range(300)], per_line=100)
    assert daemon.stop() == 0
    database = daemon.data_dir / "queue.db"
    data = bytearray(database.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data) - page, page):
        data[offset + 100 : offset + 300] = os.urandom(200)
    database.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="damaged"):
        daemon.start()
    assert database.read_bytes() == bytes(data)  # left as it was, for recovery


def test_sigterm_lets_deliveries_finish_and_exits_0(tmp_path, daemons):
    slow = threading.Event()

    def slow_ok(_request: ReceivedRequest, _index: int) -> tuple[int, dict[str, str], bytes]:
        slow.wait(1.0)
        return 200, {}, b""

    receiver = Receiver(policy=slow_ok)
    try:
        daemon = start(daemons, tmp_path, webhook_config(receiver.url))
        send_events(daemon.socket_path, ["in-flight"])
        deadline = time.monotonic() + 5
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.stop(signal.SIGTERM) == 0
        assert receiver.delivered_ids() == ["in-flight"]
        counters = Inspector(daemon.data_dir / "queue.db").counters("hook")
        assert counters.delivered == 1
    finally:
        receiver.close()


def test_a_second_router_on_the_same_data_directory_is_refused(tmp_path, receiver, daemons):
    first = start(daemons, tmp_path, webhook_config(receiver.url))
    second = Daemon(tmp_path, webhook_config(receiver.url))
    with pytest.raises(RuntimeError, match="another router is running"):
        second.start()
    assert (first.data_dir / "router.lock").read_text().strip() == str(first.process.pid)
    assert first.ready()
