"""Real parts for tests: a loopback webhook receiver, the daemon as a subprocess, and a
Unix-socket client that records acks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    def events(self) -> list[dict[str, Any]]:
        data = json.loads(self.body)
        return list(data.get("batch", [data]))


# A policy sees the request (and how many came before it) and returns (status, headers, body).
Policy = Callable[[ReceivedRequest, int], tuple[int, dict[str, str], bytes]]


def always_ok(_request: ReceivedRequest, _index: int) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"ok"


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it was sent."""

    policy: Policy = always_ok
    requests: list[ReceivedRequest] = field(default_factory=list)
    accepted: list[ReceivedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                request = ReceivedRequest(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with receiver.lock:
                    index = len(receiver.requests)
                    receiver.requests.append(request)
                    status, headers, body = receiver.policy(request, index)
                    if 200 <= status < 300:
                        receiver.accepted.append(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered_ids(self) -> list[str]:
        with self.lock:
            return [e["messageId"] for r in self.accepted for e in r.events()]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until ``count`` distinct messageIds have been accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = self.delivered_ids()
            if len(set(ids)) >= count:
                return ids
            time.sleep(0.02)
        return self.delivered_ids()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """``router run`` as a subprocess on an ephemeral port, in its own data directory."""

    def __init__(
        self, tmp_path: Path, config_body: str, *, queue: str = "", server: str = ""
    ) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.socket_path = self.data_dir / "router.sock"
        self.config_path = tmp_path / "router.toml"
        header = textwrap.dedent(
            f"""
            [server]
            data_dir = "{self.data_dir}"
            http = "127.0.0.1:{self.port}"
            socket = "router.sock"
            shutdown_grace = "5s"
            {server}

            [queue]
            synchronous = "full"
            """
        )
        # ``queue``: more [queue] keys, one per line (TOML allows one [queue] table per file).
        body = textwrap.dedent(queue) + "\n" + textwrap.dedent(config_body)
        self.config_path.write_text(header + body)
        self.stdout_path = tmp_path / "stdout.log"
        self.stderr_path = tmp_path / "stderr.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0, *args: str) -> Daemon:
        # The child keeps its own copies of the log descriptors; ours close at once.
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "router", "run", "--config", str(self.config_path), *args],
                stdout=out,
                stderr=err,
                cwd=self.dir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited {self.process.returncode}: {self.stderr()}")
            if self.ready():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"router not ready after {timeout}s: {self.stderr()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


class SocketClient:
    """A blocking NDJSON client that records every ack it reads."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def send(self, *lines: dict[str, Any] | bytes) -> None:
        data = b"".join(
            line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n" for line in lines
        )
        self.sock.sendall(data)

    def ack(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("socket closed before the ack")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def track(message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-1",
        "messageId": message_id,
        "properties": {"total": 12.5},
        **extra,
    }
