"""``nats``: publish events into a NATS JetStream stream, each with ``Nats-Msg-Id``.

Each event is one message on a subject made from a template (``events.{type}``; also
``{source}`` and ``{event}``, each made a safe subject token) whose payload is the event as
stored. ``Nats-Msg-Id`` is the event's messageId, so the server drops a repeat that arrives
within the stream's ``duplicate_window`` (JetStream's default: 2 minutes): a retry after a lost
PubAck, a restart of router or of the server, is stored once. A retry later than that window
is stored again, and a consumer (router's ``nats`` source dedupes by messageId for a day) must
absorb it. A batch is published with up to ``max_in_flight`` PubAcks outstanding; each event
is delivered when its own PubAck says so, so a failure mid-batch retries only what was not
acknowledged.

The stream: ``stream`` names it, and by default router creates it when it is missing (file
storage, the subjects under the template's literal prefix (``events.>``), ``duplicate_window``,
``replicas``, ``max_age``); an existing stream is used as it is, never changed.
``create_stream = false`` leaves streams to the operator. Every message carries
``Nats-Expected-Stream``, so one that another stream would capture fails instead of landing
there.

The client is router's own trio-native one (``router.nats_client``, where the measurement that
chose it is): ~4x the throughput of nats-py on a thread. A lost connection is reopened on the
next batch; events whose PubAck did not arrive are retried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from router import nats_wire as wire
from router.destinations.base import (
    AttemptResult,
    BuildContext,
    Delivery,
    delivered,
    permanent_failure,
    retryable_failure,
)
from router.errors import RetryableDeliveryError
from router.nats_client import (
    STREAM_NOT_FOUND,
    Connection,
    JetStreamApiError,
    NatsError,
    connect_any,
)

log = logging.getLogger(__name__)

MESSAGE_TOO_LARGE = 10054  # JetStream err_code: no retry will make it fit
IDLE_CHECK = 30.0  # seconds without a read after which a batch first pings the server


class NatsOptions(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    subject: str = "events.{type}"
    stream: str = "EVENTS"
    create_stream: bool = True
    duplicate_window: str = "2m"  # for a stream router creates
    replicas: int = 1  # for a stream router creates; 3 in a cluster
    max_age: str = ""  # for a stream router creates: drop messages older ("" keeps them all)
    max_in_flight: int = 1000


class _Fields(msgspec.Struct):
    type: Any = None
    event: Any = None


_fields = msgspec.json.Decoder(_Fields).decode


class NatsDestination:
    def __init__(self, context: BuildContext) -> None:
        options = context.options_as(NatsOptions)
        try:
            self._addresses = wire.parse_urls(options.url)
        except ValueError as exc:
            raise context.error("url", str(exc)) from exc
        self._first = 0  # the server to try first: the last one that answered
        try:
            self._placeholders = wire.template_fields(options.subject)
        except ValueError as exc:
            raise context.error("subject", str(exc)) from exc
        if not wire.is_name(options.stream):
            raise context.error("stream", "a stream name: letters, digits, '_' and '-'")
        window = context.duration("duplicate_window", options.duplicate_window)
        max_age = context.duration("max_age", options.max_age) if options.max_age else 0.0
        if options.max_in_flight < 1:
            raise context.error("max_in_flight", "must be at least 1")
        if not 1 <= options.replicas <= 5:
            raise context.error("replicas", "JetStream keeps 1 to 5 replicas")
        self._name = context.name
        self._options = options
        self._stream_config = {
            "name": options.stream,
            "subjects": wire.stream_subjects(options.subject),
            "storage": "file",
            "retention": "limits",
            "duplicate_window": int(window * 1e9),
            "num_replicas": options.replicas,
            "max_age": int(max_age * 1e9),  # 0: no limit
        }
        # Each message's header block is these around its messageId.
        self._headers = (
            b"NATS/1.0\r\nNats-Msg-Id: ",
            b"\r\nNats-Expected-Stream: " + options.stream.encode() + b"\r\n\r\n",
        )
        self._subjects: dict[tuple[str, str, str], bytes] = {}
        # The PubAcks must come back inside the dispatcher's timeout, or the acks that did
        # arrive would be lost with the cancelled attempt.
        self._ack_timeout = context.timeout * 0.9
        self._connection: Connection | None = None
        self._connecting = trio.Lock()

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        # One deadline for connecting and the PubAcks both, inside the dispatcher's timeout.
        deadline = trio.current_time() + self._ack_timeout
        connection = await self._connected()
        results: list[AttemptResult | None] = [None] * len(batch)
        messages: list[tuple[bytes, bytes, bytes]] = []
        positions: list[int] = []
        before, after = self._headers
        for index, delivery in enumerate(batch):
            headers = before + delivery.message_id.encode() + after
            if len(headers) + len(delivery.body) > connection.max_payload:
                limit = connection.max_payload
                results[index] = permanent_failure(f"event is over the server's {limit} bytes")
                continue
            messages.append((self._subject(delivery), headers, delivery.body))
            positions.append(index)
        acks: list[wire.PubAck | None] = [None] * len(messages)
        problem = f"no PubAck within {self._ack_timeout:g}s"
        with trio.move_on_at(deadline):
            try:
                await connection.publish_acked(messages, acks, window=self._options.max_in_flight)
            except NatsError as exc:
                problem = f"connection lost: {exc}"
        missing = refused = 0
        first_refusal = ""
        for index, ack in zip(positions, acks, strict=True):
            if ack is None:
                missing += 1
                results[index] = retryable_failure(problem)
                continue
            result = results[index] = _judge(ack)
            if not result.ok:
                refused += 1
                first_refusal = first_refusal or result.detail
        if missing:
            log.warning(
                "nats publish incomplete destination=%s unacked=%d reason=%s",
                self._name,
                missing,
                problem,
            )
        if refused:  # the server said no: usually its configuration (streams, limits)
            log.warning(
                "nats refused events destination=%s count=%d first=%s",
                self._name,
                refused,
                first_refusal,
            )
        return [result or DELIVERED for result in results]

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None

    async def _connected(self) -> Connection:
        """The open connection, after a liveness check when it sat idle; else a new one."""
        async with self._connecting:
            connection = self._connection
            if connection is not None and not connection.broken:
                if trio.current_time() - connection.last_read < IDLE_CHECK:
                    return connection
                # An idle connection may have been dropped by the server (stale) or a NAT:
                # find out now rather than by losing this batch's acks.
                with trio.move_on_after(min(2.0, self._ack_timeout / 2)):
                    try:
                        await connection.ping()
                    except NatsError:
                        pass
                    else:
                        return connection
            if connection is not None:
                await connection.aclose()
                self._connection = None
            self._connection = await self._open()
            return self._connection

    async def _open(self) -> Connection:
        budget = min(5.0, self._ack_timeout / 2)
        try:
            fresh, self._first = await connect_any(
                self._addresses,
                name=self._name,
                each=budget / len(self._addresses),
                first=self._first,
            )
        except NatsError as exc:
            raise RetryableDeliveryError(f"nats: {exc}") from exc
        where = self._addresses[self._first].where
        with trio.move_on_after(budget):
            try:
                await self._ensure_stream(fresh)
            except NatsError as exc:
                await fresh.aclose()
                raise RetryableDeliveryError(f"nats: {exc}") from exc
            log.info("nats connected destination=%s server=%s", self._name, where)
            return fresh
        await fresh.aclose()
        raise RetryableDeliveryError(f"nats: no JetStream answer from {where} in {budget:g}s")

    async def _ensure_stream(self, connection: Connection) -> None:
        stream = self._options.stream
        try:
            await connection.api(f"STREAM.INFO.{stream}")
        except JetStreamApiError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
            if not self._options.create_stream:
                raise NatsError(
                    f"stream {stream!r} not found, and create_stream = false: create it"
                ) from exc
            await connection.api(f"STREAM.CREATE.{stream}", self._stream_config)
            log.info("nats stream created stream=%s config=%s", stream, self._stream_config)

    def _subject(self, delivery: Delivery) -> bytes:
        if not self._placeholders:
            key = ("", "", "")
        else:
            fields = _fields(delivery.body)
            key = (_text(fields.type), _text(fields.event), delivery.source)
        subject = self._subjects.get(key)
        if subject is None:
            values = {"type": key[0], "event": key[1], "source": key[2]}
            subject = wire.render_subject(self._options.subject, values).encode()
            if len(self._subjects) < 10_000:  # event names are open-ended: cap the cache
                self._subjects[key] = subject
        return subject


DELIVERED = delivered()  # immutable: one for every event delivered


def _judge(ack: wire.PubAck) -> AttemptResult:
    if ack.error is None:
        return DELIVERED  # a duplicate too: the stream holds it already
    detail = f"JetStream {ack.error.code}: {ack.error.description}"
    if ack.error.err_code == MESSAGE_TOO_LARGE:
        return permanent_failure(detail, status=ack.error.code)
    # Anything else (no stream for the subject, another stream's, no quorum, limits) is fixed
    # on the server side; retrying keeps the events until it is.
    return retryable_failure(detail, status=ack.error.code or None)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)
