"""Event builders for the conversation tests (unique phones and ids per test)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from orbion_common.events import (
    ContactBlocked,
    HumanVerificationFailed,
    HumanVerificationPassed,
    HumanVerificationRequested,
    LeadOptedOut,
    MessageReceived,
    MessageSent,
    MessageStatusChanged,
    ReplyGenerated,
    SendFailed,
    stable_event_id,
)
from orbion_common.events.lead import ContactBlockedPayload, HumanVerificationPayload, LeadOptedOutPayload
from orbion_common.events.messaging import (
    DeliveryStatus,
    MessageKind,
    MessageReceivedPayload,
    MessageSentPayload,
    MessageStatusChangedPayload,
    Provider,
    ReplyGeneratedPayload,
    SendFailedPayload,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def new_phone() -> str:
    return "55" + "".join(random.choice("0123456789") for _ in range(11))


def inbound(
    phone: str,
    mid: str,
    text: str = "Olá",
    *,
    seconds: float = 0,
    kind: MessageKind = MessageKind.TEXT,
    **kw: object,
) -> MessageReceived:
    payload = MessageReceivedPayload(
        provider=Provider.CLOUD_API,
        provider_message_id=mid,
        phone=phone,
        kind=kind,
        text=text,
        sent_at=T0 + timedelta(seconds=seconds),
        profile_name="Ana",
        **kw,
    )
    # The gateway's id is stable per provider message id, so a webhook retried later dedupes.
    return MessageReceived.create(phone, payload, event_id=stable_event_id("MessageReceived", mid))


def status(phone: str, mid: str, st: DeliveryStatus, *, seconds: float = 0) -> MessageStatusChanged:
    payload = MessageStatusChangedPayload(
        provider=Provider.CLOUD_API,
        provider_message_id=mid,
        phone=phone,
        status=st,
        changed_at=T0 + timedelta(seconds=seconds),
    )
    return MessageStatusChanged.create(phone, payload)


def generated(phone: str, reply_key: str, text: str, *, seconds: float = 1) -> ReplyGenerated:
    payload = ReplyGeneratedPayload(reply_key=reply_key, phone=phone, text=text)
    return ReplyGenerated.create(phone, payload, occurred_at=T0 + timedelta(seconds=seconds))


def sent(
    phone: str, reply_key: str, pmid: str, text: str, *, seconds: float = 2, part: int = 1, parts: int = 1
) -> MessageSent:
    payload = MessageSentPayload(
        reply_key=reply_key, phone=phone, provider_message_id=pmid, text=text, part=part, parts=parts
    )
    return MessageSent.create(phone, payload, occurred_at=T0 + timedelta(seconds=seconds))


def failed(phone: str, reply_key: str, *, seconds: float = 2) -> SendFailed:
    payload = SendFailedPayload(reply_key=reply_key, phone=phone, reason="whatsapp down", retryable=True)
    return SendFailed.create(phone, payload, occurred_at=T0 + timedelta(seconds=seconds))


def opted_out(phone: str) -> LeadOptedOut:
    return LeadOptedOut.create(phone, LeadOptedOutPayload(phone=phone, word="stop"))


# The lead service's human verification. Like the lead's own decisions, a verdict is caused
# by the inbound message it judged (``causation_id`` = that message's event id).


def verification_requested(phone: str) -> HumanVerificationRequested:
    payload = HumanVerificationPayload(
        phone=phone, reason="pattern:auto_reply", question="Você é humano? SIM"
    )
    return HumanVerificationRequested.create(phone, payload)


def verification_passed(phone: str, answer: MessageReceived) -> HumanVerificationPassed:
    payload = HumanVerificationPayload(phone=phone, reason="answered")
    return HumanVerificationPassed.create(phone, payload, cause=answer)


def verification_failed(phone: str, answer: MessageReceived, attempt: int = 1) -> HumanVerificationFailed:
    payload = HumanVerificationPayload(phone=phone, attempt=attempt, reason="wrong_answer")
    return HumanVerificationFailed.create(phone, payload, cause=answer)


def blocked(phone: str, cause: MessageReceived | None = None) -> ContactBlocked:
    payload = ContactBlockedPayload(phone=phone, reasons=["verification_failed"])
    return ContactBlocked.create(phone, payload, cause=cause)


@contextlib.contextmanager
def in_trace(trace_id: int) -> Iterator[None]:
    """Run inside a sampled trace ``trace_id`` (as a bus handler runs in its message's trace)."""
    span = NonRecordingSpan(SpanContext(trace_id, trace_id + 1, False, TraceFlags(TraceFlags.SAMPLED)))
    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)
