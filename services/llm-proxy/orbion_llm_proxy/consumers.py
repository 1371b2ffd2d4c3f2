"""JetStream handlers of the llm-proxy: decode, check, decide, store, ack.

- ``ReplyRequested`` -> generate once per ``reply_key`` (the ``replies`` row is the claim: a
  redelivery finds it and neither calls OpenAI nor sends again) -> ``replies`` row +
  ``ReplyGenerated`` in one transaction; the sender (sender.py) delivers it. The row keeps the
  handler's trace context: the sender's span continues the message's trace from it.
- ``HumanVerificationRequested`` -> its question as a reply row (once per event id).
- ``LeadChanged`` -> the export queue for Google Sheets (latest version wins; sheets.py drains it).

Delivery policy (stated here, not left to defaults): durable pull consumers, ack after commit,
nak with growing delays (0.5 s, 2 s, 10 s, 30 s), dead-lettered after ``max_deliver`` tries.
Replies get a long ack wait because an OpenAI call (with our retries) may take a while; the
handler also heartbeats (``in_progress``) between retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from orbion_common.bus import ConsumerSpec, Delivery
from orbion_common.events import (
    Event,
    HumanVerificationRequested,
    LeadChanged,
    ReplyGenerated,
    ReplyRequested,
    stable_event_id,
)
from orbion_common.events.messaging import ReplyGeneratedPayload
from orbion_common.eventstore import EventStore
from orbion_common.logging import mask_phone
from orbion_common.telemetry import inject_context

from . import store
from .domain import split_text
from .openai_client import Responder

log = logging.getLogger(__name__)

NAK_DELAYS = (0.5, 2.0, 10.0, 30.0)


def consumer_specs(
    prefix: str = "llm-proxy", max_deliver: int = 5, *, deliver_new_only: bool = False
) -> dict[str, ConsumerSpec]:
    def spec(name: str, event_type: str, **kw: Any) -> ConsumerSpec:
        return ConsumerSpec(
            durable=f"{prefix}-{name}", event_types=(event_type,), max_deliver=max_deliver,
            nak_delays=NAK_DELAYS, deliver_new_only=deliver_new_only, **kw,
        )  # fmt: skip

    return {
        "replies": spec("replies", "ReplyRequested", ack_wait_seconds=15.0, batch_size=128),
        "verification": spec("verification", "HumanVerificationRequested"),
        "exports": spec("sheets", "LeadChanged", batch_size=256),
    }


@dataclass
class Handlers:
    pool: asyncpg.Pool
    events: EventStore
    responder: Responder
    on_reply_stored: Callable[[], None] = lambda: None  # wake the sender and the relay
    on_export_queued: Callable[[], None] = lambda: None

    async def answer_reply_request(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, ReplyRequested):
            return
        req = event.payload
        async with self.pool.acquire() as conn:
            if await store.get_reply(conn, req.reply_key) is not None:
                return  # generated before (redelivery, or a duplicate request): the sender owns it
        heartbeat = delivery.in_progress if delivery is not None else None
        generated = await self.responder.generate(req, heartbeat=heartbeat)
        reply_event = ReplyGenerated.create(
            event.stream_id,
            ReplyGeneratedPayload(
                reply_key=req.reply_key,
                phone=req.phone,
                text=generated.text,
                reply_to_message_id=req.reply_to_message_id,
                facts=generated.facts,
                model=generated.model,
                usage=generated.usage,
                latency_ms=generated.latency_ms,
                source=generated.source,
                prompt_version=generated.prompt_version,
            ),
            cause=event,
            event_id=stable_event_id("ReplyGenerated", req.reply_key),
        )
        async with self.pool.acquire() as conn, conn.transaction():
            # The row is the claim: a concurrent twin (another replica) loses here and stores nothing.
            if not await store.insert_reply(
                conn,
                reply_key=req.reply_key,
                phone=event.stream_id,  # the contract: stream_id is the contact's phone
                kind="reply",
                text=generated.text,
                parts=split_text(generated.text),
                reply_to_message_id=req.reply_to_message_id,
                source=generated.source.value,
                correlation_id=reply_event.correlation_id,
                causation_id=reply_event.event_id,
                trace_context=inject_context({}),
                requested_at=event.occurred_at,  # the contact's send order (docs/llm-proxy.md)
                previous_reply_key=req.previous_reply_key,
            ):
                return
            await self.events.append(conn, event.stream_id, [reply_event])
        log.info(
            "reply generated for %s (%s)",
            mask_phone(req.phone),
            generated.source.value,
            extra={"reply_key": req.reply_key, "latency_ms": generated.latency_ms},
        )
        self.on_reply_stored()

    async def ask_human_verification(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, HumanVerificationRequested) or not event.payload.question.strip():
            return
        question = event.payload.question.strip()
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await store.insert_reply(
                conn,
                reply_key=f"verification:{event.event_id}",
                phone=event.stream_id,
                kind="verification",
                text=question,
                parts=split_text(question),
                reply_to_message_id="",
                source="verification",
                correlation_id=event.correlation_id or event.event_id,
                causation_id=event.event_id,
                trace_context=inject_context({}),
                requested_at=event.occurred_at,
            )
        if stored:
            self.on_reply_stored()

    async def queue_lead_export(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, LeadChanged):
            return
        snap = event.payload.snapshot
        async with self.pool.acquire() as conn:
            queued = await store.queue_export(
                conn,
                phone=snap.phone or event.stream_id,
                lead_version=snap.version,
                snapshot=snap.model_dump(mode="json"),
                correlation_id=event.correlation_id or event.event_id,
                causation_id=event.event_id,
            )
        if queued:
            self.on_export_queued()
