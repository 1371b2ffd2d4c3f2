"""The contract between services: every event type used anywhere is declared in this package.

``encode`` and ``decode`` turn events into JSON bytes and back; ``decode`` picks the class
from the ``type`` field. To add an event: declare it in the module of its domain, then add
it to ``EVENT_TYPES`` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeAlias, TypeVar

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from .envelope import Envelope, Payload, new_event_id, stable_event_id, utcnow
from .lead import (
    BantStageAdvanced,
    ContactBlocked,
    ContactFlaggedAsBot,
    HumanVerificationFailed,
    HumanVerificationPassed,
    HumanVerificationRequested,
    LeadActivityRecorded,
    LeadChanged,
    LeadCreated,
    LeadFieldsCaptured,
    LeadHandedOff,
    LeadOptedIn,
    LeadOptedOut,
    LeadQualified,
)
from .messaging import (
    MessageReceived,
    MessageSent,
    MessageStatusChanged,
    ReplyGenerated,
    ReplyRequested,
    SendFailed,
)
from .operations import BreakerStateChanged, LeadExported

EVENT_TYPES: tuple[type[Envelope], ...] = (
    MessageReceived,
    MessageStatusChanged,
    ReplyRequested,
    ReplyGenerated,
    MessageSent,
    SendFailed,
    LeadCreated,
    LeadFieldsCaptured,
    BantStageAdvanced,
    LeadQualified,
    LeadHandedOff,
    LeadOptedOut,
    LeadOptedIn,
    ContactFlaggedAsBot,
    HumanVerificationRequested,
    HumanVerificationPassed,
    HumanVerificationFailed,
    ContactBlocked,
    LeadChanged,
    LeadActivityRecorded,
    BreakerStateChanged,
    LeadExported,
)

Event: TypeAlias = Annotated[
    MessageReceived
    | MessageStatusChanged
    | ReplyRequested
    | ReplyGenerated
    | MessageSent
    | SendFailed
    | LeadCreated
    | LeadFieldsCaptured
    | BantStageAdvanced
    | LeadQualified
    | LeadHandedOff
    | LeadOptedOut
    | LeadOptedIn
    | ContactFlaggedAsBot
    | HumanVerificationRequested
    | HumanVerificationPassed
    | HumanVerificationFailed
    | ContactBlocked
    | LeadChanged
    | LeadActivityRecorded
    | BreakerStateChanged
    | LeadExported,
    Field(discriminator="type"),
]

EVENTS_BY_NAME: dict[str, type[Envelope]] = {cls.__name__: cls for cls in EVENT_TYPES}

_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)

E = TypeVar("E", bound=Envelope)


class UndecodableEvent(ValueError):
    """Bytes that are not a known, valid event. Never retried: dead-lettered as they are."""


@dataclass(frozen=True)
class EncodedEvent:
    """An event already encoded as JSON (as an event store keeps it), with the envelope fields
    a publish needs: a relay passes it on as it is, without parsing and encoding it again."""

    event_id: str
    type: str
    stream_id: str
    correlation_id: str
    data: bytes


def encode(event: Envelope) -> bytes:
    """The event as compact JSON bytes, without NUL characters in its strings.

    Postgres can hold a NUL neither in ``text`` nor in ``jsonb``: one in a message's text made
    the event unstorable in every consumer's event store, redelivered until dead-lettered, and
    the message was lost. Only the NULs go; the rest of the text is kept.
    """
    data = event.__pydantic_serializer__.to_json(event)
    if b"\\u0000" in data:  # rare: found in the bytes, removed from the values
        data = orjson.dumps(_without_nul(event.__pydantic_serializer__.to_python(event, mode="json")))
    return data


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def decode(data: bytes | str) -> Event:
    """Parse JSON bytes into the event class named by its ``type``; raises :class:`UndecodableEvent`."""
    try:
        return _event_adapter.validate_json(data)
    except ValidationError as exc:
        raise UndecodableEvent(str(exc)) from exc


def decode_as(data: bytes | str, cls: type[E]) -> E:
    """Parse bytes that must be an event of type ``cls``."""
    event = decode(data)
    if not isinstance(event, cls):
        raise UndecodableEvent(f"expected {cls.__name__}, got {event.type}")
    return event


__all__ = [
    "EVENTS_BY_NAME",
    "EVENT_TYPES",
    "BantStageAdvanced",
    "BreakerStateChanged",
    "ContactBlocked",
    "ContactFlaggedAsBot",
    "EncodedEvent",
    "Envelope",
    "Event",
    "HumanVerificationFailed",
    "HumanVerificationPassed",
    "HumanVerificationRequested",
    "LeadActivityRecorded",
    "LeadChanged",
    "LeadCreated",
    "LeadExported",
    "LeadFieldsCaptured",
    "LeadHandedOff",
    "LeadOptedIn",
    "LeadOptedOut",
    "LeadQualified",
    "MessageReceived",
    "MessageSent",
    "MessageStatusChanged",
    "Payload",
    "ReplyGenerated",
    "ReplyRequested",
    "SendFailed",
    "UndecodableEvent",
    "decode",
    "decode_as",
    "encode",
    "new_event_id",
    "stable_event_id",
    "utcnow",
]
