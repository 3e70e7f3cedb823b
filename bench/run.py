"""router's benchmark suite: one command, a table of figures, each beside its baseline.

    .venv/bin/python bench/run.py [--seconds 10] [--events 200000] [--json bench.json]

The daemon (and each baseline server) is pinned to CPU 0, the load generator to CPU 1, so the
figures are what one core of this machine does. HTTP load comes from wrk (Debian's `wrk`);
without it the HTTP rows are skipped. Nothing here is a pass/fail test: run it on a quiet
machine and read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
EVENT = {
    "type": "track",
    "userId": "user-1234567890",
    "event": "Order Completed",
    "properties": {"orderId": "order-123456", "revenue": 99.95, "currency": "USD"},
    "context": {"library": {"name": "analytics.js", "version": "4.0.0"}},
}


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    note: str = ""

    @property
    def ratio(self) -> str:
        return f"{self.value / self.baseline:.2f}" if self.baseline else "-"


def pin(cpu: int) -> None:
    if (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    port: int
    data: Path
    config: Path
    process: subprocess.Popen[bytes]
    ready_after: float  # seconds from spawn to /ready answering 200

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert found is not None
        return int(found.group(1)) / 1024


@contextmanager
def running(
    tmp: Path, body: str, synchronous: str = "full", *, data: Path | None = None, queue: str = ""
) -> Iterator[Running]:
    """`router run` on CPU 0 with ``body`` as its sources/destinations/routes."""
    # The rows before this one leave hundreds of MB for the kernel to write back; doing that
    # now keeps it out of this row's fsyncs.
    os.sync()
    port = free_port()
    data = data or tmp / f"data-{port}"
    config = tmp / f"router-{port}.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        data_dir = "{data}"
        http = "127.0.0.1:{port}"
        socket = "router.sock"
        [queue]
        synchronous = "{synchronous}"
        """)
        + queue
        + "\n"
        + textwrap.dedent(body)
    )
    with (tmp / f"log-{port}").open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [PYTHON, "-m", "router", "run", "--config", str(config), "--log-level", "warning"],
            stdout=log,
            stderr=log,
            preexec_fn=lambda: pin(0),
        )
    try:
        wait_ready(port)
        yield Running(port, data, config, process, time.monotonic() - started)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


@contextmanager
def daemon(tmp: Path, body: str, synchronous: str = "full") -> Iterator[tuple[int, Path]]:
    with running(tmp, body, synchronous) as router:
        yield router.port, router.data


def wait_ready(port: int, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("router did not become ready")


def wrk(
    port: int, path: str, body: bytes, seconds: float, connections: int = 32
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["Authorization"] = "Basic YmVuY2g6"\n'
            f"wrk.body = [[{body.decode()}]]\n"
        )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", script.name,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True, preexec_fn=lambda: pin(1),
    ).stdout  # fmt: skip
    os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")

    def latency(label: str) -> float:
        found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        assert found is not None
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
        return float(found.group(1)) * scale

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate is not None
    return {"rps": float(rate.group(1)), "p50_ms": latency("50%"), "p99_ms": latency("99%")}


INGEST = """
[sources.bench]
write_key = "bench"
"""


def http_rows(tmp: Path, seconds: float) -> list[Row]:
    if shutil.which("wrk") is None:
        return [Row("HTTP figures", 0, "skipped", note="install wrk")]
    single = json.dumps(EVENT).encode()
    port_file = tmp / "bare.port"
    bare = subprocess.Popen(
        [PYTHON, str(HERE / "baselines.py"), "bare", str(port_file)], preexec_fn=lambda: pin(0)
    )
    try:
        while not port_file.exists():
            time.sleep(0.05)
        base = wrk(int(port_file.read_text()), "/v1/track", single, seconds)
    finally:
        bare.kill()
        bare.wait()
    rows = [Row("bare trio+httptools decode, 32 conns", base["rps"], "req/s")]
    for synchronous in ("full", "normal"):
        with daemon(tmp, INGEST, synchronous) as (port, _):
            got = wrk(port, "/v1/track", single, seconds)
        rows.append(Row(f"POST /v1/track, {synchronous}", got["rps"], "req/s", base["rps"],
                        f"p50 {got['p50_ms']:.2f} ms, p99 {got['p99_ms']:.2f} ms"))  # fmt: skip
    batch = json.dumps({"batch": [EVENT] * 100}).encode()
    with tempfile.TemporaryDirectory() as scratch:
        raw = float(subprocess.run(
            [PYTHON, str(HERE / "baselines.py"), "sqlite", scratch, "200000"],
            capture_output=True, text=True, check=True, preexec_fn=lambda: pin(0),
        ).stdout)  # fmt: skip
    rows.append(Row("raw SQLite, 100 rows per commit, FULL", raw, "rows/s"))
    for label, queue in (("", ""), (", dedupe off", 'dedupe_window = "0s"')):
        with running(tmp, INGEST, queue=queue) as router:
            got = wrk(router.port, "/v1/batch", batch, seconds, connections=16)
        rows.append(Row(f"POST /v1/batch x100, full{label}", got["rps"] * 100, "events/s", raw,
                        f"p99 {got['p99_ms']:.1f} ms"))  # fmt: skip
    return rows


def paced_rows(tmp: Path, seconds: float, max_rate: float) -> list[Row]:
    """p99 ack latency of single-event POSTs at half the rate measured flat out."""
    rate = max_rate / 2
    # Files deleted just before (a daemon's WAL, a baseline's scratch queue) are discarded by
    # the filesystem in its next journal commits (ext4 mounted with `discard`), which stalls
    # fsyncs for tens of ms: deleting 800 MB before a run took its p99 from ~4 to 27 ms. The
    # journal commits every 5 s, so wait two of them out (`running` writes the cache back).
    time.sleep(10)
    with running(tmp, INGEST) as router:
        out = subprocess.run(
            [PYTHON, str(HERE / "paced_load.py"), str(router.port), f"{rate:.0f}", f"{seconds:g}"],
            capture_output=True, text=True, check=True, preexec_fn=lambda: pin(1),
        ).stdout  # fmt: skip
    got = json.loads(out)
    return [Row(f"ack p99 at half load ({rate:,.0f} req/s)", got["p99_ms"], "ms",
                note=f"p50 {got['p50_ms']:.2f} ms, max {got['max_ms']:.1f} ms, full")]  # fmt: skip


def replay_row(tmp: Path, events: int) -> Row:
    """`router replay` of the whole log to a file destination, timed to the last line written."""
    out = tmp / "replayed.ndjson"
    body = f"""
        [sources.bench]
        socket = true
        [destinations.archive]
        type = "file"
        path = "{out}"
        batch_size = 500
        [[routes]]
        to = ["archive"]
        """
    with running(tmp, body) as router:
        subprocess.run(
            [PYTHON, str(HERE / "socket_load.py"), str(router.data / "router.sock"), str(events)],
            capture_output=True, check=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        _wait_lines(out, events)
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, "-m", "router", "replay", "--to", "archive", "--since", "1h", "--no-wait",
             "--config", str(router.config)],
            capture_output=True, check=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        _wait_lines(out, 2 * events)
        rate = events / (time.perf_counter() - started)
    return Row("replay of the log to a file destination", rate, "events/s")


def _wait_lines(path: Path, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not reach {count} lines")


def pending_rows(tmp: Path, pending: int) -> list[Row]:
    """Start-up time and memory with ``pending`` events waiting for a destination that is down."""
    data = tmp / "pending-data"
    subprocess.run([PYTHON, str(HERE / "fill.py"), str(data), str(pending), "hook"], check=True)
    body = f"""
        [sources.bench]
        write_key = "bench"
        [destinations.hook]
        type = "webhook"
        url = "http://127.0.0.1:{free_port()}/"
        batch_size = 100
        [[routes]]
        to = ["hook"]
        """
    with running(tmp, body, data=data) as router:
        at_ready = router.rss_mb()
        time.sleep(5)  # the dispatcher tries, fails and parks what it read as retries
        later = router.rss_mb()
    size = (data / "queue.db").stat().st_size / 1024**2
    return [
        Row(f"start-up to /ready, {pending:,} pending", router.ready_after, "s",
            note=f"queue file {size:,.0f} MiB"),
        Row(f"RSS with {pending:,} pending", max(at_ready, later), "MB",
            note=f"{at_ready:.0f} MB at ready, {later:.0f} MB 5 s later"),
    ]  # fmt: skip


def socket_row(tmp: Path, events: int) -> Row:
    body = INGEST.replace("[sources.bench]", "[sources.bench]\nsocket = true")
    with daemon(tmp, body) as (_, data):
        rate = float(subprocess.run(
            [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
            capture_output=True, text=True, check=True, preexec_fn=lambda: pin(1),
        ).stdout)  # fmt: skip
    return Row("Unix socket, pipelined, one event a line", rate, "events/s")


def delivery_rows(tmp: Path, events: int) -> list[Row]:
    """Delivery alone: a backlog already in the queue, drained to a receiver on CPU 1."""
    rows = []
    for batch_size, count in ((100, events), (1, max(events // 10, 1000))):
        data = tmp / f"backlog-{batch_size}"
        subprocess.run([PYTHON, str(HERE / "fill.py"), str(data), str(count), "hook"], check=True)
        receiver = subprocess.Popen(
            [PYTHON, str(HERE / "receiver.py"), str(tmp / "recv.port"), str(count)],
            stdout=subprocess.PIPE, text=True, preexec_fn=lambda: pin(1),
        )  # fmt: skip
        while not (tmp / "recv.port").exists():
            time.sleep(0.05)
        port = int((tmp / "recv.port").read_text())
        (tmp / "recv.port").unlink()
        body = f"""
            [sources.bench]
            socket = true
            [destinations.hook]
            type = "webhook"
            url = "http://127.0.0.1:{port}/"
            batch_size = {batch_size}
            batch_wait = "5ms"
            concurrency = {8 if batch_size > 1 else 64}
            [[routes]]
            to = ["hook"]
            """
        with running(tmp, body, data=data):
            out, _ = receiver.communicate(timeout=600)
        rows.append(Row(f"webhook delivery, batches of {batch_size}", float(out), "events/s",
                        note=f"{count:,} events waiting at start, receiver on CPU 1"))  # fmt: skip
    return rows


def run_measure(
    measure: Callable[[Path, int], list[dict[str, Any]]], description: str, events: int
) -> None:
    """The command line of a bench/forward_*.py: ``--events N``, then its rows printed."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--events", type=int, default=events)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for row in measure(Path(scratch), args.events):
            print(f"{row['name']:<60} {row['value']:>12,.1f} {row['unit']:<9} {row['note']}")


def forwarding_rows(tmp: Path, events: int) -> list[Row]:
    """Each forwarding destination's bench/forward_*.py, end to end through a daemon."""
    import importlib

    sys.path.insert(0, str(HERE.parent))
    rows = []
    for name in ("segment", "postgres", "nats", "redis"):
        module = importlib.import_module(f"bench.forward_{name}")
        scratch = tmp / f"forward-{name}"
        scratch.mkdir()
        rows += [
            Row(found["name"], found["value"], found["unit"], note=found.get("note", ""))
            for found in module.measure(scratch, min(events, 50_000))
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument(
        "--forwarding",
        action="store_true",
        help="also the segment, postgres, nats and redis destinations (starts those servers)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.events, args.pending = 1.0, 2000, 5000
    rows: list[Row] = []

    def max_single_rate() -> float:
        return next((r.value for r in rows if r.name == "POST /v1/track, full"), 2000.0)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        for make in (
            lambda: http_rows(tmp, args.seconds),
            lambda: paced_rows(tmp, args.seconds, max_single_rate()),
            lambda: [socket_row(tmp, args.events)],
            lambda: delivery_rows(tmp, args.events),
            lambda: [replay_row(tmp, args.events)],
            lambda: pending_rows(tmp, args.pending),
            *([lambda: forwarding_rows(tmp, args.events)] if args.forwarding else []),
        ):
            made = make()
            rows += made
            for row in made:
                figure = f"{row.value:>12,.{2 if row.value < 100 else 0}f} {row.unit:<9}"
                print(f"{row.name:<45} {figure} ratio {row.ratio:>5}  {row.note}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
