"""A throwaway nats-server with JetStream on 127.0.0.1, for tests and benchmarks.

Free port, store directory under the test's tmp path, stopped by its PID (never by name), and
restartable on the same port and directory, so a "server restart" keeps its streams. Also the
independent oracle the tests read JetStream with: nats-py (asyncio), not router's own client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest

T = TypeVar("T")

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    def __init__(self, directory: Path, *options: str) -> None:
        if NATS_SERVER is None:
            pytest.fail(
                "nats-server is not installed (Debian: apt-get install nats-server; CI installs "
                "it): the nats destination and source tests need a real JetStream server"
            )
        self.binary = NATS_SERVER
        self.dir = directory
        self.store = directory / "jetstream"
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.oracle_url = ""  # the URL the nats-py oracle connects with, when it needs credentials
        self.log_path = directory / "nats-server.log"
        self.options = options  # more command-line options, e.g. ("--user", "a", "--pass", "b")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "-p", str(self.port), *self.options],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_path.read_text()[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not ready after {timeout}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                info = sock.recv(4096)
        except OSError:
            return False
        return info.startswith(b"INFO ") and b'"jetstream":true' in info

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=20)
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def unread_bytes(self) -> int:
        """Bytes clients sent that the server has not read yet (it is frozen, say): the
        receive queues of its established loopback connections, from /proc/net/tcp."""
        port = f"{self.port:04X}"
        total = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port}") and fields[3] == "01":  # 01: ESTABLISHED
                total += int(fields[4].split(":")[1], 16)
        return total

    # -- the oracle (nats-py) ------------------------------------------------

    def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work(js)`` on a fresh nats-py connection, in an asyncio loop of its own."""

        async def main() -> T:
            nc = await nats.connect(
                self.oracle_url or self.url, connect_timeout=5, max_reconnect_attempts=0
            )
            try:
                return await work(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(main())

    def add_stream(self, name: str, subjects: list[str], **config: Any) -> None:
        async def work(js: Any) -> None:
            await js.add_stream(name=name, subjects=subjects, **config)

        self.run(work)

    def stream_info(self, name: str) -> dict[str, Any]:
        async def work(js: Any) -> dict[str, Any]:
            info = await js.stream_info(name)
            return {"messages": info.state.messages, "subjects": info.config.subjects}

        return self.run(work)

    def messages(self, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
        """Every message in ``stream``, in order: (subject, headers, payload)."""

        async def work(js: Any) -> list[tuple[str, dict[str, str], bytes]]:
            info = await js.stream_info(stream)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                found.append((msg.subject, dict(msg.headers or {}), msg.data))
            return found

        return self.run(work)

    def publish(self, subject: str, payloads: list[tuple[str, bytes]]) -> None:
        """Publish (msg id, payload) pairs with acks, as an edge router would."""

        async def work(js: Any) -> None:
            futures = [
                await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id})
                for msg_id, data in payloads
            ]
            await asyncio.gather(*futures)

        self.run(work)

    def consumer_pending(self, stream: str, consumer: str) -> dict[str, int]:
        async def work(js: Any) -> dict[str, int]:
            info = await js.consumer_info(stream, consumer)
            return {"pending": info.num_pending, "ack_pending": info.num_ack_pending}

        return self.run(work)


def decoded(payloads: list[tuple[str, dict[str, str], bytes]]) -> list[dict[str, Any]]:
    return [json.loads(data) for _, _, data in payloads]
