"""Forwarding from an edge router to a hub router with the ``segment`` destination.

    .venv/bin/python bench/forward_segment.py [--events 100000]

The edge (CPU 0) ingests N track events on its Unix socket (the load on CPU 1) and forwards
them to a hub router (CPU 1) on loopback with ``POST /v1/batch``; the figure is events the hub
has accepted (committed to its own queue, synchronous = "full") per second, from the first event
sent to the last accepted. Rows: batches of 100 and 500 (concurrency 8), gzip on (the default)
and off, and a baseline: the same edge writing to a local file, to read the rest against on a
machine whose figures move with what else runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import PYTHON, daemon, pin, run_measure  # noqa: E402

HUB = """
[http]
strict_auth = true
[sources.edge]
write_key = "wk_edge"
"""
BATCH = 100
ACCEPTED = re.compile(r'router_source_events_total\{source="edge",outcome="accepted"\} (\d+)')


def accepted(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        found = ACCEPTED.search(answer.read().decode())
    return int(found.group(1)) if found else 0


def move_to_cpu(data_dir: Path, cpu: int) -> None:
    """Move a router started by ``bench.run.daemon`` (CPU 0) to ``cpu``; its PID is in the lock."""
    pid = int((data_dir / "router.lock").read_text())
    if (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


def forward(tmp: Path, events: int, batch_size: int, gzip: bool) -> float:
    with daemon(tmp, HUB) as (hub_port, hub_data):
        move_to_cpu(hub_data, 1)
        edge = f"""
            [sources.bench]
            socket = true
            [destinations.hub]
            type = "segment"
            url = "http://127.0.0.1:{hub_port}"
            write_key = "wk_edge"
            gzip = {str(gzip).lower()}
            batch_size = {batch_size}
            batch_wait = "5ms"
            concurrency = 8
            [[routes]]
            to = ["hub"]
            """
        with daemon(tmp, edge) as (_, data):
            started = time.perf_counter()
            subprocess.run(
                [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
                capture_output=True, check=True, preexec_fn=lambda: pin(1),
            )  # fmt: skip
            while accepted(hub_port) < events:
                time.sleep(0.01)
            return events / (time.perf_counter() - started)


def file_baseline(tmp: Path, events: int) -> dict[str, Any]:
    """The same ingest delivered to a local file: what this machine does without a next hop,
    to read the other rows against (the figures move a lot on a shared box)."""
    body = f"""
        [sources.bench]
        socket = true
        [destinations.file]
        type = "file"
        path = "out.jsonl"
        batch_size = {BATCH}
        batch_wait = "5ms"
        concurrency = 4
        [[routes]]
        to = ["file"]
        """
    with daemon(tmp, body) as (port, data):
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
            capture_output=True, check=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        while delivered(port, "file") < events:
            time.sleep(0.01)
        rate = events / (time.perf_counter() - started)
    return {"name": f"baseline: file destination, batches of {BATCH}", "value": rate,
            "unit": "events/s", "note": "daemon on CPU 0, socket load on CPU 1"}  # fmt: skip


def delivered(port: int, destination: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        pattern = rf'router_destination_delivered_total\{{destination="{destination}"\}} (\d+)'
        found = re.search(pattern, answer.read().decode())
    return int(found.group(1)) if found else 0


def measure(tmp: Path, events: int) -> list[dict[str, Any]]:
    rows = [file_baseline(tmp, events)]
    for batch_size, gzip in ((BATCH, True), (BATCH, False), (500, True)):
        rate = forward(tmp, events, batch_size, gzip)
        rows.append({
            "name": f"segment edge -> hub, batches of {batch_size}, gzip {'on' if gzip else 'off'}",
            "value": rate,
            "unit": "events/s",
            "note": "edge on CPU 0; hub and socket load on CPU 1; both synchronous = full",
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    run_measure(measure, __doc__ or "", 100_000)
