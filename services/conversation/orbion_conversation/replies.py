"""Reply requests: deciding, waiting out the quiet period, and appending ``ReplyRequested``.

Owns the ``pending_replies`` work queue and the scheduler that empties it. A message that
deserves an answer either asks at once (quiet period 0) or joins the contact's pending
burst, written in the inbound message's transaction. The scheduler claims due bursts
(``FOR UPDATE SKIP LOCKED``: replicas never emit the same one), appends one ``ReplyRequested``
per burst and deletes the row in one transaction; the relay publishes it. A crash anywhere
leaves either the row (emitted later) or the event (published later), never both or neither.

Lock order, to avoid deadlocks between the consumer and the scheduler: the pending row
first, then the contact's event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from orbion_common.events import MessageReceived, ReplyRequested, utcnow
from orbion_common.eventstore import ConcurrencyError, EventStore, StoredEvent
from orbion_common.logging import mask_phone

from . import domain, projector, store
from .domain import ContactSummary, MessageItem
from .history import History
from .store import PendingRow, Projection

log = logging.getLogger(__name__)

PENDING = Gauge("orbion_conversation_pending_replies", "Replies waiting for their quiet period")
EMIT_LAG = Histogram(
    "orbion_conversation_reply_emit_lag_seconds",
    "Time from a burst's due time (end of its quiet period) to its ReplyRequested",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECISIONS = Counter(
    "orbion_conversation_reply_decisions_total",
    "What happened to inbound messages: scheduled, requested, cancelled, or skipped with a reason",
    ["outcome"],
)


@dataclass
class ReplyContext:
    store: EventStore
    projection: Projection
    history: History
    quiet_seconds: float
    opt_in_rule: str = "keyword"


async def lock_pending(conn: asyncpg.Connection, phone: str) -> PendingRow | None:
    """Take the contact's pending row first (see the lock order above)."""
    return await store.load_pending(conn, phone)


async def on_inbound(
    conn: asyncpg.Connection,
    ctx: ReplyContext,
    event: MessageReceived,
    applied: projector.Applied,
    pending: PendingRow | None,
) -> str:
    """Decide about a newly projected inbound message; returns the outcome (for logs and tests)."""
    item = applied.new_message
    if item is None:
        return "duplicate"
    phone = event.stream_id
    if domain.cancels_pending_reply(event.payload):
        if pending is not None:
            await store.delete_pending(conn, phone)
        DECISIONS.labels("cancelled").inc()
        return "cancelled"
    reason = domain.skip_reason(event.payload, applied.summary.state, event.event_id)
    if reason is not None:
        DECISIONS.labels(f"skipped:{reason.split(':')[0]}").inc()
        return f"skipped:{reason}"
    correlation = event.correlation_id or event.event_id
    if ctx.quiet_seconds <= 0:
        ids = (*pending.reply.inbound_ids, item.key) if pending is not None else (item.key,)
        stored = await emit(conn, ctx, phone, ids, correlation, event.event_id)
        if pending is not None:
            await store.delete_pending(conn, phone)
        DECISIONS.labels("requested").inc()
        return "requested" if stored is not None else "silenced"
    burst = domain.extend_burst(
        pending.reply if pending is not None else None,
        phone,
        item.key,
        utcnow(),
        timedelta(seconds=ctx.quiet_seconds),
    )
    await store.save_pending(conn, PendingRow(burst, correlation, event.event_id))
    DECISIONS.labels("scheduled").inc()
    return "scheduled"


async def emit(
    conn: asyncpg.Connection,
    ctx: ReplyContext,
    phone: str,
    inbound_ids: Sequence[str],
    correlation_id: str,
    causation_id: str,
) -> StoredEvent | None:
    """Append (and project) one ReplyRequested for ``inbound_ids``; None when nothing to ask."""
    # The stream version BEFORE the contact: an event committed after this read (the lead's
    # HumanVerificationRequested, an opt-out) either shows in the contact read below or makes
    # the append at this version conflict. Read the other way round, a request could be
    # appended on top of a verification the decision never saw.
    version = await ctx.store.stream_version(conn, phone)
    summary = await ctx.projection.load_contact(conn, phone) or ContactSummary(phone=phone)
    if summary.state.silenced:  # opted out, blocked, handed off or asked to prove it is human
        return None
    burst = await ctx.projection.messages_by_keys(conn, inbound_ids)
    if not burst:
        return None
    payload = domain.build_reply_request(
        phone,
        burst,
        await _recent(conn, ctx, phone),
        profile_name=summary.profile_name,
        lead_stage=summary.lead_stage,
        language=summary.language,
        quiet_period_ms=int(ctx.quiet_seconds * 1000),
    )
    # The contact's previous request: the llm-proxy sends this reply only after that one, so
    # replies keep the order of the bursts even when a redelivery brings them back out of it.
    previous = await ctx.store.last_of_type(conn, phone, "ReplyRequested")
    if previous is not None:
        payload = payload.model_copy(update={"previous_reply_key": previous.event.payload.reply_key})
    event = ReplyRequested(
        event_id=domain.reply_requested_event_id(payload.reply_key),
        stream_id=phone,
        correlation_id=correlation_id,
        causation_id=causation_id,
        payload=payload,
    )
    stored = await ctx.store.append(conn, phone, [event], expected_version=version)
    for s in stored:
        await projector.apply(conn, ctx.projection, s, ctx.opt_in_rule)
    return stored[0] if stored else None


async def _recent(conn: asyncpg.Connection, ctx: ReplyContext, phone: str) -> list[MessageItem]:
    cached = await ctx.history.cache.peek(phone)
    if cached is not None:
        return cached.value
    return await ctx.projection.recent_messages(conn, phone, ctx.history.size)


class ReplyScheduler:
    """Emits due bursts; woken by the consumer after it saved one, else polls for other replicas'."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ctx: ReplyContext,
        *,
        on_emitted: Callable[[], None] = lambda: None,
        poll_seconds: float = 0.25,
        batch_size: int = 50,
        concurrency: int = 4,
    ) -> None:
        self.pool = pool
        self.ctx = ctx
        self.on_emitted = on_emitted
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.concurrency = concurrency
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def emit_due(self, now: datetime | None = None) -> int:
        """Emit every burst due at ``now`` (up to ``batch_size``); returns how many ReplyRequested
        were appended.

        One short transaction per burst, a few at a time. A single transaction over the whole
        round held every claimed pending row (the consumer's next message of those contacts,
        and with it its whole fetched batch, waited) and an open xid that kept every relay of
        the database from publishing past it, for as long as the round took: seconds under load.
        """
        now = now or utcnow()
        async with self.pool.acquire() as conn:
            # Outside a transaction: only a list of candidates; rows another replica is
            # emitting right now are skipped. Each one is locked again and re-read below.
            candidates = await store.claim_due(conn, now, self.batch_size)
        limit = asyncio.Semaphore(max(1, self.concurrency))

        async def one(phone: str) -> bool:
            async with limit:
                return await self._emit_one(phone, now)

        emitted = sum(await asyncio.gather(*(one(row.reply.phone) for row in candidates)))
        return emitted

    async def _emit_one(self, phone: str, now: datetime) -> bool:
        """Emit the contact's burst if it is still due; True when a ReplyRequested was appended."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await store.load_pending(conn, phone)  # lock order: the pending row first
                if row is None or row.reply.due_at > now:
                    return False  # emitted by another replica, or the contact wrote again meanwhile
                stored = await emit(
                    conn, self.ctx, phone, row.reply.inbound_ids, row.correlation_id, row.causation_id
                )
                await store.delete_pending(conn, phone)
        except ConcurrencyError:
            return False  # the contact's stream moved (a late inbound): rolled back, next round
        if stored is None:
            return False
        EMIT_LAG.observe(max(0.0, (utcnow() - row.reply.due_at).total_seconds()))
        log.info(
            "reply requested", extra={"phone": mask_phone(phone), "messages": len(row.reply.inbound_ids)}
        )
        self.on_emitted()  # per burst: the relay publishes each request as soon as it committed
        return True

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.emit_due()
                waiting, due = await store.pending_summary(self.pool)
                PENDING.set(waiting)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reply scheduler paused: %r", exc)
                due = None
            wait = self.poll_seconds
            if due is not None:
                wait = max(0.0, min(wait, (due - utcnow()).total_seconds()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
