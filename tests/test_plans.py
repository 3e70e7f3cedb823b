"""Tracking plans: every policy combination, violation paths, bad plan files, and a property test
that ``apply`` never raises and never changes the event it is given."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import RouterError
from router.plans import PlanError, TrackingPlan, Violation, load_plan, parse_plan

ORDER_COMPLETED: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "currency"],
    "properties": {
        "order_id": {"type": "string", "pattern": "^ord_[0-9a-z]{6,}$"},
        "total": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "enum": ["USD", "EUR"]},
        "shipping": {
            "type": "object",
            "required": ["method"],
            "properties": {"method": {"enum": ["ground", "air"]}, "cost": {"type": "number"}},
        },
        "products": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku", "price"],
                "properties": {"sku": {"type": "string"}, "price": {"type": "number"}},
            },
        },
        "product 1": {"type": "string"},
    },
}
IDENTIFY: dict[str, Any] = {
    "type": "object",
    "properties": {"email": {"type": "string", "format": "email"}, "plan": {"enum": ["free"]}},
}
GROUP: dict[str, Any] = {"type": "object", "required": ["name"], "properties": {"name": {}}}

MODES = list(itertools.product(("allow", "block"), ("keep", "omit"), ("block", "omit", "report")))


def write_plan(tmp_path: Path, data: Any, name: str = "web.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def make_plan(
    tmp_path: Path,
    unplanned_events: str = "allow",
    unplanned_properties: str = "keep",
    violations: str = "report",
) -> TrackingPlan:
    data = {
        "unplanned_events": unplanned_events,
        "unplanned_properties": unplanned_properties,
        "violations": violations,
        "track": {"Order Completed": ORDER_COMPLETED},
        "identify": IDENTIFY,
        "group": GROUP,
    }
    return load_plan(write_plan(tmp_path, data))


def track(properties: Any = None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": "m-1",
        "timestamp": "2024-01-01T00:00:00.000Z",
    }
    if properties is not None:
        event["properties"] = properties
    event.update(fields)
    return event


def paths(violations: tuple[Violation, ...], kind: str | None = None) -> list[str]:
    return [v.path for v in violations if kind is None or v.kind == kind]


# One planned event with a valid property, an unplanned one and a schema violation, and what each
# (unplanned_properties, violations) pair stores of its properties: None means blocked.
MIXED = {"order_id": "ord_abc123", "currency": "USD", "total": -1, "extra": 1}
STORED: dict[tuple[str, str], dict[str, Any] | None] = {
    ("keep", "block"): None,
    ("keep", "omit"): {"order_id": "ord_abc123", "currency": "USD", "extra": 1},
    ("keep", "report"): MIXED,
    ("omit", "block"): None,
    ("omit", "omit"): {"order_id": "ord_abc123", "currency": "USD"},
    ("omit", "report"): {"order_id": "ord_abc123", "currency": "USD", "total": -1},
}


@pytest.mark.parametrize(("events", "properties", "violations"), MODES)
def test_every_mode_combination(
    tmp_path: Path, events: str, properties: str, violations: str
) -> None:
    plan = make_plan(tmp_path, events, properties, violations)

    unplanned = plan.apply(track({"a": 1}, event="Order Refunded"))
    assert (unplanned.event is None) == (events == "block")
    assert unplanned.violations == (
        Violation("event", "event 'Order Refunded' is not in the tracking plan", "unplanned_event"),
    )
    assert unplanned.generated == ()

    outcome = plan.apply(track(MIXED))
    expected = STORED[properties, violations]
    if expected is None:
        assert outcome.event is None
    else:
        assert outcome.event == track(expected)
    # Listed whatever the policies: the caller counts them.
    assert [(v.path, v.kind) for v in outcome.violations] == [
        ("properties.extra", "unplanned_property"),
        ("properties.total", "schema"),
    ]
    assert len(outcome.generated) == (violations == "report")


@pytest.mark.parametrize(
    ("event", "planned"),
    [
        (track({}, event="Order Completed"), True),
        (track({}, event="order completed"), False),  # names match exactly, as in Segment
        (track({}, event=""), False),
        (track({}, event=["Order Completed"]), False),
        ({"type": "track", "properties": {}}, False),
    ],
)
def test_unplanned_events_allowed_or_blocked(
    tmp_path: Path, event: dict[str, Any], planned: bool
) -> None:
    allow = make_plan(tmp_path, unplanned_events="allow")
    block = make_plan(tmp_path, unplanned_events="block")
    assert allow.apply(event).event == event
    if planned:
        assert block.apply(event).event == event
        assert paths(block.apply(event).violations, "unplanned_event") == []
    else:
        assert block.apply(event).event is None
        assert paths(block.apply(event).violations) == ["event"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "page", "name": "Home", "properties": {"anything": 1}},
        {"type": "screen", "name": "Home"},
        {"type": "alias", "userId": "u1", "previousId": "a1"},
        {"type": "nonsense"},
        {"event": "Order Completed"},
    ],
)
def test_unplanned_types_pass_untouched(tmp_path: Path, event: dict[str, Any]) -> None:
    plan = make_plan(tmp_path, "block", "omit", "block")
    outcome = plan.apply(event)
    assert outcome.event is event
    assert outcome.violations == ()
    assert outcome.generated == ()


def test_identify_and_group_without_a_schema_pass(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, {"violations": "block", "track": {}}))
    for event in ({"type": "identify", "traits": {"x": 1}}, {"type": "group", "traits": 5}):
        assert plan.apply(event).event == event
        assert plan.apply(event).violations == ()


def test_identify_and_group_check_traits(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, unplanned_properties="omit", violations="omit")
    identify = {"type": "identify", "userId": "u1", "traits": {"email": "nope", "plan": "free"}}
    outcome = plan.apply(identify)
    assert outcome.event == {"type": "identify", "userId": "u1", "traits": {"plan": "free"}}
    assert [(v.path, v.keyword) for v in outcome.violations] == [("traits.email", "format")]

    group = {"type": "group", "groupId": "g1", "traits": {"employees": 5}}
    outcome = plan.apply(group)
    assert outcome.event == {"type": "group", "groupId": "g1", "traits": {}}
    assert [(v.path, v.kind) for v in outcome.violations] == [
        ("traits.employees", "unplanned_property"),
        ("traits.name", "schema"),
    ]


def test_omitting_unplanned_properties_is_by_top_level_name(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, unplanned_properties="omit")
    event = track(
        {"order_id": "ord_abc123", "currency": "EUR", "shipping": {"method": "air", "x": 1}}
    )
    outcome = plan.apply(event)
    # Nested keys are the nested schema's business; only undeclared top-level names go.
    assert outcome.event == event
    assert outcome.violations == ()


def test_nested_violation_paths(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="block")
    outcome = plan.apply(
        track(
            {
                "order_id": "X1",
                "shipping": {"method": "boat", "cost": "free"},
                "products": [{"sku": "a", "price": 1}, {"sku": 5}],
                "product 1": 7,
            }
        )
    )
    assert outcome.event is None
    assert sorted((v.path, v.keyword) for v in outcome.violations) == [
        ("properties.currency", "required"),
        ("properties.order_id", "pattern"),
        ("properties.product\\ 1", "type"),
        ("properties.products.1.price", "required"),
        ("properties.products.1.sku", "type"),
        ("properties.shipping.cost", "type"),
        ("properties.shipping.method", "enum"),
    ]
    messages = {v.path: v.message for v in outcome.violations}
    assert messages["properties.order_id"] == '"X1" does not match "^ord_[0-9a-z]{6,}$"'
    assert messages["properties.currency"] == '"currency" is a required property'


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("plain_key-1", "properties.plain_key-1"),
        ("a.b", "properties.a\\.b"),
        ("two words", "properties.two\\ words"),
        ("back\\slash", "properties.back\\\\slash"),
        ("prénom", "properties.pr\\énom"),
    ],
)
def test_paths_escape_keys_as_fql_does(tmp_path: Path, key: str, path: str) -> None:
    plan = make_plan(tmp_path)
    outcome = plan.apply(track({"order_id": "ord_abc123", "currency": "USD", key: 1}))
    assert paths(outcome.violations) == [path]


def test_omit_drops_each_violating_top_level_property_and_keeps_the_event(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="omit")
    event = track(
        {
            "order_id": "ord_abc123",
            "total": 3,
            "shipping": {"method": "boat", "cost": 1},
            "products": [{"sku": "a", "price": 1}, {"sku": "b"}],
        }
    )
    original = copy.deepcopy(event)
    outcome = plan.apply(event)
    assert event == original
    # The missing required "currency" cannot be omitted; the event is kept without it.
    assert outcome.event == track({"order_id": "ord_abc123", "total": 3})
    assert paths(outcome.violations) == [
        "properties.currency",
        "properties.shipping.method",
        "properties.products.1.price",
    ]


def test_additional_properties_name_each_refused_key(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a": {}}, "additionalProperties": False}
    plan = load_plan(write_plan(tmp_path, {"violations": "omit", "track": {"E": schema}}))
    outcome = plan.apply(track({"a": 1, "b": 2, "c": 3}, event="E"))
    assert outcome.event == track({"a": 1}, event="E")
    schema_paths = paths(outcome.violations, "schema")
    assert schema_paths == ["properties.b", "properties.c"]
    assert {v.keyword for v in outcome.violations if v.kind == "schema"} == {"additionalProperties"}


def test_report_keeps_the_event_and_generates_one_event_per_violation(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="report")
    event = track(
        {"order_id": "ord_abc123", "currency": "USD", "total": -5, "shipping": {}},
        anonymousId="a1",
        sentAt="2024-01-01T00:00:01.000Z",
        context={"ip": "203.0.113.7"},
    )
    outcome = plan.apply(event)
    assert outcome.event == event
    assert [g["properties"]["violationField"] for g in outcome.generated] == [
        "properties.total",
        "properties.shipping.method",
    ]
    first = outcome.generated[0]
    assert first == {
        "type": "track",
        "event": "Violation Generated",
        "userId": "u1",
        "anonymousId": "a1",
        "properties": {
            "eventName": "Order Completed",
            "eventType": "track",
            "eventMessageID": "m-1",
            "eventTimestamp": "2024-01-01T00:00:00.000Z",
            "eventSentAt": "2024-01-01T00:00:01.000Z",
            "trackingPlanName": str(tmp_path / "web.json"),
            "violationType": "Minimum",
            "violationField": "properties.total",
            "violationDescription": "-5 is less than the minimum of 0",
        },
        "context": {"protocols": {"generated": True}},
    }
    assert "messageId" not in first  # the ingest path mints one
    assert outcome.generated[1]["properties"]["violationType"] == "Required"


def test_report_for_identify_names_the_call(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="report")
    outcome = plan.apply({"type": "identify", "anonymousId": "a1", "traits": {"plan": "pro"}})
    (generated,) = outcome.generated
    assert "userId" not in generated
    assert generated["anonymousId"] == "a1"
    assert generated["properties"]["eventName"] == "identify"
    assert generated["properties"]["violationField"] == "traits.plan"
    assert generated["properties"]["eventMessageID"] is None


@pytest.mark.parametrize("properties", [None, "absent"])
def test_missing_properties_are_validated_as_empty(tmp_path: Path, properties: Any) -> None:
    plan = make_plan(tmp_path, violations="omit")
    event = track()
    if properties is None:
        event["properties"] = None
    outcome = plan.apply(event)
    assert outcome.event == event  # no properties object is invented
    assert paths(outcome.violations) == ["properties.order_id", "properties.currency"]


def test_properties_that_are_not_an_object_violate_the_schema(tmp_path: Path) -> None:
    for mode, kept in (("block", False), ("omit", True)):
        plan = make_plan(tmp_path, unplanned_properties="omit", violations=mode)
        event = track(["not", "an", "object"])
        outcome = plan.apply(event)
        assert (outcome.event == event) if kept else (outcome.event is None)
        assert [(v.path, v.keyword) for v in outcome.violations] == [("properties", "type")]


def test_formats_are_asserted_and_draft_7_schemas_work(tmp_path: Path) -> None:
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"money": {"type": "number", "exclusiveMinimum": 0}},
        "properties": {"price": {"$ref": "#/definitions/money"}, "at": {"format": "date-time"}},
    }
    plan = load_plan(write_plan(tmp_path, {"violations": "block", "track": {"E": draft7}}))
    assert plan.apply(track({"price": 1, "at": "2024-01-01T00:00:00Z"}, event="E")).event
    outcome = plan.apply(track({"price": 0, "at": "yesterday"}, event="E"))
    assert [(v.path, v.keyword) for v in outcome.violations] == [
        ("properties.price", "exclusiveMinimum"),
        ("properties.at", "format"),
    ]


def test_a_value_with_no_json_form_is_a_violation_not_an_error(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="block")
    outcome = plan.apply(track({"order_id": "ord_abc123\ud800", "currency": "USD"}))
    assert outcome.event is None
    assert paths(outcome.violations) == ["properties"]
    assert outcome.violations[0].message.startswith("cannot be validated")


def test_long_values_do_not_make_long_messages(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, violations="block")
    outcome = plan.apply(track({"order_id": "x" * 100_000, "currency": "USD"}))
    (violation,) = outcome.violations
    assert len(violation.message) <= 300


def test_load_plan_reads_a_plan_with_defaults(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, {"track": {"A": {}, "B": True}}))
    assert plan.events == {"A", "B"}
    assert (plan.unplanned_events, plan.unplanned_properties, plan.violations) == (
        "allow",
        "keep",
        "report",
    )
    assert plan.file == str(tmp_path / "web.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"track": {', "web.json:1:12: invalid JSON: Expecting property name"),
        ("[]", "web.json: a plan is a JSON object, not an array"),
        ('{"track": {"A": {}, "A": {}}}', "web.json: duplicate key 'A'"),
        ({"colour": "red"}, "web.json: colour: unknown key (expected one of: unplanned_events,"),
        ({"violations": "drop"}, "web.json: violations: unknown mode 'drop' (expected 'block',"),
        ({"unplanned_events": True}, "web.json: unplanned_events: unknown mode True"),
        ({"unplanned_properties": "allow"}, "unplanned_properties: unknown mode 'allow'"),
        ({"track": []}, "web.json: track: expected an object of event name -> JSON Schema"),
        (
            {"track": {"Order Completed": {"type": 5}}},
            "web.json: track.Order Completed: invalid JSON Schema: 5 is not valid under any of",
        ),
        (
            {"track": {"A": {"properties": {"a": {"minimum": "x"}}}}},
            'track.A: invalid JSON Schema: "x" is not of type "number" (at /properties/a/minimum)',
        ),
        (
            {"track": {"A": {"pattern": "("}}},
            'web.json: track.A: invalid JSON Schema: "(" is not a "regex"',
        ),
        (
            {"track": {"A": {"$ref": "https://example.com/order.json"}}},
            "order.json' is not present in a registry and retrieving it failed: Retrieval is",
        ),
        (
            {"track": {"A": {"$ref": "#/$defs/missing"}}},
            "web.json: track.A: invalid JSON Schema: Pointer '/$defs/missing' does not exist",
        ),
        (
            {"track": {"A": "object"}},
            "track.A: invalid JSON Schema: expected an object or a boolean, not a string",
        ),
        ({"identify": None}, "web.json: identify: invalid JSON Schema: expected an object or a"),
        ({"group": []}, "web.json: group: invalid JSON Schema: expected an object or a boolean"),
    ],
)
def test_bad_plan_files_are_refused_with_file_and_key(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = write_plan(tmp_path, content)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(path))
    assert isinstance(caught.value, RouterError)


def test_an_unreadable_plan_file_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"missing\.json: cannot read the plan: .*No such file"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes(b'{"track": {"caf\xe9": {}}}')
    with pytest.raises(PlanError, match=r"latin1\.json: cannot read the plan: .*utf-8"):
        load_plan(tmp_path / "latin1.json")


def test_parse_plan_names_the_file_it_is_given() -> None:
    with pytest.raises(PlanError, match=r"^plans/web\.json: track\.X: invalid JSON Schema"):
        parse_plan({"track": {"X": {"type": "nope"}}}, file="plans/web.json")


# Property test: arbitrary JSON-like events (NaN and lone surrogates included: Python's json
# accepts both) against plans with every policy combination. Most events are planned ones, with
# property names the schema knows, so the checks and every policy run, not only the early exits.
# st.text() drops surrogates whatever its alphabet, so strings are joined from characters.
_text = st.lists(st.characters() | st.characters(categories=["Cs"]), max_size=12).map("".join)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _text
_names = st.sampled_from(["order_id", "total", "currency", "shipping", "products", "email", "name"])
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            _names | st.sampled_from(["method", "sku", "price"]) | _text, inner, max_size=5
        )
    ),
    max_leaves=20,
)
_objects = st.dictionaries(_names, _json, min_size=1, max_size=4) | st.dictionaries(
    _names | _text, _json, max_size=6
)
_extras = {"userId": _json, "anonymousId": _json, "messageId": _json, "context": _json}
_events = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("track"), "event": st.just("Order Completed"), "properties": _objects},
        optional=_extras,
    ),
    st.fixed_dictionaries(
        {"type": st.just("track"), "event": st.just("Order Completed")},
        optional={"properties": _json, **_extras},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["identify", "group"])},
        optional={"traits": _objects | _json, **_extras},
    ),
    st.fixed_dictionaries(
        {},
        optional={"type": _json, "event": _json, "properties": _json, "traits": _json, **_extras},
    ),
)
_PLANS = [
    parse_plan(
        {
            "unplanned_events": e,
            "unplanned_properties": p,
            "violations": v,
            "track": {"Order Completed": ORDER_COMPLETED},
            "identify": IDENTIFY,
            "group": GROUP,
        },
        file="web.json",
    )
    for e, p, v in MODES
]


@settings(max_examples=300, deadline=None)
@given(event=_events, plan=st.sampled_from(_PLANS))
def test_apply_never_raises_nor_mutates(event: dict[str, Any], plan: TrackingPlan) -> None:
    before = json.dumps(event)  # NaN != NaN, so compare the text rather than the values
    snapshot = copy.deepcopy(event)
    outcome = plan.apply(event)
    assert json.dumps(event) == before
    assert json.dumps(snapshot) == before
    if outcome.event is None:
        assert outcome.violations, "a blocked event says why"
    else:
        # Only the checked object may change; every other field is the client's own.
        field = "traits" if event.get("type") in ("identify", "group") else "properties"
        assert {k: v for k, v in outcome.event.items() if k != field}.keys() == (
            {k for k in event if k != field}
        )
    assert not outcome.generated or plan.violations == "report"
    for generated in outcome.generated:
        assert generated["event"] == "Violation Generated"
        assert "messageId" not in generated
