"""What every command shares: finding the config file, and how a failure is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from router.config import Config, default_config, load_config

# Where a command looks for its config when --config is not given, in order; with none of
# them, the embedded default (the one `router run` starts with on a fresh machine).
CONFIG_SEARCH = (Path("router.toml"), Path("/etc/router/router.toml"))

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config (default: ./router.toml, then /etc/router/router.toml, "
        "then the embedded default).",
    ),
]


def locate(config: Path | None) -> Path | None:
    """The config file a command uses; None for the embedded default."""
    if config is not None:
        return config
    return next((c for c in CONFIG_SEARCH if c.is_file()), None)


def load(config: Path | None) -> Config:
    path = locate(config)
    return default_config() if path is None else load_config(path)


def fail(message: object) -> typer.Exit:
    typer.echo(f"router: {message}", err=True)
    return typer.Exit(code=2)
