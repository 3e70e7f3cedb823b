"""router.client and router.aclient against the real daemon: pipelined sends all acked and
stored, a kill -9 and restart in the middle that loses and duplicates nothing, refusals surfacing
with the daemon's code; and the pure ledger, fed acks by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from router.aclient import AsyncClient
from router.client import Client, ClientError, Ledger, build_event, encode_line, new_message_id
from router.journal import Inspector
from tests.support import Daemon

CONFIG = """
[sources.app]
socket = true
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path, CONFIG).start()
    yield daemon
    daemon.kill()  # what it stored was counted already; a clean stop waits shutdown_grace


def stored_ids(daemon: Daemon) -> list[str]:
    inspector = Inspector(daemon.data_dir / "queue.db")
    ids: list[str] = []
    seq = 0
    while batch := inspector.events_after(seq, 10_000):
        ids.extend(e.message_id for e in batch)
        seq = batch[-1].seq
    return ids


# -- the ledger, without I/O --------------------------------------------------------------


def test_ledger_matches_acks_in_order_and_rewinds_what_is_unanswered() -> None:
    ledger = Ledger()
    for name in "abc":
        ledger.add(name.encode() + b"\n", (name,))
    assert ledger.take_outbox() == b"a\nb\nc\n"
    ledger.answer(b'{"ok":true,"count":1}')
    ledger.answer(b'{"ok":false,"code":"invalid_event","message":"no"}')
    ledger.rewind()  # a new connection: only c goes out again
    assert ledger.take_outbox() == b"c\n"
    assert (ledger.acked, ledger.refused, ledger.pending_events, ledger.resent) == (1, 1, 1, 1)
    with pytest.raises(ClientError) as caught:
        ledger.raise_refusals()
    assert caught.value.code == "invalid_event"
    assert caught.value.refusals[0].message_ids == ("b",)
    ledger.raise_refusals()  # raised once, then cleared


def test_ledger_counts_a_partial_batch_refusal() -> None:
    ledger = Ledger()
    ledger.add(b"x\n", ("1", "2", "3"))
    ledger.answer(b'{"ok":true,"count":2,"rejected":1,"message":"bad"}')
    assert (ledger.acked, ledger.refused) == (2, 1)
    ledger.add(b"y\n", ("4", "5"))
    ledger.answer(b'{"ok":true,"count":1}')  # one blocked by a tracking plan
    assert (ledger.acked, ledger.refused) == (3, 2)
    assert [r.code for r in ledger.refusals] == ["invalid_event", "blocked"]


FULL = b'{"ok":false,"code":"queue_full","message":"full","retry_after":2}'


def test_ledger_holds_a_line_the_queue_had_no_room_for_and_sends_it_again() -> None:
    ledger = Ledger(retry_full_for=30)
    ledger.add(b"a\n", ("a",))
    ledger.take_outbox()
    ledger.answer(FULL, now=100)
    assert (ledger.waiting, ledger.pending_events, ledger.next_due()) == (True, 1, 102)
    ledger.release(101)
    assert ledger.take_outbox() == b""
    ledger.release(102)
    assert ledger.take_outbox() == b"a\n"
    ledger.answer(b'{"ok":true,"count":1}', now=102)
    assert (ledger.waiting, ledger.acked, ledger.refused) == (False, 1, 0)


def test_ledger_refuses_a_line_still_refused_after_retry_full_for() -> None:
    ledger = Ledger(retry_full_for=30)
    ledger.add(b"a\n", ("a",))
    ledger.answer(FULL, now=100)
    ledger.release(102)
    ledger.answer(FULL, now=130)
    assert (ledger.waiting, ledger.refused) == (False, 1)
    assert ledger.refusals[0].retry_after == 2


def test_built_events_are_segment_shaped() -> None:
    event = build_event("track", user_id="u1", event="Signed Up", properties={"plan": "pro"})
    assert (event["type"], event["userId"], len(event["messageId"])) == ("track", "u1", 36)
    assert event["timestamp"].endswith("Z")
    assert event["context"]["library"]["name"] == "router.client"
    assert json.loads(encode_line(event)) == event
    with pytest.raises(ValueError, match="user_id or an anonymous_id"):
        build_event("identify")


def test_the_sync_client_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import router.client; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "['router']"


def test_a_forked_child_mints_other_ids_than_its_parent() -> None:
    # Pre-forking servers import the client before forking; shared ids would be deduped away.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, new_message_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 100).decode() != new_message_id()


# -- against the daemon ---------------------------------------------------------------------


@pytest.mark.slow
def test_100k_pipelined_events_are_all_acked_and_stored(daemon: Daemon) -> None:
    n = 100_000
    with Client(daemon.socket_path) as client:
        for i in range(n):
            client.track("u1", "Signed Up", {"i": i})
        client.flush()
        stats = client.statistics()
    assert (stats.sent, stats.acked, stats.refused, stats.pending) == (n, n, 0, 0)
    assert Inspector(daemon.data_dir / "queue.db").event_count() == n


@pytest.mark.slow
def test_kill_and_restart_in_the_middle_loses_and_duplicates_nothing(daemon: Daemon) -> None:
    n = 20_000
    sent: list[str] = []
    with Client(daemon.socket_path, max_pending=2_000) as client:

        def produce() -> None:
            sent.extend(client.track(f"u{i % 7}", "Tick", {"i": i}) for i in range(n))

        producer = threading.Thread(target=produce)
        producer.start()
        while client.statistics().acked < 3_000:
            time.sleep(0.005)
        daemon.kill()
        daemon.start()
        producer.join()
        client.flush(timeout=60)
        stats = client.statistics()
    assert stats.reconnects >= 1
    assert stats.resent > 0  # lines in flight at the kill went out again
    assert (stats.acked, stats.refused) == (n, 0)
    ids = stored_ids(daemon)
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == set(sent)


@pytest.mark.slow
def test_a_refused_event_raises_with_the_daemons_code_and_the_rest_are_stored(
    daemon: Daemon,
) -> None:
    with Client(daemon.socket_path) as client:
        client.track("u1", "Fine")
        bad = client.send({"type": "track", "userId": "u1"})  # no event name
        client.identify("u1", {"plan": "pro"})
        with pytest.raises(ClientError) as caught:
            client.flush()
        assert caught.value.code == "invalid_event"
        assert "requires 'event'" in caught.value.message
        assert caught.value.refusals[0].message_ids == (bad,)
        client.flush()  # reported once
    assert Inspector(daemon.data_dir / "queue.db").event_count() == 2


@pytest.mark.slow
def test_batches_threads_and_every_call_type(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:

        def work(k: int) -> None:
            for i in range(500):
                client.page(f"u{k}", "Home", {"i": i})

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        client.identify("u1", {"plan": "pro"})
        client.screen(anonymous_id="a1", name="Settings")
        client.group("u1", "g1", {"name": "Acme"})
        client.alias("a1", "u1")
        client.send_batch([{"type": "track", "userId": "u1", "event": str(i)} for i in range(10)])
        for thread in threads:
            thread.join()
    assert Inspector(daemon.data_dir / "queue.db").event_count() == 2000 + 4 + 10


def test_no_daemon_is_an_error_at_once(tmp_path: Path) -> None:
    with pytest.raises(ClientError) as caught:
        Client(tmp_path / "nothing.sock")
    assert caught.value.code == "unavailable"


@pytest.mark.slow
def test_events_are_refused_as_unavailable_when_the_daemon_stays_away(daemon: Daemon) -> None:
    client = Client(daemon.socket_path, reconnect_timeout=0.5)
    daemon.kill()
    client.track("u1", "Lost")
    with pytest.raises(ClientError) as caught:
        client.flush(timeout=10)
    assert caught.value.code == "unavailable"
    client.close()


@pytest.mark.slow
def test_a_full_queue_is_retried_then_surfaces_as_queue_full(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, CONFIG, queue='max_bytes = "1KiB"').start()  # always full
    try:
        client = Client(daemon.socket_path, reconnect_timeout=1.0)
        client.track("u1", "No Room")
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.flush(timeout=20)
        assert caught.value.code == "queue_full"
        assert time.monotonic() - started >= 1.0  # held and sent again before giving up
        client.close()
    finally:
        daemon.kill()


@pytest.mark.slow
async def test_the_trio_client_survives_a_restart_and_raises_refusals(daemon: Daemon) -> None:
    n = 5_000
    async with AsyncClient(daemon.socket_path, max_pending=500) as client:
        for i in range(n // 2):
            await client.track("u1", "Async", {"i": i})
        await trio.to_thread.run_sync(daemon.kill)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, daemon.start)
            for i in range(n // 2, n):
                await client.track("u1", "Async", {"i": i})
            with trio.fail_after(60):
                await client.flush()
        await client.send({"type": "alias", "userId": "u1"})  # no previousId
        with pytest.raises(ClientError) as caught:
            await client.flush()
        assert caught.value.code == "invalid_event"
        stats = client.statistics()
    assert (stats.acked, stats.refused) == (n, 1)
    assert stats.reconnects >= 1
    ids = stored_ids(daemon)
    assert len(ids) == len(set(ids)) == n
