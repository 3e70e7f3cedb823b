"""Chaos at the network edges: failing destinations, slowloris and floods, socket permissions,
wall-clock jumps. The real daemon as a subprocess, real loopback peers.

Each scenario prints one ``scenario NAME: acked=N delivered=N duplicated=N lost=N ...`` line.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Daemon, ReceivedRequest, Receiver, SocketClient, track

pytestmark = pytest.mark.slow


def emit(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Past pytest's capture: CI logs should show what each scenario did."""
    with capsys.disabled():
        print(f"\n{line}")


def status(daemon: Daemon) -> dict[str, Any]:
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


def wait_settled(daemon: Daemon, names: list[str], timeout: float = 60) -> dict[str, Any]:
    """Status once every destination has nothing pending (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = status(daemon)
        dests = shown["destinations"]
        if all(dests[n]["routed"] and not dests[n]["pending"] for n in names):
            return shown
        if time.monotonic() > deadline:
            return shown
        time.sleep(0.2)


def send(daemon: Daemon, ids: list[str]) -> list[str]:
    """Send over the Unix socket; return the ids acked."""
    client = SocketClient(daemon.socket_path)
    acked = []
    try:
        for message_id in ids:
            client.send(track(message_id))
            if client.ack().get("ok"):
                acked.append(message_id)
    finally:
        client.close()
    return acked


class Attempts:
    """A Receiver policy that timestamps every attempt per webhook-id, then answers by rule."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, request: ReceivedRequest, _index: int) -> tuple[int, dict[str, str], bytes]:
        key = request.headers.get("webhook-id", "")
        self.times[key].append(time.monotonic())
        result: tuple[int, dict[str, str], bytes] = self.answer(len(self.times[key]))
        return result

    def total(self) -> int:
        return sum(len(t) for t in self.times.values())


class RawServer:
    """A TCP peer that misbehaves below HTTP: ``reset`` reads the request head, then closes with
    RST; ``hang`` accepts, reads, and never answers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.times: dict[str, list[float]] = defaultdict(list)
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        conn.close()
                        return
                    head += chunk
                key = ""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"webhook-id:"):
                        key = line.split(b":", 1)[1].strip().decode()
                with self.lock:
                    self.times[key].append(time.monotonic())
                if self.mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
                with self.lock:
                    self.held.append(conn)
                # Never answer; let go only when the daemon gives up and closes its end.
                while conn.recv(65536):
                    pass
                with self.lock:
                    self.held.remove(conn)
                conn.close()
                return
        except OSError:
            conn.close()

    def total(self) -> int:
        with self.lock:
            return sum(len(t) for t in self.times.values())

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for conn in self.held:
                conn.close()


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Daemon):
            if thing.process is not None and thing.process.poll() is None:
                thing.kill()
        else:
            thing.close()


def destination(name: str, url: str, retry: str, *, timeout: str = "5s") -> str:
    return f"""
        [destinations.{name}]
        type = "webhook"
        url = "{url}"
        concurrency = 8
        timeout = "{timeout}"
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # for the webhook-id header
        retry = {{ {retry} }}
        """


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# -- (6) failing destinations beside a healthy one ---------------------------------------------


def test_failing_destinations_retry_as_configured_and_spare_the_healthy_one(
    tmp_path: Path, cleanup: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    healthy_seen: dict[str, float] = {}

    def healthy_answer(request: ReceivedRequest, _i: int) -> tuple[int, dict[str, str], bytes]:
        healthy_seen.setdefault(request.headers["webhook-id"], time.monotonic())
        return 200, {}, b"ok"

    def slow_answer(_n: int) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.2)
        return 200, {}, b"ok"

    e500 = Attempts(lambda _n: (500, {}, b"boom"))
    e400 = Attempts(lambda _n: (400, {}, b"no"))
    # 429 with Retry-After: 1 twice, then accepted.
    e429 = Attempts(lambda n: (429, {"retry-after": "1"}, b"later") if n <= 2 else (200, {}, b""))
    slow = Attempts(slow_answer)
    receivers = {
        "healthy": Receiver(healthy_answer),
        "e500": Receiver(e500),
        "e400": Receiver(e400),
        "e429": Receiver(e429),
        "slow": Receiver(slow),
    }
    cleanup.extend(receivers.values())
    reset, hang = RawServer("reset"), RawServer("hang")
    cleanup.extend([reset, hang])
    fast = 'max_attempts = 3, max_age = "0s", initial = "50ms", max_backoff = "100ms"'
    backoff = 'max_attempts = 5, max_age = "0s", initial = "200ms", max_backoff = "800ms"'
    config = (
        "[sources.app]\nsocket = true\n"
        + destination("healthy", receivers["healthy"].url, fast)
        + destination("e500", receivers["e500"].url, backoff)
        + destination("e400", receivers["e400"].url, fast)
        + destination("e429", receivers["e429"].url, fast)
        + destination("slow", receivers["slow"].url, fast)
        + destination("reset", reset.url, fast)
        + destination(
            "hang", hang.url, 'max_attempts = 2, max_age = "0s", initial = "50ms"', timeout="1s"
        )
        + "\n[[routes]]\nto = ['healthy', 'e500', 'e400', 'e429', 'slow', 'reset', 'hang']\n"
    )
    daemon = Daemon(tmp_path, config)
    cleanup.append(daemon)
    daemon.start()

    ids = [str(uuid.uuid4()) for _ in range(12)]
    acked_at: dict[str, float] = {}
    client = SocketClient(daemon.socket_path)
    for message_id in ids:
        client.send(track(message_id))
        assert client.ack()["ok"]
        acked_at[message_id] = time.monotonic()
    client.close()

    names = ["healthy", "e500", "e400", "e429", "slow", "reset", "hang"]
    shown = wait_settled(daemon, names, timeout=60)
    dests = shown["destinations"]

    # The healthy destination got everything, promptly, while the others were failing.
    delays = [healthy_seen[m] - acked_at[m] for m in ids if m in healthy_seen]
    assert set(healthy_seen) == set(ids)
    assert max(delays) < 1.0, delays

    # 5xx: exactly max_attempts attempts, each gap within the full-jitter ceiling for it.
    worst_excess = 0.0
    for message_id in ids:
        times = e500.times[message_id]
        assert len(times) == 5, times
        for n, (a, b) in enumerate(itertools.pairwise(times), start=1):
            ceiling = min(0.8, 0.2 * 2 ** (n - 1))
            worst_excess = max(worst_excess, (b - a) - ceiling)
    assert worst_excess < 0.35, worst_excess
    # 4xx: one attempt, dead at once.
    assert all(len(e400.times[m]) == 1 for m in ids)
    # 429 + Retry-After: 1: the wait is honoured even though the backoff would be 50-100ms.
    gaps_429 = [b - a for m in ids for a, b in itertools.pairwise(e429.times[m])]
    assert len(gaps_429) == 2 * len(ids)
    assert min(gaps_429) >= 0.95, gaps_429
    assert max(gaps_429) < 1.8, gaps_429
    # Reset connections: retried like any transport error, max_attempts times each.
    assert all(len(reset.times[m]) == 3 for m in ids), dict(reset.times)
    # Never answers: timed out after ~1s, twice each, then dead.
    assert all(len(hang.times[m]) == 2 for m in ids), dict(hang.times)
    hang_gaps = [b - a for m in ids for a, b in itertools.pairwise(hang.times[m])]
    assert min(hang_gaps) >= 0.9, hang_gaps

    expected = {
        "healthy": ("delivered", len(ids)),
        "slow": ("delivered", len(ids)),
        "e429": ("delivered", len(ids)),
        "e500": ("dead_lettered", len(ids)),
        "e400": ("dead_lettered", len(ids)),
        "reset": ("dead_lettered", len(ids)),
        "hang": ("dead_lettered", len(ids)),
    }
    for name, (field, count) in expected.items():
        assert dests[name][field] == count, (name, dests[name])
        assert dests[name]["pending"] == 0, (name, dests[name])
    delivered = sum(dests[n]["delivered"] for n in names)
    dead = sum(dests[n]["dead_lettered"] for n in names)
    dup = sum(1 for r in receivers.values() for n in Counter(r.delivered_ids()).values() if n > 1)
    emit(
        capsys,
        f"scenario failing_destinations: acked={len(ids)} delivered={delivered} "
        f"duplicated={dup} lost=0 dead={dead} pending=0 "
        f"healthy_max_delay={max(delays):.3f}s e500_worst_gap_over_ceiling={worst_excess:.3f}s "
        f"retry_after_gaps={min(gaps_429):.2f}-{max(gaps_429):.2f}s "
        f"hang_gaps>={min(hang_gaps):.2f}s",
    )


def test_thousands_of_failures_leak_no_descriptors_or_memory(
    tmp_path: Path, cleanup: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    e500 = Attempts(lambda _n: (500, {}, b"boom"))
    failing = Receiver(e500)
    reset, hang = RawServer("reset"), RawServer("hang")
    cleanup.extend([failing, reset, hang])
    retry = 'max_attempts = 10, max_age = "0s", initial = "1ms", max_backoff = "5ms"'
    few = 'max_attempts = 3, max_age = "0s", initial = "1ms", max_backoff = "5ms"'
    config = (
        "[sources.app]\nsocket = true\n"
        + destination("e500", failing.url, retry)
        + destination("reset", reset.url, retry)
        + destination("hang", hang.url, few, timeout="100ms")
        + "\n[[routes]]\nto = ['e500', 'reset', 'hang']\n"
    )
    names = ["e500", "reset", "hang"]
    daemon = Daemon(tmp_path, config)
    cleanup.append(daemon)
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid

    def run(count: int) -> list[str]:
        ids = send(daemon, [str(uuid.uuid4()) for _ in range(count)])
        assert len(ids) == count
        return ids

    # Warm up: every code path, connection pool and cache is in use before the baseline.
    warm = run(20)
    shown = wait_settled(daemon, names, timeout=60)
    fds_before, rss_before = fd_count(pid), proc_status(pid, "VmRSS")
    threads_before = proc_status(pid, "Threads")
    attempts_before = e500.total() + reset.total()

    ids = run(100)
    started = time.monotonic()
    deadline = started + 90
    while time.monotonic() < deadline:
        shown = status(daemon)
        if all(shown["destinations"][n]["dead_lettered"] == 120 for n in names):
            break
        time.sleep(0.2)
    took = time.monotonic() - started
    time.sleep(0.5)  # let closing connections finish closing
    fds_after, rss_after = fd_count(pid), proc_status(pid, "VmRSS")
    threads_after = proc_status(pid, "Threads")
    failures = e500.total() + reset.total() - attempts_before
    timeouts = hang.total()

    for name in names:
        d = shown["destinations"][name]
        assert d["dead_lettered"] == len(warm) + len(ids), (name, d)
        assert d["pending"] == 0
    assert failures >= 2000, failures
    assert timeouts == 3 * (len(warm) + len(ids)), timeouts
    # The daemon hung up on every attempt it gave up on: none is left open at the peer.
    with hang.lock:
        assert hang.held == [], len(hang.held)
    emit(
        capsys,
        f"scenario failure_leaks: acked={len(warm) + len(ids)} delivered=0 duplicated=0 lost=0 "
        f"dead={3 * (len(warm) + len(ids))} pending=0 failed_attempts={failures} "
        f"timed_out_attempts={timeouts} in {took:.1f}s "
        f"fds={fds_before}->{fds_after} rss_kib={rss_before}->{rss_after} "
        f"threads={threads_before}->{threads_after} hung_conns_left_open={len(hang.held)}",
    )
    assert fds_after <= fds_before + 4, (fds_before, fds_after)
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)


# -- (8) slowloris and connection floods -------------------------------------------------------

HTTP_CONFIG = """
[http]
max_connections = 64

[sources.web]
write_key = "wk"

[destinations.out]
type = "stdout"

[[routes]]
to = ["out"]
"""


class GoodClient:
    """A well-behaved client: one fresh connection per request, its latency recorded."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/track"
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def request(self) -> httpx.Response:
        message_id = str(uuid.uuid4())
        started = time.monotonic()
        response = httpx.post(self.url, auth=("wk", ""), json=track(message_id), timeout=10)
        self.latencies.append(time.monotonic() - started)
        self.statuses[response.status_code] += 1
        if response.status_code == 200:
            self.acked.append(message_id)
        return response

    def _run(self) -> None:
        while not self.stop.is_set():
            self.request()
            time.sleep(0.05)

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2]
        return f"good_requests={len(ordered)} p50={p50 * 1000:.1f}ms max={ordered[-1] * 1000:.1f}ms"


def closed_after(sock: socket.socket, started: float, drip: bytes | None, limit: float) -> float:
    """Seconds until the daemon closes ``sock`` (dripping ``drip`` a byte a second meanwhile)."""
    sock.settimeout(1.0)
    position = 0
    while time.monotonic() - started < limit:
        if drip is not None and position < len(drip):
            try:
                sock.send(drip[position : position + 1])
            except OSError:
                return time.monotonic() - started
            position += 1
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started
        # An error answer (408) before the close is fine; keep reading until EOF.
    return float("inf")


def test_slowloris_is_cut_off_and_good_clients_stay_fast(
    tmp_path: Path, cleanup: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = Daemon(tmp_path, HTTP_CONFIG)
    cleanup.append(daemon)
    daemon.start()
    good = GoodClient(daemon.port)
    for _ in range(5):
        assert good.request().status_code == 200
    baseline = sorted(good.latencies)[2]

    # 20 silent connections and 20 that drip a request head a byte a second: under the cap.
    head = b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic d2s6\r\n" * 4
    closes: list[float] = []
    lock = threading.Lock()

    def attack(drip: bytes | None) -> None:
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        started = time.monotonic()
        took = closed_after(sock, started, drip, limit=25)
        sock.close()
        with lock:
            closes.append(took)

    attackers = [
        threading.Thread(target=attack, args=(None if i % 2 else head,), daemon=True)
        for i in range(40)
    ]
    for thread in attackers:
        thread.start()
    time.sleep(0.5)
    good.latencies.clear()
    good.thread.start()
    for thread in attackers:
        thread.join(timeout=30)
    good.stop.set()
    good.thread.join()

    # header_timeout is 10s: every slow connection was closed near it, none lasted.
    assert len(closes) == 40
    assert all(8.5 < c < 13 for c in closes), sorted(closes)
    assert set(good.statuses) == {200}, good.statuses
    assert max(good.latencies) < 1.0, good.summary()
    out = wait_settled(daemon, ["out"])["destinations"]["out"]
    assert out["delivered"] == len(good.acked), out
    emit(
        capsys,
        f"scenario slowloris: acked={len(good.acked)} delivered={out['delivered']} "
        "duplicated=0 lost=0 "
        f"slow_conns=40 closed_after={min(closes):.1f}-{max(closes):.1f}s "
        f"baseline={baseline * 1000:.1f}ms {good.summary()}",
    )


def test_connection_flood_meets_the_cap_and_recovers(
    tmp_path: Path, cleanup: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = Daemon(tmp_path, HTTP_CONFIG)
    cleanup.append(daemon)
    daemon.start()
    good = GoodClient(daemon.port)
    assert good.request().status_code == 200
    time.sleep(0.2)  # its connection is closed and forgotten

    flood = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(300)]
    # Past the cap a connection is answered 503 and closed; past twice the cap (refusals in
    # flight) it is closed without a word. Either way it is not served.
    answers: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        waiting = [s for s in flood if s not in answers]
        readable, _, _ = select.select(waiting, [], [], 0.2)
        for sock in readable:
            try:
                answers[sock] = sock.recv(4096)
            except ConnectionResetError:
                answers[sock] = b""
    held = len(flood) - len(answers)
    refused = sum(1 for data in answers.values() if data.startswith(b"HTTP/1.1 503"))
    closed = sum(1 for data in answers.values() if data == b"")
    assert all(b"retry-after: 1" in d.lower() for d in answers.values() if d), answers
    # While the flood holds the cap, a newcomer is told to come back later, promptly.
    started = time.monotonic()
    over = good.request()
    refusal_latency = time.monotonic() - started
    assert over.status_code == 503
    assert over.headers["retry-after"] == "1"
    for sock in flood:
        sock.close()
    time.sleep(0.3)
    after = [good.request().status_code for _ in range(20)]
    assert held == 64, (held, refused)
    assert refused + closed == 300 - 64
    assert refused >= 64
    assert set(after) == {200}, after
    latencies = sorted(good.latencies[-20:])
    out = wait_settled(daemon, ["out"])["destinations"]["out"]
    assert out["delivered"] == len(good.acked), out
    emit(
        capsys,
        f"scenario connection_flood: acked={len(good.acked)} delivered={out['delivered']} "
        "duplicated=0 lost=0 "
        f"flood=300 cap=64 held={held} refused_503={refused} closed={closed} "
        f"newcomer_503_in={refusal_latency * 1000:.1f}ms "
        f"after_flood_max={latencies[-1] * 1000:.1f}ms",
    )


# -- (9) Unix socket permissions ---------------------------------------------------------------

CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(exc.errno)
else:
    s.sendall(sys.argv[2].encode() + b"\\n")
    s.shutdown(socket.SHUT_WR)
    print(0, s.makefile().readline().strip())
"""


def connect_as(user: str, path: Path, line: str = "{}") -> str:
    """Connect to ``path`` as ``user`` from a separate process; errno or 0 plus the answer."""
    result = subprocess.run(
        ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", CONNECT, str(path), line],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


@pytest.fixture
def socket_member() -> Iterator[tuple[str, int]]:
    """A temporary user whose only group is a temporary group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users and create a group")
    if not (shutil.which("runuser") and shutil.which("useradd") and shutil.which("groupadd")):
        pytest.skip("runuser, useradd or groupadd missing")
    name = f"rtst{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True)
    try:
        subprocess.run(
            ["useradd", "-M", "-N", "-g", name, "-s", "/usr/sbin/nologin", name], check=True
        )
        try:
            yield name, grp.getgrnam(name).gr_gid
        finally:
            subprocess.run(["userdel", name], check=True)
    finally:
        # userdel may already have removed the group (USERGROUPS_ENAB): check by name.
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=True)


def test_only_the_socket_group_reaches_ingest_and_only_the_owner_reaches_admin(
    socket_member: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    member, gid = socket_member
    # Not under pytest's 0700 tmp dirs: the sockets' own modes must be what keeps users out.
    top = Path(tempfile.mkdtemp(prefix="router-perm-", dir="/tmp"))
    daemon = Daemon(
        top,
        "[sources.app]\nsocket = true\n[destinations.out]\ntype = 'stdout'\n"
        "[[routes]]\nto = ['out']\n",
    )
    try:
        os.chmod(top, 0o755)
        daemon.start()
        os.chmod(daemon.data_dir, 0o755)
        ingest, admin = daemon.socket_path, daemon.data_dir / "admin.sock"
        assert admin.exists()
        assert ingest.stat().st_mode & 0o777 == 0o660
        assert admin.stat().st_mode & 0o777 == 0o600
        assert ingest.stat().st_gid == 0  # the daemon's group (root's)
        assert pwd.getpwnam("nobody").pw_gid != 0

        line = json.dumps(track(str(uuid.uuid4())))
        nobody_ingest = connect_as("nobody", ingest, line)
        nobody_admin = connect_as("nobody", admin, '{"op": "status"}')
        # What an operator does (or systemd's SocketGroup=): hand the socket to a group.
        os.chown(ingest, -1, gid)
        os.chown(admin, -1, gid)
        member_ingest = connect_as(member, ingest, line)
        member_admin = connect_as(member, admin, '{"op": "status"}')
        root_admin = connect_as("root", admin, '{"op": "status"}')
    finally:
        if daemon.process is not None:
            daemon.stop()
        shutil.rmtree(top, ignore_errors=True)

    eacces = "13"
    assert nobody_ingest == eacces, nobody_ingest
    assert nobody_admin == eacces, nobody_admin
    assert member_ingest.startswith("0 ")
    assert '"ok":true' in member_ingest.replace(" ", "")
    assert member_admin == eacces, member_admin
    assert root_admin.startswith("0 "), root_admin
    emit(
        capsys,
        f"scenario socket_permissions: acked=1 delivered=n/a duplicated=0 lost=0 "
        f"nobody_ingest=errno{nobody_ingest} nobody_admin=errno{nobody_admin} "
        f"member_ingest=ok member_admin=errno{member_admin} root_admin=ok",
    )


# -- (10) wall-clock jumps ---------------------------------------------------------------------

# Debian's faketime package, whatever the architecture.
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)


def test_wall_clock_jumps_cause_no_retry_storm_and_no_stall(
    tmp_path: Path,
    cleanup: list[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if LIBFAKETIME is None:
        pytest.skip("libfaketime missing (Debian package faketime)")
    # The daemon's wall clock reads this file on every call; CLOCK_MONOTONIC stays real, as it
    # does when NTP or an operator steps the clock.
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    monkeypatch.setenv("LD_PRELOAD", str(LIBFAKETIME))
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")

    failing = threading.Event()
    failing.set()

    def answer(_n: int) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"down") if failing.is_set() else (200, {}, b"ok")

    attempts = Attempts(answer)
    hook = Receiver(attempts)
    cleanup.append(hook)
    retry = 'max_attempts = 1000, max_age = "24h", initial = "500ms", max_backoff = "2s"'
    config = (
        "[sources.app]\nsocket = true\n"
        + destination("hook", hook.url, retry)
        + "\n[[routes]]\nto = ['hook']\n"
    )
    daemon = Daemon(tmp_path, config)
    cleanup.append(daemon)
    daemon.start()
    monkeypatch.delenv("LD_PRELOAD")  # the test's own subprocesses (router status) run unfaked

    ids = send(daemon, [str(uuid.uuid4()) for _ in range(20)])
    assert len(ids) == 20
    time.sleep(2.0)

    def window(jump: str, seconds: float) -> int:
        # Atomically: libfaketime must never read a half-written file.
        fresh = offset.with_suffix(".new")
        fresh.write_text(jump + "\n")
        fresh.replace(offset)
        before = attempts.total()
        time.sleep(seconds)
        return attempts.total() - before

    forward = window("+2h", 3.0)
    # 30 minutes back: less than the longest Retry-After honoured (1h), so only noticing
    # the step releases the retries it parked.
    back_short = window("+90m", 3.0)
    backward = window("-1h", 3.0)  # two and a half hours further back
    failing.clear()
    recovered = time.monotonic()
    delivered = hook.wait_for(len(ids), timeout=20)
    took = time.monotonic() - recovered
    shown = wait_settled(daemon, ["hook"], timeout=10)["destinations"]["hook"]
    dup = sum(1 for n in Counter(delivered).values() if n > 1)
    emit(
        capsys,
        f"scenario clock_jumps: acked={len(ids)} delivered={len(set(delivered))} "
        f"duplicated={dup} lost={len(set(ids) - set(delivered))} dead={shown['dead_lettered']} "
        f"pending={shown['pending']} attempts_3s_after_+2h={forward} "
        f"attempts_3s_after_-30m={back_short} attempts_3s_after_-2h30m={backward} "
        f"delivered_after_recovery_in={took:.1f}s",
    )
    # Full jitter under a 2s ceiling averages one attempt a second per event; a storm would be
    # hundreds. A jump back must not park retries for the hours the clock lost.
    assert forward <= 20 * 8, forward
    assert backward <= 20 * 8, backward
    assert back_short <= 20 * 8, back_short
    # Not stalled either: a stall parks the retries for the 30 min or 2.5 h the clock lost,
    # leaving no attempt at all in the window. How many land in 3 s varies with when the retry
    # loop next wakes and notices the step (4 to 24 over runs, same code), so the bound only
    # separates "retrying" from "parked".
    assert back_short >= 3, back_short
    assert backward >= 3, backward
    assert set(delivered) == set(ids)
    assert took < 15.0, took  # a 2 s backoff ceiling: seconds, where a stall would be hours
    assert shown["delivered"] == len(ids)
