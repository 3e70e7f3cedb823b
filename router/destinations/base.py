"""The destination protocol: what a built-in or plugin destination implements.

A destination is built from its config section and receives batches of ``Delivery``.
It answers with one ``AttemptResult`` per delivery (or ``None`` when all were taken), or
raises ``RetryableDeliveryError`` / ``PermanentDeliveryError`` for the whole batch. Any
other exception, and any attempt that outlives the destination's ``timeout``, counts as a
retryable failure: the dispatcher contains it, so one broken plugin never stops the rest.
It must not block the event loop: blocking work belongs in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from router.config import Secret
from router.errors import ConfigError
from router.retry import AttemptResult
from router.units import parse_duration

__all__ = [
    "AttemptResult",
    "BuildContext",
    "Delivery",
    "Destination",
    "delivered",
    "permanent_failure",
    "retryable_failure",
]

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way to one destination."""

    seq: int
    source: str
    message_id: str
    received_at: float
    body: bytes  # the event as compact JSON, exactly as stored
    attempt: int  # 1 for the first try

    def event(self) -> Any:
        """The decoded event (a dict), for destinations that need fields rather than bytes."""
        return msgspec.json.decode(self.body)


class Destination(Protocol):
    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a destination's constructor gets: its name, raw options and a way to fail."""

    name: str
    type: str
    options: dict[str, Any]
    data_dir: Path
    timeout: float
    batch_size: int
    file: str = ""
    line: int | None = None

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError pointing at this destination's section."""
        path = f"destinations.{self.name}" + (f".{key}" if key else "")
        return ConfigError(message, file=self.file, line=self.line, key=path)

    def duration(self, key: str, text: str) -> float:
        """Seconds in an option like ``"30s"``; a bad one is a ConfigError at ``key``."""
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc

    def options_as(self, options_type: builtins.type[OptionsT]) -> OptionsT:
        """Validate the options against a msgspec Struct, with located errors."""
        plain = {key: _reveal(value) for key, value in self.options.items()}
        try:
            return msgspec.convert(plain, options_type)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            key = where.rstrip("`").lstrip(".")
            raise self.error(key, message) from exc


def _reveal(value: Any) -> Any:
    """Secrets revealed at any depth (``headers = { Authorization = "env:AUTH" }``)."""
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_reveal(item) for item in value]
    return value


def delivered() -> AttemptResult:
    return AttemptResult(ok=True)


def retryable_failure(
    detail: str, *, status: int | None = None, retry_after: float | None = None
) -> AttemptResult:
    return AttemptResult(
        ok=False, retryable=True, status=status, detail=detail, retry_after=retry_after
    )


def permanent_failure(detail: str, *, status: int | None = None) -> AttemptResult:
    return AttemptResult(ok=False, retryable=False, status=status, detail=detail)
