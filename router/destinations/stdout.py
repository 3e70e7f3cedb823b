"""``stdout``: print each event as one JSON line. For trying router out and for pipes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from router.destinations.base import AttemptResult, BuildContext, Delivery


class StdoutDestination:
    def __init__(self, context: BuildContext) -> None:
        if context.options:
            raise context.error(next(iter(context.options)), "unknown option for type 'stdout'")

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        data = b"".join(d.body + b"\n" for d in batch)
        # A slow reader on the other end of a pipe must block a worker thread, not the loop.
        await trio.to_thread.run_sync(_write, data)
        return None

    async def aclose(self) -> None:
        return None


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
