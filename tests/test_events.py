"""The event model: decoding, the batch envelope and normalization per SEGMENT_API.md §2."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.errors import IngestError
from router.events import decode_json, new_message_id, normalize, split_envelope

# 2027-01-15T08:00:00Z
RECEIVED = 1_800_000_000.0
RECEIVED_TEXT = "2027-01-15T08:00:00.000Z"


def stored(item: Any, **options: Any) -> dict[str, Any]:
    event = normalize(item, received_at=RECEIVED, **options)
    body: dict[str, Any] = json.loads(event.body)
    assert body.get("messageId", event.message_id) == event.message_id
    return body


def refused(item: Any, **options: Any) -> IngestError:
    with pytest.raises(IngestError) as error:
        normalize(item, received_at=RECEIVED, **options)
    assert error.value.status == 400
    return error.value


# -- decoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"a": 1',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": "\xff"}',  # not UTF-8
        b"[" * 65 + b"]" * 65,
        b'{"a":' * 65 + b"1" + b"}" * 65,
    ],
)
def test_undecodable_bodies_are_refused_as_invalid_json(body: bytes):
    with pytest.raises(IngestError) as error:
        decode_json(body)
    assert (error.value.status, error.value.code) == (400, "invalid_json")


def test_nesting_up_to_the_limit_decodes():
    assert decode_json(b"[" * 64 + b"]" * 64) is not None
    assert decode_json(b'{"a":' * 63 + b"1" + b"}" * 63) is not None


# -- the envelope --------------------------------------------------------------


def test_a_bare_message_is_its_own_envelope():
    envelope = split_envelope({"type": "track", "sentAt": "2027-01-15T07:59:59Z", "writeKey": "k"})
    assert len(envelope.items) == 1
    assert (envelope.sent_at, envelope.write_key) == ("2027-01-15T07:59:59Z", "k")


def test_batch_context_and_integrations_fill_items_and_the_item_wins():
    envelope = split_envelope(
        {
            "batch": [
                {"type": "track", "context": {"app": "mine"}},
                {"type": "track", "integrations": {"All": True}},
            ],
            "context": {"library": {"name": "analytics-python"}, "app": "shared"},
            "integrations": {"All": False},
            "sentAt": "2027-01-15T07:59:59Z",
        }
    )
    first, second = envelope.items
    assert first["context"] == {"library": {"name": "analytics-python"}, "app": "mine"}
    assert first["integrations"] == {"All": False}
    assert second["context"] == {"library": {"name": "analytics-python"}, "app": "shared"}
    assert second["integrations"] == {"All": True}
    assert envelope.sent_at == "2027-01-15T07:59:59Z"


def test_a_batch_that_is_not_a_list_is_refused():
    with pytest.raises(IngestError) as error:
        split_envelope({"batch": {"type": "track"}})
    assert error.value.code == "invalid_batch"


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"type": "track", "userId": "u"}, "track event requires 'event'"),
        ({"type": "group", "userId": "u"}, "group event requires 'groupId'"),
        ({"type": "alias", "userId": "u"}, "alias event requires 'previousId'"),
        ({"type": "track", "event": "E"}, "track event requires 'userId' or 'anonymousId'"),
        ({"type": "track", "event": "E", "userId": None}, "requires 'userId' or 'anonymousId'"),
        ({"type": "track", "event": "E", "userId": ""}, "requires 'userId' or 'anonymousId'"),
        ({"type": "track", "event": 5, "userId": "u"}, "'event' is invalid"),
        ({"type": "identify", "userId": "u", "traits": []}, "'traits' is invalid"),
        ({"type": "nope", "userId": "u"}, "unknown event type 'nope'"),
        ({"userId": "u"}, "missing 'type'"),
        ({"type": "track", "event": "E", "userId": "u", "messageId": "x" * 100}, "messageId"),
    ],
)
def test_invalid_events_name_what_is_wrong(item: dict[str, Any], message: str):
    error = refused(item)
    assert error.code == "invalid_event"
    assert message in error.message


def test_a_non_object_is_refused():
    assert "JSON object" in refused([1, 2]).message


@pytest.mark.parametrize(
    "item",
    [
        {"type": "track", "event": "Signed Up", "userId": "u1"},
        {"type": "track", "event": "Signed Up", "anonymousId": 42},  # numeric ids are kept
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "page", "anonymousId": "a1", "name": "Home", "properties": {"path": "/"}},
        {"type": "screen", "userId": "u1", "name": "Cart"},
        {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"size": 5}},
        {"type": "alias", "userId": "u2", "previousId": "u1"},
    ],
)
def test_each_of_the_six_types_is_accepted(item: dict[str, Any]):
    body = stored(dict(item))
    for key, value in item.items():
        assert body[key] == value


# -- normalization -------------------------------------------------------------


def test_nulls_in_known_fields_are_absent_but_unknown_fields_pass_through():
    body = stored(
        {
            "type": "track",
            "event": "E",
            "userId": "u",
            "anonymousId": None,
            "properties": None,
            "_metadata": {"bundled": ["x"]},
            "custom": None,
        }
    )
    assert "anonymousId" not in body
    assert "properties" not in body
    assert body["_metadata"] == {"bundled": ["x"]}
    assert body["custom"] is None


def test_a_missing_or_empty_message_id_is_filled_with_a_uuid():
    for item in (
        {"type": "track", "event": "E", "userId": "u"},
        {"type": "track", "event": "E", "userId": "u", "messageId": ""},
    ):
        body = stored(item)
        assert uuid.UUID(body["messageId"]).version == 4


def test_a_client_message_id_is_kept():
    event = normalize(
        {"type": "track", "event": "E", "userId": "u", "messageId": "ajs-123"},
        received_at=RECEIVED,
    )
    assert event.message_id == "ajs-123"


def test_without_any_timestamp_the_event_happened_when_received():
    body = stored({"type": "track", "event": "E", "userId": "u"})
    assert body["receivedAt"] == body["timestamp"] == RECEIVED_TEXT
    assert "originalTimestamp" not in body


def test_a_timestamp_without_sent_at_is_kept_as_sent():
    body = stored(
        {"type": "track", "event": "E", "userId": "u", "timestamp": "2027-01-15T07:00:00Z"}
    )
    assert body["timestamp"] == "2027-01-15T07:00:00Z"
    assert body["originalTimestamp"] == "2027-01-15T07:00:00Z"


def test_a_client_clock_ten_minutes_fast_is_corrected():
    # The client thinks it is 08:10 when it sends; the event happened 5 s before sending.
    body = stored(
        {"type": "track", "event": "E", "userId": "u", "timestamp": "2027-01-15T08:09:55+00:00"},
        sent_at="2027-01-15T08:10:00.000Z",
    )
    assert body["timestamp"] == "2027-01-15T07:59:55.000Z"
    assert body["originalTimestamp"] == "2027-01-15T08:09:55+00:00"
    assert body["sentAt"] == "2027-01-15T08:10:00.000Z"


def test_the_item_sent_at_wins_over_the_envelope():
    body = stored(
        {
            "type": "track",
            "event": "E",
            "userId": "u",
            "timestamp": "2027-01-15T08:00:00.250000Z",
            "sentAt": "2027-01-15T08:00:01Z",
        },
        sent_at="2027-01-15T09:00:00Z",
    )
    assert body["timestamp"] == "2027-01-15T07:59:59.250Z"


def test_an_unparseable_timestamp_is_kept_not_refused():
    body = stored(
        {"type": "track", "event": "E", "userId": "u", "timestamp": "yesterday"},
        sent_at="2027-01-15T08:00:00Z",
    )
    assert body["timestamp"] == "yesterday"


def test_the_type_is_inferred_from_the_path_when_the_body_omits_it():
    body = stored({"event": "E", "userId": "u"}, inferred_type="track")
    assert body["type"] == "track"


def test_extra_context_is_added_and_the_client_context_wins():
    body = stored(
        {"type": "track", "event": "E", "userId": "u", "context": {"ip": "10.0.0.1"}},
        context_extra={"ip": "127.0.0.1", "peer": {"pid": 1}},
    )
    assert body["context"] == {"ip": "10.0.0.1", "peer": {"pid": 1}}


def test_raw_sources_store_plain_json_as_sent():
    body = stored({"hello": "world", "n": None}, raw=True)
    assert body["hello"] == "world"
    assert body["n"] is None
    assert "receivedAt" not in body


def test_raw_sources_still_validate_segment_calls():
    assert refused({"type": "track", "userId": "u"}, raw=True).code == "invalid_event"


@given(
    offset=st.integers(min_value=-86_400_000, max_value=86_400_000),
    lag=st.integers(min_value=0, max_value=3_600_000),
)
def test_skew_correction_keeps_the_gap_between_event_and_send(offset: int, lag: int):
    """Whatever the client's clock error, the corrected timestamp is receivedAt minus the
    client-measured time between the event and the send (at millisecond precision)."""
    client_now_ms = int(RECEIVED * 1000) + offset
    timestamp = _iso(client_now_ms - lag)
    sent = _iso(client_now_ms)
    body = stored(
        {"type": "track", "event": "E", "userId": "u", "timestamp": timestamp}, sent_at=sent
    )
    assert body["timestamp"] == _iso(int(RECEIVED * 1000) - lag)


def _iso(ms: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def test_minted_message_ids_are_distinct_version_4_uuids():
    ids = [new_message_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:100]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
