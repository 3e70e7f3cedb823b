"""The exception tree. Every error router raises on purpose derives from RouterError.

Foreign exceptions (apsw, httpx, OSError) are mapped to these in the one place that
decides what they mean, with ``raise ... from exc``.
"""

from __future__ import annotations


class RouterError(Exception):
    """Root of router's own errors."""


class ConfigError(RouterError):
    """A configuration problem, located by file, line and key path.

    ``str(err)`` reads like ``router.toml:14: routes[2].to: unknown destination 'nosuch'``.
    """

    def __init__(self, message: str, *, file: str = "", line: int | None = None, key: str = ""):
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        parts = [p for p in (where, self.key) if p]
        return ": ".join([*parts, self.message])


class IngestError(RouterError):
    """Input that router refuses; carries the HTTP status and a machine-readable code."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{code}: {message}")


class JournalError(RouterError):
    """The queue database cannot be opened or used (corrupt, locked, not a database)."""


class QueueFullError(IngestError):
    """The queue is over its byte limit or the disk is full; the client should retry later."""

    def __init__(self, message: str, *, retry_after: float = 5.0):
        super().__init__(503, "queue_full", message, retry_after=retry_after)


class DeliveryError(RouterError):
    """A destination failed to take a batch."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = ""):
        self.status = status
        self.detail = detail
        super().__init__(message)


class RetryableDeliveryError(DeliveryError):
    """Worth trying again later (5xx, 408, 429, timeouts, connection errors)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
    ):
        self.retry_after = retry_after
        super().__init__(message, status=status, detail=detail)


class PermanentDeliveryError(DeliveryError):
    """Will never succeed as sent (most 4xx); the events go to the dead letters at once."""
