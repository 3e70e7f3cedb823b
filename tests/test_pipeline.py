"""What a destination receives of an event: routes, integrations, filters, transforms, PII.

The pipeline is compiled from real TOML, as users write it, and run on plain dicts.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from typing import Any

import pytest

from router.config import parse_config
from router.errors import ConfigError
from router.pipeline import (
    DROPPED,
    FILTER_ERROR,
    INTEGRATIONS,
    NO_ROUTE,
    SAMPLED_OUT,
    TRANSFORM_DROPPED,
    Held,
    Pipeline,
    TransformFunction,
    kept_by_sample,
)

SALT = "pepper-for-tests"
DEFAULT_ROUTE = '[[routes]]\nto = ["hook"]'


def pipeline(
    destination: str, routes: str = "", function: TransformFunction | None = None
) -> Pipeline:
    routes = textwrap.dedent(routes) or DEFAULT_ROUTE
    text = f"""
        [sources.web]
        write_key = "wk_web"
        [sources.app]
        write_key = "wk_app"

        [destinations.hook]
        type = "stdout"
        {textwrap.dedent(destination)}

        {routes}
        """
    config = parse_config(textwrap.dedent(text))
    return Pipeline.for_destination(config, "hook", function)


def order(**extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": "m1",
        "properties": {"total": 120, "email": "ann@example.com", "sku": "A-1"},
        "context": {"ip": "192.0.2.1", "traits": {"email": "ann@example.com", "phone": "555"}},
        **extra,
    }


def shaped(p: Pipeline, event: dict[str, Any], source: str = "web") -> dict[str, Any] | Held:
    result = p.prepare(source, json.dumps(event).encode())
    return result if isinstance(result, Held) else json.loads(result)


# -- routes ----------------------------------------------------------------------


ROUTES = """
[[routes]]
from = ["web"]
when = "type = 'track' and properties.total > 100"
to = ["hook"]

[[routes]]
from = ["app"]
when = "event = 'Signed Up'"
to = ["hook"]
"""


@pytest.mark.parametrize(
    ("source", "event", "delivered"),
    [
        ("web", order(), True),
        ("web", order(properties={"total": 50}), False),
        ("web", order(type="identify"), False),
        ("app", order(), False),  # the app route wants Signed Up
        ("app", order(event="Signed Up"), True),
        ("other", order(), False),
    ],
)
def test_an_event_goes_where_some_route_takes_it(source: str, event: dict, delivered: bool):
    p = pipeline("", ROUTES)
    assert p.takes_source(source) is (source in ("web", "app"))
    result = shaped(p, event, source)
    assert (not isinstance(result, Held)) is delivered
    if not delivered:
        assert result == Held(NO_ROUTE)


def test_a_condition_that_cannot_be_evaluated_holds_the_event_back():
    p = pipeline("", '[[routes]]\nwhen = "properties.total > 100"\nto = ["hook"]')
    weird = order(properties="not an object")
    assert shaped(p, weird) in (Held(NO_ROUTE), Held(FILTER_ERROR))


def test_a_route_without_when_takes_every_event_of_its_sources():
    p = pipeline("", '[[routes]]\nfrom = "web"\nto = ["hook"]')
    assert shaped(p, order())["messageId"] == "m1"
    assert not p.takes_source("app")


# -- integrations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("integrations", "delivered"),
    [
        (None, True),
        ({}, True),
        ({"All": False}, False),
        ({"all": False}, False),
        ({"All": False, "hook": True}, True),
        ({"hook": False}, False),
        ({"All": True, "hook": False}, False),
        ({"other": False}, True),
        ({"All": False, "hook": {"option": 1}}, True),
    ],
)
def test_the_event_integrations_object_is_honoured(integrations: Any, delivered: bool):
    event = order() if integrations is None else order(integrations=integrations)
    result = shaped(pipeline(""), event)
    assert (result != Held(INTEGRATIONS)) is delivered


# -- filters -----------------------------------------------------------------------


def test_drop_filter():
    p = pipeline("""
        [[destinations.hook.filters]]
        if = "event = 'Order Completed'"
        drop = true
        """)
    assert shaped(p, order()) == Held(DROPPED)
    assert shaped(p, order(event="Other"))["event"] == "Other"


def test_sampling_is_deterministic_by_the_chosen_path():
    p = pipeline("""
        [[destinations.hook.filters]]
        sample = { percent = 30, by = "userId" }
        """)
    kept = {
        user: not isinstance(shaped(p, order(userId=user, messageId=f"{user}-{n}")), Held)
        for user in (f"user-{i}" for i in range(400))
        for n in range(3)
    }
    # Every event of a user shares that user's fate, and about 30% of users are kept.
    for user, fate in kept.items():
        for n in range(3):
            again = shaped(p, order(userId=user, messageId=f"{user}-{n}"))
            assert (not isinstance(again, Held)) is fate
            if not fate:
                assert again == Held(SAMPLED_OUT)
    share = sum(kept.values()) / len(kept)
    assert 0.22 < share < 0.38


def test_sampling_edges():
    assert all(kept_by_sample({"messageId": f"m{i}"}, 100, "messageId") for i in range(200))
    assert not any(kept_by_sample({"messageId": f"m{i}"}, 0, "messageId") for i in range(200))


def test_drop_and_allow_properties():
    p = pipeline("""
        [[destinations.hook.filters]]
        allow_properties = ["properties.total", "properties.sku"]

        [[destinations.hook.filters]]
        if = "type = 'track'"
        drop_properties = ["properties.sku", "context.ip"]
        """)
    event = shaped(p, order())
    assert event["properties"] == {"total": 120}  # drop ran before allow, whatever the order
    assert "ip" not in event["context"]
    assert event["context"]["traits"]["phone"] == "555"  # an object no path names is untouched


def test_filters_run_in_segments_order_whatever_the_order_written():
    p = pipeline("""
        [[destinations.hook.filters]]
        drop_properties = ["properties.total"]

        [[destinations.hook.filters]]
        if = "properties.total > 100"
        drop = true
        """)
    # Had drop_properties run first, the drop filter would no longer see the total.
    assert shaped(p, order()) == Held(DROPPED)


# -- transforms --------------------------------------------------------------------


def test_set_rename_remove():
    p = pipeline("""
        [destinations.hook.transform]
        rename = { "properties.total" = "properties.revenue" }
        remove = ["context.traits"]
        set = { "context.app.name" = "shop", "properties.currency" = "EUR" }
        """)
    event = shaped(p, order())
    assert event["properties"]["revenue"] == 120
    assert "total" not in event["properties"]
    assert "traits" not in event["context"]
    assert event["context"]["app"] == {"name": "shop"}
    assert event["properties"]["currency"] == "EUR"


def test_a_transform_function_edits_or_drops():
    def enrich(event: dict[str, Any]) -> dict[str, Any] | None:
        if event.get("event") == "Debug":
            return None
        event["properties"]["tier"] = "gold" if event["properties"]["total"] > 100 else "std"
        return event

    p = pipeline("", function=enrich)
    assert shaped(p, order())["properties"]["tier"] == "gold"
    assert shaped(p, order(event="Debug")) == Held(TRANSFORM_DROPPED)


# -- privacy -----------------------------------------------------------------------


def sha(value: str) -> str:
    return hashlib.sha256((SALT + value).encode()).hexdigest()


def test_pii_is_dropped_or_hashed_by_name_and_pattern(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PII_SALT", SALT)
    p = pipeline("""
        [destinations.hook.privacy]
        drop = ["context.ip", "*.phone"]
        hash = ["userId", "*email"]
        salt = "env:PII_SALT"
        """)
    event = shaped(p, order())
    assert "ip" not in event["context"]
    assert "phone" not in event["context"]["traits"]
    assert event["userId"] == sha("u1")
    assert event["properties"]["email"] == sha("ann@example.com")
    assert event["context"]["traits"]["email"] == sha("ann@example.com")
    assert "ann@example.com" not in json.dumps(event)


def test_privacy_runs_after_the_transform_function(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PII_SALT", SALT)

    def leak(event: dict[str, Any]) -> dict[str, Any]:
        event["properties"]["contact_email"] = event["context"]["traits"]["email"]
        return event

    p = pipeline(
        """
        [destinations.hook.privacy]
        hash = ["*email"]
        salt = "env:PII_SALT"
        """,
        function=leak,
    )
    assert "ann@example.com" not in json.dumps(shaped(p, order()))


def test_keys_with_dots_are_reached_by_escaping():
    p = pipeline(r"""
        [destinations.hook.privacy]
        drop = ['properties.e\.mail']
        """)
    event = shaped(p, order(properties={"e.mail": "x@example.com", "total": 1}))
    assert event["properties"] == {"total": 1}


# -- config errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "[[destinations.hook.filters]]\ndrop = true\nsample = { percent = 5 }",
            "destinations.hook.filters[0]: a filter takes exactly one action",
        ),
        ("[[destinations.hook.filters]]\nif = \"event = 'x'\"", "found: none"),
        (
            '[[destinations.hook.filters]]\nif = "event = "\ndrop = true',
            "destinations.hook.filters[0].if: invalid filter: column",
        ),
        ("[destinations.hook.privacy]\nhash = ['userId']", "hashing needs a salt"),
        ("[destinations.hook.transform]\nmove = {}", "unknown field"),
    ],
)
def test_config_mistakes_are_located(section: str, message: str):
    with pytest.raises(ConfigError) as error:
        pipeline(section)
    assert message in str(error.value)
    assert str(error.value).startswith("router.toml:")


def test_a_bad_route_condition_names_the_column():
    with pytest.raises(ConfigError) as error:
        pipeline("", "[[routes]]\nwhen = \"type = 'track' and\"\nto = ['hook']")
    assert "routes[0].when: invalid filter: column" in str(error.value)
