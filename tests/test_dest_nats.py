"""The ``nats`` destination: the wire protocol core, then publishing into a real JetStream
(nats-server on loopback), exactly once across a server restart and a kill -9 of router."""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from router import nats_wire as wire
from router.destinations import nats as nats_destination
from router.destinations.base import BuildContext, Delivery
from router.destinations.nats import NatsDestination
from router.errors import ConfigError, RetryableDeliveryError
from router.journal import Inspector
from tests.nats_server import NatsServer, free_port
from tests.support import Daemon, SocketClient, track


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


# -- the pure protocol core ----------------------------------------------------------


def message(op: bytes, subject: bytes, rest: bytes, headers: bytes, payload: bytes) -> bytes:
    sizes = (
        b"%d %d" % (len(headers), len(headers) + len(payload)) if headers else b"%d" % len(payload)
    )
    return b"%s %s %s %s\r\n%s%s\r\n" % (op, subject, rest, sizes, headers, payload)


SERVER_BYTES = (
    b'INFO {"server_id":"x","max_payload":1048576,"jetstream":true}\r\n'
    b"PING\r\n"
    b"+OK\r\n"
    + message(b"MSG", b"_INBOX.a.1", b"1", b"", b'{"stream":"EVENTS","seq":7,"duplicate":true}')
    + message(
        b"HMSG",
        b"events.track",
        b"2 $JS.ACK.EVENTS.hub.1.42.9.1733300000000000000.0",
        b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n",
        b"{}",
    )
    + message(b"HMSG", b"_INBOX.a.pull.2", b"2", b"NATS/1.0 408 Request Timeout\r\n\r\n", b"")
    + b"-ERR 'Stale Connection'\r\n"
    b"PONG\r\n"
)


def test_parser_gives_the_same_events_however_the_input_is_cut() -> None:
    whole = wire.Parser().feed(SERVER_BYTES)
    parser = wire.Parser()
    one_by_one = [
        event for i in range(len(SERVER_BYTES)) for event in parser.feed(SERVER_BYTES[i : i + 1])
    ]
    assert one_by_one == whole
    kinds = [type(event).__name__ for event in whole]
    assert kinds == ["Info", "Ping", "Msg", "Msg", "Msg", "Err", "Pong"]
    ack, data, status = whole[2], whole[3], whole[4]
    assert isinstance(ack, wire.Msg)
    assert wire.pub_ack(ack.payload).duplicate
    assert isinstance(data, wire.Msg)
    assert data.header("nats-msg-id") == "m1"
    assert data.reply is not None
    assert wire.ack_stream_seq(data.reply) == 42
    assert isinstance(status, wire.Msg)
    assert (status.status, status.payload) == (408, b"")
    assert whole[5] == wire.Err("Stale Connection")


@given(st.lists(st.integers(min_value=0, max_value=len(SERVER_BYTES)), max_size=12))
def test_parser_is_indifferent_to_where_reads_end(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SERVER_BYTES)]
    parser = wire.Parser()
    events = [e for a, b in itertools.pairwise(bounds) for e in parser.feed(SERVER_BYTES[a:b])]
    assert events == wire.Parser().feed(SERVER_BYTES)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("nats://h", wire.Address("h", 4222)),
        ("nats://h:4223", wire.Address("h", 4223)),
        ("nats://u:p%40ss@h:1", wire.Address("h", 1, user="u", password="p@ss")),
        ("nats://tok3n@h:1", wire.Address("h", 1, token="tok3n")),
        ("nats://[::1]:1", wire.Address("::1", 1)),
    ],
)
def test_urls(url: str, address: wire.Address) -> None:
    assert wire.parse_url(url) == address
    assert wire.parse_urls(f"{url}, nats://other") == [address, wire.Address("other", 4222)]


@pytest.mark.parametrize(
    "data", [b"HTTP/1.1 400 Bad Request\r\n", b"MSG a 1 2\r\nabc\r\n", b"MSG a x 2\r\nab\r\n"]
)
def test_parser_refuses_what_is_not_nats(data: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.Parser().feed(data)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("track", "track"),
        ("Order Completed", "Order_Completed"),
        ("a.b", "a_b"),
        ("*", "_"),
        (">", "_"),
        ("", "_"),
        ("tab\there", "tab_here"),
        ("Ünïcode", "_n_code"),
    ],
)
def test_subject_tokens_are_made_safe(text: str, token: str) -> None:
    assert wire.safe_token(text) == token
    assert wire.render_subject("events.{event}", {"event": text}) == f"events.{token}"


@pytest.mark.parametrize("template", ["events.{nope}", "events..x", "events.*", "a.>", "", "a b"])
def test_bad_subject_templates_are_config_errors(tmp_path: Path, template: str) -> None:
    with pytest.raises(ConfigError, match="subject"):
        NatsDestination(context(tmp_path, "nats://127.0.0.1:4222", subject=template))


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:4222", "tls://u:hunter2@h:4222", "nats://u:hunter2@h:99999", "nats://a,x"],
)
def test_bad_url_is_a_config_error_that_does_not_show_it(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="url") as caught:
        NatsDestination(context(tmp_path, url))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("template", "subjects"),
    [
        ("events.{source}.{type}", ["events.>"]),
        ("events.{type}", ["events.>"]),
        ("a.b.x{type}", ["a.b.>"]),
        ("{source}.events", ["*.events"]),
        ("events", ["events"]),
    ],
)
def test_a_created_stream_covers_the_template(template: str, subjects: list[str]) -> None:
    assert wire.stream_subjects(template) == subjects


# -- against a real server, in process -----------------------------------------------


def context(tmp_path: Path, url: str, **options: object) -> BuildContext:
    return BuildContext(
        name="stream",
        type="nats",
        options={"url": url, **options},
        data_dir=tmp_path,
        timeout=5.0,
        batch_size=100,
    )


def deliveries(start: int, count: int, *, attempt: int = 1) -> list[Delivery]:
    return [
        Delivery(
            seq=i,
            source="web",
            message_id=f"m-{i}",
            received_at=0.0,
            body=json.dumps(track(f"m-{i}", event="Order Completed")).encode(),
            attempt=attempt,
        )
        for i in range(start, start + count)
    ]


def msg_ids(server: NatsServer, stream: str = "EVENTS") -> list[str]:
    return [headers["Nats-Msg-Id"] for _, headers, _ in server.messages(stream)]


async def test_publishes_each_event_once_and_a_resend_is_deduplicated(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    destination = NatsDestination(
        context(tmp_path, nats_server.url, subject="events.{type}.{event}", max_in_flight=64)
    )
    try:
        for start in range(0, 1000, 250):
            results = await destination.send(deliveries(start, 250))
            assert results is not None
            assert all(r.ok for r in results)
        # The whole lot again, as after a crash before the cursor moved: the stream's
        # duplicate window absorbs it, and each is reported delivered.
        results = await destination.send(deliveries(0, 1000))
        assert results is not None
        assert all(r.ok for r in results)
    finally:
        await destination.aclose()
    found = nats_server.messages("EVENTS")
    assert len(found) == 1000
    assert len({headers["Nats-Msg-Id"] for _, headers, _ in found}) == 1000
    assert {subject for subject, _, _ in found} == {"events.track.Order_Completed"}
    info = nats_server.stream_info("EVENTS")
    assert info["subjects"] == ["events.>"]  # created by the destination from its template


async def test_concurrent_batches_share_one_connection(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # Whoever waits reads: each batch's PubAcks may arrive while another batch holds the
    # socket, and must still reach their own batch.
    destination = NatsDestination(context(tmp_path, nats_server.url, max_in_flight=50))
    outcomes: list[bool] = []

    async def send(start: int) -> None:
        results = await destination.send(deliveries(start, 250))
        assert results is not None
        outcomes.extend(r.ok for r in results)

    try:
        async with trio.open_nursery() as nursery:
            for start in range(0, 1000, 250):
                nursery.start_soon(send, start)
    finally:
        await destination.aclose()
    assert outcomes == [True] * 1000
    assert sorted(msg_ids(nats_server)) == sorted(f"m-{i}" for i in range(1000))


async def test_an_existing_stream_is_used_and_a_missing_one_is_not_created_when_told(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    missing = NatsDestination(
        context(tmp_path, nats_server.url, stream="ORDERS", create_stream=False)
    )
    with pytest.raises(RetryableDeliveryError, match="stream 'ORDERS' not found"):
        await missing.send(deliveries(0, 3))
    nats_server.add_stream("ORDERS", ["events.>"])
    results = await missing.send(deliveries(0, 3))
    await missing.aclose()
    assert results is not None
    assert all(r.ok for r in results)
    assert nats_server.stream_info("ORDERS")["subjects"] == ["events.>"]  # not changed


async def test_a_subject_no_stream_takes_is_retried_per_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    nats_server.add_stream("OTHER", ["other.>"])
    destination = NatsDestination(context(tmp_path, nats_server.url, stream="OTHER"))
    results = await destination.send(deliveries(0, 5))
    await destination.aclose()
    assert results is not None
    assert [(r.ok, r.retryable, r.status) for r in results] == [(False, True, 503)] * 5
    assert "no stream takes this subject" in results[0].detail


async def test_server_restart_between_batches_loses_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    destination = NatsDestination(context(tmp_path, nats_server.url))
    pending = deliveries(0, 600)
    attempts = 0
    try:
        while pending:
            batch, pending = pending[:100], pending[100:]
            if attempts == 2:
                nats_server.restart()
            results = await destination.send(batch)
            attempts += 1
            assert results is not None
            failed = [d for d, r in zip(batch, results, strict=True) if not r.ok]
            assert all(r.retryable for r in results if not r.ok)
            pending = failed + pending  # what the dispatcher does: retry the unacked
            if failed:
                await trio.sleep(0.05)
    finally:
        await destination.aclose()
    assert sorted(msg_ids(nats_server)) == sorted(f"m-{i}" for i in range(600))


async def test_after_the_server_restarted_while_idle_the_next_batch_goes_at_once(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_destination, "IDLE_CHECK", 0.0)  # every batch finds "idle"
    destination = NatsDestination(context(tmp_path, nats_server.url))
    try:
        first = await destination.send(deliveries(0, 10))
        nats_server.restart()
        # The liveness check finds the old connection dead and opens a new one first: no
        # event of this batch fails, nothing waits for a retry.
        second = await destination.send(deliveries(10, 10))
    finally:
        await destination.aclose()
    assert first is not None
    assert second is not None
    assert all(r.ok for r in [*first, *second])
    assert len(msg_ids(nats_server)) == 20


async def test_credentials_in_the_url_are_used(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "auth", "--user", "edge", "--pass", "s3cret").start()
    server.oracle_url = f"nats://edge:s3cret@127.0.0.1:{server.port}"
    good = f"nats://edge:s3cret@127.0.0.1:{server.port}"
    bad = f"nats://edge:wrong@127.0.0.1:{server.port}"
    try:
        refused = NatsDestination(context(tmp_path, bad))
        with pytest.raises(RetryableDeliveryError, match="Authorization Violation"):
            await refused.send(deliveries(0, 1))
        await refused.aclose()
        accepted = NatsDestination(context(tmp_path, good))
        results = await accepted.send(deliveries(0, 3))
        await accepted.aclose()
        assert results is not None
        assert all(r.ok for r in results)
        assert len(msg_ids(server)) == 3
    finally:
        server.stop()


async def test_a_cluster_url_list_skips_a_server_that_is_down(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    destination = NatsDestination(context(tmp_path, f"{down}, {nats_server.url}"))
    results = await destination.send(deliveries(0, 3))
    await destination.aclose()
    assert results is not None
    assert all(r.ok for r in results)


async def test_server_down_is_a_retryable_failure(tmp_path: Path, nats_server: NatsServer) -> None:
    destination = NatsDestination(context(tmp_path, nats_server.url))
    nats_server.stop()
    with pytest.raises(RetryableDeliveryError, match="cannot connect"):
        await destination.send(deliveries(0, 1))
    await destination.aclose()


# -- end to end: the daemon, a server restart, a kill -9 ---------------------------------


def nats_config(server: NatsServer) -> str:
    return f"""
        [sources.local]
        socket = true

        [destinations.stream]
        type = "nats"
        url = "{server.url}"
        subject = "events.{{type}}"
        batch_size = 100
        batch_wait = "10ms"
        timeout = "3s"
        retry = {{ max_attempts = 1000, max_age = "1h", initial = "50ms", max_backoff = "300ms" }}

        [[routes]]
        to = ["stream"]
        """


def wait_for_count(server: NatsServer, count: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    found = -1
    while time.monotonic() < deadline:
        try:
            found = server.stream_info("EVENTS")["messages"]
        except Exception:  # the stream may not exist yet, or the server is restarting
            found = -1
        if found >= count:
            return found
        time.sleep(0.1)
    return found


def send_all(client: SocketClient, ids: list[str], per_line: int = 50) -> None:
    for start in range(0, len(ids), per_line):
        client.send({"batch": [track(i) for i in ids[start : start + per_line]]})
        ack = client.ack()
        assert ack["ok"], ack


def delivered(daemon: Daemon) -> int:
    inspector = Inspector(daemon.data_dir / "queue.db")
    try:
        return inspector.counters("stream").delivered
    finally:
        inspector.close()


@pytest.mark.slow
def test_daemon_delivers_1000_exactly_once_across_a_server_restart_and_a_kill_9(
    tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]
) -> None:
    (tmp_path / "router").mkdir()
    daemon = Daemon(tmp_path / "router", nats_config(nats_server))
    daemons.append(daemon)
    daemon.start()
    ids = [f"e2e-{i}" for i in range(1000)]
    client = SocketClient(daemon.socket_path)
    send_all(client, ids[:300])
    # The server goes away while router is delivering, and comes back on the same port.
    nats_server.stop()
    send_all(client, ids[300:600])  # ingest goes on: the queue holds them
    time.sleep(0.3)
    nats_server.start()
    assert wait_for_count(nats_server, 600) == 600
    # router killed -9 between publishing and hearing the PubAcks: the server is frozen
    # (SIGSTOP) while router writes the last 400 into the socket; router dies; the server
    # thaws and stores what was written. So the stream holds events router never recorded as
    # delivered, and router publishes them again after its restart.
    assert nats_server.process is not None
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        send_all(client, ids[600:])
        client.close()
        deadline = time.monotonic() + 10  # until router has published into the frozen server
        while time.monotonic() < deadline and nats_server.unread_bytes() < 10_000:
            time.sleep(0.02)
        time.sleep(0.2)  # the rest of its batch
        daemon.kill()
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    at_restart = wait_for_count(nats_server, 1000, timeout=3)
    print(f"the stream held {at_restart} of 1000 when router started again")
    assert at_restart > 600  # else nothing was published twice and the test proves less
    daemon.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and delivered(daemon) < 1000:
        time.sleep(0.1)
    assert delivered(daemon) == 1000  # router sent all 1000 again or before
    found = msg_ids(nats_server)
    assert len(found) == 1000  # JetStream's dedupe dropped the repeats
    assert sorted(found) == sorted(ids)
    assert daemon.stop() == 0
