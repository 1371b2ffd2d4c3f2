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

Group commit (groupcommit.py): the handlers of one bus batch run concurrently; their "already
stored?" checks are one query, and their reply rows and ``ReplyGenerated`` events are written
together, one transaction of three statements for the whole batch (rows, stream versions,
events). Each handler returns, and the bus acks, only after its batch committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from orbion_common.bus import ConsumerSpec, Delivery
from orbion_common.events import (
    Envelope,
    Event,
    HumanVerificationRequested,
    LeadChanged,
    ReplyGenerated,
    ReplyRequested,
    stable_event_id,
)
from orbion_common.events.messaging import ReplyGeneratedPayload
from orbion_common.eventstore import EventStore, trace_context
from orbion_common.logging import mask_phone
from orbion_common.telemetry import inject_context

from . import store
from .domain import split_text
from .groupcommit import GroupCommit
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


@dataclass(frozen=True)
class _Store:
    """A reply row to store, with its ``ReplyGenerated`` (None: a verification question) and the
    trace context the event is appended in (the handler's, captured before the batch)."""

    reply: store.NewReply
    event: ReplyGenerated | None = None
    trace: str | None = None


@dataclass
class Handlers:
    pool: asyncpg.Pool
    events: EventStore
    responder: Responder
    on_reply_stored: Callable[[str], None] = lambda phone: None  # hand it to the sender
    # Events just committed (with the trace context each was stored in), for the relay.
    on_appended: Callable[[Sequence[Envelope], Sequence[str | None]], None] = lambda events, traces: None
    on_export_queued: Callable[[], None] = lambda: None
    _lookups: GroupCommit[str, bool] = field(init=False, repr=False)
    _writes: GroupCommit[_Store, bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._lookups = GroupCommit(self.pool, self._stored, name="reply-lookups", transaction=False)
        self._writes = GroupCommit(self.pool, self._store, name="replies", transaction=False)

    async def answer_reply_request(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, ReplyRequested):
            return
        req = event.payload
        # A request's event id is made from its reply key, and JetStream drops a copy published
        # again within its duplicate window: a first delivery was answered by no one before, and
        # only a redelivery (or a call from no delivery) is looked up, a statement less per reply.
        # A copy beyond the window costs one LLM call, never a second send: the row is the claim.
        first = delivery is not None and delivery.num_delivered == 1
        if not first and await self._lookups.submit(req.reply_key):
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
        reply = store.NewReply(
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
        )
        # The row is the claim: a concurrent twin (another replica) loses here and stores nothing.
        trace = trace_context()
        if not await self._writes.submit(_Store(reply, reply_event, trace)):
            return
        self.on_appended([reply_event], [trace])
        log.info(
            "reply generated for %s (%s)",
            mask_phone(req.phone),
            generated.source.value,
            extra={"reply_key": req.reply_key, "latency_ms": generated.latency_ms},
        )
        self.on_reply_stored(reply.phone)

    async def ask_human_verification(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, HumanVerificationRequested) or not event.payload.question.strip():
            return
        question = event.payload.question.strip()
        reply = store.NewReply(
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
        if await self._writes.submit(_Store(reply)):
            self.on_reply_stored(reply.phone)

    async def _stored(self, conn: asyncpg.Connection, reply_keys: list[str]) -> list[bool]:
        stored = await store.stored_reply_keys(conn, reply_keys)
        return [key in stored for key in reply_keys]

    async def _store(self, conn: asyncpg.Connection, batch: list[_Store]) -> list[bool]:
        """Rows, and the events of the rows stored now, each after its stream's current version
        (in batch order within a stream), in one statement. A version another writer took
        meanwhile (the sender's ``MessageSent``) raises ``ConcurrencyError``: the batch is run
        again item by item."""
        # By stream, as every batch writer orders them, so that row locks cannot deadlock.
        generated = sorted(
            ((s.reply.reply_key, s.event, s.trace) for s in batch if s.event is not None),
            key=lambda item: item[1].stream_id,
        )
        fresh = await store.insert_replies(
            conn, [s.reply for s in batch], events=self.events, generated=generated
        )
        return [s.reply.reply_key in fresh for s in batch]

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
