"""The warehouse layout, pure: names, which tables an event makes rows in, column kinds, and
what happens to values that do not fit. No server here (tests/test_dest_postgres.py has one)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.warehouse import (
    DISCARDS_TABLE,
    MAX_IDENTIFIER_BYTES,
    Discard,
    coerce,
    event_table,
    flatten,
    identifier,
    plan_table,
    rows_for,
    schema_for,
    snake_case,
)

LOADED = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def rows(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    made = rows_for(event, message_id="m1", received_at=0.0, loaded_at=LOADED)
    assert made is not None
    return {row.table: row.values for row in made}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Order Completed", "order_completed"),
        ("orderId", "order_id"),
        ("userID", "user_id"),
        ("HTMLParser", "html_parser"),
        ("  spaced--out__name ", "spaced_out_name"),
        ("Ünïcode Név", "ünïcode_név"),
        ("already_snake", "already_snake"),
        ("v2Checkout", "v2_checkout"),
        ("$$$", ""),
    ],
)
def test_snake_case(name, expected):
    assert snake_case(name) == expected


def test_identifier_caps_at_63_bytes_and_keeps_long_names_apart():
    head = "a" * 70
    first, second = identifier(head + "_first"), identifier(head + "_second")
    assert len(first.encode()) == len(second.encode()) == MAX_IDENTIFIER_BYTES
    assert first != second
    assert identifier(head + "_first") == first  # the same on every run
    assert identifier("9lives") == "_9lives"
    assert identifier("") == "_"


@given(st.text(min_size=1, max_size=200))
def test_identifier_is_always_valid_utf8_within_the_limit(name):
    made = identifier(name)
    assert 0 < len(made.encode()) <= MAX_IDENTIFIER_BYTES
    assert identifier(name) == made


@given(st.dictionaries(st.text(max_size=80), st.integers() | st.text(), max_size=5))
def test_flattened_column_names_are_identifiers(properties):
    for column in flatten({"outer": properties, **properties}):
        assert 0 < len(column.encode()) <= MAX_IDENTIFIER_BYTES
        assert not column[0].isdigit()


def test_event_tables_never_take_the_layouts_own_names():
    assert event_table("Order Completed") == "order_completed"
    assert event_table("Tracks") == "_tracks"
    assert event_table("users") == "_users"
    assert event_table(DISCARDS_TABLE) == "_" + DISCARDS_TABLE
    assert event_table("!!!").startswith("_")  # named by a hash, not empty


def test_schema_is_the_source_snake_cased():
    assert schema_for("My Web App") == "my_web_app"


def test_track_makes_a_tracks_row_and_an_event_table_row_with_properties():
    made = rows(
        {
            "type": "track",
            "event": "Order Completed",
            "userId": 42,
            "messageId": "ignored: the journal's id wins",
            "receivedAt": "2026-12-04T12:00:00.000Z",
            "sentAt": None,
            "properties": {"orderId": "o-1", "total": 12.5, "product": {"skuCode": "S"}},
            "context": {"library": {"name": "analytics.js"}, "page": {"path": "/cart"}},
        }
    )
    assert set(made) == {"tracks", "order_completed"}
    tracks, order = made["tracks"], made["order_completed"]
    assert tracks["id"] == order["id"] == "m1"
    assert tracks["event"] == "order_completed"
    assert tracks["event_text"] == "Order Completed"
    assert tracks["context_library_name"] == "analytics.js"
    assert tracks["context_page_path"] == "/cart"
    assert "order_id" not in tracks  # properties live in the event's own table
    assert order["order_id"] == "o-1"
    assert order["total"] == 12.5
    assert order["product_sku_code"] == "S"
    assert order["user_id"] == 42
    assert order["uuid_ts"] == LOADED
    assert "sent_at" not in order  # null: no value, no column


def test_a_property_named_like_a_standard_column_is_renamed_not_lost():
    order = rows(
        {"type": "track", "event": "E", "userId": "u", "properties": {"id": "p-1", "event": "x"}}
    )["e"]
    assert order["id"] == "m1"
    assert order["properties_id"] == "p-1"
    assert order["properties_event"] == "x"


def test_identify_makes_identifies_and_users_rows_and_rudders_context_traits_count():
    made = rows(
        {
            "type": "identify",
            "userId": "u1",
            "traits": {"email": "a@example.com", "plan": "pro"},
            "context": {"traits": {"plan": "free", "firstName": "Ada"}},
        }
    )
    assert made["identifies"]["email"] == "a@example.com"
    assert made["identifies"]["plan"] == "pro"  # the event's own traits win
    assert made["identifies"]["first_name"] == "Ada"
    assert made["users"] == {
        "id": "u1",
        "uuid_ts": LOADED,
        "received_at": made["users"]["received_at"],
        "email": "a@example.com",
        "plan": "pro",
        "first_name": "Ada",
    }


def test_an_anonymous_identify_makes_no_users_row():
    assert set(rows({"type": "identify", "anonymousId": "a1", "traits": {"x": 1}})) == {
        "identifies"
    }


@pytest.mark.parametrize(
    ("event", "table", "expected"),
    [
        (
            {"type": "page", "name": "Home", "properties": {"path": "/", "title": "T"}},
            "pages",
            {"name": "Home", "path": "/", "title": "T"},
        ),
        ({"type": "screen", "name": "Cart"}, "screens", {"name": "Cart"}),
        (
            {"type": "group", "groupId": "g1", "traits": {"industry": "x"}},
            "groups",
            {"group_id": "g1", "industry": "x"},
        ),
        ({"type": "alias", "previousId": "old"}, "aliases", {"previous_id": "old"}),
    ],
)
def test_each_type_has_its_table(event, table, expected):
    made = rows({"userId": "u1", **event})
    assert set(made) == {table}
    assert expected.items() <= made[table].items()


def test_non_segment_events_make_no_rows():
    for event in ({"hello": "world"}, {"type": "purchase"}, ["not", "an", "object"]):
        assert rows_for(event, message_id="m", received_at=0.0, loaded_at=LOADED) is None


def test_received_at_falls_back_to_routers_clock():
    made = rows({"type": "alias", "userId": "u", "previousId": "p"})
    assert made["aliases"]["received_at"] == "1970-01-01T00:00:00+00:00"


def test_new_columns_get_kinds_from_their_values():
    plan = plan_table(
        "e",
        [
            {"id": "1", "n": 1, "f": 1.5, "b": True, "s": "x", "l": [1, 2], "mixed": 1},
            {"id": "2", "n": 2, "mixed": "two", "received_at": "2026-12-04T12:00:00Z"},
        ],
        {},
        upsert=False,
    )
    assert plan.add == {
        "id": "text",
        "n": "number",
        "f": "number",
        "b": "boolean",
        "s": "text",
        "l": "text",
        "mixed": "text",  # values disagree in one batch: the kind every value fits
        "received_at": "timestamp",  # a standard column: its kind is fixed
    }
    first, second = plan.rows
    assert first == ("1", 1.0, 1.5, True, "x", "[1,2]", "1", None)
    assert second[plan.columns.index("received_at")] == datetime(2026, 12, 4, 12, tzinfo=UTC)
    assert plan.discards == []


def test_a_value_that_does_not_fit_its_column_is_discarded_not_failed():
    known = {"id": "text", "total": "float8", "paid": "bool", "note": "text"}
    plan = plan_table(
        "orders", [{"id": "m1", "total": "n/a", "paid": "yes", "note": 3.5}], known, upsert=False
    )
    assert plan.add == {}
    assert plan.rows == [("m1", None, None, "3.5")]  # text takes anything
    assert plan.discards == [
        Discard("orders", "total", "m1", "n/a"),
        Discard("orders", "paid", "m1", "yes"),
    ]


def test_columns_router_did_not_create_get_text_for_postgres_to_cast():
    plan = plan_table("t", [{"id": "m1", "qty": 3}], {"id": "text", "qty": "int4"}, upsert=False)
    assert plan.kinds == ("text", "other")
    assert plan.types == ("text", "int4")
    assert plan.rows == [("m1", "3")]


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("number", 10**400, (False, None)),  # past float's range
        ("number", True, (False, None)),  # a bool is not a number here
        ("text", "a\x00b", (True, "a\ufffdb")),  # Postgres text cannot hold NUL
        ("text", {"a": [1]}, (True, '{"a":[1]}')),
        ("text", False, (True, "false")),
        ("timestamp", "yesterday", (False, None)),
        ("timestamp", "2026-12-04T12:00:00", (True, datetime(2026, 12, 4, 12, tzinfo=UTC))),
        ("boolean", 1, (False, None)),
    ],
)
def test_coerce(kind, value, expected):
    assert coerce(kind, value) == expected


def test_users_rows_merge_by_id_the_newer_winning():
    plan = plan_table(
        "users",
        [
            {"id": "u1", "received_at": "2026-12-04T12:00:02Z", "plan": "pro"},
            {"id": "u1", "received_at": "2026-12-04T12:00:01Z", "plan": "free", "age": 30},
            {"id": "u2", "received_at": "2026-12-04T12:00:00Z", "plan": "free"},
        ],
        {},
        upsert=True,
    )
    by_id = {row[0]: dict(zip(plan.columns, row, strict=True)) for row in plan.rows}
    assert by_id["u1"]["plan"] == "pro"
    assert by_id["u1"]["age"] == 30.0
    assert by_id["u2"]["age"] is None


def test_the_pure_module_imports_no_io_library():
    io = "{'psycopg', 'trio', 'apsw', 'httpx'}"
    code = f"import sys, router.warehouse; print(sorted({io} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


KEYS = st.sampled_from(["a", "b", "total", "received_at"]) | st.text(max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)


@given(
    st.sampled_from(["track", "identify", "page", "screen", "group", "alias"]),
    st.dictionaries(st.sampled_from(["properties", "traits", "context", "event", "name"]), JSON),
    st.dictionaries(KEYS, st.sampled_from(["text", "float8", "bool", "int4", "timestamptz"])),
)
def test_any_event_plans_into_valid_columns_and_values_of_their_kind(kind, fields, known):
    """Whatever JSON arrives and whatever columns exist, planning never raises, every column
    name is an identifier, and every value is of its column's kind (or NULL, discarded)."""
    made = rows_for(
        {"type": kind, "userId": "u", **fields}, message_id="m", received_at=0.0, loaded_at=LOADED
    )
    assert made is not None
    for row in made:
        plan = plan_table(row.table, [row.values], {"id": "text", **known}, upsert=False)
        for column, kind_of_column, value in zip(
            plan.columns, plan.kinds, plan.rows[0], strict=True
        ):
            assert 0 < len(column.encode()) <= MAX_IDENTIFIER_BYTES
            expected = {"text": str, "other": str, "number": float, "boolean": bool,
                        "timestamp": datetime}[kind_of_column]  # fmt: skip
            assert value is None or isinstance(value, expected)
            if value is None and row.values.get(column) is not None:
                assert any(d.column == column for d in plan.discards)


def test_a_name_collides_only_with_its_own_tables_standard_columns():
    identify = rows({"type": "identify", "userId": "u1", "traits": {"name": "Ada", "timestamp": 1}})
    assert identify["identifies"]["name"] == identify["users"]["name"] == "Ada"
    # Time columns are never data's: a trait there would make a timestamptz column of it.
    assert identify["users"]["traits_timestamp"] == 1
    for page in ({"type": "page", "name": "Home"}, {"type": "page"}):
        made = rows({**page, "userId": "u1", "properties": {"name": "from properties"}})
        assert made["pages"]["properties_name"] == "from properties"
