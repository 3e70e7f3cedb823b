"""A webhook receiver that counts events and exits after N, printing events/s since the first.

python bench/receiver.py PORT_FILE N
"""

from __future__ import annotations

import os
import sys
import time

import httptools
import trio

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class _Counter:
    """Events seen on every connection, and when the goal is reached."""

    def __init__(self, goal: int) -> None:
        self.goal = goal
        self.events = 0
        self.first = 0.0
        self.done = trio.Event()


class _Requests:
    """One connection's parser callbacks: its own count of requests to answer (a count shared
    by every connection let one answer another's requests while that one was sending)."""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self.body: list[bytes] = []
        self.complete = 0

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        self.complete += 1
        counter = self.counter
        counter.first = counter.first or time.perf_counter()
        counter.events += body.count(b'"messageId"')
        if counter.events >= counter.goal:
            counter.done.set()


async def main(port_file: str, goal: int) -> None:
    counter = _Counter(goal)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    with open(port_file + ".tmp", "w") as out:
        out.write(str(listener.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)

    async def serve(sock: trio.socket.SocketType) -> None:
        requests = _Requests(counter)
        parser = httptools.HttpRequestParser(requests)
        with sock:
            try:
                while data := await sock.recv(65536):
                    parser.feed_data(data)
                    if requests.complete:
                        answers, requests.complete = requests.complete, 0
                        await sock.send(OK * answers)
            except OSError:
                return  # the client closed the connection: router's pool does that

    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(serve, sock)

        nursery.start_soon(accept)
        await counter.done.wait()
        print(f"{counter.events / (time.perf_counter() - counter.first):.0f}", flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
