"""Events about WhatsApp messages: what came in, what went out, and their delivery status.

Published by the gateway (inbound, statuses), the conversation service (reply requests)
and the llm-proxy (replies generated, sent, failed). ``stream_id`` is the contact's phone.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from .envelope import Envelope, Payload


class Provider(StrEnum):
    CLOUD_API = "cloud_api"
    EVOLUTION = "evolution"


class MessageKind(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"
    DOCUMENT = "document"
    STICKER = "sticker"
    LOCATION = "location"
    CONTACTS = "contacts"
    INTERACTIVE = "interactive"
    BUTTON = "button"
    REACTION = "reaction"
    UNSUPPORTED = "unsupported"


class Media(Payload):
    media_id: str = ""
    mime_type: str = ""
    caption: str = ""
    filename: str = ""
    url: str = ""


class Location(Payload):
    latitude: float
    longitude: float
    name: str = ""
    address: str = ""


#: WhatsApp's own limit on a message's text; anything longer is cut (and flagged) so that an
#: event always fits in one NATS message (1 MiB by default) and a hostile webhook cannot make
#: the gateway answer 503 for ever.
MAX_TEXT_CHARS = 65_536


class MessageReceivedPayload(Payload):
    provider: Provider
    provider_message_id: str
    phone: str
    business_number_id: str = ""
    profile_name: str = ""
    kind: MessageKind
    text: str = ""
    media: Media | None = None
    location: Location | None = None
    contacts: list[dict[str, object]] = Field(default_factory=list)
    reply_id: str = ""
    reply_title: str = ""
    reaction_emoji: str = ""
    context_message_id: str = ""
    sent_at: datetime
    throttled: bool = False
    from_me: bool = False
    raw_type: str = ""
    text_truncated: bool = False

    @model_validator(mode="before")
    @classmethod
    def _cut_overlong_text(cls, data: object) -> object:
        if isinstance(data, dict):
            text = data.get("text")
            if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
                data = {**data, "text": text[:MAX_TEXT_CHARS], "text_truncated": True}
        return data


class MessageReceived(Envelope):
    """A contact (or, with ``from_me``, our own number elsewhere) wrote to the business."""

    type: Literal["MessageReceived"] = "MessageReceived"
    payload: MessageReceivedPayload


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"


class ProviderError(Payload):
    code: int | None = None
    title: str = ""
    detail: str = ""


class MessageStatusChangedPayload(Payload):
    provider: Provider
    provider_message_id: str
    phone: str
    status: DeliveryStatus
    changed_at: datetime
    errors: list[ProviderError] = Field(default_factory=list)


class MessageStatusChanged(Envelope):
    type: Literal["MessageStatusChanged"] = "MessageStatusChanged"
    payload: MessageStatusChangedPayload


class HistoryLine(Payload):
    direction: Literal["in", "out"]
    text: str
    at: datetime


#: How much of a message's trip to the conversation service may count toward its quiet period.
#: Its usual trip (milliseconds) is work done while the contact is quiet anyway; a message that
#: arrives later than this (a backlog, a redelivery) may have the rest of its burst queued
#: behind it, which must still find the burst waiting.
QUIET_PERIOD_HEAD_START = timedelta(milliseconds=100)


def quiet_period_start(received_at: datetime, handled_at: datetime) -> datetime:
    """When the quiet period of a message received by the gateway at ``received_at`` and handled
    by the conversation service at ``handled_at`` starts: at its receipt, no more than
    ``QUIET_PERIOD_HEAD_START`` before it was handled, and never after that (a gateway whose clock
    runs ahead delays no reply)."""
    return min(handled_at, max(received_at, handled_at - QUIET_PERIOD_HEAD_START))


class ReplyRequestedPayload(Payload):
    reply_key: str
    phone: str
    inbound_message_ids: list[str]
    reply_to_message_id: str = ""
    text: str
    history: list[HistoryLine] = Field(default_factory=list)
    profile_name: str = ""
    lead_stage: str = ""
    language: str = ""
    # The wait for the contact to stop typing: from the burst's last message's receipt by the
    # gateway (its ``occurred_at``), or from at most ``QUIET_PERIOD_HEAD_START`` before the
    # conversation service handled it, whichever is later.
    quiet_period_ms: int = 0
    # The reply key of the contact's previous ReplyRequested ("" for the first, or when unknown):
    # the llm-proxy holds this reply (bounded) until that one is stored, so that a contact's
    # replies go out in the conversation's order even when requests reach it out of order.
    previous_reply_key: str = ""


class ReplyRequested(Envelope):
    """The agent should answer these inbound messages; ``reply_key`` makes the answer happen once."""

    type: Literal["ReplyRequested"] = "ReplyRequested"
    payload: ReplyRequestedPayload


class LeadFacts(Payload):
    """Structured facts the LLM extracted alongside a reply."""

    need: str = ""
    budget: str = ""
    authority: str = ""
    timing: str = ""
    company: str = ""
    sector: str = ""
    name: str = ""
    stage_hint: str = ""
    language: str = ""
    intent: str = ""


class TokenUsage(Payload):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplySource(StrEnum):
    LLM = "llm"
    CACHE = "cache"
    FALLBACK = "fallback"


class ReplyGeneratedPayload(Payload):
    reply_key: str
    phone: str
    text: str
    reply_to_message_id: str = ""
    facts: LeadFacts = Field(default_factory=LeadFacts)
    model: str = ""
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_ms: float = 0.0
    source: ReplySource = ReplySource.LLM
    prompt_version: str = ""


class ReplyGenerated(Envelope):
    type: Literal["ReplyGenerated"] = "ReplyGenerated"
    payload: ReplyGeneratedPayload


class MessageSentPayload(Payload):
    reply_key: str
    phone: str
    provider_message_id: str
    text: str
    part: int = 1
    parts: int = 1
    via: str = ""
    reply_to_message_id: str = ""


class MessageSent(Envelope):
    """A reply (or one part of a long one) was accepted by WhatsApp or written to the outbox."""

    type: Literal["MessageSent"] = "MessageSent"
    payload: MessageSentPayload


class SendFailedPayload(Payload):
    reply_key: str
    phone: str
    reason: str
    code: int | None = None
    retryable: bool = False


class SendFailed(Envelope):
    type: Literal["SendFailed"] = "SendFailed"
    payload: SendFailedPayload
