"""The ``router`` command. Parses arguments and calls into the rest; no logic of its own."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import trio
import typer

from router.admission import load_plans
from router.cli_common import ConfigOption, fail, load, locate
from router.cli_init import init_command
from router.cli_operate import dlq_app, replay_command, status_command, tail_command
from router.cli_send import send_command
from router.daemon import Daemon, build_destinations
from router.destinations.base import Destination
from router.errors import RouterError
from router.explain import explain, pick_source, plan_steps, stored_form
from router.logs import setup_logging
from router.pipeline import pipelines
from router.transforms import configured_transforms

app = typer.Typer(
    help="router: a self-hosted event router with a durable queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # plain tracebacks: journald and log files are not terminals
)


def _only_router_error(group: BaseExceptionGroup[BaseException]) -> RouterError | None:
    """The RouterError inside a nursery's exception group, if that is all it holds."""
    matched, rest = group.split(RouterError)
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, RouterError) else None


@app.command()
def run(config: ConfigOption = None, log_level: str = "info") -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config."""
    setup_logging(log_level)
    try:
        path = locate(config)
        loaded = load(path)
        trio.run(Daemon(loaded, config_path=path).run)
    except RouterError as exc:
        raise fail(exc) from exc
    except BaseExceptionGroup as group:
        error = _only_router_error(group)
        if error is None:
            raise
        raise fail(error) from group


@app.command()
def check(config: ConfigOption = None) -> None:
    """Validate a config, including that every destination can be built."""
    try:
        loaded = load(config)
        destinations = build_destinations(loaded)
        pipelines(loaded, configured_transforms(loaded))
        load_plans(loaded)
        trio.run(_close_all, list(destinations.values()))
    except RouterError as exc:
        raise fail(exc) from exc
    typer.echo(
        f"{loaded.file}: ok ({len(loaded.sources)} sources, "
        f"{len(loaded.destinations)} destinations, {len(loaded.routes)} routes)"
    )


@app.command("route")
def route_event(
    event_file: Annotated[Path, typer.Argument(help="a JSON file holding one event; - for stdin")],
    config: ConfigOption = None,
    source: Annotated[str | None, typer.Option(help="the source it arrives from")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show what each destination would receive of one event, and why."""
    try:
        loaded = load(config)
        picked = pick_source(loaded, source)
        text = sys.stdin.read() if str(event_file) == "-" else event_file.read_text()
        try:
            event = json.loads(text)
        except ValueError as exc:
            raise RouterError(f"{event_file}: not JSON: {exc}") from exc
        stored = stored_form(loaded, picked, event, time.time())
        admitted, planned = plan_steps(load_plans(loaded).get(picked), stored)
        functions = configured_transforms(loaded)
        outcomes = [] if admitted is None else explain(loaded, picked, admitted, functions)
    except (RouterError, OSError) as exc:
        raise fail(exc if isinstance(exc, RouterError) else RouterError(str(exc))) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "source": picked,
                    "plan": planned,
                    "destinations": {
                        o.destination: {
                            "delivered": o.delivered,
                            "reason": o.reason,
                            "steps": o.steps,
                            "payload": o.payload,
                        }
                        for o in outcomes
                    },
                },
                indent=2,
            )
        )
        return
    typer.echo(f"source {picked}: {stored.get('type', 'raw')} {stored.get('messageId', '')}")
    for step in planned:
        typer.echo(f"  {step}")
    for outcome in outcomes:
        verdict = "delivered" if outcome.delivered else f"held back ({outcome.reason})"
        typer.echo(f"\n{outcome.destination}: {verdict}")
        for step in outcome.steps:
            typer.echo(f"  {step}")
        if outcome.payload is not None:
            typer.echo(f"  payload: {json.dumps(outcome.payload)}")


async def _close_all(destinations: list[Destination]) -> None:
    for destination in destinations:
        await destination.aclose()


app.command("init")(init_command)
app.command("status")(status_command)
app.command("replay")(replay_command)
app.command("tail")(tail_command)
app.command("send")(send_command)
app.add_typer(dlq_app, name="dlq")


def main() -> None:
    app()
