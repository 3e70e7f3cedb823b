"""Transform functions, like Segment Functions: ``def transform(event) -> event | None``.

Found by name in plugin files' ``TRANSFORMS`` dicts and the ``router.transforms`` entry-point
group. A function gets the event as a dict (after routes, filters and field edits, before the
privacy controls) and returns the event to deliver, or None to drop it for that destination.
The dispatcher runs it on a worker thread under the destination's timeout; an exception
dead-letters that one event with the error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from router.config import Config, config_error
from router.pipeline import TransformFunction
from router.plugins import collect

ENTRY_POINT_GROUP = "router.transforms"


def discover_transforms(plugin_dirs: Iterable[Path] = ()) -> dict[str, TransformFunction]:
    found: dict[str, TransformFunction] = collect(
        plugin_dirs, "TRANSFORMS", ENTRY_POINT_GROUP, what="transform"
    )
    return found


def configured_transforms(config: Config) -> dict[str, TransformFunction]:
    """The functions the config names, checked to exist."""
    wanted = {
        name: d.transform.function
        for name, d in config.destinations.items()
        if d.transform.function is not None
    }
    if not wanted:
        return {}
    known = discover_transforms(config.server.plugin_dirs)
    for destination, function in wanted.items():
        if function not in known:
            names = ", ".join(sorted(known)) or "none"
            raise config_error(
                config,
                f"destinations.{destination}.transform.function",
                f"unknown transform {function!r} (known: {names})",
            )
    return {function: known[function] for function in wanted.values()}
