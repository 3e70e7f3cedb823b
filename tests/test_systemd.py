"""router.systemd against real sockets, and the unit files in systemd/ against systemd's own tools.

sd_notify is received on real AF_UNIX datagram sockets (a path and an abstract name); socket
activation is exercised in a subprocess that inherits real listening sockets at fds 3 and 4
with LISTEN_PID naming it, as systemd execs a service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from router import systemd
from router.cli_init import SYSTEM, starter_text
from router.config import parse_config
from router.systemd import Notifier, SystemdError, listen_fds, notify, watchdog_interval

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


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


# --- the unit files ----------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with all its values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values is not None, f"{key} is missing"
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_the_service_unit() -> None:
    unit = read_unit(UNITS / "router.service")
    service = unit["Service"]
    config = "--config /etc/router/router.toml"
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == f"/opt/router/venv/bin/router run {config}"
    assert one(service, "ExecStartPre") == f"/opt/router/venv/bin/router check {config}"
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "WatchdogSec") == "30"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "StateDirectory") == "router"
    assert one(service, "RuntimeDirectory") == "router"
    assert one(service, "RuntimeDirectoryPreserve") == "yes"
    assert one(service, "User") == "router"
    assert one(service, "UMask") == "0077"
    hardening = {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: one(service, key) for key in hardening} == hardening
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # Secrets: shown, not set (a LoadCredential= whose file is missing stops the service).
    assert "#LoadCredential=" in (UNITS / "router.service").read_text()
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_the_socket_units_match_the_system_starter_config() -> None:
    """router.socket, router-http.socket and `router init --system` name the same addresses."""
    config = parse_config(
        starter_text(Path("/etc/router/router.toml"), system=True, write_key="k"),
        base_dir=Path("/etc/router"),
    )
    assert config.server.data_dir == Path(SYSTEM["data_dir"])
    ingest = read_unit(UNITS / "router.socket")["Socket"]
    assert one(ingest, "ListenStream") == str(config.server.socket_path)
    assert one(ingest, "FileDescriptorName") == "socket"
    assert int(one(ingest, "SocketMode"), 8) == config.server.socket_mode
    assert (one(ingest, "SocketUser"), one(ingest, "SocketGroup")) == ("router", "router")
    assert one(ingest, "Service") == "router.service"
    http = read_unit(UNITS / "router-http.socket")["Socket"]
    assert one(http, "ListenStream") == config.server.http
    assert one(http, "FileDescriptorName") == "http"
    assert one(http, "Service") == "router.service"
    service = read_unit(UNITS / "router.service")["Service"]
    assert Path("/var/lib") / one(service, "StateDirectory") == config.server.data_dir
    assert config.server.socket_path is not None
    assert Path("/run") / one(service, "RuntimeDirectory") == config.server.socket_path.parent


@needs_analyze
def test_security_exposure_is_at_most_2_and_as_the_unit_says() -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNITS / "router.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for router\.service: (\d+\.\d+)", done.stdout)
    assert found is not None, done.stdout + done.stderr
    exposure = float(found.group(1))
    assert exposure <= 2.0, done.stdout
    claimed = re.search(
        r"rates this unit\s*#?\s*(\d+\.\d+)", (UNITS / "router.service").read_text()
    )
    assert claimed is not None
    assert float(claimed.group(1)) == exposure, "update the figure in router.service's comment"


@needs_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """Every key known and valid. The venv is not installed here, so ExecStart= points at a stub."""
    assert ANALYZE is not None
    stub = tmp_path / "router"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    names = ["router.service", "router.socket", "router-http.socket"]
    for name in names:
        text = (UNITS / name).read_text().replace("/opt/router/venv/bin/router", str(stub))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [ANALYZE, "verify", *(str(tmp_path / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_router_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers = shutil.which("systemd-sysusers")
    assert sysusers is not None
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(UNITS / "router.sysusers.conf")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert "router" in groups
    _, _, uid, _, _, home, shell = users["router"]
    assert 0 < int(uid) < 1000  # a system user
    assert home == "/var/lib/router"
    assert shell.strip().endswith("nologin")
