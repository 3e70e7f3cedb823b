"""``redis``: append events to Redis Streams (``XADD``), one pipelined round trip per batch.

Each entry has the fields ``id`` (the messageId), ``source``, ``type`` (empty for raw events) and
``event`` (the event as compact JSON, exactly as stored). ``stream`` names the stream, with
optional ``{source}`` and ``{type}`` placeholders (``{type}`` is ``none`` for a raw event without
one); ``maxlen`` trims it approximately (``MAXLEN ~ N``), which costs Redis far less than exact
trimming.

Redelivery is idempotent. At-least-once delivery sends a batch again when its answer was lost
(a timeout, a reset connection, a kill -9 of router before it recorded the outcome), and a plain
XADD would append the events a second time. So each stream's share of a batch goes through one
small Lua script (EVALSHA, loaded again if Redis forgot it) that, atomically per event, claims
the key ``router:seen:{stream}:{messageId}`` (``SET NX EX dedupe_window``) and XADDs the event
only if the claim is new; if the XADD fails, it releases the claim, so a failed write never
makes its retry look like a repeat. ``dedupe_window`` defaults to 1h (``"0s"``: no dedupe, plain
pipelined XADDs). It must outlast the time between an attempt and its retry
(``retry.max_backoff``, 10 min by default, plus any downtime of router).

What it costs, measured on this 2-core box (loopback, batches of 100, AOF ``appendfsync
always``; ``bench/forward_redis.py``): in Redis, ~9-11 us per event with the script against
~2 us for a plain XADD (``INFO commandstats``), so one Redis core tops out near 100k events/s
instead of ~500k; memory, ~113 bytes per key for the window (about a third of a 350-byte
entry). In router it costs nothing: one EVALSHA of 400 arguments is cheaper for redis-py to
encode than 100 XADDs, so ``send`` alone ran at 20k-33k events/s with the script, 14k-20k
without; the round trip count is the same (one pipeline per batch).

Durability is Redis's: an entry survives a Redis crash only with AOF on (``appendonly yes``)
and, to survive losing the machine's power, ``appendfsync always`` (``everysec`` may lose the
last second; the RDB snapshots alone lose everything since the last one), and with
``maxmemory-policy noeviction`` (an evicting policy may drop entries or dedupe keys). A script's
writes reach the AOF together.

redis-py's synchronous client runs on a worker thread (``trio.to_thread.run_sync``): its asyncio
client does not run under trio. Its own retries are off: the dispatcher retries, with backoff and
dead letters. The keys a script touches are not all declared, so this targets a standalone Redis
(or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import redis
import redis.backoff
import redis.exceptions
import redis.retry
import trio
from redis.typing import EncodableT, FieldT

from router.destinations.base import AttemptResult, BuildContext, Delivery
from router.errors import PermanentDeliveryError, RetryableDeliveryError

log = logging.getLogger(__name__)

DEFAULT_DEDUPE_WINDOW = "1h"
SEEN_PREFIX = "router:seen:"
_PLACEHOLDERS = ("source", "type")

# KEYS[1]: the stream. ARGV: window seconds, maxlen ("0": none), then (id, source, type, event)
# for each event. Returns how many were appended; the rest had been appended before. Each id is
# claimed first (SET NX) and released again if its XADD fails, so a failed write never makes
# its retry look like a repeat. Claiming first saves an EXISTS per event (~20% of the script's
# time in Redis).
DEDUPE_XADD = """
local window = tonumber(ARGV[1])
local maxlen = ARGV[2]
local prefix = 'router:seen:' .. KEYS[1] .. ':'
local added = 0
for i = 3, #ARGV, 4 do
  local seen = prefix .. ARGV[i]
  if redis.call('SET', seen, '1', 'NX', 'EX', window) then
    local reply
    if maxlen == '0' then
      reply = redis.pcall('XADD', KEYS[1], '*',
        'id', ARGV[i], 'source', ARGV[i + 1], 'type', ARGV[i + 2], 'event', ARGV[i + 3])
    else
      reply = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
        'id', ARGV[i], 'source', ARGV[i + 1], 'type', ARGV[i + 2], 'event', ARGV[i + 3])
    end
    if type(reply) == 'table' and reply.err then
      redis.call('DEL', seen)
      return reply
    end
    added = added + 1
  end
end
return added
"""
SCRIPT_SHA = hashlib.sha1(DEDUPE_XADD.encode()).hexdigest()

# Errors Redis answers while it cannot take writes for now: loading its data, busy with a
# script, out of memory, a read-only replica, failing to persist (MISCONF). Others (WRONGTYPE:
# the stream's name holds another type) will not heal by waiting.
_TRANSIENT = ("LOADING", "BUSY", "OOM", "READONLY", "MISCONF", "MASTERDOWN", "TRYAGAIN", "NOREPL")


class RedisOptions(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    stream: str
    maxlen: int | None = None
    dedupe_window: str = DEFAULT_DEDUPE_WINDOW


class _Typed(msgspec.Struct):
    type: str | None = None


_type_decoder = msgspec.json.Decoder(_Typed)


# -- pure parts ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    message_id: str
    source: str
    type: str
    event: bytes


def event_type(body: bytes) -> str:
    """The event's ``type``, or "" (raw events may have none, or not a string)."""
    try:
        return _type_decoder.decode(body).type or ""
    except msgspec.ValidationError:
        return ""


def group(batch: Sequence[Delivery], template: str) -> dict[str, list[Entry]]:
    """The batch's entries by stream name, each stream's in batch order."""
    streams: dict[str, list[Entry]] = defaultdict(list)
    for d in batch:
        entry = Entry(d.message_id, d.source, event_type(d.body), d.body)
        streams[template.format(source=entry.source, type=entry.type or "none")].append(entry)
    return streams


def script_args(entries: Sequence[Entry], window: int, maxlen: int | None) -> list[bytes | str]:
    args: list[bytes | str] = [str(window), str(maxlen or 0)]
    for e in entries:
        args += [e.message_id, e.source, e.type, e.event]
    return args


def is_transient(error: redis.exceptions.ResponseError) -> bool:
    return str(error).startswith(_TRANSIENT)


# -- the I/O shell -------------------------------------------------------------


class RedisDestination:
    def __init__(self, context: BuildContext) -> None:
        options = context.options_as(RedisOptions)
        try:
            options.stream.format(**dict.fromkeys(_PLACEHOLDERS, "x"))
        except (KeyError, IndexError, ValueError) as exc:
            raise context.error(
                "stream",
                f"bad template {options.stream!r}: use only {{source}} and {{type}} ({exc})",
            ) from exc
        if not options.stream:
            raise context.error("stream", "empty stream name")
        if options.maxlen is not None and options.maxlen < 1:
            raise context.error("maxlen", "must be at least 1 (omit it to keep every entry)")
        window = context.duration("dedupe_window", options.dedupe_window)
        try:
            self._client = redis.Redis.from_url(
                options.url,
                socket_timeout=context.timeout,
                socket_connect_timeout=context.timeout,
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            )
        except ValueError as exc:
            raise context.error("url", f"not a Redis URL: {exc}") from exc
        self._options = options
        self._window = round(window)

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        streams = group(batch, self._options.stream)
        try:
            added = await trio.to_thread.run_sync(self._write, streams)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise RetryableDeliveryError(f"redis unavailable: {exc}") from exc
        except redis.exceptions.ResponseError as exc:
            if is_transient(exc):
                raise RetryableDeliveryError(f"redis refused: {exc}") from exc
            raise PermanentDeliveryError(f"redis refused: {exc}") from exc
        if added < len(batch):
            log.debug("skipped redelivered events count=%d", len(batch) - added)
        return None

    def _write(self, streams: dict[str, list[Entry]]) -> int:
        """On a worker thread: one pipeline for the batch; how many entries were appended."""
        try:
            return self._pipeline(streams)
        except redis.exceptions.NoScriptError:
            # Redis restarted (or SCRIPT FLUSH) and forgot the script: load it and run the
            # batch again; the script skips whatever the first run did append.
            self._client.script_load(DEDUPE_XADD)
            return self._pipeline(streams)

    def _pipeline(self, streams: dict[str, list[Entry]]) -> int:
        started = time.perf_counter()
        pipe = self._client.pipeline(transaction=False)
        maxlen = self._options.maxlen
        for stream, entries in streams.items():
            if self._window > 0:
                # EVALSHA directly: redis-py's Script objects make every pipeline ask
                # SCRIPT EXISTS first, one more round trip per batch.
                args = script_args(entries, self._window, maxlen)
                pipe.evalsha(SCRIPT_SHA, 1, stream, *args)
                continue
            for e in entries:
                fields: dict[FieldT, EncodableT] = {
                    "id": e.message_id,
                    "source": e.source,
                    "type": e.type,
                    "event": e.event,
                }
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
        replies = pipe.execute()
        log.debug("wrote streams=%d seconds=%.4f", len(streams), time.perf_counter() - started)
        if self._window <= 0:
            return len(replies)
        return sum(int(n) for n in replies)

    async def aclose(self) -> None:
        self._client.close()
