"""The ``nats`` source: JetStream messages into the journal, acked only after the commit, and
stored exactly once although NATS redelivers (a hub killed between its commit and its ack)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from router import nats_wire as wire
from router.config import parse_config
from router.ingress.nats import NatsSource, convert
from router.journal import Inspector, open_journal
from router.reload import plan_reload
from tests.nats_server import NatsServer
from tests.support import Daemon, Receiver, SocketClient, track


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


# -- pure: messages to events ---------------------------------------------------------


def msg(payload: dict[str, Any] | bytes, msg_id: str | None = None, seq: int = 7) -> wire.Msg:
    headers = wire.header_block((b"Nats-Msg-Id", msg_id.encode())) if msg_id else b""
    reply = f"$JS.ACK.EVENTS.hub.1.{seq}.{seq}.1733300000000000000.0".encode()
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return wire.Msg(b"events.track", 2, reply, headers, data)


def test_messages_become_events_with_stable_ids() -> None:
    own = track("own-id")
    no_id = {k: v for k, v in track("x").items() if k != "messageId"}
    converted = convert(
        [msg(own, "header-id"), msg(no_id, "header-id-2"), msg(no_id, None, seq=42)],
        stream="EVENTS",
        raw=False,
        plan=None,
        received_at=1_800_000_000.0,
    )
    assert [e.message_id for e in converted.events] == ["own-id", "header-id-2", "nats-EVENTS-42"]
    assert len(converted.accepted) == 3
    assert not converted.refused


def test_an_upstream_routers_times_are_kept() -> None:
    event = track("m1", receivedAt="2026-12-04T10:00:00.250Z", timestamp="2026-12-04T09:59:59.000Z")
    event["originalTimestamp"] = "2026-12-04T09:59:59.000Z"
    event["sentAt"] = "2026-12-04T09:59:59.000Z"
    converted = convert(
        [msg(event)], stream="EVENTS", raw=False, plan=None, received_at=1_900_000_000.0
    )
    stored = json.loads(converted.events[0].body)
    assert stored["receivedAt"] == "2026-12-04T10:00:00.250Z"
    assert stored["timestamp"] == "2026-12-04T10:00:00.250Z"  # corrected as the edge did


def test_bad_messages_are_refused_and_counted() -> None:
    converted = convert(
        [msg(b"{not json"), msg({"type": "track"}), msg(track("ok"))],
        stream="EVENTS",
        raw=False,
        plan=None,
        received_at=1_800_000_000.0,
    )
    assert [e.message_id for e in converted.events] == ["ok"]
    assert len(converted.refused) == 2
    assert dict(converted.tallies) == {"invalid_json": 1, "invalid_event": 1}


def test_config_errors_point_at_the_nats_table() -> None:
    text = '[sources.edges]\nnats = { url = "nats://127.0.0.1:4222", consumer = "a.b" }\n'
    with pytest.raises(Exception, match=r"sources\.edges\.nats\.consumer"):
        parse_config(text)


# -- against a real server and a real journal, in process --------------------------------


def source_config(server: NatsServer, **extra: str) -> Any:
    options = "".join(f', {k} = "{v}"' for k, v in extra.items())
    text = (
        f'[sources.edges]\nnats = {{ url = "{server.url}", consumer = "hub", '
        f'subject = "events.>", batch = 100{options} }}\n'
    )
    return parse_config(text).sources["edges"]


def publish(server: NatsServer, ids: list[str]) -> None:
    server.publish("events.track", [(i, json.dumps(track(i)).encode()) for i in ids])


class SimulatedCrash(Exception):
    pass


class CrashAfterFirstCommit:
    """The journal, but the first append "crashes" right after its commit: before the ack."""

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.crashed = False

    async def append(self, *args: Any) -> int:
        stored: int = await self.journal.append(*args)
        if not self.crashed:
            self.crashed = True
            raise SimulatedCrash
        return stored


async def test_committed_but_unacked_messages_are_redelivered_and_stored_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    nats_server.add_stream("EVENTS", ["events.>"])
    ids = [f"m-{i}" for i in range(300)]
    publish(nats_server, ids)
    source = source_config(nats_server, ack_wait="1s")
    async with open_journal(tmp_path / "queue.db") as journal:
        crashing = CrashAfterFirstCommit(journal)
        with pytest.raises(SimulatedCrash):
            await NatsSource(crashing, source).run()  # type: ignore[arg-type]
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(NatsSource(journal, source).run)
                while journal.head < 300 or not await _acked(nats_server):
                    await trio.sleep(0.1)
                await trio.sleep(1.5)  # past ack_wait: a missed ack would redeliver by now
                nursery.cancel_scope.cancel()
    inspector = Inspector(tmp_path / "queue.db")
    try:
        stored = [e.message_id for e in inspector.events_after(0, 1000)]
        tallies = inspector.tallies("source", "edges")
    finally:
        inspector.close()
    assert sorted(stored) == sorted(ids)
    # The first batch was committed, not acked, redelivered, and absorbed by the dedupe (on a
    # loaded machine a slow commit can outlast ack_wait, and more come back: absorbed too).
    assert tallies["accepted"] == 300
    assert tallies["duplicate"] >= 100
    assert nats_server.consumer_pending("EVENTS", "hub") == {"pending": 0, "ack_pending": 0}


async def _acked(server: NatsServer) -> bool:
    state = await trio.to_thread.run_sync(server.consumer_pending, "EVENTS", "hub")
    return state == {"pending": 0, "ack_pending": 0}


async def test_waits_for_the_stream_and_for_the_server(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    source = source_config(nats_server)
    async with open_journal(tmp_path / "queue.db") as journal:
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(NatsSource(journal, source).run)
                await trio.sleep(0.3)  # no stream yet: the source waits, it does not fail
                nats_server.add_stream("EVENTS", ["events.>"])
                publish(nats_server, ["a", "b"])
                while journal.head < 2:
                    await trio.sleep(0.05)
                nats_server.restart()
                publish(nats_server, ["c"])
                while journal.head < 3:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert journal.head == 3


# -- end to end: a hub daemon consuming, killed -9 mid-stream --------------------------------


@pytest.mark.slow
def test_hub_stores_each_event_once_across_a_kill_9(
    tmp_path: Path, nats_server: NatsServer, receiver: Receiver, daemons: list[Daemon]
) -> None:
    nats_server.add_stream("EVENTS", ["events.>"])
    ids = [f"e-{i}" for i in range(1000)]
    publish(nats_server, ids)
    (tmp_path / "hub").mkdir()
    hub = Daemon(
        tmp_path / "hub",
        f"""
        [sources.edges]
        nats = {{ url = "{nats_server.url}", consumer = "hub", batch = 50, ack_wait = "1s" }}

        [destinations.hook]
        type = "webhook"
        url = "{receiver.url}"
        batch_size = 100
        batch_wait = "10ms"

        [[routes]]
        to = ["hook"]
        """,
    )
    daemons.append(hub)
    hub.start()
    queue = hub.data_dir / "queue.db"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _stored(queue) < 100:
        time.sleep(0.01)
    hub.kill()
    at_kill = _stored(queue)
    print(f"the hub had stored {at_kill} of 1000 when it was killed")
    hub.start()
    delivered = receiver.wait_for(1000)
    # Messages the killed hub had taken but not acked come back after ack_wait, possibly after
    # all 1000 reached the webhook: let them be absorbed before stopping.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and nats_server.consumer_pending("EVENTS", "hub") != {
        "pending": 0,
        "ack_pending": 0,
    }:
        time.sleep(0.1)
    assert hub.stop() == 0
    assert at_kill > 0, "the hub consumed nothing before it was killed"
    inspector = Inspector(queue)
    try:
        stored = [e.message_id for e in inspector.events_after(0, 5000)]
    finally:
        inspector.close()
    assert sorted(stored) == sorted(ids)  # each event stored once
    assert set(delivered) == set(ids)  # and delivered (at least once, by the webhook's rules)
    assert nats_server.consumer_pending("EVENTS", "hub") == {"pending": 0, "ack_pending": 0}


def _stored(queue: Path) -> int:
    try:
        inspector = Inspector(queue)
    except Exception:
        return 0
    try:
        return inspector.event_count()
    finally:
        inspector.close()


@pytest.mark.slow
def test_edge_to_nats_to_hub(
    tmp_path: Path, nats_server: NatsServer, receiver: Receiver, daemons: list[Daemon]
) -> None:
    """The whole fan-in: an edge's nats destination, the stream it creates, a hub's source."""
    (tmp_path / "edge").mkdir()
    (tmp_path / "hub").mkdir()
    edge = Daemon(
        tmp_path / "edge",
        f"""
        [sources.local]
        socket = true
        [destinations.stream]
        type = "nats"
        url = "{nats_server.url}"
        subject = "events.{{source}}.{{type}}"
        batch_size = 100
        batch_wait = "10ms"
        [[routes]]
        to = ["stream"]
        """,
    )
    hub = Daemon(
        tmp_path / "hub",
        f"""
        [sources.edges]
        nats = {{ url = "{nats_server.url}", consumer = "hub", subject = "events.local.>" }}
        [destinations.hook]
        type = "webhook"
        url = "{receiver.url}"
        batch_size = 100
        batch_wait = "10ms"
        [[routes]]
        from = ["edges"]
        to = ["hook"]
        """,
    )
    daemons.extend([edge, hub])
    edge.start()
    hub.start()  # before the stream exists: it waits for the edge to create it
    ids = [f"fan-{i}" for i in range(500)]
    client = SocketClient(edge.socket_path)
    for start in range(0, 500, 50):
        client.send({"batch": [track(i) for i in ids[start : start + 50]]})
        assert client.ack()["ok"]
    client.close()
    delivered = receiver.wait_for(500)
    assert edge.stop() == 0
    assert hub.stop() == 0
    assert sorted(set(delivered)) == sorted(ids)
    at_edge = _bodies(edge.data_dir / "queue.db")
    at_hub = _bodies(hub.data_dir / "queue.db")
    assert sorted(at_hub) == sorted(ids)  # once each
    # The hub keeps the times the edge stamped.
    assert all(at_hub[i]["receivedAt"] == at_edge[i]["receivedAt"] for i in ids)
    assert all(at_hub[i]["timestamp"] == at_edge[i]["timestamp"] for i in ids)


def _bodies(queue: Path) -> dict[str, dict[str, Any]]:
    inspector = Inspector(queue)
    try:
        return {e.message_id: json.loads(e.body) for e in inspector.events_after(0, 5000)}
    finally:
        inspector.close()


def test_a_reload_says_a_changed_nats_source_needs_a_restart() -> None:
    def config(consumer: str) -> str:
        return (
            "[sources.edges]\n"
            'nats = { url = "nats://127.0.0.1:4222", stream = "EVENTS", '
            f'consumer = "{consumer}" }}\n'
        )

    same = plan_reload(parse_config(config("hub")), parse_config(config("hub")))
    assert same.needs_restart == ()
    changed = plan_reload(parse_config(config("hub")), parse_config(config("hub-2")))
    assert changed.needs_restart == ("sources.edges (a nats source)",)
