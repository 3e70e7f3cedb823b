"""router as a systemd service, against the real daemon: sd_notify, the watchdog, SIGHUP
reload without loss, a bad reload that keeps the running config, and socket activation.

systemd itself is not needed: its side of each protocol is a real socket made here (the
notify datagram socket, the listening sockets it would pass).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Daemon, Receiver, free_port

pytestmark = pytest.mark.slow


class NotifySocket:
    """What systemd listens on: a datagram socket collecting every notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, prefix: str, after: int = 0, timeout: float = 20) -> int:
        """The index of the first message from ``after`` on that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(after, len(self.messages)):
                if any(line.startswith(prefix) for line in self.messages[index].split("\n")):
                    return index
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} after message {after}: {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


HOOK = """
[sources.web]
write_key = "wk"

[destinations.a]
type = "webhook"
url = "{url}"
batch_size = 20
batch_wait = "10ms"

[[routes]]
to = ["a"]
"""


def post(port: int, ids: list[str]) -> int:
    batch = [{"type": "track", "userId": "u", "event": "E", "messageId": m} for m in ids]
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/batch", json={"batch": batch}, auth=("wk", "")
    ).status_code


def test_sd_notify_ready_watchdog_status_reload_stopping(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # every 0.5 s
    daemon = Daemon(tmp_path, HOOK.format(url=receiver.url))
    try:
        daemon.start()
        ready = notify.wait_for("READY=1")
        first_watchdog = notify.wait_for("WATCHDOG=1", ready)
        notify.wait_for("WATCHDOG=1", first_watchdog + 1)  # again: it keeps coming
        notify.wait_for("STATUS=", ready)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", ready + 1)
        assert "MONOTONIC_USEC=" in notify.messages[reloading]
        notify.wait_for("READY=1", reloading + 1)
        assert daemon.stop() == 0
        notify.wait_for("STOPPING=1", reloading)
    finally:
        notify.close()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()


def test_reload_swaps_routes_and_destinations_without_loss_or_duplicates(tmp_path: Path):
    first, second = Receiver(), Receiver()
    daemon = Daemon(tmp_path, HOOK.format(url=first.url))
    try:
        daemon.start()
        sent: list[str] = []
        stop = threading.Event()

        def keep_sending() -> None:
            n = 0
            while not stop.is_set():
                ids = [f"r-{n}-{i}" for i in range(10)]
                if post(daemon.port, ids) == 200:
                    sent.extend(ids)
                n += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(1)
        # a's batch settings change (a restart of its dispatcher) and b is added.
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace("batch_size = 20", "batch_size = 7")
            + f"""
[destinations.b]
type = "webhook"
url = "{second.url}"

[[routes]]
to = ["b"]
"""
        )
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        stop.set()
        sender.join()
        delivered = first.wait_for(len(sent), timeout=60)
        assert sorted(delivered) == sorted(sent)  # every acked event once: none lost, none twice
        assert len(second.wait_for(1)) > 0  # the new destination gets events after the reload
        assert "reloaded" in daemon.stderr()
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
        first.close()
        second.close()


def test_a_bad_config_on_reload_keeps_the_running_one(tmp_path: Path, receiver: Receiver):
    daemon = Daemon(tmp_path, HOOK.format(url=receiver.url))
    try:
        daemon.start()
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good.replace('to = ["a"]', 'to = ["nosuch"]'))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "routes[0].to: unknown destination 'nosuch'" in daemon.stderr()
        assert post(daemon.port, ["after-bad-reload"]) == 200
        assert receiver.wait_for(1) == ["after-bad-reload"]
        metrics = httpx.get(f"http://127.0.0.1:{daemon.port}/metrics").text
        assert 'router_reloads_total{result="failed"} 1' in metrics
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()


ACTIVATE = """
import os, socket, sys
http = socket.socket()
http.bind(("127.0.0.1", int(sys.argv[1])))
http.listen(16)
unix = socket.socket(socket.AF_UNIX)
unix.bind(sys.argv[2])
unix.listen(16)
for fd, sock in ((3, http), (4, unix)):
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd)
    os.set_inheritable(fd, True)  # dup2 onto itself is a no-op that would leave it CLOEXEC
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="http:socket")
os.execv(sys.executable, [sys.executable, "-m", "router", "run", "--config", sys.argv[3]])
"""


def test_socket_activation_uses_the_sockets_systemd_passes(tmp_path: Path, receiver: Receiver):
    """A wrapper plays systemd: it binds both listeners, then execs router (same pid)."""
    port = free_port()
    ingest = tmp_path / "activated.sock"
    daemon = Daemon(
        tmp_path,
        HOOK.format(url=receiver.url).replace("[sources.web]", "[sources.web]\nsocket = true"),
    )
    text = daemon.config_path.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{port}")
    daemon.config_path.write_text(text.replace('socket = "router.sock"', f'socket = "{ingest}"'))
    with (tmp_path / "out.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(port), str(ingest), str(daemon.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))},
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert post(port, ["over-http"]) == 200
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(ingest))
            line = {"type": "track", "userId": "u", "event": "E", "messageId": "over-socket"}
            client.sendall(json.dumps(line).encode() + b"\n")
            assert json.loads(client.makefile().readline()) == {"ok": True, "count": 1}
        assert sorted(receiver.wait_for(2)) == ["over-http", "over-socket"]
        log = (tmp_path / "out.log").read_text()
        assert "using the http socket from systemd" in log
        assert "using the socket socket from systemd" in log
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert ingest.is_socket()  # systemd's socket file: not ours to remove


def test_logs_are_json_lines_and_never_hold_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    secrets = {"HOOK_SECRET": "whsec_c2VjcmV0LWZvci1sb2dz", "ADMIN": "admin-t0ken-xyz"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    failing = Receiver(policy=lambda _r, _i: (500, {}, b"server error"))
    body = HOOK.format(url=failing.url) + '\n[destinations.a.retry]\ninitial = "50ms"\n'
    body = body.replace('batch_wait = "10ms"', 'batch_wait = "10ms"\nsecret = "env:HOOK_SECRET"')
    daemon = Daemon(tmp_path, body, server='admin_token = "env:ADMIN"')
    try:
        daemon.start(20.0, "--log-level", "debug")
        assert post(daemon.port, ["l-1"]) == 200
        failing.wait_for(0)
        time.sleep(1.5)  # a few failed attempts, logged
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)  # a reload logs too
        time.sleep(1)
    finally:
        daemon.stop()
        failing.close()
    lines = daemon.stderr().splitlines()
    assert len(lines) > 5
    for line in lines:
        entry = json.loads(line)  # stderr is not a terminal: JSON lines for journald
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    for value in secrets.values():
        assert value not in daemon.stderr()
        assert value not in daemon.stdout_path.read_text()
