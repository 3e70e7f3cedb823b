"""Benchmark the HTTP ingress server (not a test; pytest does not collect it).

    .venv/bin/python tests/bench_http.py [--seconds 5] [--connections 32] [--client auto|wrk|trio]

The server runs in a subprocess pinned to CPU 0 with a trivial handler; the load (wrk if it is
installed, else a raw trio keep-alive client) runs pinned to CPU 1. Each request is a ~420-byte
JSON POST, as in the measurements of DESIGN.md §4. Prints requests per second.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import trio

from router.ingress.http import Request, Response, serve_http

BODY = (
    b'{"type":"track","event":"Order Completed","userId":"user-1234567890",'
    b'"messageId":"msg-0000000000000000000000000000000000","timestamp":"2024-01-01T00:00:00.000Z",'
    b'"properties":{"orderId":"order-123456","revenue":99.95,"currency":"USD",'
    b'"products":[{"sku":"sku-1","price":49.95},{"sku":"sku-2","price":50.00}]},'
    b'"context":{"library":{"name":"analytics.js","version":"4.0.0"},"ip":"203.0.113.7"}}'
)
REQUEST = (
    b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)
OK = Response(200, b'{"success": true}')


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


async def ok(request: Request) -> Response:
    return OK


async def serve(port_file: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1", 0, ok)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(port_file + ".tmp", port_file)  # the parent never sees half a number


async def load(port: int, connections: int, seconds: float) -> None:
    done = 0
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal done
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = b""
        while trio.current_time() < deadline:
            await stream.send_all(REQUEST)
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            buf = buf[length:]
            done += 1
        await stream.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    print(f"{done / (time.perf_counter() - start):.0f}")


def run_wrk(port: int, connections: int, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{BODY.decode()}]]\n"
        )
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", script.name]
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}/v1/track"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: pin(1),
    ).stdout
    os.unlink(script.name)
    if "Non-2xx" in out or "Socket errors" in out:
        print(out, file=sys.stderr)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def run_trio(port: int, connections: int, seconds: float) -> float:
    command = [sys.executable, __file__, "--load", str(port), "--connections", str(connections)]
    out = subprocess.run(
        [*command, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: pin(1),
    ).stdout
    return float(out.strip())


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--client", choices=["auto", "wrk", "trio"], default="auto")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        pin(0)
        trio.run(serve, args.serve)
        return
    if args.load:
        trio.run(load, args.load, args.connections, args.seconds)
        return

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "trio"
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        server = subprocess.Popen([sys.executable, __file__, "--serve", port_file])
        try:
            while not os.path.exists(port_file) or not read(port_file):
                time.sleep(0.05)
            port = int(read(port_file))
            run = run_wrk if client == "wrk" else run_trio
            rate = run(port, args.connections, args.seconds)
        finally:
            server.terminate()
            server.wait()
    print(
        f"{client}, {args.connections} keep-alive connections, {args.seconds:g}s: {rate:,.0f} req/s"
    )


if __name__ == "__main__":
    main()
