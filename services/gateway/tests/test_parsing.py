"""Cloud API and Evolution API webhooks, from the providers' documented shapes, to events.

Each file in fixtures/ holds a webhook and what it must become: the payload fields of every
MessageReceived and MessageStatusChanged, how many items are dead-lettered and ignored.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from gateway_testkit import fixture_names, load_fixture

from orbion_common.events import MessageReceived, MessageStatusChanged, decode, encode, stable_event_id
from orbion_gateway import cloud_api, evolution
from orbion_gateway.inbound import MalformedWebhook, ParsedWebhook, to_events

PARSERS = {"cloud": cloud_api.parse, "evolution": evolution.parse}


def parse_fixture(name: str) -> tuple[ParsedWebhook, dict[str, Any]]:
    data = load_fixture(name)
    return PARSERS[name.split("_", 1)[0]](data["webhook"]), data["expect"]


def assert_subset(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, dict) and isinstance(actual.get(key), dict):
            assert_subset(actual[key], value)
        else:
            assert actual.get(key) == value, f"{key}: {actual.get(key)!r} != {value!r}"


@pytest.mark.parametrize("name", fixture_names("cloud") + fixture_names("evolution"))
def test_fixture_parses_to_the_expected_events(name: str) -> None:
    parsed, expect = parse_fixture(name)
    assert len(parsed.messages) == len(expect["messages"])
    assert len(parsed.statuses) == len(expect["statuses"])
    assert len(parsed.rejected) == expect["rejected"]
    assert parsed.ignored == expect["ignored"]
    for msg, expected in zip(parsed.messages, expect["messages"], strict=True):
        assert_subset(msg.payload.model_dump(mode="json"), expected)
    for status, expected in zip(parsed.statuses, expect["statuses"], strict=True):
        assert_subset(status.payload.model_dump(mode="json"), expected)


@pytest.mark.parametrize("name", fixture_names("cloud") + fixture_names("evolution"))
def test_events_survive_encoding_and_are_streamed_per_phone(name: str) -> None:
    parsed, _ = parse_fixture(name)
    events, msg_ids = to_events(parsed)
    assert len(events) == len(msg_ids) == len(parsed.messages) + len(parsed.statuses)
    for event in events:
        assert decode(encode(event)) == event
        assert event.stream_id == event.payload.phone
        assert event.stream_id.isdigit()


def test_a_provider_retry_gets_the_same_event_id_and_msg_id() -> None:
    first, _ = parse_fixture("cloud_text")
    again, _ = parse_fixture("cloud_text")
    wamid = first.messages[0].payload.provider_message_id
    assert first.messages[0].event_id == again.messages[0].event_id == stable_event_id("cloud_api", wamid)
    assert first.messages[0].msg_id == wamid
    events, _ = to_events(first)
    assert events[0].event_id == stable_event_id("cloud_api", wamid)


def test_event_ids_are_the_uuid5_they_always_were() -> None:
    # Event stores dedupe provider retries on these ids for ever: a new formula would let a
    # retry of a message stored before it through as a new message.
    parts = ("cloud_api", "status", "wamid.HBgLNTUxMTk5OTk5MDAwMBUCABIYFjNFQjA=:read")
    expected = uuid.uuid5(uuid.NAMESPACE_URL, "orbion:" + "/".join(parts)).hex
    assert stable_event_id(*parts) == expected
    assert (
        stable_event_id("evolution", "BAE5çã")
        == uuid.uuid5(uuid.NAMESPACE_URL, "orbion:evolution/BAE5çã").hex
    )


def test_each_status_transition_is_its_own_fact() -> None:
    sent, _ = parse_fixture("cloud_status_sent")
    read, _ = parse_fixture("cloud_status_read")
    assert sent.statuses[0].msg_id != read.statuses[0].msg_id
    assert sent.statuses[0].event_id != read.statuses[0].event_id
    assert read.statuses[0].msg_id == read.statuses[0].payload.provider_message_id + ":read"


def test_the_throttled_flag_marks_only_the_flagged_messages() -> None:
    parsed, _ = parse_fixture("cloud_batch_with_malformed")
    events, _ = to_events(parsed, [False, True, False])
    flags = [e.payload.throttled for e in events if isinstance(e, MessageReceived)]
    assert flags == [False, True, False]
    assert all(isinstance(e, MessageStatusChanged) for e in events[3:])


def test_the_malformed_message_is_kept_verbatim_for_the_dead_letter_queue() -> None:
    parsed, _ = parse_fixture("cloud_batch_with_malformed")
    [rejected] = parsed.rejected
    raw = {"from": "16315551181", "id": "wamid.BAD", "type": "text", "text": {"body": "no timestamp"}}
    assert rejected.raw == raw
    assert "timestamp" in rejected.reason


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        {"object": "page", "entry": []},
        {"object": "whatsapp_business_account"},
        {"object": "whatsapp_business_account", "entry": {}},
    ],
)
def test_a_body_that_is_not_a_cloud_api_webhook_is_malformed(body: object) -> None:
    with pytest.raises(MalformedWebhook):
        cloud_api.parse(body)


@pytest.mark.parametrize("body", [[], {"data": {}}, {"event": 3}])
def test_a_body_that_is_not_an_evolution_webhook_is_malformed(body: object) -> None:
    with pytest.raises(MalformedWebhook):
        evolution.parse(body)


def _msg(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "from": "16315551181",
        "id": "wamid.1",
        "timestamp": "1750090702",
        "type": "text",
        "text": {"body": "x"},
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "message",
    [
        _msg(**{"from": None}),
        _msg(id=None),
        _msg(timestamp="soon"),
        _msg(text="flat"),
        _msg(type="location", location={}),
        _msg(**{"from": "not-a-phone"}),
        "a string",
    ],
)
def test_a_mistyped_cloud_message_is_rejected_alone(message: object) -> None:
    body = load_fixture("cloud_text")["webhook"]
    good = body["entry"][0]["changes"][0]["value"]["messages"][0]
    body["entry"][0]["changes"][0]["value"]["messages"] = [message, good]
    parsed = cloud_api.parse(body)
    assert len(parsed.rejected) == 1
    assert parsed.rejected[0].raw == message
    assert [m.payload.provider_message_id for m in parsed.messages] == [good["id"]]


def test_a_lid_chat_without_its_phone_is_rejected() -> None:
    body = load_fixture("evolution_lid_with_alt")["webhook"]
    del body["data"]["key"]["remoteJidAlt"]
    parsed = evolution.parse(body)
    assert not parsed.messages
    assert len(parsed.rejected) == 1


def test_webhook_by_events_names_are_understood() -> None:
    body = load_fixture("evolution_text")["webhook"]
    body["event"] = "MESSAGES_UPSERT"
    assert len(evolution.parse(body).messages) == 1


@pytest.mark.parametrize(
    ("date_time", "expected"),
    [
        ("2024-06-06T09:51:37-03:00", "2024-06-06T12:51:37+00:00"),  # kept, in UTC
        ("0001-01-01T00:00:00+05:00", None),  # no such time in UTC: the receipt time instead
    ],
)
def test_an_evolution_status_time_is_kept_in_utc_or_replaced_when_it_cannot_be(
    date_time: str, expected: str | None
) -> None:
    body = load_fixture("evolution_status_v2")["webhook"]
    body["date_time"] = date_time
    changed_at = evolution.parse(body).statuses[0].payload.changed_at
    assert changed_at.utcoffset() is not None and not changed_at.utcoffset()
    if expected is not None:
        assert changed_at.isoformat() == expected
    else:
        assert changed_at.year >= 2026
