"""Benchmark router.client's pipelined throughput (not a test; pytest does not collect it).

    .venv/bin/python -m tests.bench_client [--events 100000] [--synchronous full|normal]
    .venv/bin/python -m tests.bench_client --fake   # the client's own ceiling

Starts the real daemon (a subprocess, its own temporary data directory, one socket source, no
destinations) and sends ``--events`` track events through it, each way: the sync client one
event per line, the sync client in ``send_batch`` lines of 100, and the trio client one event
per line. This process is pinned to the last CPU, the daemon left to the others. Prints events
per second from the first send to the last ack (every event committed), and checks the count.
With ``--fake`` a trivial server in another process acks every line at once without storing
anything, which measures the client alone.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from router.aclient import AsyncClient
from router.client import Client
from router.journal import Inspector
from tests.support import Daemon

PROPERTIES = {"orderId": "order-123456", "revenue": 99.95, "currency": "USD"}


def one_per_line(path: Path, n: int) -> None:
    with Client(path) as client:
        for i in range(n):
            client.track("user-1234567890", "Order Completed", {**PROPERTIES, "i": i})


def batches_of_100(path: Path, n: int) -> None:
    with Client(path) as client:
        for start in range(0, n, 100):
            client.send_batch(
                {
                    "type": "track",
                    "userId": "user-1234567890",
                    "event": "Order Completed",
                    "properties": {**PROPERTIES, "i": i},
                }
                for i in range(start, min(start + 100, n))
            )


def trio_client(path: Path, n: int) -> None:
    async def run() -> None:
        async with AsyncClient(path) as client:
            for i in range(n):
                await client.track("user-1234567890", "Order Completed", {**PROPERTIES, "i": i})

    trio.run(run)


@contextlib.contextmanager
def pinned_apart() -> Iterator[None]:
    """Children started inside get every CPU but the last; this process keeps the last one
    (on this 2-core machine: the server on core 0, the client on core 1, as DESIGN.md §5)."""
    cpus = os.cpu_count() or 1
    if cpus < 2 or not hasattr(os, "sched_setaffinity"):
        yield
        return
    os.sched_setaffinity(0, set(range(cpus - 1)))
    try:
        yield
    finally:
        os.sched_setaffinity(0, {cpus - 1})


def fake_server(path: str) -> None:
    """Ack every line at once, store nothing: what the client costs by itself."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    while True:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 18):
                conn.sendall(b'{"ok":true,"count":1}\n' * data.count(b"\n"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument("--fake", action="store_true", help="a server that only acks")
    args = parser.parse_args()
    ways: list[tuple[str, Callable[[Path, int], None]]] = [
        ("sync, one event per line", one_per_line),
        ("sync, send_batch of 100", batches_of_100),
        ("trio, one event per line", trio_client),
    ]
    if args.fake:
        ways.pop(1)  # the fake server acks lines, not the events in a batch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fake.sock"
            server = multiprocessing.Process(target=fake_server, args=(str(path),), daemon=True)
            with pinned_apart():
                server.start()
            while not path.exists():
                time.sleep(0.01)
            for label, way in ways:
                started = time.perf_counter()
                way(path, args.events)
                elapsed = time.perf_counter() - started
                print(f"{label:28} {args.events / elapsed:>9,.0f} events/s (fake server)")
            server.kill()
        return
    for label, way in ways:
        with tempfile.TemporaryDirectory() as tmp:
            daemon = Daemon(Path(tmp), "[sources.bench]\nsocket = true\n")
            config = daemon.config_path.read_text()  # its header says synchronous = "full"
            daemon.config_path.write_text(
                config.replace('synchronous = "full"', f'synchronous = "{args.synchronous}"')
            )
            with pinned_apart():
                daemon.start()
            try:
                started = time.perf_counter()
                way(daemon.socket_path, args.events)
                elapsed = time.perf_counter() - started
                stored = Inspector(daemon.data_dir / "queue.db").event_count()
            finally:
                daemon.kill()
        assert stored == args.events, (stored, args.events)
        print(
            f"{label:28} {args.events / elapsed:>9,.0f} events/s "
            f"({args.events} in {elapsed:.2f}s, synchronous={args.synchronous})"
        )


if __name__ == "__main__":
    main()
