"""The event envelope: the fields every event carries, whatever its payload.

An event is an immutable fact. ``event_id`` is unique for ever (event stores and JetStream
dedupe on it); ``stream_id`` names the aggregate it belongs to (for messages and leads: the
contact's phone number in E.164 digits); ``correlation_id`` is shared by every event caused,
directly or not, by one inbound message; ``causation_id`` is the event that caused this one.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field


class Payload(BaseModel):
    """Base of every payload: frozen, and strict about unknown fields only on our side."""

    model_config = ConfigDict(frozen=True, extra="ignore")


def new_event_id() -> str:
    return uuid.uuid4().hex


_NAMESPACE = uuid.NAMESPACE_URL.bytes


def stable_event_id(*parts: str) -> str:
    """A deterministic event id, so that the same fact seen twice (a provider retry) gets the same id.

    It is ``uuid5(NAMESPACE_URL, "orbion:" + "/".join(parts)).hex``, computed without building
    a ``UUID`` object (which costs twice the hash), since the gateway makes one per event.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE + ("orbion:" + "/".join(parts)).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields common to all events. Subclasses pin ``type`` and ``payload``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    #: Bumped when a payload changes incompatibly; decoders upcast older versions.
    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: str = Field(default_factory=new_event_id)
    type: str
    schema_version: int = 1
    stream_id: str
    occurred_at: datetime = Field(default_factory=utcnow)
    correlation_id: str = ""
    causation_id: str | None = None
    payload: Any

    @classmethod
    def create(
        cls,
        stream_id: str,
        payload: Payload,
        *,
        cause: Envelope | None = None,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Self:
        """Build an event of this type; ``cause`` links correlation and causation ids."""
        eid = event_id or new_event_id()
        return cls(
            event_id=eid,
            type=cls.__name__,
            schema_version=cls.SCHEMA_VERSION,
            stream_id=stream_id,
            occurred_at=occurred_at or utcnow(),
            correlation_id=(cause.correlation_id or cause.event_id) if cause else eid,
            causation_id=cause.event_id if cause else None,
            payload=payload,
        )
