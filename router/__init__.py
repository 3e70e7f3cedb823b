"""router: a self-hosted event router with a durable SQLite queue."""

__version__ = "0.1.0"
