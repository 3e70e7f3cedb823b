"""Operator commands: status, replay, dead letters, tail. Thin: the control channel does it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from router import control
from router.cli_common import ConfigOption, fail, load
from router.config import Config
from router.errors import RouterError
from router.status import table

JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]

dlq_app = typer.Typer(help="Dead letters: list, show, replay, purge.", no_args_is_help=True)


def _loaded(config: Path | None) -> Config:
    return load(config)


def _fail(message: str) -> typer.Exit:
    return fail(message)


def _answer(answer: dict[str, Any]) -> dict[str, Any]:
    if not answer.get("ok"):
        raise _fail(str(answer.get("error")))
    return answer


def status_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Per destination and source: what was routed, delivered, dead-lettered, filtered, pending."""
    try:
        loaded = _loaded(config)
        answer = control.ask(loaded, {"op": "status"})
        result = _answer(answer) if answer is not None else control.offline_status(loaded)
    except RouterError as exc:
        raise _fail(str(exc)) from exc
    result.pop("ok", None)
    result["running"] = answer is not None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(table(result))
    if answer is None:
        typer.echo("(router is not running: read from the queue file; no rates)")


def replay_command(
    to: Annotated[str, typer.Option("--to", help="the destination to send to")],
    since: Annotated[str | None, typer.Option(help="ISO 8601 or a duration back, e.g. 2h")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 or a duration back")] = None,
    source: Annotated[str | None, typer.Option(help="only events of this source")] = None,
    where: Annotated[str | None, typer.Option(help="only events this FQL matches")] = None,
    rate: Annotated[float | None, typer.Option(help="events per second at most")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count, send nothing")] = False,
    wait: Annotated[bool, typer.Option(help="show progress until sent")] = True,
    config: ConfigOption = None,
) -> None:
    """Send logged events again, through the destination's routes, filters and transforms."""
    try:
        loaded = _loaded(config)
        now = time.time()
        request = {
            "op": "replay",
            "to": to,
            "since": control.parse_time(since, now=now),
            "until": control.parse_time(until, now=now),
            "source": source,
            "where": where,
            "rate": rate,
            "dry_run": dry_run,
        }
        before = _retrying(loaded, to)
        answer, running = control.act(loaded, request)
    except RouterError as exc:
        raise _fail(str(exc)) from exc
    result = _answer(answer)
    if dry_run:
        typer.echo(f"{result['matched']} events would be replayed to {to} (dry run: none sent)")
        return
    typer.echo(f"{result['queued']} events queued for replay to {to}")
    if not running:
        typer.echo("router is not running: they are sent when it starts")
    elif wait and result["queued"]:
        _progress(loaded, to, before, int(result["queued"]))


def _retrying(config: Config, destination: str) -> int:
    answer = control.ask(config, {"op": "status"})
    if answer is None or not answer.get("ok"):
        return 0
    return int(answer["destinations"].get(destination, {}).get("retrying", 0))


def _progress(config: Config, destination: str, before: int, queued: int) -> None:
    with typer.progressbar(length=queued, label=f"replaying to {destination}") as bar:
        done = 0
        while done < queued:
            time.sleep(0.5)
            left = _retrying(config, destination) - before
            now_done = min(queued, max(0, queued - left))
            bar.update(now_done - done)
            done = now_done


def tail_command(
    source: Annotated[str | None, typer.Option(help="only events of this source")] = None,
    route: Annotated[int | None, typer.Option(help="only events route N (from 0) takes")] = None,
    destination: Annotated[
        str | None, typer.Option(help="what this destination receives, after its pipeline")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """A live sample of events as they pass (at most 50 a second)."""
    request = {"op": "tail", "source": source, "route": route, "destination": destination}
    try:
        for line in control.stream(_loaded(config), request):
            if line.get("ok") is False:
                raise _fail(str(line.get("error")))
            typer.echo(json.dumps(line))
    except RouterError as exc:
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        return


@dlq_app.command("list")
def dlq_list(
    destination: Annotated[str | None, typer.Option(help="one destination's")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """The dead letters, oldest first."""
    letters = _dead_letters(config, destination)
    if as_json:
        typer.echo(json.dumps(letters, indent=2))
        return
    if not letters:
        typer.echo("no dead letters")
    for letter in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter["dead_at"]))
        typer.echo(
            f"{letter['id']:>8}  {letter['destination']:<16} {when}  "
            f"{letter['attempts']:>3} attempts  {letter['message_id']}  {letter['reason'][:70]}"
        )


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[int, typer.Argument(help="the ID `router dlq list` shows")],
    destination: Annotated[str | None, typer.Option(help="one destination's")] = None,
    config: ConfigOption = None,
) -> None:
    """One dead letter: every attempt's time, status and response, and the event."""
    found = [d for d in _dead_letters(config, destination) if d["id"] == letter_id]
    if not found:
        raise _fail(f"no dead letter {letter_id}")
    for letter in found:
        typer.echo(f"dead letter {letter['id']} for {letter['destination']}: {letter['reason']}")
        for attempt in letter["history"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempt["at"]))
            typer.echo(f"  {when}  {attempt.get('status') or '-'}  {attempt.get('detail', '')}")
        typer.echo(json.dumps(letter["event"], indent=2))


def _dead_letters(config: Path | None, destination: str | None) -> list[dict[str, Any]]:
    request = {"op": "dlq_list", "destination": destination}
    try:
        loaded = _loaded(config)
        answer = control.ask(loaded, request)
        if answer is None:
            answer = control.offline(loaded, request)
    except RouterError as exc:
        raise _fail(str(exc)) from exc
    letters: list[dict[str, Any]] = _answer(answer)["dead_letters"]
    return letters


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="IDs to replay (default: all)")] = None,
    destination: Annotated[str | None, typer.Option(help="one destination's")] = None,
    to: Annotated[str | None, typer.Option(help="send to this destination instead")] = None,
    config: ConfigOption = None,
) -> None:
    """Send dead letters again; they leave the dead letters (and return if they fail again)."""
    request = {"op": "dlq_replay", "destination": destination, "to": to, "ids": ids or None}
    result = _act(config, request)
    typer.echo(f"{result['replayed']} dead letters replayed")


@dlq_app.command("purge")
def dlq_purge(
    ids: Annotated[list[int] | None, typer.Argument(help="IDs to discard")] = None,
    destination: Annotated[str | None, typer.Option(help="one destination's")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="discard all of them")] = False,
    config: ConfigOption = None,
) -> None:
    """Discard dead letters for good."""
    if not ids and not purge_all:
        raise _fail("name the IDs to discard, or --all")
    result = _act(config, {"op": "dlq_purge", "destination": destination, "ids": ids or None})
    typer.echo(f"{result['purged']} dead letters discarded")


def _act(config: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    try:
        answer, _running = control.act(_loaded(config), request)
    except RouterError as exc:
        raise _fail(str(exc)) from exc
    return _answer(answer)
