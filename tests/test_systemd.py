"""router.systemd against real sockets.

sd_notify is received on real AF_UNIX datagram sockets (a path and an abstract name); socket
activation is exercised in a subprocess that inherits real listening sockets at fds 3 and 4
with LISTEN_PID naming it, as systemd execs a service.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from router import systemd
from router.systemd import Notifier, SystemdError, listen_fds, notify, watchdog_interval

# --- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where $NOTIFY_SOCKET will point, as systemd's."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def test_notify_sends_one_datagram_to_the_path(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    assert notify("READY=1", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"router-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_the_messages(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier(address) as notifier:
        assert notifier.ready()
        assert notifier.reloading(123456)
        assert notifier.status("accepting 12 events/s\nbacklog 3\r\n")
        assert notifier.watchdog()
        assert notifier.stopping()
    received = [sock.recv(4096) for _ in range(5)]
    assert received == [
        b"READY=1",
        b"RELOADING=1\nMONOTONIC_USEC=123456",
        b"STATUS=accepting 12 events/s backlog 3",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_reloading_carries_the_monotonic_clock_now(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier(address) as notifier:
        assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_a_missing_or_closed_socket_is_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="router.systemd")
    assert notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    closed = tmp_path / "closed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(closed))
    assert closed.exists()  # the file stays, nobody reads it: ECONNREFUSED
    with Notifier(str(closed)) as notifier:
        assert notifier.watchdog() is False
    with Notifier("@router-test-nobody-" + uuid.uuid4().hex) as notifier:
        assert notifier.ready() is False
    failures = [r for r in caplog.records if r.name == "router.systemd"]
    assert len(failures) == 3
    assert all(r.levelname == "DEBUG" for r in failures)


def test_one_socket_serves_every_notify(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    environ = {"NOTIFY_SOCKET": address}
    assert notify("WATCHDOG=1", environ=environ)  # opens the one socket
    sock.recv(4096)
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        assert notify("WATCHDOG=1", environ=environ)
        assert sock.recv(4096) == b"WATCHDOG=1"
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_recreated_notify_socket_is_found_again(tmp_path: Path) -> None:
    """systemd re-creates its socket on daemon-reexec; a connected sender would lose it."""
    path = tmp_path / "notify.sock"
    with Notifier(str(path)) as notifier:
        for round_ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(str(path))
                sock.settimeout(2)
                assert notifier.status(f"round {round_}")
                assert sock.recv(4096) == f"STATUS=round {round_}".encode()
            path.unlink()


def test_a_full_notify_socket_drops_the_message_instead_of_hanging(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = receiver
    monkeypatch.setattr(systemd, "_SEND_TIMEOUT", 0.05)
    started = time.monotonic()
    with Notifier(address) as notifier:
        results = [notifier.watchdog() for _ in range(20)]  # nobody reads: the queue fills up
    assert results[0] is True
    assert results[-1] is False
    assert time.monotonic() - started < 10


# --- watchdog ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ) == interval


# --- socket activation -------------------------------------------------------------------------

# Run in the child: what listen_fds() found, each socket accepting the connection the test made.
CHILD = r"""
import json, os, socket
from router.systemd import SystemdError, listen_fds
try:
    found = listen_fds()
except SystemdError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
report = {"env": sorted(k for k in os.environ if k.startswith("LISTEN_")), "sockets": {}}
for name, socks in found.items():
    entries = report["sockets"][name] = []
    for sock in socks:
        conn, _ = sock.accept()
        address = sock.getsockname()
        entries.append({
            "fd": sock.fileno(),
            "family": sock.family.name,
            "type": sock.type.name,
            "address": address if isinstance(address, str) else list(address),
            "inheritable": os.get_inheritable(sock.fileno()),
            "said": conn.recv(100).decode(),
        })
        conn.close()
print(json.dumps(report))
"""

# What systemd does between fork and exec: the sockets moved to fds 3, 4, ... (inheritable),
# LISTEN_PID set to this very process, which then execs the service.
WRAPPER = r"""
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("TEST_FDS").split(",")]
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in enumerate(parked, start=3):
    os.dup2(fd, target)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def _activate(fds: list[int], names: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["TEST_FDS"] = ",".join(map(str, fds))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, CHILD],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP listener on loopback and a Unix stream listener, each with a client waiting."""
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "in.sock"))
    unix.listen()
    clients = []
    for listener, greeting in ((tcp, b"hello http"), (unix, b"hello socket")):
        client = socket.socket(listener.family, socket.SOCK_STREAM)
        client.connect(listener.getsockname())  # completes into the backlog
        client.sendall(greeting)
        clients.append(client)
    yield tcp, unix
    for sock in [tcp, unix, *clients]:
        sock.close()


def test_sockets_handed_over_by_name(
    listeners: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    tcp, unix = listeners
    report = _activate([tcp.fileno(), unix.fileno()], "http:socket")
    assert report["env"] == []  # unset, so that no child of router takes them
    assert report["sockets"] == {
        "http": [
            {
                "fd": 3,
                "family": "AF_INET",
                "type": "SOCK_STREAM",
                "address": ["127.0.0.1", tcp.getsockname()[1]],
                "inheritable": False,
                "said": "hello http",
            }
        ],
        "socket": [
            {
                "fd": 4,
                "family": "AF_UNIX",
                "type": "SOCK_STREAM",
                "address": str(tmp_path / "in.sock"),
                "inheritable": False,
                "said": "hello socket",
            }
        ],
    }


def test_unnamed_sockets_are_unknown(listeners: tuple[socket.socket, socket.socket]) -> None:
    tcp, unix = listeners
    report = _activate([tcp.fileno(), unix.fileno()], None)
    sockets = report["sockets"]
    assert isinstance(sockets, dict)
    assert list(sockets) == ["unknown"]
    assert [s["said"] for s in sockets["unknown"]] == ["hello http", "hello socket"]


def test_a_handed_over_fd_that_is_no_socket_is_an_error() -> None:
    read_end, write_end = os.pipe()
    try:
        report = _activate([read_end], "http")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "fd 3 (http)" in str(report["error"])


def test_sockets_for_another_process_are_left_alone() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(environ) == {}
    assert environ == {}  # unset all the same, as sd_listen_fds(1) does


def test_no_socket_activation() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) == {}
    assert environ == {"PATH": "/bin"}


def test_a_malformed_count_is_an_error() -> None:
    with pytest.raises(SystemdError, match="LISTEN_FDS"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
