from datetime import UTC, datetime

import pytest

from orbion_common.events import (
    EVENT_TYPES,
    MessageReceived,
    ReplyRequested,
    UndecodableEvent,
    decode,
    decode_as,
    encode,
    stable_event_id,
)
from orbion_common.events.messaging import MessageReceivedPayload, ReplyRequestedPayload


def inbound(text: str = "Olá, quanto custa?") -> MessageReceived:
    return MessageReceived.create(
        "5511999990000",
        MessageReceivedPayload(
            provider="cloud_api",
            provider_message_id="wamid.1",
            phone="5511999990000",
            kind="text",
            text=text,
            sent_at=datetime.now(UTC),
        ),
    )


def test_an_event_survives_the_round_trip_with_its_type():
    event = inbound()
    decoded = decode(encode(event))
    assert isinstance(decoded, MessageReceived)
    assert decoded == event


def test_caused_events_share_the_correlation_id_and_name_their_cause():
    first = inbound()
    reply = ReplyRequested.create(
        first.stream_id,
        ReplyRequestedPayload(
            reply_key="k", phone=first.stream_id, inbound_message_ids=["wamid.1"], text="x"
        ),
        cause=first,
    )
    assert reply.correlation_id == first.event_id
    assert reply.causation_id == first.event_id


def test_every_declared_event_type_is_decodable_by_name():
    names = {cls.__name__ for cls in EVENT_TYPES}
    assert len(names) == len(EVENT_TYPES)
    for cls in EVENT_TYPES:
        assert cls.model_fields["type"].default == cls.__name__


@pytest.mark.parametrize("data", [b"", b"{}", b"not json", b'{"type":"Nope","stream_id":"1","payload":{}}'])
def test_bytes_that_are_not_an_event_are_refused_clearly(data):
    with pytest.raises(UndecodableEvent):
        decode(data)


def test_decode_as_refuses_another_type():
    with pytest.raises(UndecodableEvent):
        decode_as(encode(inbound()), ReplyRequested)


def test_stable_ids_repeat_for_the_same_fact_only():
    assert stable_event_id("cloud_api", "wamid.1") == stable_event_id("cloud_api", "wamid.1")
    assert stable_event_id("cloud_api", "wamid.1") != stable_event_id("cloud_api", "wamid.2")


def test_every_event_type_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "events.md").read_text()
    undocumented = [
        cls.__name__ for cls in EVENT_TYPES if cls.__name__.removeprefix("HumanVerification") not in doc
    ]
    assert undocumented == []


def test_a_text_longer_than_whatsapp_allows_is_cut_and_flagged():
    from orbion_common.events.messaging import MAX_TEXT_CHARS

    event = inbound("x" * (MAX_TEXT_CHARS * 4))
    assert len(event.payload.text) == MAX_TEXT_CHARS
    assert event.payload.text_truncated
    assert len(encode(event)) < 1024 * 1024  # fits in one NATS message
    assert not inbound().payload.text_truncated


def test_a_nul_character_is_dropped_from_an_event_and_the_rest_of_its_text_kept():
    # Postgres stores a NUL neither in text nor in jsonb: kept, it made the event unstorable.
    event = inbound("Oi\x00, quanto \\u0000 custa?\x00")
    decoded = decode(encode(event))
    assert decoded.payload.text == "Oi, quanto \\u0000 custa?"  # a written-out "\u0000" stays
    assert decoded.event_id == event.event_id
