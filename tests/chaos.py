"""The oracle for fault-injection tests: drive the real daemon, record what it acked, check nothing
acked was lost.

- ``Load`` runs HTTP clients (``/v1/batch``, Basic auth) and Unix-socket clients (NDJSON, reading
  every ack) in threads. Each messageId is used once. An id is *acked* when its request got
  ``200`` or its line got ``{"ok": true}``; an id whose request failed midway (connection reset,
  daemon gone, 5xx) is *unknown*: it may or may not be stored, and either is correct.
- ``Crashes`` kills the daemon with SIGKILL and remembers where each receiver's log stood, so a
  duplicate delivery can be told apart: explained when its copies straddle a crash (the daemon
  died between the receiver's answer and the journal's record), unexplained otherwise.
- ``check`` waits for the daemon to settle, then proves, for every acked id: it reached a receiver,
  or it is a dead letter, or it is still stored and counted as pending. It also checks the
  conservation counts of ``router status`` against the receivers and the dead-letter table, and
  prints ``scenario NAME: acked=N delivered=N duplicated=N lost=N dead=N pending=N``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.journal import Inspector
from tests.support import Daemon, Receiver, SocketClient


def event(message_id: str) -> dict[str, Any]:
    return {"type": "track", "userId": "u", "event": "E", "messageId": message_id}


class _SocketClient(SocketClient):
    """``SocketClient`` that closes its socket when the daemon is not there to connect to."""

    def __init__(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.reader = sock.makefile("rb")


@dataclass
class Load:
    """Concurrent HTTP and socket clients that keep sending until ``stop()``.

    Clients survive the daemon going away: they note what was in flight as unknown, wait a
    little and reconnect, so a test can kill and restart the daemon under them.
    """

    daemon: Daemon
    http_clients: int = 2
    socket_clients: int = 2
    batch: int = 5
    pause: float = 0.0  # seconds between requests per client; 0 is as fast as the daemon acks
    write_key: str = "wk"
    prefix: str = "c"
    acked: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    refused: int = 0  # requests answered with a 4xx/5xx or an error ack (nothing acked)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        workers = [self._http] * self.http_clients + [self._socket] * self.socket_clients
        for n, work in enumerate(workers):
            thread = threading.Thread(target=work, args=(f"{self.prefix}{n}",), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self

    def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def _ids(self, name: str) -> Iterable[list[str]]:
        n = 0
        while not self._stop.is_set():
            yield [f"{name}-{n + i}" for i in range(self.batch)]
            n += self.batch
            if self.pause:
                time.sleep(self.pause)

    def _settle(self, ids: list[str], outcome: str) -> None:
        with self.lock:
            if outcome == "acked":
                self.acked.update(ids)
            elif outcome == "unknown":
                self.unknown.update(ids)
            else:
                self.refused += 1

    def _http(self, name: str) -> None:
        url = f"http://127.0.0.1:{self.daemon.port}/v1/batch"
        with httpx.Client(auth=(self.write_key, ""), timeout=10) as client:
            for ids in self._ids(name):
                try:
                    response = client.post(url, json={"batch": [event(m) for m in ids]})
                except httpx.HTTPError:
                    self._settle(ids, "unknown")
                    time.sleep(0.05)
                    continue
                if response.status_code == 200:
                    self._settle(ids, "acked")
                elif response.status_code >= 500:
                    # A 5xx promises nothing was acked, but under a crash the commit may have
                    # happened; an id we cannot vouch for either way is unknown.
                    self._settle(ids, "unknown")
                else:
                    self._settle(ids, "refused")

    def _socket(self, name: str) -> None:
        client: SocketClient | None = None
        for ids in self._ids(name):
            try:
                if client is None:
                    client = _SocketClient(self.daemon.socket_path)
                client.send({"batch": [event(m) for m in ids]})
                ack = client.ack()
            except (OSError, ValueError):
                self._settle(ids, "unknown")
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.05)
                continue
            self._settle(ids, "acked" if ack.get("ok") else "refused")
        if client is not None:
            client.close()


@dataclass
class Crashes:
    """kill -9 with a bookmark in every receiver's log of accepted requests."""

    receivers: list[Receiver]
    marks: list[dict[int, int]] = field(default_factory=list)  # id(receiver) -> accepted count

    def kill(self, daemon: Daemon, then: Callable[[], None] | None = None) -> None:
        """SIGKILL and wait; ``then`` runs once the daemon is dead (a receiver that was told
        to answer only now, say), before the bookmark."""
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        if then is not None:
            then()
        # A request the dead daemon already sent may still be in a handler thread; let it land
        # before the bookmark so it counts as "before the crash".
        time.sleep(0.2)
        self.marks.append({id(r): len(r.accepted) for r in self.receivers})

    def straddles(self, receiver: Receiver, first: int, later: int) -> bool:
        """Whether a crash happened between accepted request ``first`` and ``later``."""
        return any(first < mark[id(receiver)] <= later for mark in self.marks)


@dataclass
class Report:
    scenario: str
    acked: int
    delivered: int  # acked ids that reached a receiver
    duplicated: int  # (destination, id) pairs accepted more than once
    unexplained: list[str]  # duplicates with no crash between their copies
    lost: list[str]
    dead: int
    pending: int
    conservation: list[str]  # every way the status counts disagree with what we saw
    status: dict[str, Any]  # ``router status --json`` as the check saw it

    @property
    def line(self) -> str:
        return (
            f"scenario {self.scenario}: acked={self.acked} delivered={self.delivered} "
            f"duplicated={self.duplicated} lost={len(self.lost)} dead={self.dead} "
            f"pending={self.pending}"
        )

    def assert_ok(self, *, allow_pending: bool = False) -> None:
        assert not self.lost, f"{self.line}: lost {sorted(self.lost)[:20]}"
        assert not self.unexplained, f"{self.line}: unexplained duplicates {self.unexplained[:20]}"
        assert not self.conservation, f"{self.line}: {self.conservation}"
        assert allow_pending or not self.pending, f"{self.line}: still pending"

    def assert_settled(self) -> None:
        """``assert_ok``, and every destination caught up (nothing pending or unread)."""
        self.assert_ok()
        busy = {
            name: {k: d[k] for k in ("pending", "unread", "retrying")}
            for name, d in self.status["destinations"].items()
            if d["pending"] or d["unread"]
        }
        assert not busy, f"{self.line}: never settled: {busy}"


def status(daemon: Daemon) -> dict[str, Any]:
    """``router status --json``: over the admin socket when running, from the file otherwise."""
    result = subprocess.run(
        [sys.executable, "-m", "router", "status", "--json", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def settle(daemon: Daemon, destinations: Iterable[str], timeout: float = 60) -> dict[str, Any]:
    """Status once no destination has anything pending or unread (or the timeout passed)."""
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
        time.sleep(0.25)


def stored_ids(daemon: Daemon) -> set[str]:
    inspector = Inspector(daemon.data_dir / "queue.db")
    try:
        ids: set[str] = set()
        seq = 0
        while page := inspector.events_after(seq, 5000):
            ids.update(e.message_id for e in page)
            seq = page[-1].seq
        return ids
    finally:
        inspector.close()


def check(
    scenario: str,
    daemon: Daemon,
    acked: set[str],
    receivers: dict[str, Receiver],
    crashes: Crashes | None = None,
    *,
    settle_timeout: float = 30,
    capsys: pytest.CaptureFixture[str] | None = None,
) -> Report:
    """The oracle. ``receivers`` maps each webhook destination to the server behind it.

    Waits for the daemon to settle first; a destination that never settles leaves its ids
    pending, which ``Report.assert_ok`` refuses unless told otherwise.

    An acked id counts as delivered when any receiver took it (routes decide who should);
    per destination, a settled ``delivered`` count must equal the distinct ids its receiver
    holds, so a destination that records a delivery its receiver never saw is caught there.
    """
    shown = settle(daemon, receivers, settle_timeout)
    inspector = Inspector(daemon.data_dir / "queue.db")
    try:
        dead_rows = inspector.dead_letters()
    finally:
        inspector.close()
    stored = stored_ids(daemon)

    copies: Counter[tuple[str, str]] = Counter()  # (destination, messageId) -> accepted copies
    unexplained: list[str] = []
    problems: list[str] = []
    for name, receiver in receivers.items():
        seen: dict[str, int] = {}  # id -> index of the first accepted request holding it
        with receiver.lock:
            accepted = list(receiver.accepted)
        for index, request in enumerate(accepted):
            try:
                events = request.events()
            except ValueError:
                # The daemon died mid-request: the receiver read a short body (support.Receiver
                # does not check Content-Length) and answered a request nobody sent in full.
                continue
            for e in events:
                message_id = e["messageId"]
                copies[name, message_id] += 1
                if message_id not in seen:
                    seen[message_id] = index
                elif crashes is None or not crashes.straddles(receiver, seen[message_id], index):
                    unexplained.append(message_id)
        d = shown["destinations"][name]
        if d["routed"] != d["delivered"] + d["dead_lettered"] + d["filtered"] + d["pending"]:
            problems.append(f"{name}: routed != delivered + dead + filtered + pending: {d}")
        if min(d["pending"], d["delivered"], d["dead_lettered"]) < 0:
            problems.append(f"{name}: a negative count: {d}")
        if not d["pending"] and not d["unread"] and d["delivered"] != len(seen):
            problems.append(f"{name}: delivered={d['delivered']} but receiver has {len(seen)}")
        dead_here = sum(1 for row in dead_rows if row.destination == name)
        if d["dead_lettered"] != dead_here:
            problems.append(f"{name}: dead_lettered={d['dead_lettered']} but {dead_here} rows")

    dead = {row.message_id for row in dead_rows}
    delivered = acked & {message_id for _, message_id in copies}
    open_ids = acked - delivered - dead
    # Still stored and the journal still owes it to someone: pending. Anything else is lost.
    owed = sum(d["pending"] + d["unread"] for d in shown["destinations"].values())
    lost = sorted(open_ids - stored)
    if len(open_ids & stored) > owed:
        lost += sorted(open_ids & stored)
    pending = len(open_ids) - len(lost)
    report = Report(
        scenario,
        acked=len(acked),
        delivered=len(delivered),
        duplicated=sum(1 for n in copies.values() if n > 1),
        unexplained=unexplained,
        lost=lost,
        dead=len(acked & dead),
        pending=pending,
        conservation=problems,
        status=shown,
    )
    emit(report.line, capsys)
    return report


def emit(line: str, capsys: pytest.CaptureFixture[str] | None = None) -> None:
    """Print past pytest's capture when given ``capsys``; the issue wants these lines in CI."""
    if capsys is None:
        print(line)
        return
    with capsys.disabled():
        print(f"\n{line}")
