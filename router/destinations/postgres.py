"""``postgres``: events into a PostgreSQL warehouse in Segment's layout.

``router.warehouse`` decides the tables, columns, types and values; this module only talks to
the server. Each batch is one transaction (all of its rows or none). Per table, the rows go by
binary COPY into a session-local staging table, then ``INSERT ... SELECT ... ON CONFLICT (id)
DO NOTHING``: a batch delivered again after a crash or a timeout adds nothing, the messageId
is the primary key; ``users`` is upserted by userId. (Measured in bench/forward_postgres.py:
COPY beat ``executemany`` in pipeline mode and a one-statement ``unnest`` of arrays at 1000
events a batch in every run, by 1.1-3x, and was close to ``executemany`` at 100; reusing the
staging table instead of a temp table per batch was worth up to 2x at 100 events.)

New tables and columns are created before the transaction, each DDL statement on its own with
``IF NOT EXISTS``, so writers never hold DDL locks across a batch; what exists is cached, and
the cache is dropped on any error.

psycopg's async API needs asyncio, so the synchronous client runs on worker threads, one
connection per batch in flight. The connection is opened on the first send (``router check``
needs no server) and replaced when it breaks; ``statement_timeout`` bounds every statement,
since a worker thread cannot be cancelled and the dispatcher's timeout only stops waiting.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import trio
from psycopg import sql
from psycopg.pq import TransactionStatus

from router.destinations.base import AttemptResult, BuildContext, Delivery, permanent_failure
from router.errors import RetryableDeliveryError
from router.warehouse import (
    DISCARDS_TABLE,
    MAX_IDENTIFIER_BYTES,
    USERS_TABLE,
    Discard,
    Kind,
    TablePlan,
    kind_of_type,
    plan_table,
    rows_for,
    schema_for,
)

log = logging.getLogger(__name__)

# SQLSTATE classes that one event's own data causes (22: data exception, 23: integrity, 54:
# program limit such as 1600 columns): retrying cannot help, so that event dead-letters and
# the rest of its batch goes on. Everything else (connection, timeout, deadlock, a stale
# cache's undefined column) is retried whole.
_EVENT_FAULT_CLASSES = ("22", "23", "54")

_COLUMNS_QUERY = """
SELECT c.relname, a.attname, t.typname
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
"""
_SCHEMA_QUERY = "SELECT 1 FROM pg_namespace WHERE nspname = %s"


class PostgresOptions(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str
    schema: str | None = None  # default: the event's source name, snake_cased
    statement_timeout: str | None = None  # default: the destination's timeout


# One event's rows, in the schema they go to; ``index`` is its place in the batch.
_Item = tuple[int, str, list[Any]]

# Binary COPY types of the staging columns, by kind ("other" goes as text and is cast).
_COPY_TYPES: dict[Kind, str] = {
    "text": "text",
    "number": "float8",
    "boolean": "bool",
    "timestamp": "timestamptz",
    "other": "text",
}
# How long adding a column may wait for its table's lock before the batch is retried.
DDL_LOCK_TIMEOUT_MS = 1000
# Staging tables a session keeps (one per table and its columns); past this, DISCARD TEMP.
MAX_STAGING_TABLES = 64


@dataclass(eq=False)
class _Session:
    conn: psycopg.Connection[Any]
    staged: set[str] = field(default_factory=set)  # staging tables made in this session


class PostgresDestination:
    def __init__(self, context: BuildContext) -> None:
        options = context.options_as(PostgresOptions)
        try:
            params = psycopg.conninfo.conninfo_to_dict(options.dsn)
        except psycopg.ProgrammingError as exc:
            message = f"not a PostgreSQL connection string: {str(exc).strip()}"
            raise context.error("dsn", message) from exc
        if (
            options.schema is not None
            and not 0 < len(options.schema.encode()) <= MAX_IDENTIFIER_BYTES
        ):
            raise context.error("schema", f"must be 1 to {MAX_IDENTIFIER_BYTES} bytes")
        timeout = context.timeout
        if options.statement_timeout is not None:
            timeout = context.duration("statement_timeout", options.statement_timeout)
        # The DSN's own settings win over these defaults.
        defaults: dict[str, Any] = {
            "application_name": "router",
            "connect_timeout": max(2, round(timeout)),
        }
        self._connect_args: dict[str, Any] = {k: v for k, v in defaults.items() if k not in params}
        self._dsn = options.dsn
        self._schema = options.schema
        self._statement_timeout_ms = max(1, round(timeout * 1000))
        self._name = context.name
        self._idle: list[_Session] = []
        self._schemas = _SchemaCache()

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        session = self._idle.pop() if self._idle else None
        outcome = await trio.to_thread.run_sync(self._send_sync, session, list(batch))
        if outcome.session is not None:
            self._idle.append(outcome.session)
        elif self._idle:  # this one broke: the others, idle since before, likely did too
            stale, self._idle = self._idle, []
            with trio.CancelScope(shield=True):  # a timeout here must not leak them
                await trio.to_thread.run_sync(_close_all, stale)
        if outcome.error is not None:
            raise outcome.error
        return outcome.results

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await trio.to_thread.run_sync(_close_all, idle)

    # --- on a worker thread ------------------------------------------------------------------

    def _send_sync(self, session: _Session | None, batch: list[Delivery]) -> _Outcome:
        loaded_at = datetime.now(UTC)
        items: list[_Item] = []
        results: list[AttemptResult | None] = [None] * len(batch)
        for index, delivery in enumerate(batch):
            rows = rows_for(
                delivery.event(),
                message_id=delivery.message_id,
                received_at=delivery.received_at,
                loaded_at=loaded_at,
            )
            if rows is None:
                results[index] = permanent_failure("not a Segment event: no known 'type'")
            else:
                items.append((index, self._schema or schema_for(delivery.source), rows))
        reused = session is not None and not session.conn.closed
        while True:
            try:
                if session is None or session.conn.closed:
                    session = self._connect()
                self._write_isolating(session, items, results)
                break
            except (psycopg.Error, _SchemaChangeFailed) as exc:
                self._schemas.clear()
                broken = session is None or session.conn.broken
                if broken and session is not None:
                    session.conn.close()
                if broken and reused:
                    # An idle connection the server dropped (a restart, an idle timeout): one
                    # new connection at once, rather than a failed batch and a backoff. Sending
                    # the batch again is safe even if its commit landed: rows are idempotent.
                    log.info("reconnecting destination=%s error=%s", self._name, exc)
                    session, reused = None, False
                    for index, _, _ in items:
                        results[index] = None
                    continue
                what = "connection failed" if broken else "postgres"
                error = RetryableDeliveryError(f"{what}: {exc}")
                return _Outcome(None if broken else session, None, error)
            except BaseException:
                if session is not None:
                    session.conn.close()
                raise
        if all(result is None for result in results):
            return _Outcome(session, None)
        return _Outcome(session, [result or AttemptResult(ok=True) for result in results])

    def _connect(self) -> _Session:
        conn = psycopg.connect(self._dsn, autocommit=True, **self._connect_args)
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            [f"{self._statement_timeout_ms}ms"],
        )
        return _Session(conn)

    def _write_isolating(
        self, session: _Session, items: list[_Item], results: list[AttemptResult | None]
    ) -> None:
        """Write the batch; when one event's data fails it, write the events one by one so
        only that event fails. Other errors propagate (the whole batch retries)."""
        try:
            self._write(session, items)
        except psycopg.Error as exc:
            self._schemas.clear()
            session.staged.clear()  # the failed transaction took its CREATE TEMP TABLEs along
            if session.conn.broken or not _event_fault(exc):
                raise
            if len(items) == 1:
                results[items[0][0]] = permanent_failure(f"postgres: {exc}")
                return
            log.warning(
                "batch failed on one event's data, writing one by one destination=%s error=%s",
                self._name,
                exc,
            )
            for item in items:
                self._write_isolating(session, [item], results)

    def _write(self, session: _Session, items: list[_Item]) -> None:
        conn = session.conn
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for _, schema, rows in items:
            for row in rows:
                grouped[schema, row.table].append(row.values)
        plans: list[tuple[str, TablePlan, dict[str, str]]] = []
        try:
            # Sorted: every writer takes the tables in one order, so two never deadlock.
            for (schema, table), rows in sorted(grouped.items()):
                plans.append((schema, *self._plan(conn, schema, table, rows)))
            discards = [(schema, d) for schema, plan, _ in plans for d in plan.discards]
            for schema in sorted({schema for schema, _ in discards}):
                self._ensure_discards(conn, schema)
        except psycopg.Error as exc:
            # Not the events' fault even when the SQLSTATE says so: two writers creating one
            # table at once can collide in the catalog (23505); the retry finds it made.
            raise _SchemaChangeFailed(exc) from exc
        if len(session.staged) > MAX_STAGING_TABLES:
            conn.execute("DISCARD TEMP")
            session.staged.clear()
        conn.execute("BEGIN")
        try:
            inserts = [_copy_in(session, schema, plan, cols) for schema, plan, cols in plans]
            if discards:
                _insert_discards(conn, discards)
            # The INSERTs take no parameters, so they go with the COMMIT in one simple query:
            # one round trip instead of one per table (round trips dominate small batches).
            conn.execute(sql.SQL("; ").join([*inserts, sql.SQL("COMMIT")]))
        except BaseException:
            if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
            raise

    def _plan(
        self, conn: psycopg.Connection[Any], schema: str, table: str, rows: list[dict[str, Any]]
    ) -> tuple[TablePlan, dict[str, str]]:
        """The plan, and the table's columns (their type names) once the plan's exist."""
        upsert = table == USERS_TABLE
        known = self._schemas.columns(conn, schema, table)
        plan = plan_table(table, rows, known or {}, upsert=upsert)
        if known is not None and not plan.add:
            return plan, known
        _add_columns(conn, schema, plan, create=known is None)
        # Another writer may have made a column first, with another type: plan on what is.
        known = self._schemas.columns(conn, schema, table, refresh=True)
        plan = plan_table(table, rows, known or {}, upsert=upsert)
        if known is None or plan.add:  # dropped again at once, say: the retry will see
            raise psycopg.ProgrammingError(f"columns still missing in {table}: {list(plan.add)}")
        return plan, known

    def _ensure_discards(self, conn: psycopg.Connection[Any], schema: str) -> None:
        if self._schemas.columns(conn, schema, DISCARDS_TABLE) is not None:
            return
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (table_name text, column_name text, "
                "row_id text, value text, uuid_ts timestamptz DEFAULT now(), "
                "PRIMARY KEY (table_name, row_id, column_name))"
            ).format(sql.Identifier(schema), sql.Identifier(DISCARDS_TABLE))
        )
        self._schemas.columns(conn, schema, DISCARDS_TABLE, refresh=True)


class _SchemaChangeFailed(Exception):
    """Reading or changing the schema failed: the whole batch retries."""

    def __init__(self, cause: psycopg.Error) -> None:
        super().__init__(f"schema change: {cause}")


@dataclass(frozen=True, slots=True)
class _Outcome:
    session: _Session | None  # None: it broke (or never opened)
    results: list[AttemptResult] | None
    error: RetryableDeliveryError | None = None


class _SchemaCache:
    """Tables and column types per schema, as last read; shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._schemas: dict[str, dict[str, dict[str, str]]] = {}

    def columns(
        self, conn: psycopg.Connection[Any], schema: str, table: str, *, refresh: bool = False
    ) -> dict[str, str] | None:
        """The table's columns and their type names, or None when it does not exist."""
        with self._lock:
            tables = self._schemas.get(schema)
        if tables is None or refresh:
            tables = _read_schema(conn, schema)
            with self._lock:
                self._schemas[schema] = tables
        return tables.get(table)

    def clear(self) -> None:
        with self._lock:
            self._schemas.clear()


def _read_schema(conn: psycopg.Connection[Any], schema: str) -> dict[str, dict[str, str]]:
    """The schema's tables and columns; the schema is made when missing. (Only then: CREATE
    SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists.)"""
    tables: dict[str, dict[str, str]] = defaultdict(dict)
    for table, column, type_name in conn.execute(_COLUMNS_QUERY, [schema]):
        tables[table][column] = type_name
    if not tables and not conn.execute(_SCHEMA_QUERY, [schema]).fetchone():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    return dict(tables)


def _add_columns(
    conn: psycopg.Connection[Any], schema: str, plan: TablePlan, *, create: bool
) -> None:
    target = sql.Identifier(schema, plan.table)
    additions = [
        sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
            sql.Identifier(column), sql.SQL(plan.sql_type(column))
        )
        for column in plan.add
        if column != "id"
    ]
    with conn.transaction():
        # ALTER TABLE waits for every query on the table to end, and every query after it
        # waits for the ALTER: behind a long report, the warehouse would stall for as long.
        # Give up soon instead; the batch retries.
        conn.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT_MS}ms'")
        if create:
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY)").format(target)
            )
        if additions:
            conn.execute(sql.SQL("ALTER TABLE {} ").format(target) + sql.SQL(", ").join(additions))
    log.info("columns added schema=%s table=%s columns=%s", schema, plan.table, list(plan.add))


def _copy_in(
    session: _Session, schema: str, plan: TablePlan, table_columns: Mapping[str, str]
) -> sql.Composed:
    """COPY the rows into this session's staging table for the table; return the INSERT that
    moves them into the table. The staging table has every column the table has (so batches
    with different columns share it, and it changes only when the table does), lives as long
    as the session and empties at every commit."""
    conn = session.conn
    layout = sorted(
        (column, _COPY_TYPES[kind_of_type(udt)]) for column, udt in table_columns.items()
    )
    signature = repr((schema, plan.table, layout)).encode()
    name = "router_staging_" + hashlib.sha1(signature).hexdigest()[:16]
    staging = sql.Identifier(name)
    if name not in session.staged:
        columns = [
            sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(copy_type))
            for column, copy_type in layout
        ]
        conn.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                staging, sql.SQL(", ").join(columns)
            )
        )
        session.staged.add(name)
    names = sql.SQL(", ").join(sql.Identifier(column) for column in plan.columns)
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(staging, names)
    with conn.cursor().copy(copy_sql) as copy:
        copy.set_types([_COPY_TYPES[kind] for kind in plan.kinds])
        for row in plan.rows:
            copy.write_row(row)
    return _insert(schema, plan, staging)


def _insert(schema: str, plan: TablePlan, staging: sql.Identifier) -> sql.Composed:
    names = [sql.Identifier(column) for column in plan.columns]
    selected = [
        sql.SQL("{}::{}").format(name, sql.Identifier(type_name)) if kind == "other" else name
        for name, kind, type_name in zip(names, plan.kinds, plan.types, strict=True)
    ]
    body = sql.SQL("({}) SELECT {} FROM {} ").format(
        sql.SQL(", ").join(names), sql.SQL(", ").join(selected), staging
    )
    target = sql.Identifier(schema, plan.table)
    if plan.table != USERS_TABLE:
        return (
            sql.SQL("INSERT INTO {} ").format(target)
            + body
            + sql.SQL("ON CONFLICT (id) DO NOTHING")
        )
    # users: the newer identify wins per trait; an older one (a retry, a replay) only fills
    # traits still missing, so the order deliveries arrive in does not matter much.
    newer = sql.SQL("COALESCE(EXCLUDED.received_at >= t.received_at, true)")
    updates = [
        sql.SQL("{0} = CASE WHEN {1} THEN COALESCE(EXCLUDED.{0}, t.{0}) "
                "ELSE COALESCE(t.{0}, EXCLUDED.{0}) END").format(name, newer)
        for name in names[1:]
    ]  # fmt: skip
    return (
        sql.SQL("INSERT INTO {} AS t ").format(target)
        + body
        + sql.SQL("ON CONFLICT (id) DO UPDATE SET ")
        + sql.SQL(", ").join(updates)
    )


def _insert_discards(conn: psycopg.Connection[Any], discards: list[tuple[str, Discard]]) -> None:
    by_schema: dict[str, list[Discard]] = defaultdict(list)
    for schema, discard in discards:
        by_schema[schema].append(discard)
    for schema, found in sorted(by_schema.items()):
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_name, column_name, row_id, value) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) "
                "ON CONFLICT DO NOTHING"
            ).format(sql.Identifier(schema, DISCARDS_TABLE)),
            [[d.table for d in found], [d.column for d in found],
             [d.row_id for d in found], [d.value for d in found]],
        )  # fmt: skip


def _event_fault(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "")[:2] in _EVENT_FAULT_CLASSES


def _close_all(sessions: list[_Session]) -> None:
    for session in sessions:
        session.conn.close()
