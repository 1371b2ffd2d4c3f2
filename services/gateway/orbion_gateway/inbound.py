"""What the webhook parsers produce: normalised payloads with their ids, and rejects.

The parsers (``cloud_api``, ``evolution``) are pure: JSON in, these values out. Turning them
into events (with the ``throttled`` flag the rate limiter decides) happens in ``to_events``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from orbion_common.events import Envelope, MessageReceived, MessageStatusChanged
from orbion_common.events.messaging import MessageReceivedPayload, MessageStatusChangedPayload


class MalformedWebhook(ValueError):
    """The webhook as a whole is unusable (wrong top-level shape): answered with 400."""


class BadItem(ValueError):
    """One message or status in a webhook is malformed: it is dead-lettered, the others go on."""


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    payload: MessageReceivedPayload
    event_id: str
    msg_id: str  # Nats-Msg-Id: the provider's message id, so JetStream drops provider retries


@dataclass(frozen=True, slots=True)
class ParsedStatus:
    payload: MessageStatusChangedPayload
    event_id: str
    msg_id: str  # provider message id + status: each transition is its own fact


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    raw: object  # the offending JSON fragment, kept verbatim for the dead-letter queue


@dataclass(slots=True)
class ParsedWebhook:
    messages: list[ParsedMessage] = field(default_factory=list)
    statuses: list[ParsedStatus] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: int = 0  # well-formed parts we do not act on (other fields, groups, errors-only)


def to_events(
    parsed: ParsedWebhook, throttled: Sequence[bool] = (), *, received_at: datetime | None = None
) -> tuple[list[Envelope], list[str]]:
    """Events and their ``Nats-Msg-Id``s, occurring at ``received_at`` (the webhook's arrival;
    default now); ``throttled[i]`` flags ``parsed.messages[i]``."""
    events: list[Envelope] = []
    msg_ids: list[str] = []
    for i, msg in enumerate(parsed.messages):
        payload = msg.payload
        if i < len(throttled) and throttled[i]:
            payload = payload.model_copy(update={"throttled": True})
        events.append(
            MessageReceived.create(payload.phone, payload, event_id=msg.event_id, occurred_at=received_at)
        )
        msg_ids.append(msg.msg_id)
    for status in parsed.statuses:
        events.append(
            MessageStatusChanged.create(
                status.payload.phone, status.payload, event_id=status.event_id, occurred_at=received_at
            )
        )
        msg_ids.append(status.msg_id)
    return events, msg_ids


# Small typed accessors shared by both parsers: a wrong type is a BadItem, never a crash.


def obj(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadItem(f"{what} is not an object")
    return value


def opt_obj(parent: dict[str, object], key: str) -> dict[str, object]:
    value = parent.get(key)
    if value is None:
        return {}
    return obj(value, key)


def req_str(parent: dict[str, object], key: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise BadItem(f"{key} missing or not a string")
    return value


def opt_str(parent: dict[str, object], key: str) -> str:
    value = parent.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadItem(f"{key} is not a string")


def phone_digits(raw: str) -> str:
    """E.164 digits without '+': the stream id of a contact."""
    # Meta sends bare digits: skip the per-character filter then (ASCII only: "٣".isdigit()).
    digits = raw if raw.isascii() and raw.isdigit() else "".join(ch for ch in raw if "0" <= ch <= "9")
    if not 6 <= len(digits) <= 20:
        raise BadItem("not a phone number")
    return digits


def epoch(value: object, what: str = "timestamp") -> datetime:
    """Provider timestamps: epoch seconds as int, numeric string, or a protobuf Long {low, high}."""
    if isinstance(value, dict):  # Baileys (Evolution) may serialise a Long as {"low":..,"high":..}
        low, high = value.get("low"), value.get("high", 0)
        if isinstance(low, int) and isinstance(high, int):
            value = (high << 32) + (low & 0xFFFFFFFF)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11:
        return datetime.fromtimestamp(value, UTC)
    raise BadItem(f"{what} is not epoch seconds")
