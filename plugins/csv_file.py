"""A worked example of a destination plugin: append chosen event fields to a CSV file.

Copy this file into a directory listed in ``server.plugin_dirs`` and use it as
``type = "csv"``::

    [destinations.orders_csv]
    type = "csv"
    path = "orders.csv"                     # relative to the data directory
    columns = ["messageId", "userId", "event", "properties.total"]

A plugin is a class built from a ``BuildContext`` that has ``async send(batch)`` and
``async aclose()``. ``send`` returns None when every event was taken, or one
``AttemptResult`` per event; raising ``RetryableDeliveryError`` retries the batch,
``PermanentDeliveryError`` dead-letters it. Anything else it raises, or a hang past the
destination's ``timeout``, is contained by router and retried. Blocking work (files,
sync clients) goes to a worker thread so the event loop never stalls.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from router.destinations.base import AttemptResult, BuildContext, Delivery
from router.errors import RetryableDeliveryError


class CsvOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    columns: list[str]


def lookup(event: Any, dotted: str) -> Any:
    """``properties.total`` -> event["properties"]["total"]; missing parts give ""."""
    value = event
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    return value


class CsvDestination:
    def __init__(self, context: BuildContext) -> None:
        options = context.options_as(CsvOptions)
        if not options.columns:
            raise context.error("columns", "name at least one column")
        self.path = context.data_dir / options.path
        self.columns = options.columns

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for delivery in batch:
            event = delivery.event()
            writer.writerow([lookup(event, column) for column in self.columns])
        try:
            await trio.to_thread.run_sync(self._append, buffer.getvalue())
        except OSError as exc:
            raise RetryableDeliveryError(f"cannot write {self.path}: {exc.strerror}") from exc
        return None

    def _append(self, rows: str) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with Path(self.path).open("a", newline="") as handle:
            if new:
                csv.writer(handle).writerow(self.columns)
            handle.write(rows)
            handle.flush()
            os.fsync(handle.fileno())

    async def aclose(self) -> None:
        return None


DESTINATIONS = {"csv": CsvDestination}
