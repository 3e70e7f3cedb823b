"""The ``segment`` destination: the requests it makes (httpx.MockTransport), how it cuts batches to
Segment's limits, and an edge router forwarding to a real hub router, exactly once per messageId
across a hub restart and a kill -9 of the edge.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import parse_config
from router.daemon import build_destinations
from router.destinations.base import BuildContext, Delivery
from router.destinations.segment import SegmentDestination, shift_sent_at, split
from router.errors import ConfigError, PermanentDeliveryError, RetryableDeliveryError
from tests.chaos import status
from tests.support import Daemon, SocketClient, track

# -- cutting batches to the limits (pure) ---------------------------------------


@pytest.mark.parametrize(
    ("sizes", "limits", "requests", "too_large"),
    [
        ([100, 100, 100], (1000, 10_000, 10), [[0, 1, 2]], []),
        # 64 bytes of envelope + (size + comma) each: 3 x 301 = 903 fits 1000, a 4th does not.
        ([300, 300, 300, 300, 300], (1000, 1000, 10), [[0, 1, 2], [3, 4]], []),
        ([100, 100, 100], (1000, 10_000, 2), [[0, 1], [2]], []),
        ([100, 2000, 100], (1000, 10_000, 10), [[0, 2]], [1]),
        ([2000], (1000, 10_000, 10), [], [0]),
        ([], (1000, 10_000, 10), [], []),
    ],
)
def test_split_cuts_by_bytes_and_count_and_sets_apart_events_too_large(
    sizes: list[int],
    limits: tuple[int, int, int],
    requests: list[list[int]],
    too_large: list[int],
):
    max_event, max_batch, max_events = limits
    cut = split(sizes, max_event=max_event, max_batch=max_batch, max_events=max_events)
    assert (cut.requests, cut.too_large) == (requests, too_large)


@given(
    sizes=st.lists(st.integers(0, 5000), max_size=200),
    max_event=st.integers(1024, 4096),
    max_batch=st.integers(1024, 20_000),
    max_events=st.integers(1, 50),
)
def test_split_keeps_every_event_once_in_order_within_the_limits(
    sizes: list[int], max_event: int, max_batch: int, max_events: int
):
    cut = split(sizes, max_event=max_event, max_batch=max_batch, max_events=max_events)
    sent = [index for request in cut.requests for index in request]
    assert sorted(sent + cut.too_large) == list(range(len(sizes)))
    assert sent == sorted(sent)
    for request in cut.requests:
        body = b'{"batch":[' + b",".join(b"x" * sizes[i] for i in request) + b'],"sentAt":"'
        assert len(body) + len("2026-01-01T00:00:00.000+00:00") + 2 <= max_batch
        assert 0 < len(request) <= max_events
    assert all(sizes[i] > max_event or sizes[i] + 64 > max_batch for i in cut.too_large)


def test_an_event_held_here_has_its_sent_at_moved_by_the_time_held():
    """The hub corrects skew with receivedAt - (sentAt - originalTimestamp): the held time
    must not end up in the event's timestamp."""
    body = json.dumps({"messageId": "m", "sentAt": "2026-01-01T00:00:00.000Z"}).encode()
    shifted = json.loads(shift_sent_at(body, 3600.25))
    assert shifted == {"messageId": "m", "sentAt": "2026-01-01T01:00:00.250000+00:00"}
    plain = json.dumps({"messageId": "m", "timestamp": "2026-01-01T00:00:00Z"}).encode()
    assert shift_sent_at(plain, 3600) is plain
    odd = json.dumps({"messageId": "m", "sentAt": "yesterday"}).encode()
    assert shift_sent_at(odd, 3600) is odd
    number = json.dumps({"messageId": "m", "sentAt": 1767225600}).encode()
    assert shift_sent_at(number, 3600) is number


def test_only_the_top_level_sent_at_moves():
    event = {
        "properties": {"sentAt": "2026-01-01T00:00:00Z", "label": "sentAt"},
        "sentAt": "2026-01-01T00:00:00Z",
    }
    shifted = json.loads(shift_sent_at(json.dumps(event, separators=(",", ":")).encode(), 60))
    assert shifted["sentAt"] == "2026-01-01T00:01:00.000000+00:00"
    assert shifted["properties"] == event["properties"]


# -- options ----------------------------------------------------------------------


def context(**options: Any) -> BuildContext:
    return BuildContext(
        name="hub", type="segment", options=options, data_dir=Path("."), timeout=5.0, batch_size=100
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"write_key": "wk"}, "destinations.hub: Object missing required field `url`"),
        (
            {"url": "http://127.0.0.1:1"},
            "destinations.hub: Object missing required field `write_key`",
        ),
        (
            {"url": "ftp://hub.example.com", "write_key": "wk"},
            "destinations.hub.url: not an http(s) URL: 'ftp://hub.example.com'",
        ),
        (
            {"url": "hub.example.com", "write_key": "wk"},
            "destinations.hub.url: not an http(s) URL: 'hub.example.com'",
        ),
        ({"url": "http://h", "write_key": ""}, "destinations.hub.write_key: empty write key"),
        (
            {"url": "http://h", "write_key": "wk", "gzip": "yes"},
            "destinations.hub.gzip: Expected `bool`, got `str`",
        ),
        (
            {"url": "http://h", "write_key": "wk", "max_batch_bytes": "4 megs"},
            "destinations.hub.max_batch_bytes: invalid size '4 megs'",
        ),
        (
            {"url": "http://h", "write_key": "wk", "max_event_bytes": 100},
            "destinations.hub.max_event_bytes: must be at least 1024 bytes",
        ),
        (
            {"url": "http://h", "write_key": "wk", "writekey": "x"},
            "destinations.hub: Object contains unknown field `writekey`",
        ),
    ],
)
def test_option_errors_point_at_the_key(options: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as error:
        SegmentDestination(context(**options))
    assert str(error.value).startswith(message)


def test_a_write_key_from_an_unset_environment_variable_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv("HUB_WRITE_KEY", raising=False)
    text = (
        '[destinations.hub]\ntype = "segment"\nurl = "http://h"\nwrite_key = "env:HUB_WRITE_KEY"\n'
    )
    with pytest.raises(ConfigError) as error:
        build_destinations(parse_config(text))
    expected = "router.toml:4: destinations.hub.write_key: environment variable 'HUB_WRITE_KEY'"
    assert str(error.value).startswith(expected)


# -- the requests (MockTransport) --------------------------------------------------

Answer = Callable[[httpx.Request], httpx.Response]


def ok(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"success": True})


class Recorder:
    """A transport that records each request's decoded body and answers with ``answer``."""

    def __init__(self, answer: Answer = ok) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raw = request.content
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        self.bodies.append(json.loads(raw))
        return self.answer(request)

    def ids(self) -> list[list[str]]:
        return [[event["messageId"] for event in body["batch"]] for body in self.bodies]


def deliveries(count: int, **extra: Any) -> list[Delivery]:
    now = time.time()
    return [
        Delivery(n, "web", f"m-{n}", now, json.dumps(track(f"m-{n}", **extra)).encode(), 1)
        for n in range(count)
    ]


def destination(recorder: Recorder, **options: Any) -> SegmentDestination:
    options = {"url": "https://hub.example.com/router", "write_key": "wk_edge", **options}
    return SegmentDestination(context(**options), transport=recorder.transport)


async def test_a_batch_goes_gzipped_to_v1_batch_with_the_write_key_as_basic_user():
    recorder = Recorder()
    hub = destination(recorder, headers={"X-Edge": "berlin-1"})
    batch = deliveries(3)
    assert await hub.send(batch) is None
    await hub.aclose()
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == "https://hub.example.com/router/v1/batch"
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"wk_edge:").decode()
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["x-edge"] == "berlin-1"
    (body,) = recorder.bodies
    assert body["batch"] == [json.loads(d.body) for d in batch]  # as stored, ids and all
    sent_at = datetime.fromisoformat(body["sentAt"])
    assert abs(sent_at - datetime.now(UTC)) < timedelta(seconds=5)


async def test_with_gzip_off_the_body_goes_as_plain_json():
    recorder = Recorder()
    hub = destination(recorder, gzip=False)
    await hub.send(deliveries(2))
    await hub.aclose()
    assert "content-encoding" not in recorder.requests[0].headers
    assert recorder.ids() == [["m-0", "m-1"]]


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (429, {"retry-after": "7"}, RetryableDeliveryError, 7.0),
        (503, {"retry-after": "5"}, RetryableDeliveryError, 5.0),  # a hub's full queue
        (500, {}, RetryableDeliveryError, None),
        (408, {}, RetryableDeliveryError, None),
        (400, {}, PermanentDeliveryError, None),
        (401, {}, PermanentDeliveryError, None),  # a hub with strict_auth, a wrong key
        (413, {}, PermanentDeliveryError, None),
    ],
)
async def test_answers_are_classified_and_retry_after_is_honoured(
    status: int, headers: dict[str, str], error: type[Exception], retry_after: float | None
):
    answer = {"code": "x", "message": "no"}
    recorder = Recorder(lambda _r: httpx.Response(status, json=answer, headers=headers))
    hub = destination(recorder)
    with pytest.raises(error) as raised:
        await hub.send(deliveries(2))
    await hub.aclose()
    assert getattr(raised.value, "retry_after", None) == retry_after
    assert raised.value.status == status  # type: ignore[attr-defined]
    assert '"message":"no"' in raised.value.detail  # type: ignore[attr-defined]


async def test_a_connection_failure_is_retryable():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    hub = SegmentDestination(
        context(url="http://127.0.0.1:1", write_key="wk"), transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(RetryableDeliveryError, match="connection failed"):
        await hub.send(deliveries(1))
    await hub.aclose()


async def test_a_big_batch_goes_as_several_requests_within_the_byte_limit():
    recorder = Recorder()
    hub = destination(recorder, max_batch_bytes="2KiB", gzip=False)
    batch = deliveries(20)
    assert await hub.send(batch) is None
    await hub.aclose()
    assert len(recorder.requests) > 1
    assert all(len(r.content) <= 2048 for r in recorder.requests)
    assert [i for ids in recorder.ids() for i in ids] == [d.message_id for d in batch]


async def test_an_event_over_32kb_fails_for_good_alone():
    recorder = Recorder()
    hub = destination(recorder)
    batch = deliveries(3)
    big = json.dumps(track("m-big", properties={"blob": "x" * 40_000})).encode()
    batch.insert(1, Delivery(9, "web", "m-big", time.time(), big, 1))
    results = await hub.send(batch)
    await hub.aclose()
    assert results is not None
    assert [r.ok for r in results] == [True, False, True, True]
    assert not results[1].retryable
    assert "over max_event_bytes" in results[1].detail
    assert recorder.ids() == [["m-0", "m-1", "m-2"]]


async def test_after_a_retryable_failure_the_rest_of_the_batch_waits_with_it():
    def fail_the_second(request: httpx.Request) -> httpx.Response:
        if len(recorder.requests) == 2:
            return httpx.Response(503, headers={"retry-after": "3"})
        return ok(request)

    recorder = Recorder(fail_the_second)
    hub = destination(recorder, max_batch_events=2)
    results = await hub.send(deliveries(6))
    await hub.aclose()
    assert results is not None
    assert [r.ok for r in results] == [True, True, False, False, False, False]
    assert all(r.retryable and r.retry_after == 3.0 for r in results[2:])
    assert len(recorder.requests) == 2  # the third request was not made


# -- an edge router forwarding to a hub router --------------------------------------

FAST_RETRY = (
    'retry = { max_attempts = 1000, max_age = "1h", initial = "20ms", max_backoff = "200ms" }'
)
HUB = """
    [http]
    strict_auth = true

    [sources.edge]
    write_key = "wk_edge"

    [destinations.out]
    type = "file"
    path = "out/{source}.jsonl"
    batch_size = 100
    batch_wait = "5ms"

    [[routes]]
    to = ["out"]
    """


def edge_config(hub: Daemon) -> str:
    return f"""
        [sources.local]
        socket = true

        [destinations.hub]
        type = "segment"
        url = "http://127.0.0.1:{hub.port}"
        write_key = "env:HUB_WRITE_KEY"
        batch_size = 20
        batch_wait = "5ms"
        concurrency = 2
        timeout = "5s"
        {FAST_RETRY}

        [[routes]]
        to = ["hub"]
        """


def start_pair(tmp_path: Path, daemons: list[Daemon]) -> tuple[Daemon, Daemon]:
    (tmp_path / "hub").mkdir()
    (tmp_path / "edge").mkdir()
    hub = Daemon(tmp_path / "hub", textwrap.dedent(HUB))
    daemons.append(hub)
    hub.start()
    edge = Daemon(tmp_path / "edge", edge_config(hub))
    daemons.append(edge)
    edge.start()
    return hub, edge


def ingest(daemon: Daemon, events: list[dict[str, Any]]) -> None:
    """Send events over the socket in lines of 50 and wait for every ack."""
    client = SocketClient(daemon.socket_path)
    lines = [{"batch": events[i : i + 50]} for i in range(0, len(events), 50)]
    client.send(*lines)
    for _ in lines:
        assert client.ack()["ok"]
    client.close()


def arrived(hub: Daemon) -> list[dict[str, Any]]:
    """The events the hub has delivered to its file, complete lines only."""
    path = hub.data_dir / "out" / "edge.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for(hub: Daemon, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(events := arrived(hub)) < count:
        assert time.monotonic() < deadline, f"{len(events)} of {count} events at the hub"
        time.sleep(0.02)
    return events


def assert_exactly_once(hub: Daemon, count: int) -> list[dict[str, Any]]:
    wait_for(hub, count)
    time.sleep(0.5)  # a late duplicate would show by now
    events = arrived(hub)
    ids = [event["messageId"] for event in events]
    assert len(ids) == count
    assert set(ids) == {f"e-{n}" for n in range(count)}
    return events


def unread_bytes(port: int) -> int:
    """Bytes that arrived on 127.0.0.1:``port``'s connections and no one has read yet (Linux)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        established = fields[3] == "01"
        if local_port == port and established:
            total += int(fields[4].split(":")[1], 16)
    return total


def events(ids: range, **extra: Any) -> list[dict[str, Any]]:
    return [track(f"e-{n}", **extra) for n in ids]


@pytest.mark.slow
def test_1000_events_reach_the_hub_once_across_a_hub_restart_mid_stream(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
):
    """Held while the hub is down, the second half still carries its own timestamps."""
    monkeypatch.setenv("HUB_WRITE_KEY", "wk_edge")
    hub, edge = start_pair(tmp_path, daemons)
    ingest(edge, events(range(500)))
    wait_for(hub, 1)
    hub.stop()  # mid-stream: the edge's requests fail and retry
    happened = datetime.now(UTC) - timedelta(seconds=30)
    stamps = {"timestamp": happened.isoformat(), "sentAt": datetime.now(UTC).isoformat()}
    ingest(edge, events(range(500, 1000), **stamps))
    time.sleep(2.0)  # held at the edge for a while (with the hub's restart, 2.5 s or more)
    hub.start()
    forwarded = assert_exactly_once(hub, 1000)
    later = [e for e in forwarded if int(e["messageId"][2:]) >= 500]
    for event in later:
        at_hub = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        # The request's own latency still counts (up to ~1 s on a loaded CI box); the held
        # time, if it leaked in, would be over twice that.
        assert abs(at_hub - happened) < timedelta(seconds=1), event
        assert event["properties"] == {"total": 12.5}
    assert hub.stop() == 0
    assert edge.stop() == 0


@pytest.mark.slow
def test_1000_events_reach_the_hub_once_across_a_kill_9_of_the_edge_mid_stream(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
):
    """The edge dies with requests sent but unanswered (the hub is stopped with SIGSTOP); the
    hub then stores them, and the restarted edge sends them again: the hub's dedupe by
    messageId absorbs the repeats."""
    monkeypatch.setenv("HUB_WRITE_KEY", "wk_edge")
    hub, edge = start_pair(tmp_path, daemons)
    ingest(edge, events(range(500)))
    wait_for(hub, 500)
    assert hub.process is not None
    hub.process.send_signal(signal.SIGSTOP)
    try:
        ingest(edge, events(range(500, 1000)))
        deadline = time.monotonic() + 5
        while unread_bytes(hub.port) == 0:  # the edge's next requests wait in the hub's socket
            assert time.monotonic() < deadline, "the edge sent nothing to the stopped hub"
            time.sleep(0.01)
        edge.stop(signal.SIGKILL)
    finally:
        hub.process.send_signal(signal.SIGCONT)
    edge.start()
    assert_exactly_once(hub, 1000)
    # The crash did cost repeats, and the hub took them as such.
    assert status(hub)["sources"]["edge"]["duplicate"] > 0
    assert hub.stop() == 0
    assert edge.stop() == 0
