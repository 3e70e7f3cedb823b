"""Send N events over router's Unix socket, one per line, pipelined; print events/s acked.

python bench/socket_load.py SOCKET N
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def main(path: str, count: int) -> None:
    event = {"type": "track", "userId": "u1", "event": "Order Completed",
             "properties": {"revenue": 99.95, "currency": "USD"}}  # fmt: skip
    lines = b"".join(
        json.dumps({**event, "messageId": f"b-{time.time_ns()}-{i}"}).encode() + b"\n"
        for i in range(count)
    )
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    acked = 0

    def read_acks() -> None:
        nonlocal acked
        with sock.makefile("rb") as answers:
            for _ in range(count):
                answer = json.loads(answers.readline())
                if not answer.get("ok"):
                    raise RuntimeError(answer)
                acked += int(answer["count"])

    reader = threading.Thread(target=read_acks)
    started = time.perf_counter()
    reader.start()
    sock.sendall(lines)
    reader.join()
    print(f"{acked / (time.perf_counter() - started):.0f}")
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
