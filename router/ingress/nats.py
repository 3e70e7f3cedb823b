"""The ``nats`` source: a durable JetStream pull consumer that feeds the journal, for fan-in
(hubs consume what edge routers published with the ``nats`` destination).

Each pull brings up to ``batch`` messages. They go through the same path as the socket's
events (``normalize``, the source's tracking plan, the journal's messageId dedupe) and are
committed in one journal append; only after that append returned are they acked to NATS. So a
hub that dies between the two gets them again (after ``ack_wait``), and the journal stores
each messageId once: the redelivery of what was committed but not acked counts as a duplicate.
A message that is not a valid event is counted in the source's tallies and terminated
(``+TERM``), so it is not redelivered forever.

An event that an upstream router already stamped keeps its ``receivedAt`` and ``timestamp``:
the hub's journal time is its own, but the event's times are when it first arrived.
A missing messageId is taken from ``Nats-Msg-Id``, else made from the stream sequence, so a
redelivered message always has the same id.

The consumer is created when missing (explicit acks, deliver all, ``ack_wait``, the
``subject`` filter); an existing one is used as it is. The stream must exist (the publishers'
``nats`` destination creates it); until it does, the source waits and says so.
Must not: ack before the commit, or stop the daemon when NATS is away (it reconnects).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from router import nats_wire as wire
from router.admission import admit
from router.config import Config, SourceConfig
from router.errors import IngestError, RouterError
from router.events import StoredEvent, decode_json, normalize
from router.journal import Journal
from router.nats_client import (
    CONSUMER_NOT_FOUND,
    Connection,
    JetStreamApiError,
    NatsError,
    connect_any,
)
from router.plans import TrackingPlan

log = logging.getLogger(__name__)

EXPIRES = 5.0  # a pull waits this long for messages before the server ends it (408)
CONNECT_TIMEOUT = 5.0
ACK_TIMEOUT = 2.0
RECONNECT = (0.2, 2.0)  # first and longest wait between attempts to reach the server
MAX_ACK_PENDING = 20_000  # above the largest batch, so a pull is never starved by its own size


# -- pure: messages to events ---------------------------------------------------------------


@dataclass(slots=True)
class Converted:
    events: list[StoredEvent] = field(default_factory=list)
    accepted: list[wire.Msg] = field(default_factory=list)  # acked after the commit
    refused: list[wire.Msg] = field(default_factory=list)  # terminated after the commit
    tallies: Counter[str] = field(default_factory=Counter)


def convert(
    messages: Sequence[wire.Msg],
    *,
    stream: str,
    raw: bool,
    plan: TrackingPlan | None,
    received_at: float,
) -> Converted:
    out = Converted()
    for msg in messages:
        try:
            item = decode_json(msg.payload)
            if type(item) is dict and not item.get("messageId"):
                item["messageId"] = _stable_id(msg, stream)
            stamped = upstream_received_at(item, received_at)
            out.events.append(normalize(item, received_at=stamped, raw=raw))
        except IngestError as exc:
            out.tallies[exc.code] += 1
            out.refused.append(msg)
            continue
        out.accepted.append(msg)
    out.events = admit(plan, out.events, received_at=received_at, tallies=out.tallies)
    return out


def upstream_received_at(item: Any, default: float) -> float:
    """When an upstream router received the event (its ``receivedAt``), else ``default``.
    Normalizing with it reproduces the upstream's skew-corrected ``timestamp`` too."""
    text = item.get("receivedAt") if type(item) is dict else None
    if type(text) is not str:
        return default
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return default
    if moment.tzinfo is None:
        return default
    stamped = moment.timestamp()
    # Only a time that could be true: normalize refuses years it cannot write.
    return stamped if 0 < stamped <= default + 86400 else default


def _stable_id(msg: wire.Msg, stream: str) -> str:
    header = msg.header("Nats-Msg-Id")
    if header:
        return header
    seq = wire.ack_stream_seq(msg.reply) if msg.reply else None
    return f"nats-{stream}-{seq}" if seq is not None else ""


# -- the I/O shell ------------------------------------------------------------------------


class NatsSource:
    def __init__(
        self,
        journal: Journal,
        source: SourceConfig,
        plan: TrackingPlan | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert source.nats is not None
        self._journal = journal
        self._source = source
        self._options = source.nats
        self._plan = plan
        self._clock = clock
        # Validated by the config already; a cluster's servers are tried in turn.
        self._addresses = wire.parse_urls(source.nats.url.reveal())

    async def run(self) -> None:
        """Consume until cancelled, reconnecting (with backoff) whenever the server is away."""
        options = self._options
        delay = RECONNECT[0]
        first = 0
        name = f"router-source-{self._source.name}"
        said = ""  # the last failure logged: a server down for an hour is one warning, not 1800
        while True:
            connection: Connection | None = None
            try:
                connection, first = await connect_any(
                    self._addresses, name=name, each=CONNECT_TIMEOUT, first=first
                )
                with trio.fail_after(CONNECT_TIMEOUT):
                    await self._ensure_consumer(connection)
                log.info(
                    "nats source consuming source=%s stream=%s consumer=%s server=%s",
                    self._source.name,
                    options.stream,
                    options.consumer,
                    self._addresses[first].where,
                )
                delay, said = RECONNECT[0], ""
                await self._consume(connection)
            except (NatsError, trio.TooSlowError) as exc:
                reason = str(exc) or "timed out"
                log.log(
                    logging.DEBUG if reason == said else logging.WARNING,
                    "nats source cannot consume source=%s error=%s retry_in=%.1fs",
                    self._source.name,
                    reason,
                    delay,
                )
                said = reason
            finally:
                if connection is not None:
                    with trio.CancelScope(shield=True):
                        await connection.aclose()
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT[1])

    async def _ensure_consumer(self, connection: Connection) -> None:
        options = self._options
        where = f"{options.stream}.{options.consumer}"
        try:
            await connection.api(f"CONSUMER.INFO.{where}")
        except JetStreamApiError as exc:
            if exc.err_code != CONSUMER_NOT_FOUND:
                raise
            config: dict[str, Any] = {
                "durable_name": options.consumer,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(options.ack_wait * 1e9),
                "max_ack_pending": MAX_ACK_PENDING,
            }
            if options.subject:
                config["filter_subject"] = options.subject
            body = {"stream_name": options.stream, "config": config}
            await connection.api(f"CONSUMER.DURABLE.CREATE.{where}", body)
            log.info("nats consumer created stream=%s consumer=%s", *where.split("."))

    async def _consume(self, connection: Connection) -> None:
        options = self._options
        while True:
            # The server ends each pull itself after EXPIRES; silence well past that means the
            # connection is dead without having said so.
            with trio.move_on_after(EXPIRES + 5.0) as scope:
                messages = await connection.fetch(
                    options.stream, options.consumer, batch=options.batch, expires=EXPIRES
                )
            if scope.cancelled_caught:
                raise NatsError("no answer to a pull request")
            if messages:
                await self._store(connection, messages)

    async def _store(self, connection: Connection, messages: list[wire.Msg]) -> None:
        received_at = self._clock()
        converted = convert(
            messages,
            stream=self._options.stream,
            raw=self._source.raw,
            plan=self._plan,
            received_at=received_at,
        )
        name = self._source.name
        try:
            await self._journal.append(name, converted.events, received_at, +converted.tallies)
        except IngestError as exc:  # the queue is full: NATS keeps them until we can
            wait = exc.retry_after or 5.0
            log.warning("nats source paused source=%s reason=%s for=%.0fs", name, exc, wait)
            await trio.sleep(wait)
            return  # unacked: redelivered after ack_wait
        except RouterError:
            log.exception("nats source could not store source=%s", name)
            await trio.sleep(1.0)
            return
        # Committed: now, and only now, NATS may forget them. Shielded, so a stop right here
        # does not cost a redelivery of the whole batch (it would be absorbed, but why pay).
        with trio.CancelScope(shield=True), trio.move_on_after(ACK_TIMEOUT):
            await connection.ack(converted.accepted)
            await connection.ack(converted.refused, b"+TERM")
        if converted.refused:
            log.warning(
                "nats source refused messages source=%s count=%d", name, len(converted.refused)
            )


def start_nats_sources(
    config: Config,
    journal: Journal,
    plans: dict[str, TrackingPlan],
    nursery: trio.Nursery,
) -> None:
    """A consumer task per source with a ``nats`` table, in the ingress nursery (cancelled
    first at shutdown; what it committed but had not acked is redelivered and deduplicated).
    ``start_soon``, not ``start``: router is ready, and takes other ingest, without NATS."""
    for source in config.sources.values():
        if source.nats is None:
            continue
        if config.queue.dedupe_window <= source.nats.ack_wait:
            # Exactly-once at the hub rests on the dedupe: a message committed but not acked
            # comes back after ack_wait (or after the hub's restart) and must be recognised.
            log.warning(
                "nats source without a dedupe window longer than its ack_wait: redeliveries "
                "will be stored twice source=%s dedupe_window=%gs ack_wait=%gs",
                source.name,
                config.queue.dedupe_window,
                source.nats.ack_wait,
            )
        nursery.start_soon(NatsSource(journal, source, plans.get(source.name)).run)
