"""Finding destination types: built-ins, the ``router.destinations`` entry-point group,
and Python files in ``plugin_dirs`` (see ``router.plugins``).

A plugin file defines ``DESTINATIONS = {"type_name": SomeClass}``; an entry point names
such a class directly. A class is called with a ``BuildContext`` and returns an object
with ``send`` and ``aclose`` (see ``base.py``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from router.destinations.base import BuildContext, Destination
from router.destinations.file import FileDestination
from router.destinations.stdout import StdoutDestination
from router.destinations.webhook import WebhookDestination
from router.errors import ConfigError
from router.plugins import collect

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "router.destinations"
Factory = Callable[[BuildContext], Destination]

BUILT_INS: dict[str, Factory] = {
    "webhook": WebhookDestination,
    "file": FileDestination,
    "stdout": StdoutDestination,
}

# Built-ins that need a client library from an extra ("pip install 'router[postgres]'"): imported
# only when a config uses them, so the daemon starts without libraries it does not need.
OPTIONAL_BUILT_INS = {
    "segment": ("router.destinations.segment", "SegmentDestination", None),
    "postgres": ("router.destinations.postgres", "PostgresDestination", "postgres"),
    "nats": ("router.destinations.nats", "NatsDestination", None),
    "redis": ("router.destinations.redis", "RedisDestination", "redis"),
}


def _optional(type_name: str) -> Factory:
    module_name, class_name, extra = OPTIONAL_BUILT_INS[type_name]

    def factory(context: BuildContext) -> Destination:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f": pip install 'router[{extra}]'" if extra else ""
            raise context.error("type", f"{type_name!r} needs {exc.name}{hint}") from exc
        built: Destination = getattr(module, class_name)(context)
        return built

    return factory


BUILT_INS.update({type_name: _optional(type_name) for type_name in OPTIONAL_BUILT_INS})


def discover(plugin_dirs: Iterable[Path] = ()) -> dict[str, Factory]:
    """Every destination type known: built-ins, then entry points, then plugin files."""
    types: dict[str, Factory] = collect(
        plugin_dirs, "DESTINATIONS", ENTRY_POINT_GROUP, what="destination type", known=BUILT_INS
    )
    return types


def build(context: BuildContext, types: dict[str, Factory]) -> Destination:
    """Build one destination, turning any failure into a ConfigError at its section."""
    factory = types.get(context.type)
    if factory is None:
        known = ", ".join(sorted(types))
        raise context.error("type", f"unknown destination type {context.type!r} (known: {known})")
    try:
        return factory(context)
    except ConfigError:
        raise
    except Exception as exc:
        raise context.error("", f"cannot build destination: {exc!r}") from exc
