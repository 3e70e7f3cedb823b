"""Forwarding through NATS JetStream: the ``nats`` destination's and the ``nats`` source's rates.

    .venv/bin/python bench/forward_nats.py [--events 100000]

Against a throwaway nats-server with JetStream (tests/nats_server.py, file store) pinned to
CPU 1:
- *send() alone*: the destination called in a loop with prepared batches of 100 and of 1000
  (every PubAck awaited before the next batch), nothing else in the process;
- *end to end*: a router daemon on CPU 0 ingests N track events on its Unix socket (the load on
  CPU 1) and publishes them with batch_size 1000; the figure is messages in the stream per
  second, from the first event sent to the stream holding N;
- *source*: N events waiting in the stream; a hub daemon on CPU 0 consumes them (pull batches
  of 500, each committed to its journal, then acked); the figure is events in the hub's
  journal per second, from the moment it is ready to the journal holding N.
The first row is the same ingest into a local file: on a shared machine, read the ratios.
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
from router.destinations.nats import NatsDestination  # noqa: E402
from router.journal import Inspector  # noqa: E402
from tests.nats_server import NatsServer  # noqa: E402


def deliveries(count: int, tag: str) -> list[Delivery]:
    now = time.time()
    return [
        Delivery(i, "bench", f"{tag}-{i}", now, json.dumps({**EVENT, "messageId": f"{tag}-{i}"})
                 .encode(), 1)
        for i in range(count)
    ]  # fmt: skip


def send_alone(url: str, events: int, batch: int, stream: str) -> float:
    """Events/s through ``send`` in batches of ``batch``, nothing else running in the process."""
    options = {"url": url, "stream": stream, "subject": f"{stream.lower()}.{{type}}"}
    context = BuildContext("bench", "nats", options, Path("."), 30.0, batch)
    prepared = deliveries(events, stream)
    chunks = [prepared[i : i + batch] for i in range(0, events, batch)]

    async def run() -> float:
        destination = NatsDestination(context)
        await destination.send(chunks[0][:1])  # connect and create the stream first
        started = time.perf_counter()
        for chunk in chunks:
            results = await destination.send(chunk)
            assert results is None or all(r.ok for r in results), results
        elapsed = time.perf_counter() - started
        await destination.aclose()
        return events / elapsed

    return trio.run(run)


def stream_count(server: NatsServer, stream: str) -> int:
    try:
        return int(server.stream_info(stream)["messages"])
    except Exception:  # noqa: BLE001 -- not created yet
        return 0


def end_to_end(tmp: Path, server: NatsServer, events: int, concurrency: int) -> float:
    stream = f"E2E{concurrency}"
    body = f"""
        [sources.bench]
        socket = true
        [destinations.stream]
        type = "nats"
        url = "{server.url}"
        stream = "{stream}"
        subject = "{stream.lower()}.{{type}}"
        batch_size = 1000
        batch_wait = "5ms"
        concurrency = {concurrency}
        [[routes]]
        to = ["stream"]
        """
    with daemon(tmp, body) as (_, data):
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
            capture_output=True, check=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        while stream_count(server, stream) < events:
            time.sleep(0.02)
        return events / (time.perf_counter() - started)


def consume(tmp: Path, server: NatsServer, events: int) -> float:
    send_alone(server.url, events, 1000, "HUB")  # what edges published
    body = f"""
        [sources.edges]
        nats = {{ url = "{server.url}", stream = "HUB", consumer = "hub", batch = 500 }}
        """
    with daemon(tmp, body) as (_, data):
        started = time.perf_counter()  # ready: the journal is open, the consumer starting
        queue = data / "queue.db"
        while True:
            inspector = Inspector(queue)
            try:
                if inspector.event_count() >= events:
                    break
            finally:
                inspector.close()
            time.sleep(0.02)
        return events / (time.perf_counter() - started)


def measure(tmp: Path, events: int) -> list[dict[str, Any]]:
    server = NatsServer(tmp / "nats").start()
    assert server.process is not None
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(server.process.pid, {1})
    note = "nats-server 2.9 on CPU 1, JetStream file store"
    rows = [file_baseline(tmp, events)]  # the same daemon writing a local file, for scale
    try:
        for batch in (100, 1000):
            rate = send_alone(server.url, events, batch, f"ALONE{batch}")
            rows.append({"name": f"nats send() alone, batches of {batch}",
                         "value": rate, "unit": "events/s", "note": note})  # fmt: skip
        for concurrency in (1, 4):
            rate = end_to_end(tmp, server, events, concurrency)
            rows.append({"name": f"nats end to end, batches of 1000, concurrency {concurrency}",
                         "value": rate, "unit": "events/s",
                         "note": note + "; daemon on CPU 0, socket load on CPU 1"})  # fmt: skip
        rate = consume(tmp, server, events)
        rows.append({"name": "nats source into the journal, pulls of 500", "value": rate,
                     "unit": "events/s",
                     "note": note + "; hub daemon on CPU 0, from ready"})  # fmt: skip
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    run_measure(measure, __doc__ or "", 100_000)
