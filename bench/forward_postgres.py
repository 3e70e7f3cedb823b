"""Delivery into a PostgreSQL warehouse: how fast, and which way of writing is fastest.

    .venv/bin/python bench/forward_postgres.py [--events 20000]

Two parts, each against a throwaway server (tests/postgres_server.py) with fsync and
synchronous_commit on, pinned to CPU 1:
- *write strategies*: the same planned batches written three ways, on one connection: binary
  COPY into a staging table then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (what the
  destination does), ``INSERT ... SELECT FROM unnest(arrays)`` (one statement per table), and
  ``executemany`` of a one-row INSERT (psycopg sends it in pipeline mode); the transaction is
  timed, not the planning;
- *end to end*: a router daemon on CPU 0 ingests N track events on its Unix socket and
  delivers them with batch_size 100 and 1000, concurrency 1 and 4; the figure is events (and
  rows: each track event makes a ``tracks`` row and an ``order_completed`` row) in the
  warehouse per second, from the first event sent to the last row visible.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import EVENT, PYTHON, daemon, pin, run_measure  # noqa: E402
from router.destinations.base import BuildContext, Delivery  # noqa: E402
from router.destinations.postgres import PostgresDestination, _copy_in, _Session  # noqa: E402
from router.warehouse import TablePlan, rows_for  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402

Writer = Callable[[psycopg.Connection[Any], str, TablePlan], None]


ARRAY_TYPES = {"text": "text[]", "number": "float8[]", "boolean": "bool[]",
               "timestamp": "timestamptz[]", "other": "text[]"}  # fmt: skip


def write_copy(conn: psycopg.Connection[Any], schema: str, plan: TablePlan) -> None:
    """What the destination does: binary COPY into a session's staging table, then INSERT."""
    session = _sessions.setdefault(id(conn), _Session(conn))
    conn.execute(_copy_in(session, schema, plan, dict(zip(plan.columns, plan.types, strict=True))))


_sessions: dict[int, _Session] = {}


def write_unnest(conn: psycopg.Connection[Any], schema: str, plan: TablePlan) -> None:
    """One statement per table: each column as an array parameter, unnest makes the rows."""
    names = sql.SQL(", ").join(map(sql.Identifier, plan.columns))
    arrays = sql.SQL(", ").join(sql.SQL("%s::" + ARRAY_TYPES[kind]) for kind in plan.kinds)
    query = sql.SQL(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT (id) DO NOTHING"
    ).format(sql.Identifier(schema, plan.table), names, arrays)
    conn.execute(query, [list(column) for column in zip(*plan.rows, strict=True)])


def write_executemany(conn: psycopg.Connection[Any], schema: str, plan: TablePlan) -> None:
    """One INSERT per row; psycopg sends executemany in pipeline mode (one round trip)."""
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (id) DO NOTHING").format(
        sql.Identifier(schema, plan.table),
        sql.SQL(", ").join(map(sql.Identifier, plan.columns)),
        sql.SQL(", ").join(sql.Placeholder() for _ in plan.columns),
    )
    with conn.cursor() as cursor:
        cursor.executemany(query, plan.rows)


def deliveries(count: int, tag: str) -> list[Delivery]:
    now = time.time()
    return [
        Delivery(i, "bench", f"{tag}-{i}", now, json.dumps({
            **EVENT, "messageId": f"{tag}-{i}", "receivedAt": "2026-12-04T12:00:00.000Z",
            "timestamp": "2026-12-04T12:00:00.000Z", "anonymousId": f"anon-{i % 97}",
        }).encode(), 1)
        for i in range(count)
    ]  # fmt: skip


def strategy_rows(server: PostgresServer, batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    dsn = server.create_database("strategies")
    context = BuildContext("wh", "postgres", {"dsn": dsn}, Path("."), 30.0, 1000)
    destination = PostgresDestination(context)
    session = destination._connect()
    conn = session.conn
    # One send makes the tables, so each strategy times only its writes.
    destination._write_isolating(session, plan_items(deliveries(10, "warm")), [None] * 10)
    rows: list[dict[str, Any]] = []
    writers: dict[str, Writer] = {
        "COPY + INSERT SELECT": write_copy, "unnest INSERT": write_unnest,
        "executemany INSERT": write_executemany,
    }  # fmt: skip
    for size in batch_sizes:
        batches = max(3, 20_000 // size)
        for name, writer in writers.items():
            took = 0.0
            for number in range(batches):
                items = plan_items(deliveries(size, f"{name}-{size}-{number}"))
                plans = [
                    destination._plan(conn, "bench", table, values)[0]
                    for table, values in group(items).items()
                ]
                started = time.perf_counter()
                with conn.transaction():
                    for plan in plans:
                        writer(conn, "bench", plan)
                took += time.perf_counter() - started
            rows.append({
                "name": f"{name}, {size} events/txn",
                "value": round(batches * size / took), "unit": "events/s",
                "note": f"{2 * batches * size / took:,.0f} rows/s; the transaction alone",
            })  # fmt: skip
    conn.close()
    return rows


def plan_items(batch: list[Delivery]) -> list[tuple[int, str, list[Any]]]:
    loaded = datetime.now(UTC)
    items = []
    for index, d in enumerate(batch):
        made = rows_for(d.event(), message_id=d.message_id, received_at=0.0, loaded_at=loaded)
        items.append((index, "bench", made or []))
    return items


def group(items: list[tuple[int, str, list[Any]]]) -> dict[str, list[dict[str, Any]]]:
    tables: dict[str, list[dict[str, Any]]] = {}
    for _, _, made in items:
        for row in made:
            tables.setdefault(row.table, []).append(row.values)
    return tables


def end_to_end_rows(
    tmp: Path, server: PostgresServer, events: int, batch_sizes: tuple[int, ...]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size, concurrency in ((s, c) for s in batch_sizes for c in (1, 4)):
        dsn = server.create_database(f"e2e_{size}_{concurrency}")
        body = f"""
            [sources.bench]
            socket = true
            [destinations.warehouse]
            type = "postgres"
            dsn = "{dsn}"
            batch_size = {size}
            concurrency = {concurrency}
            batch_wait = "20ms"
            timeout = "30s"
            [[routes]]
            to = ["warehouse"]
            """
        with daemon(tmp, body) as (_, data), psycopg.connect(dsn, autocommit=True) as conn:
            started = time.perf_counter()
            subprocess.run(
                [PYTHON, str(HERE / "socket_load.py"), str(data / "router.sock"), str(events)],
                capture_output=True, check=True, preexec_fn=lambda: pin(1),
            )  # fmt: skip
            ingested = time.perf_counter() - started
            while count(conn, "bench.order_completed") < events:
                if time.perf_counter() - started > 600:
                    raise RuntimeError("the warehouse never got every event")
                time.sleep(0.05)
            took = time.perf_counter() - started
        rows.append({
            "name": f"postgres delivery, batches of {size}, concurrency {concurrency}",
            "value": round(events / took),
            "unit": "events/s",
            "note": f"{2 * events / took:,.0f} rows/s; {events} events, ingest took "
            f"{ingested:.2f}s; daemon on CPU 0, postgres and load on CPU 1",
        })  # fmt: skip
    return rows


def count(conn: psycopg.Connection[Any], table: str) -> int:
    try:
        found = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[arg-type]
    except psycopg.errors.UndefinedTable:
        return 0
    return int(found[0]) if found else 0


def measure(tmp: Path, events: int) -> list[dict[str, Any]]:
    server = PostgresServer(fsync=True, cpu=1).start()
    try:
        return strategy_rows(server, (100, 1000)) + end_to_end_rows(
            tmp, server, events, (100, 1000)
        )
    finally:
        server.close()


if __name__ == "__main__":
    run_measure(measure, __doc__ or "", 20_000)
