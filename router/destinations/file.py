"""``file``: append events as JSON lines, fsync'd per batch, one file per day and source.

The path is a template with ``{source}``, ``{destination}`` and ``{date}`` (the event's
``receivedAt`` day in UTC, so a retried or replayed event lands in the file of its day).
A relative path is relative to the data directory. Delivery is at-least-once: after a
crash between the write and the commit of the outcome, a line can appear twice.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio

from router.destinations.base import AttemptResult, BuildContext, Delivery
from router.errors import RetryableDeliveryError

_FIELDS = ("source", "destination", "date")


class FileOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str


class FileDestination:
    def __init__(self, context: BuildContext) -> None:
        options = context.options_as(FileOptions)
        try:
            options.path.format(source="s", destination="d", date="2026-01-01")
        except (KeyError, IndexError, ValueError) as exc:
            raise context.error(
                "path",
                f"bad template {options.path!r}: use only {{source}}, {{destination}}, "
                f"{{date}} ({exc})",
            ) from exc
        self._template = str(context.data_dir / options.path)
        self._name = context.name

    def path_for(self, delivery: Delivery) -> Path:
        date = time.strftime("%Y-%m-%d", time.gmtime(delivery.received_at))
        return Path(
            self._template.format(source=delivery.source, destination=self._name, date=date)
        )

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        lines: dict[Path, list[bytes]] = defaultdict(list)
        for delivery in batch:
            lines[self.path_for(delivery)].append(delivery.body + b"\n")
        try:
            await trio.to_thread.run_sync(_append_all, lines)
        except OSError as exc:
            raise RetryableDeliveryError(f"cannot write {exc.filename}: {exc.strerror}") from exc
        return None

    async def aclose(self) -> None:
        return None


def _append_all(lines: dict[Path, list[bytes]]) -> None:
    for path, chunks in lines.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.write(b"".join(chunks))
            handle.flush()
            os.fsync(handle.fileno())
