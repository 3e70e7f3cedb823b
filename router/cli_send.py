"""``router send``: events from arguments, a JSON file or NDJSON on stdin, through router.client.

Argument parsing and reporting only; the sending (pipelining, acks, reconnects) is the client's.
Exit status: 0 when every event was acked, 1 when any was refused (each refusal is printed with
its reason), 2 when nothing could be sent (no daemon, bad arguments).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from router.cli_common import ConfigOption, fail, load
from router.client import Client, ClientError, Refusal
from router.errors import RouterError

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")


def parse_pairs(pairs: Iterable[str], what: str) -> dict[str, Any]:
    """``plan=pro total=12.5 tags=["a"]`` into a dict; a value that parses as JSON is JSON."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise RouterError(f"--{what} {pair!r}: expected KEY=VALUE")
        try:
            result[key] = json.loads(text)
        except ValueError:
            result[key] = text
    return result


def event_from_arguments(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """One Segment call of ``kind`` from the options; what the daemon will check is left to it."""
    if kind not in EVENT_TYPES:
        raise RouterError(f"unknown event type {kind!r}: one of {', '.join(EVENT_TYPES)} or -")
    event: dict[str, Any] = {"type": kind}
    event.update((k, v) for k, v in fields.items() if v not in (None, {}))
    return event


# A labelled input: (where it came from, the decoded JSON or the reason it was not sent).
Item = tuple[str, Any, str | None]


def ndjson_items(lines: Iterable[str], name: str) -> Iterator[Item]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label = f"{name} line {number}"
        try:
            yield label, json.loads(line), None
        except ValueError as exc:
            yield label, None, f"invalid_json: {exc}"


def file_items(path: Path, text: str) -> Iterator[Item]:
    """A JSON file: one event, a ``{"batch": [...]}`` envelope, a list of events, or NDJSON."""
    try:
        whole = json.loads(text)
    except ValueError:
        yield from ndjson_items(text.splitlines(), str(path))
        return
    if isinstance(whole, list):
        for index, item in enumerate(whole):
            yield f"{path}[{index}]", item, None
    else:
        yield str(path), whole, None


def send_command(
    kind: Annotated[
        str | None,
        typer.Argument(
            help="track, identify, page, screen, group or alias; - (or a pipe) for NDJSON on stdin"
        ),
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="userId")] = None,
    anonymous: Annotated[str | None, typer.Option("--anonymous-id", help="anonymousId")] = None,
    event: Annotated[str | None, typer.Option("--event", "-e", help="track: the event")] = None,
    name: Annotated[str | None, typer.Option(help="page, screen: the name")] = None,
    category: Annotated[str | None, typer.Option(help="page, screen: the category")] = None,
    group: Annotated[str | None, typer.Option("--group", help="group: groupId")] = None,
    previous: Annotated[str | None, typer.Option("--previous-id", help="alias: previousId")] = None,
    prop: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="a property; a value that parses as JSON is JSON"),
    ] = None,
    trait: Annotated[
        list[str] | None, typer.Option(metavar="KEY=VALUE", help="a trait, as --prop")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="a JSON file: an event, a list, NDJSON")
    ] = None,
    config: ConfigOption = None,
    socket: Annotated[
        Path | None, typer.Option(help="the socket (default: the one the config names)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the acks")] = 30.0,
) -> None:
    """Send events to the running daemon over its Unix socket and wait for their acks.

    One event from options: router send track --user u1 --event "Signed Up" --prop plan=pro

    Many: --file F (an event, a list, NDJSON), or NDJSON on stdin (router send -).

    Prints how many were sent, acked and refused; exits 1 when any was refused, with why.
    """
    try:
        items = _items(
            kind,
            file,
            _fields(user, anonymous, event, name, category, group, previous, prop, trait),
        )
        client = Client(_socket_path(socket, config))
    except (RouterError, ClientError, OSError) as exc:
        raise fail(exc) from exc
    labels: dict[str, str] = {}
    local: list[tuple[str, str]] = []  # refused before sending: not JSON, not an object
    for label, obj, problem in items:
        if problem is None:
            problem = _enqueue(client, obj, label, labels)
        if problem is not None:
            local.append((label, problem))
    refusals: tuple[Refusal, ...] = ()
    try:
        client.close(timeout=timeout)
    except ClientError as error:
        refusals = error.refusals
        if not refusals:  # a timeout: the events were sent and their fate is unknown
            typer.echo(f"router: {error}", err=True)
    stats = client.statistics()
    for label, problem in local:
        typer.echo(f"router: {label}: refused: {problem}", err=True)
    for refusal in refusals:
        where = ", ".join(sorted({labels[m] for m in refusal.message_ids if m in labels}))
        typer.echo(
            f"router: {where or 'event'}: refused: {refusal.code}: {refusal.message}", err=True
        )
    refused = stats.refused + len(local)
    typer.echo(f"sent {stats.sent + len(local)}, acked {stats.acked}, refused {refused}")
    if refused or stats.pending or stats.acked < stats.sent - stats.refused:
        raise typer.Exit(code=1)


def _socket_path(socket: Path | None, config: Path | None) -> Path:
    path = socket or load(config).server.socket_path
    if path is None:
        raise RouterError('the config disables the socket (server.socket = "")')
    return path


def _fields(
    user: str | None,
    anonymous: str | None,
    event: str | None,
    name: str | None,
    category: str | None,
    group: str | None,
    previous: str | None,
    prop: list[str] | None,
    trait: list[str] | None,
) -> dict[str, Any]:
    return {
        "userId": user,
        "anonymousId": anonymous,
        "event": event,
        "name": name,
        "category": category,
        "groupId": group,
        "previousId": previous,
        "properties": parse_pairs(prop or [], "prop"),
        "traits": parse_pairs(trait or [], "trait"),
    }


def _items(kind: str | None, file: Path | None, fields: dict[str, Any]) -> Iterator[Item]:
    if file is not None:
        return file_items(file, file.read_text())
    if kind == "-" or (kind is None and not sys.stdin.isatty()):
        return ndjson_items(sys.stdin, "stdin")
    if kind is None:
        raise RouterError("nothing to send: give an event type, --file F, or - for stdin")
    return iter([("argument", event_from_arguments(kind, fields), None)])


def _enqueue(client: Client, obj: Any, label: str, labels: dict[str, str]) -> str | None:
    """Send one input; the reason it cannot be sent, or None."""
    if not isinstance(obj, dict):
        return "invalid_event: an event must be a JSON object"
    batch = obj.get("batch")
    if batch is None:
        labels[client.send(obj)] = label
        return None
    if not isinstance(batch, list) or not all(isinstance(i, dict) for i in batch):
        return "invalid_batch: 'batch' must be a list of JSON objects"
    envelope = {k: v for k, v in obj.items() if k != "batch"}
    for message_id in client.send_batch(batch, **envelope):
        labels[message_id] = label
    return None
