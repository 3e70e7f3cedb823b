"""``router init``: write a commented starter config that passes ``router check``.

The text is ``router/starter.toml`` (package data) with a few values filled in: a fresh write
key, and where the queue and the ingest socket go. Two layouts: *local* (beside the file, for
trying router out) and *system* (``/var/lib/router`` and ``/run/router/router.sock``, where
``systemd/router.service`` and ``router.socket`` expect them). A file under ``/etc`` gets the
system layout unless ``--local`` says otherwise.
"""

from __future__ import annotations

import secrets
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer

from router.cli_common import fail
from router.errors import RouterError

LOCAL = {"data_dir": "./router-data", "socket": "router.sock"}
SYSTEM = {"data_dir": "/var/lib/router", "socket": "/run/router/router.sock"}


def starter_text(path: Path, *, system: bool, write_key: str) -> str:
    """The starter config for ``path``, placeholders filled."""
    values = {**(SYSTEM if system else LOCAL), "write_key": write_key, "path": str(path)}
    text = files("router").joinpath("starter.toml").read_text("utf-8")
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def is_system_path(path: Path) -> bool:
    return Path("/etc") in path.absolute().parents


def init_command(
    path: Annotated[
        Path, typer.Argument(help="where to write the config (default: ./router.toml)")
    ] = Path("router.toml"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
    system: Annotated[
        bool | None,
        typer.Option(
            "--system/--local",
            help="data in /var/lib/router and the socket in /run/router (as the systemd units "
            "expect), or beside the file; default: --system for a file under /etc",
        ),
    ] = None,
) -> None:
    """Write a commented starter config; it passes `router check` as written."""
    layout_system = is_system_path(path) if system is None else system
    text = starter_text(path, system=layout_system, write_key=secrets.token_urlsafe(18))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x" refuses an existing file atomically: no window between a check and the write.
        with path.open("w" if force else "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError as exc:
        raise fail(RouterError(f"{path} exists; use --force to overwrite it")) from exc
    except OSError as exc:
        raise fail(RouterError(f"cannot write {path}: {exc.strerror or exc}")) from exc
    data_dir = (SYSTEM if layout_system else LOCAL)["data_dir"]
    typer.echo(f"wrote {path} (data_dir {data_dir}); check it with: router check --config {path}")
