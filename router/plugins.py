"""Plugin code: Python files in ``plugin_dirs`` and installed packages' entry points.

A plugin file may define ``DESTINATIONS = {"type_name": SomeClass}`` and/or
``TRANSFORMS = {"name": function}``; a package publishes the same under the entry-point groups
``router.destinations`` and ``router.transforms``. Each file is imported once per process even
when both kinds are looked up.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from router.errors import ConfigError

EXPORTS = ("DESTINATIONS", "TRANSFORMS")


def collect(
    plugin_dirs: Iterable[Path],
    attribute: str,
    group: str,
    *,
    what: str,
    known: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``known`` plus every callable exported under ``attribute``/``group``, each name once."""
    found: dict[str, Any] = dict(known or {})
    for name, value, origin in exported(plugin_dirs, attribute, group):
        if name in found:
            raise ConfigError(f"{what} {name!r} from {origin} is already defined")
        if not callable(value):
            raise ConfigError(f"{what} {name!r} from {origin} is not callable")
        found[name] = value
    return found


def exported(
    plugin_dirs: Iterable[Path], attribute: str, group: str
) -> Iterator[tuple[str, Any, str]]:
    """(name, object, origin) for each entry of ``group`` and of files' ``attribute`` dict."""
    for entry in importlib.metadata.entry_points(group=group):
        yield entry.name, entry.load(), f"entry point {entry.value}"
    for path, module in _modules(tuple(plugin_dirs)):
        found = getattr(module, attribute, {})
        if not isinstance(found, dict):
            raise ConfigError(f"plugin file {path}: {attribute} must be a dict")
        for name, value in found.items():
            yield name, value, str(path)


@functools.cache
def _modules(plugin_dirs: tuple[Path, ...]) -> tuple[tuple[Path, ModuleType], ...]:
    loaded = []
    for directory in plugin_dirs:
        if not directory.is_dir():
            raise ConfigError(
                f"plugin directory {directory} does not exist", key="server.plugin_dirs"
            )
        for path in sorted(directory.glob("*.py")):
            module = _load_file(path)
            if not any(hasattr(module, name) for name in EXPORTS):
                raise ConfigError(f"plugin file {path} defines neither DESTINATIONS nor TRANSFORMS")
            loaded.append((path, module))
    return tuple(loaded)


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"router_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"plugin file {path} failed to import: {exc!r}") from exc
    return module
