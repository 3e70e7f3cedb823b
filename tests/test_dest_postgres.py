"""The ``postgres`` destination against a real PostgreSQL server (tests/postgres_server.py):
the layout it writes, idempotent redelivery, columns that follow new properties, values that
do not fit, failures (server gone, a lock held past statement_timeout, one bad event), and,
through the real daemon, 1000 events landing exactly once across a PostgreSQL crash and a
kill -9 of router."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from router.destinations.base import BuildContext, Delivery
from router.destinations.postgres import PostgresDestination
from router.errors import ConfigError, RetryableDeliveryError
from tests.postgres_server import PostgresServer
from tests.support import Daemon, SocketClient

RECEIVED = "2026-12-04T12:00:00.000Z"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except RuntimeError as exc:  # no binaries: a failure to fix, never a silent pass
        pytest.fail(str(exc))
    server.start()
    yield server
    server.close()


@pytest.fixture
def dsn(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database per test, so tests never see each other's tables."""
    return postgres.create_database("t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest())


def destination(dsn: str, **options: Any) -> PostgresDestination:
    context = BuildContext(
        name="warehouse",
        type="postgres",
        options={"dsn": dsn, **options},
        data_dir=Path("."),
        timeout=10.0,
        batch_size=100,
    )
    return PostgresDestination(context)


def delivery(event: dict[str, Any], *, source: str = "web") -> Delivery:
    event = {"userId": "u1", "receivedAt": RECEIVED, "timestamp": RECEIVED, **event}
    return Delivery(0, source, event["messageId"], 0.0, json.dumps(event).encode(), 1)


def order(message_id: str, **properties: Any) -> Delivery:
    return delivery(
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": message_id,
            "properties": properties,
            "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        }
    )


def query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement.encode())
        return cursor.fetchall() if cursor.description else []


def columns(dsn: str, schema: str, table: str) -> dict[str, str]:
    found = query(
        dsn,
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = '{schema}' AND table_name = '{table}'",
    )
    return dict(found)  # type: ignore[arg-type]


async def send(dest: PostgresDestination, *batch: Delivery) -> Any:
    return await dest.send(list(batch))


# --- the destination on its own --------------------------------------------------------------


def test_config_errors_point_at_the_key_and_nothing_connects_at_build():
    with pytest.raises(ConfigError, match=r"destinations\.warehouse\.dsn: not a PostgreSQL"):
        destination("not a dsn")
    with pytest.raises(ConfigError, match="statement_timeout"):
        destination("postgresql://router@127.0.0.1/x", statement_timeout="soon")
    with pytest.raises(ConfigError, match="tablespace"):
        destination("postgresql://router@127.0.0.1/x", tablespace="fast")
    with pytest.raises(ConfigError, match="schema"):
        destination("postgresql://router@127.0.0.1/x", schema="s" * 64)
    # Nothing listens on port 1: building works (``router check`` needs no server) ...
    destination("postgresql://router@127.0.0.1:1/x")


async def test_an_unreachable_server_is_a_retryable_failure():
    dest = destination("postgresql://router@127.0.0.1:1/x")
    with pytest.raises(RetryableDeliveryError, match="connection failed"):
        await send(dest, order("m1"))
    await dest.aclose()


async def test_every_type_lands_in_segments_warehouse_layout(dsn):
    dest = destination(dsn)
    assert (
        await send(
            dest,
            order("t1", total=12.5, orderId="o-1", paid=True, product={"skuCode": "S-1"}),
            delivery({"type": "track", "event": "Product Viewed", "messageId": "t2"}),
            delivery({"type": "identify", "messageId": "i1", "traits": {"email": "a@x.io"}}),
            delivery({"type": "page", "messageId": "p1", "name": "Home",
                      "properties": {"path": "/"}}),
            delivery({"type": "screen", "messageId": "s1", "name": "Cart"}),
            delivery({"type": "group", "messageId": "g1", "groupId": "acme",
                      "traits": {"seats": 3}}),
            delivery({"type": "alias", "messageId": "a1", "previousId": "anon-1"}),
        )
        is None
    )  # fmt: skip
    await dest.aclose()
    tables = query(dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema='web'")
    assert {name for (name,) in tables} == {
        "tracks", "order_completed", "product_viewed", "identifies", "users", "pages",
        "screens", "groups", "aliases",
    }  # fmt: skip
    assert query(dsn, "SELECT id, event, event_text FROM web.tracks ORDER BY id") == [
        ("t1", "order_completed", "Order Completed"),
        ("t2", "product_viewed", "Product Viewed"),
    ]
    assert query(
        dsn, "SELECT total, order_id, paid, product_sku_code, context_library_name, user_id "
        "FROM web.order_completed"
    ) == [(12.5, "o-1", True, "S-1", "analytics-python", "u1")]  # fmt: skip
    typed = columns(dsn, "web", "order_completed")
    assert typed["total"] == "double precision"
    assert typed["paid"] == "boolean"
    assert typed["received_at"] == typed["timestamp"] == "timestamp with time zone"
    assert query(dsn, "SELECT id, email FROM web.users") == [("u1", "a@x.io")]
    assert query(dsn, "SELECT name, path FROM web.pages") == [("Home", "/")]
    assert query(dsn, "SELECT group_id, seats FROM web.groups") == [("acme", 3.0)]
    assert query(dsn, "SELECT previous_id FROM web.aliases") == [("anon-1",)]


async def test_a_batch_delivered_again_adds_nothing(dsn):
    dest = destination(dsn)
    batch = [order(f"m{i}", total=i) for i in range(50)]
    await dest.send(batch)
    await dest.send(batch)  # a redelivery after a crash or a timeout
    await dest.send([*batch[25:], *(order(f"n{i}") for i in range(5))])  # overlapping
    await dest.aclose()
    assert query(dsn, "SELECT count(*) FROM web.tracks") == [(55,)]
    assert query(dsn, "SELECT count(*) FROM web.order_completed") == [(55,)]


async def test_new_properties_become_columns_without_ddl(dsn):
    dest = destination(dsn)
    await send(dest, order("m1", total=1))
    assert "coupon" not in columns(dsn, "web", "order_completed")
    await send(dest, order("m2", total=2, coupon="WINTER", shipping={"method": "ups", "days": 2}))
    await dest.aclose()
    assert {"coupon", "shipping_method", "shipping_days"} <= set(
        columns(dsn, "web", "order_completed")
    )
    assert query(
        dsn,
        "SELECT id, coupon, shipping_method, shipping_days FROM web.order_completed ORDER BY id",
    ) == [("m1", None, None, None), ("m2", "WINTER", "ups", 2.0)]  # fmt: skip


async def test_a_value_that_does_not_fit_is_kept_in_router_discards(dsn):
    dest = destination(dsn)
    await send(dest, order("m1", total=1))
    assert await send(dest, order("m2", total="n/a")) is None  # delivered, not retried forever
    await dest.aclose()
    assert query(dsn, "SELECT id, total FROM web.order_completed ORDER BY id") == [
        ("m1", 1.0),
        ("m2", None),
    ]
    assert query(dsn, "SELECT table_name, column_name, row_id, value FROM web.router_discards") == [
        ("order_completed", "total", "m2", "n/a")
    ]


async def test_an_event_that_breaks_a_users_own_column_fails_alone(dsn):
    """A column the user made ``integer``: the value is cast by Postgres, and one event that
    does not cast dead-letters by itself while the rest of its batch lands."""
    query(
        dsn,
        "CREATE SCHEMA web; CREATE TABLE web.order_completed (id text PRIMARY KEY, qty integer)",
    )
    dest = destination(dsn)
    results = await send(dest, order("m1", qty=1), order("m2", qty="lots"), order("m3", qty=3))
    await dest.aclose()
    assert [(r.ok, r.retryable) for r in results] == [(True, True), (False, False), (True, True)]
    assert "invalid input syntax for type integer" in results[1].detail
    assert query(dsn, "SELECT id, qty FROM web.order_completed ORDER BY id") == [
        ("m1", 1),
        ("m3", 3),
    ]
    assert query(dsn, "SELECT id FROM web.tracks ORDER BY id") == [("m1",), ("m3",)]


async def test_users_keep_the_newest_traits_whatever_order_identifies_arrive_in(dsn):
    def identify(message_id: str, at: str, **traits: Any) -> Delivery:
        return delivery(
            {"type": "identify", "messageId": message_id, "receivedAt": at, "traits": traits}
        )

    older = identify("i1", "2026-12-04T12:00:01Z", plan="free", email="a@x.io")
    newer = identify("i2", "2026-12-04T12:00:02Z", plan="pro")
    dest = destination(dsn)
    await send(dest, newer)
    await send(dest, older)  # late: a retry or a replay
    await dest.aclose()
    assert query(dsn, "SELECT id, plan, email FROM web.users") == [("u1", "pro", "a@x.io")]
    assert query(dsn, "SELECT count(*) FROM web.identifies") == [(2,)]


async def test_the_schema_is_the_source_or_the_configured_one(dsn):
    dest = destination(dsn)
    await send(
        dest, delivery({"type": "alias", "messageId": "a1", "previousId": "p"}, source="Mobile App")
    )
    await dest.aclose()
    assert query(dsn, "SELECT id FROM mobile_app.aliases") == [("a1",)]
    dest = destination(dsn, schema="Warehouse")
    await send(dest, delivery({"type": "alias", "messageId": "a2", "previousId": "p"}))
    await dest.aclose()
    assert query(dsn, 'SELECT id FROM "Warehouse".aliases') == [("a2",)]


async def test_an_event_without_a_segment_type_dead_letters_alone(dsn):
    dest = destination(dsn)
    results = await send(dest, order("m1"), delivery({"messageId": "raw", "hello": "world"}))
    await dest.aclose()
    assert [(r.ok, r.retryable) for r in results] == [(True, True), (False, False)]
    assert query(dsn, "SELECT id FROM web.tracks") == [("m1",)]


async def test_the_server_down_is_retryable_and_a_restart_between_batches_costs_nothing(
    postgres, dsn
):
    dest = destination(dsn)
    await send(dest, order("m1"))
    postgres.crash()
    try:
        with pytest.raises(RetryableDeliveryError, match="connection failed"):
            await send(dest, order("m2"))
    finally:
        postgres.start()
    await send(dest, order("m2"))
    postgres.stop()
    postgres.start()
    # The idle connection is dead: it is replaced at once, and the batch does not fail.
    assert await send(dest, order("m3")) is None
    await dest.aclose()
    assert ids(dsn, "web.tracks") == ["m1", "m2", "m3"]


async def test_a_role_without_create_on_the_database_writes_into_a_granted_schema(postgres, dsn):
    database = dsn.rsplit("/", 1)[1]
    query(
        dsn,
        "DO $$ BEGIN CREATE ROLE loader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC;'
        "CREATE SCHEMA web; GRANT USAGE, CREATE ON SCHEMA web TO loader",
    )
    dest = destination(dsn.replace("router@", "loader@"))
    assert await send(dest, order("m1")) is None
    await dest.aclose()
    assert ids(dsn, "web.order_completed") == ["m1"]


async def test_statement_timeout_bounds_a_write_blocked_by_a_lock(dsn):
    dest = destination(dsn, statement_timeout="300ms")
    await send(dest, order("m1"))
    with psycopg.connect(dsn) as holder:  # a transaction holding the table, as a long DDL would
        holder.execute("LOCK TABLE web.tracks IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with trio.fail_after(5), pytest.raises(RetryableDeliveryError, match="statement timeout"):
            await send(dest, order("m2"))
        assert time.monotonic() - started < 3
    await send(dest, order("m2"))  # the same connection goes on once the lock is gone
    await dest.aclose()
    assert query(dsn, "SELECT count(*) FROM web.tracks") == [(2,)]


async def test_adding_a_column_gives_up_soon_behind_a_long_query(dsn):
    """A report holding the table: the ALTER TABLE waits about a second, not the statement
    timeout (every query after it would queue behind it), and the batch retries later."""
    dest = destination(dsn)
    await send(dest, order("m1", total=1))
    with psycopg.connect(dsn) as reader:  # a transaction left open after its SELECT
        reader.execute("SELECT * FROM web.order_completed").fetchall()
        started = time.monotonic()
        with pytest.raises(RetryableDeliveryError, match="lock timeout"):
            await send(dest, order("m2", coupon="X"))
        assert time.monotonic() - started < 5
        assert await send(dest, order("m3", total=3)) is None  # no new column: no wait
    assert await send(dest, order("m2", coupon="X")) is None
    await dest.aclose()
    assert query(dsn, "SELECT id, coupon FROM web.order_completed ORDER BY id") == [
        ("m1", None),
        ("m2", "X"),
        ("m3", None),
    ]


async def test_concurrent_batches_creating_the_same_tables_never_dead_letter(dsn):
    """Two writers creating one table at once can collide in the catalog: that is retried,
    never blamed on the events."""
    dest = destination(dsn)
    failures: list[str] = []

    async def one(n: int) -> None:
        batch = [order(f"c{n}-{i}", **{f"p{n}": i}) for i in range(20)]
        for _ in range(20):
            try:
                results = await dest.send(batch)
            except RetryableDeliveryError as exc:
                failures.append(str(exc))
                continue
            assert results is None
            return
        raise AssertionError(f"never delivered: {failures}")

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(one, n)
    await dest.aclose()
    assert query(dsn, "SELECT count(*) FROM web.order_completed") == [(80,)]
    assert {"p0", "p1", "p2", "p3"} <= set(columns(dsn, "web", "order_completed"))


# --- through the daemon ----------------------------------------------------------------------

FAST_RETRY = (
    'retry = { max_attempts = 1000, max_age = "1h", initial = "20ms", max_backoff = "300ms" }'
)


def daemon_config(dsn: str) -> str:
    return f"""
        [sources.local]
        socket = true

        [destinations.warehouse]
        type = "postgres"
        dsn = "{dsn}"
        batch_size = 50
        batch_wait = "10ms"
        concurrency = 2
        timeout = "5s"
        {FAST_RETRY}

        [[routes]]
        to = ["warehouse"]
        """


def numbered(i: int) -> dict[str, Any]:
    """Event ``i`` of the stream: every tenth an identify, the rest two kinds of track."""
    if i % 10 == 0:
        return {"type": "identify", "userId": f"u{i % 37}", "messageId": f"e{i}",
                "traits": {"seen": i, "plan": f"p{i}"}}  # fmt: skip
    name = "Order Completed" if i % 2 else "Product Viewed"
    return {"type": "track", "event": name, "userId": f"u{i % 37}", "messageId": f"e{i}",
            "properties": {"n": i, "sku": f"sku-{i % 13}"}}  # fmt: skip


def send_lines(daemon: Daemon, events: list[dict[str, Any]], per_line: int = 25) -> None:
    client = SocketClient(daemon.socket_path)
    try:
        for start in range(0, len(events), per_line):
            client.send({"batch": events[start : start + per_line]})
            answer = client.ack()
            assert answer["ok"], answer
    finally:
        client.close()


def wait_for_rows(dsn: str, table: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    found = -1
    while time.monotonic() < deadline:
        try:
            found = query(dsn, f"SELECT count(*) FROM {table}")[0][0]
        except psycopg.errors.UndefinedTable:
            found = 0
        if found >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{table}: {found} rows after {timeout}s, expected {count}")


def retried(daemon: Daemon) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r'router_destination_retried_total\{destination="warehouse"\} (\d+)', text)
    return int(found.group(1)) if found else 0


def ids(dsn: str, table: str) -> list[str]:
    return [message_id for (message_id,) in query(dsn, f"SELECT id FROM {table} ORDER BY id")]


@pytest.mark.slow
def test_1000_events_land_exactly_once_across_a_postgres_crash_and_a_kill_9(
    tmp_path, daemons, postgres, dsn
):
    events = [numbered(i) for i in range(1000)]
    daemon = Daemon(tmp_path, daemon_config(dsn))
    daemons.append(daemon)
    daemon.start()
    send_lines(daemon, events[:300])
    postgres.crash()  # mid-stream: batches in flight fail, the rest queue up in router
    send_lines(daemon, events[300:500])
    postgres.start()
    send_lines(daemon, events[500:800])
    assert retried(daemon) > 0, "the crash never failed a batch: the test proves nothing"
    daemon.kill()  # kill -9 while the dispatcher still delivers what just arrived
    daemon.start()
    send_lines(daemon, events[800:])

    tracks = sorted(e["messageId"] for e in events if e["type"] == "track")
    identifies = sorted(e["messageId"] for e in events if e["type"] == "identify")
    wait_for_rows(dsn, "local.tracks", len(tracks))
    wait_for_rows(dsn, "local.identifies", len(identifies))
    assert daemon.stop() == 0
    assert ids(dsn, "local.tracks") == tracks  # every one, and nothing else
    assert ids(dsn, "local.identifies") == identifies
    for table, name in (
        ("order_completed", "Order Completed"),
        ("product_viewed", "Product Viewed"),
    ):
        expected = sorted(e["messageId"] for e in events if e.get("event") == name)
        assert ids(dsn, f"local.{table}") == expected
    last_seen: dict[str, int] = {}
    for e in events:
        if e["type"] == "identify":
            last_seen[e["userId"]] = e["traits"]["seen"]
    assert dict(query(dsn, "SELECT id, seen::int FROM local.users")) == last_seen  # type: ignore[arg-type]


@pytest.mark.slow
def test_new_properties_through_the_daemon_appear_as_columns(tmp_path, daemons, dsn, monkeypatch):
    monkeypatch.setenv("WAREHOUSE_DSN", dsn)  # the DSN as a secret, the way users write it
    daemon = Daemon(tmp_path, daemon_config("env:WAREHOUSE_DSN"))
    daemons.append(daemon)
    daemon.start()
    send_lines(daemon, [numbered(i) for i in range(1, 10)])
    wait_for_rows(dsn, "local.tracks", 9)
    properties = {"coupon": "WINTER", "giftWrap": True, "shipping": {"method": "ups"}}
    later = {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "late",
             "properties": properties}  # fmt: skip
    send_lines(daemon, [later])
    wait_for_rows(dsn, "local.tracks", 10)
    assert daemon.stop() == 0
    assert query(
        dsn,
        "SELECT coupon, gift_wrap, shipping_method FROM local.order_completed WHERE id = 'late'",
    ) == [("WINTER", True, "ups")]  # fmt: skip
    assert query(dsn, "SELECT count(coupon) FROM local.order_completed") == [(1,)]
