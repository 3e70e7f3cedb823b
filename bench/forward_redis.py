"""Delivery into Redis Streams: how fast, and what the redelivery dedupe costs.

    .venv/bin/python bench/forward_redis.py [--events 100000]

Against a throwaway redis-server (tests/redis_server.py: AOF on, ``appendfsync always``) pinned
to CPU 1:
- *send() alone*: the destination called in a loop with batches of 100 prepared events, with
  the dedupe script (the default) and with plain pipelined XADDs (``dedupe_window = "0s"``),
  and the time Redis itself spent per event (``INFO commandstats``: steadier than rates on a
  shared machine);
- *end to end*: a router daemon on CPU 0 ingests N track events on its Unix socket (the load on
  CPU 1) and delivers them with batch_size 100; the figure is entries in the stream per second,
  from the first event sent to XLEN reaching N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.forward_segment import file_baseline  # noqa: E402
from bench.run import EVENT, PYTHON, daemon, pin, run_measure  # noqa: E402
from router.destinations.base import BuildContext, Delivery  # noqa: E402
from router.destinations.redis import RedisDestination  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

BATCH = 100


def deliveries(count: int, tag: str) -> list[Delivery]:
    now = time.time()
    return [
        Delivery(i, "bench", f"{tag}-{i}", now, json.dumps({**EVENT, "messageId": f"{tag}-{i}"})
                 .encode(), 1)
        for i in range(count)
    ]  # fmt: skip


def send_alone(url: str, events: int, dedupe_window: str) -> float:
    """Events/s through ``send`` with batches of 100, nothing else running in the process."""
    options: dict[str, Any] = {"url": url, "stream": f"alone-{dedupe_window}"}
    options["dedupe_window"] = dedupe_window
    context = BuildContext("bench", "redis", options, Path("."), 10.0, BATCH)
    prepared = deliveries(events, f"alone-{dedupe_window}")
    chunks = [prepared[i : i + BATCH] for i in range(0, events, BATCH)]

    async def run() -> float:
        destination = RedisDestination(context)
        started = time.perf_counter()
        for chunk in chunks:
            await destination.send(chunk)
        elapsed = time.perf_counter() - started
        await destination.aclose()
        return events / elapsed

    return trio.run(run)


def redis_usec(server: RedisServer) -> float:
    """Microseconds Redis spent in the commands router sends (the script's own calls are
    counted inside EVALSHA's time)."""
    with server.client() as client:
        stats = client.info("commandstats")
    return float(sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("evalsha", "xadd")))


def end_to_end(tmp: Path, server: RedisServer, events: int, dedupe_window: str) -> float:
    stream = f"e2e-{dedupe_window}"
    body = f"""
        [sources.bench]
        socket = true
        [destinations.redis]
        type = "redis"
        url = "{server.url}"
        stream = "{stream}"
        dedupe_window = "{dedupe_window}"
        batch_size = {BATCH}
        batch_wait = "5ms"
        concurrency = 4
        [[routes]]
        to = ["redis"]
        """
    with daemon(tmp, body) as (_, data), server.client() as client:
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
            capture_output=True, check=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        while client.xlen(stream) < events:
            time.sleep(0.01)
        return events / (time.perf_counter() - started)


def measure(tmp: Path, events: int) -> list[dict[str, Any]]:
    server = RedisServer(tmp / "redis").start()
    assert server.process is not None
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(server.process.pid, {1})
    note = "redis-server on CPU 1, AOF appendfsync always"
    rows = [file_baseline(tmp, events)]
    try:
        for window, label in (("1h", "dedupe script"), ("0s", "plain XADD")):
            with server.client() as client:
                client.config_resetstat()
            rate = send_alone(server.url, events, window)
            rows.append({"name": f"redis send() alone, batches of {BATCH}, {label}",
                         "value": rate, "unit": "events/s", "note": note})  # fmt: skip
            rows.append({"name": f"redis time per event in Redis, {label}",
                         "value": redis_usec(server) / events, "unit": "us",
                         "note": "INFO commandstats: EVALSHA or XADD, less noisy"})  # fmt: skip
        for window, label in (("1h", "dedupe script"), ("0s", "plain XADD")):
            rate = end_to_end(tmp, server, events, window)
            rows.append({"name": f"redis end to end, batches of {BATCH}, {label}",
                         "value": rate, "unit": "events/s",
                         "note": note + "; daemon on CPU 0, socket load on CPU 1"})  # fmt: skip
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    run_measure(measure, __doc__ or "", 100_000)
