"""The ``redis`` destination against a real redis-server (AOF on), alone and behind the daemon.

What a user would check with redis-cli: XLEN, the entries' fields, and that every event is there
exactly once after Redis restarts or router is killed mid-stream.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from router.destinations.base import BuildContext, Delivery
from router.destinations.redis import Entry, RedisDestination, group
from router.errors import ConfigError, PermanentDeliveryError, RetryableDeliveryError
from tests.redis_server import (  # noqa: F401 (redis_server: a fixture)
    RedisServer,
    ReplyHoldingProxy,
    redis_server,
)
from tests.support import Daemon, SocketClient, track


def context(**options: Any) -> BuildContext:
    return BuildContext(
        name="stream",
        type="redis",
        options=options,
        data_dir=Path("."),
        timeout=2.0,
        batch_size=100,
    )


def deliveries(ids: range, source: str = "web", **extra: Any) -> list[Delivery]:
    return [
        Delivery(n, source, f"m-{n}", 1e9, json.dumps(track(f"m-{n}", **extra)).encode(), 1)
        for n in ids
    ]


def ids_in(client: redis_py.Redis, stream: str) -> list[str]:
    return [fields[b"id"].decode() for _, fields in client.xrange(stream)]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"type":"identify","userId":"u"}', "identify"),
        (b'{"orderId":7}', ""),  # a raw source's event
        (b'{"type":7}', ""),
        (b"[1,2]", ""),
    ],
)
def test_the_type_field_and_stream_name_come_from_the_event(body: bytes, expected: str):
    (stream, entries), *_ = group([Delivery(1, "web", "m-1", 1e9, body, 1)], "ev.{type}").items()
    assert entries == [Entry("m-1", "web", expected, body)]
    assert stream == f"ev.{expected or 'none'}"


async def test_each_event_becomes_an_entry_with_its_id_source_type_and_body(
    redis_server: RedisServer,  # noqa: F811
):
    destination = RedisDestination(context(url=redis_server.url, stream="events"))
    batch = deliveries(range(3))
    assert await destination.send(batch) is None
    await destination.aclose()
    with redis_server.client() as client:
        entries = client.xrange("events")
    assert [fields for _, fields in entries] == [
        {b"id": d.message_id.encode(), b"source": b"web", b"type": b"track", b"event": d.body}
        for d in batch
    ]


async def test_a_batch_sent_again_appends_only_the_events_not_seen_before(
    redis_server: RedisServer,  # noqa: F811
):
    """A redelivery after a lost answer (the same messageIds again) must not duplicate."""
    destination = RedisDestination(context(url=redis_server.url, stream="events"))
    await destination.send(deliveries(range(100)))
    await destination.send(deliveries(range(50, 150)))
    await destination.aclose()
    with redis_server.client() as client:
        assert ids_in(client, "events") == [f"m-{n}" for n in range(150)]


async def test_without_a_dedupe_window_a_redelivery_duplicates(
    redis_server: RedisServer,  # noqa: F811
):
    """The knob does what it says: plain XADDs, at-least-once."""
    options = {"url": redis_server.url, "stream": "events", "dedupe_window": "0s"}
    destination = RedisDestination(context(**options))
    await destination.send(deliveries(range(10)))
    await destination.send(deliveries(range(10)))
    await destination.aclose()
    with redis_server.client() as client:
        assert client.xlen("events") == 20


async def test_the_stream_template_splits_by_source_and_type(
    redis_server: RedisServer,  # noqa: F811
):
    destination = RedisDestination(context(url=redis_server.url, stream="ev.{source}.{type}"))
    batch = [*deliveries(range(3), "web"), *deliveries(range(3, 5), "app", type="identify")]
    await destination.send(batch)
    await destination.aclose()
    with redis_server.client() as client:
        assert ids_in(client, "ev.web.track") == ["m-0", "m-1", "m-2"]
        assert ids_in(client, "ev.app.identify") == ["m-3", "m-4"]


async def test_maxlen_trims_the_stream_approximately(redis_server: RedisServer):  # noqa: F811
    destination = RedisDestination(context(url=redis_server.url, stream="events", maxlen=100))
    for start in range(0, 2000, 100):
        await destination.send(deliveries(range(start, start + 100)))
    await destination.aclose()
    with redis_server.client() as client:
        length = client.xlen("events")
        newest = ids_in(client, "events")[-1]
    # "~" trims whole radix-tree nodes (100 entries each by default): never below maxlen.
    assert 100 <= length < 300
    assert newest == "m-1999"


async def test_redis_down_is_retryable_and_the_retry_lands(redis_server: RedisServer):  # noqa: F811
    destination = RedisDestination(context(url=redis_server.url, stream="events"))
    await destination.send(deliveries(range(5)))
    redis_server.stop()
    with pytest.raises(RetryableDeliveryError, match="redis unavailable"):
        await destination.send(deliveries(range(5, 10)))
    redis_server.start()
    await destination.send(deliveries(range(5, 10)))
    await destination.aclose()
    with redis_server.client() as client:
        # AOF with fsync always: what was acked before the restart is still there.
        assert ids_in(client, "events") == [f"m-{n}" for n in range(10)]


async def test_a_key_of_another_type_fails_for_good_and_leaves_nothing_behind(
    redis_server: RedisServer,  # noqa: F811
):
    with redis_server.client() as client:
        client.set("events", "not a stream")
    destination = RedisDestination(context(url=redis_server.url, stream="events"))
    with pytest.raises(PermanentDeliveryError, match="WRONGTYPE"):
        await destination.send(deliveries(range(3)))
    # Once the key is fixed, replaying the dead letters writes them: the failed attempt left
    # no dedupe mark that would make them look delivered.
    with redis_server.client() as client:
        client.delete("events")
    await destination.send(deliveries(range(3)))
    await destination.aclose()
    with redis_server.client() as client:
        assert ids_in(client, "events") == ["m-0", "m-1", "m-2"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stream": "events"}, "destinations.stream: Object missing required field `url`"),
        ({"url": "redis://127.0.0.1"}, "destinations.stream: Object missing required field"),
        (
            {"url": "http://127.0.0.1", "stream": "events"},
            "destinations.stream.url: not a Redis URL",
        ),
        (
            {"url": "redis://127.0.0.1", "stream": "events.{date}"},
            "destinations.stream.stream: bad template 'events.{date}'",
        ),
        (
            {"url": "redis://127.0.0.1", "stream": "events", "maxlen": 0},
            "destinations.stream.maxlen: must be at least 1",
        ),
        (
            {"url": "redis://127.0.0.1", "stream": "events", "dedupe_window": "60"},
            "destinations.stream.dedupe_window: invalid duration '60'",
        ),
        (
            {"url": "redis://127.0.0.1", "stream": "events", "maxlength": 5},
            "destinations.stream: Object contains unknown field `maxlength`",
        ),
    ],
)
def test_option_errors_point_at_the_key(options: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as error:
        RedisDestination(context(**options))
    assert str(error.value).startswith(message)


# -- behind the daemon -----------------------------------------------------------

FAST_RETRY = (
    'retry = { max_attempts = 1000, max_age = "1h", initial = "20ms", max_backoff = "200ms" }'
)


def daemon_config(url: str) -> str:
    return f"""
        [sources.local]
        socket = true

        [destinations.redis]
        type = "redis"
        url = "{url}"
        stream = "events"
        batch_size = 20
        batch_wait = "5ms"
        concurrency = 2
        timeout = "2s"
        {FAST_RETRY}

        [[routes]]
        to = ["redis"]
        """


def ingest(daemon: Daemon, ids: range) -> None:
    """Send events over the socket in lines of 50 and wait for every ack."""
    client = SocketClient(daemon.socket_path)
    lines = [{"batch": [track(f"e-{n}") for n in ids[i : i + 50]]} for i in range(0, len(ids), 50)]
    client.send(*lines)
    for _ in lines:
        assert client.ack()["ok"]
    client.close()


def wait_for_length(server: RedisServer, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while client.xlen("events") < count:
            assert time.monotonic() < deadline, f"{client.xlen('events')} of {count} entries"
            time.sleep(0.02)


def assert_exactly_once(server: RedisServer, count: int) -> None:
    time.sleep(0.5)  # a late duplicate would show by now
    with server.client() as client:
        ids = ids_in(client, "events")
    assert len(ids) == count
    assert sorted(set(ids)) == sorted(f"e-{n}" for n in range(count))


@pytest.mark.slow
def test_1000_events_land_once_across_a_redis_restart_mid_stream(
    tmp_path: Path,
    daemons: list[Daemon],
    redis_server: RedisServer,  # noqa: F811
):
    daemon = Daemon(tmp_path, daemon_config(redis_server.url))
    daemons.append(daemon)
    daemon.start()
    ingest(daemon, range(500))
    wait_for_length(redis_server, 1)
    redis_server.stop()  # mid-stream: deliveries in flight fail and retry
    ingest(daemon, range(500, 1000))  # ingest goes on while Redis is down
    redis_server.start()
    wait_for_length(redis_server, 1000)
    assert_exactly_once(redis_server, 1000)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_1000_events_land_once_across_a_kill_9_of_router_mid_stream(
    tmp_path: Path,
    daemons: list[Daemon],
    redis_server: RedisServer,  # noqa: F811
):
    """Router dies after Redis ran its writes but before the replies came back (a proxy holds
    them); the restarted router sends those events again, and they are not appended twice."""
    proxy = ReplyHoldingProxy(redis_server.port)
    try:
        daemon = Daemon(tmp_path, daemon_config(proxy.url))
        daemons.append(daemon)
        daemon.start()
        ingest(daemon, range(500))
        wait_for_length(redis_server, 500)
        proxy.hold.set()
        ingest(daemon, range(500, 1000))
        wait_for_length(redis_server, 501)  # written, unanswered
        daemon.stop(signal.SIGKILL)
        proxy.hold.clear()
        daemon.start()
        wait_for_length(redis_server, 1000)
        assert_exactly_once(redis_server, 1000)
        assert daemon.stop() == 0
    finally:
        proxy.close()
