"""Finding destination types: built-ins, the ``router.destinations`` entry-point group,
and Python files in ``plugin_dirs``.

A plugin file defines ``DESTINATIONS = {"type_name": SomeClass}``; an entry point names
such a class directly. A class is called with a ``BuildContext`` and returns an object
with ``send`` and ``aclose`` (see ``base.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from router.destinations.base import BuildContext, Destination
from router.destinations.file import FileDestination
from router.destinations.stdout import StdoutDestination
from router.destinations.webhook import WebhookDestination
from router.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "router.destinations"
Factory = Callable[[BuildContext], Destination]

BUILT_INS: dict[str, Factory] = {
    "webhook": WebhookDestination,
    "file": FileDestination,
    "stdout": StdoutDestination,
}


def discover(plugin_dirs: Iterable[Path] = ()) -> dict[str, Factory]:
    """Every destination type known: built-ins, then entry points, then plugin files."""
    types: dict[str, Factory] = dict(BUILT_INS)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _add(types, entry.name, entry.load(), origin=f"entry point {entry.value}")
    for directory in plugin_dirs:
        if not directory.is_dir():
            raise ConfigError(
                f"plugin directory {directory} does not exist", key="server.plugin_dirs"
            )
        for path in sorted(directory.glob("*.py")):
            for name, factory in _load_file(path).items():
                _add(types, name, factory, origin=str(path))
    return types


def _add(types: dict[str, Factory], name: str, factory: Any, *, origin: str) -> None:
    if name in types:
        raise ConfigError(f"destination type {name!r} from {origin} is already defined")
    if not callable(factory):
        raise ConfigError(f"destination type {name!r} from {origin} is not a class")
    types[name] = factory


def _load_file(path: Path) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location(f"router_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"plugin file {path} failed to import: {exc!r}") from exc
    found = getattr(module, "DESTINATIONS", None)
    if not isinstance(found, dict):
        raise ConfigError(f"plugin file {path} defines no DESTINATIONS dict")
    return found


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
