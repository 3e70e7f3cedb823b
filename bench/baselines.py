"""The baselines router's figures are divided by, run in the same session as router's.

- ``bare``: an HTTP server on trio raw sockets + httptools that decodes each body with
  msgspec and answers 200: what one core can do before any durability or routing.
- ``sqlite``: raw SQLite (apsw, WAL, synchronous=FULL) committing events in transactions of
  100 rows into a table shaped like router's log: the cost of durability itself.

    python bench/baselines.py bare PORT_FILE       # serves until killed
    python bench/baselines.py sqlite DIR N          # prints rows/s
"""

from __future__ import annotations

import os
import sys
import time

import apsw
import httptools
import msgspec
import trio

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n"
OK += b'{"success":true}'


class _Parser:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = 0

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        msgspec.json.decode(b"".join(self.body))
        self.body = []
        self.complete += 1


async def _serve_connection(sock: trio.socket.SocketType) -> None:
    handler = _Parser()
    parser = httptools.HttpRequestParser(handler)
    with sock:
        while True:
            data = await sock.recv(65536)
            if not data:
                return
            parser.feed_data(data)
            if handler.complete:
                await sock.send(OK * handler.complete)
                handler.complete = 0


async def bare(port_file: str) -> None:
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    with open(port_file + ".tmp", "w") as out:
        out.write(str(listener.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(_serve_connection, sock)


def sqlite(directory: str, count: int) -> float:
    conn = apsw.Connection(os.path.join(directory, "baseline.db"))
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE events(seq INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT, "
        "message_id TEXT, received_at REAL, body BLOB)"
    )
    body = b'{"type":"track","event":"Order Completed","userId":"u1","properties":{"total":1}}'
    started = time.perf_counter()
    for start in range(0, count, 100):
        with conn:
            conn.executemany(
                "INSERT INTO events(source, message_id, received_at, body) VALUES (?, ?, ?, ?)",
                [("web", f"m-{i}", time.time(), body) for i in range(start, start + 100)],
            )
    return count / (time.perf_counter() - started)


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        trio.run(bare, sys.argv[2])
    else:
        print(f"{sqlite(sys.argv[2], int(sys.argv[3])):.0f}")
