"""Open-loop load: single-event POSTs at a fixed rate over keep-alive connections; prints the
ack latency percentiles (ms) as JSON. Latency counts from when each request was due, not from
when it went out, so a server that falls behind shows it (no coordinated omission).

python bench/paced_load.py PORT RATE SECONDS [CONNECTIONS]
"""

from __future__ import annotations

import json
import sys
import time

import httptools
import trio

BODY = json.dumps({"type": "track", "userId": "user-1", "event": "Paced",
                   "properties": {"revenue": 9.95}}).encode()  # fmt: skip
REQUEST = (
    b"POST /v1/track HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"authorization: Basic YmVuY2g6\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class _Answers:
    def __init__(self) -> None:
        self.complete = 0
        self.status = 0

    def on_status(self, _status: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.complete += 1


async def connection(port: int, due: list[float], latencies: list[float]) -> None:
    """Send each request at its due time (or at once when late), one in flight at a time."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    answers = _Answers()
    parser = httptools.HttpResponseParser(answers)
    with sock:
        for when in due:
            await trio.sleep_until(when)
            await sock.send(REQUEST)
            while not answers.complete:
                parser.feed_data(await sock.recv(65536))
            answers.complete -= 1
            if parser.get_status_code() != 200:
                raise RuntimeError(f"HTTP {parser.get_status_code()}")
            latencies.append(trio.current_time() - when)


async def main(port: int, rate: float, seconds: float, connections: int) -> None:
    start = trio.current_time() + 0.2
    count = int(rate * seconds)
    # Request i is due at start + i/rate; connection c takes every c-th one, so each connection
    # has `connections`/rate seconds per request: enough while the server keeps up.
    schedule = [start + i / rate for i in range(count)]
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        for c in range(connections):
            nursery.start_soon(connection, port, schedule[c::connections], latencies)
    latencies.sort()

    def at(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    print(json.dumps({"sent": len(latencies), "p50_ms": at(0.5), "p99_ms": at(0.99),
                      "max_ms": latencies[-1] * 1000}))  # fmt: skip


if __name__ == "__main__":
    started = time.perf_counter()
    connections = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), connections)
