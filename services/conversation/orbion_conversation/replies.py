"""Reply requests: deciding, waiting out the quiet period, and appending ``ReplyRequested``.

Owns the ``pending_replies`` work queue and the scheduler that empties it. A message that
deserves an answer either asks at once (quiet period 0) or joins the contact's pending
burst, written in the inbound message's transaction. The scheduler claims due bursts
(``FOR UPDATE SKIP LOCKED``: replicas never emit the same one), appends one ``ReplyRequested``
per burst and deletes the rows in one transaction per round; the relay publishes them. A crash
anywhere leaves either the row (emitted later) or the event (published later), never both or
neither.

Lock order, to avoid deadlocks between the consumer and the scheduler: the pending row
first, then the contact's event stream; several at once: pending rows in phone order, appends
in stream order. The consumer takes a contact's pending row (when there is one) before every
append to its stream, whatever the event, so it waits for a scheduler round that holds the row
instead of racing it for the stream's next version (a lost race makes the round redo each of
its bursts alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import asyncpg
from opentelemetry import context as otel_context
from prometheus_client import Counter, Gauge, Histogram

from orbion_common.events import MessageReceived, ReplyRequested, utcnow
from orbion_common.events.messaging import quiet_period_start
from orbion_common.eventstore import (
    ConcurrencyError,
    EventStore,
    StoredEvent,
    context_of,
    parse_trace_context,
)
from orbion_common.logging import mask_phone

from . import domain, projector, store
from .domain import ContactSummary, MessageItem
from .history import History
from .store import DueBurst, PendingRow, Projection

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


@dataclass(frozen=True)
class InboundDecision:
    """What a newly projected inbound message does about the contact's reply (no I/O yet)."""

    outcome: str  # duplicate, cancelled, skipped:<reason>, scheduled, or requested (quiet period 0)
    metric: str | None = None  # the DECISIONS label
    save: PendingRow | None = None  # the contact's burst with this message: upsert it
    delete: bool = False  # the contact's waiting reply goes
    ask: tuple[str, ...] = ()  # quiet period 0: ask a reply for these inbound ids now


def decide_inbound(
    ctx: ReplyContext,
    event: MessageReceived,
    applied: projector.Applied,
    pending: PendingRow | None,
    now: datetime,
) -> InboundDecision:
    """Decide about a newly projected inbound message, given the contact's locked pending row."""
    item = applied.new_message
    if item is None:
        return InboundDecision("duplicate")
    if domain.cancels_pending_reply(event.payload):
        return InboundDecision("cancelled", "cancelled", delete=pending is not None)
    reason = domain.skip_reason(event.payload, applied.summary.state, event.event_id)
    if reason is not None:
        return InboundDecision(f"skipped:{reason}", f"skipped:{reason.split(':')[0]}")
    if ctx.quiet_seconds <= 0:
        ids = (*pending.reply.inbound_ids, item.key) if pending is not None else (item.key,)
        return InboundDecision("requested", "requested", delete=pending is not None, ask=ids)
    burst = domain.extend_burst(
        pending.reply if pending is not None else None,
        event.stream_id,
        item.key,
        quiet_period_start(event.occurred_at, now),
        timedelta(seconds=ctx.quiet_seconds),
    )
    correlation = event.correlation_id or event.event_id
    return InboundDecision("scheduled", "scheduled", save=PendingRow(burst, correlation, event.event_id))


async def on_inbound(
    conn: asyncpg.Connection,
    ctx: ReplyContext,
    event: MessageReceived,
    applied: projector.Applied,
    pending: PendingRow | None,
) -> str:
    """Decide about a newly projected inbound message and act on it; returns the outcome."""
    decision = decide_inbound(ctx, event, applied, pending, utcnow())
    outcome = await ask(conn, ctx, event, decision.ask) if decision.ask else decision.outcome
    if decision.delete:
        await store.delete_pending(conn, event.stream_id)
    if decision.save is not None:
        await store.save_pending(conn, decision.save)
    if decision.metric is not None:
        DECISIONS.labels(decision.metric).inc()
    return outcome


async def ask(conn: asyncpg.Connection, ctx: ReplyContext, event: MessageReceived, ids: Sequence[str]) -> str:
    """Quiet period 0: the ReplyRequested for ``ids`` in the inbound message's transaction."""
    correlation = event.correlation_id or event.event_id
    stored = await emit(conn, ctx, event.stream_id, ids, correlation, event.event_id)
    return "requested" if stored is not None else "silenced"


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
    previous = await ctx.store.last_of_type(conn, phone, "ReplyRequested")
    event = _reply_requested(
        ctx,
        summary,
        burst,
        await _recent(conn, ctx, phone),
        previous.event.payload.reply_key if previous and isinstance(previous.event, ReplyRequested) else "",
        correlation_id,
        causation_id,
    )
    # No savepoint: every caller's transaction ends on a conflict.
    stored = await ctx.store.append(conn, phone, [event], expected_version=version, savepoint=False)
    for s in stored:
        await projector.apply(conn, ctx.projection, s, ctx.opt_in_rule)
    return stored[0] if stored else None


def _reply_requested(
    ctx: ReplyContext,
    summary: ContactSummary,
    burst: Sequence[MessageItem],
    recent: Sequence[MessageItem],
    previous_reply_key: str,
    correlation_id: str,
    causation_id: str,
) -> ReplyRequested:
    payload = domain.build_reply_request(
        summary.phone,
        burst,
        recent,
        profile_name=summary.profile_name,
        lead_stage=summary.lead_stage,
        language=summary.language,
        quiet_period_ms=int(ctx.quiet_seconds * 1000),
    )
    # The contact's previous request: the llm-proxy sends this reply only after that one, so
    # replies keep the order of the bursts even when a redelivery brings them back out of it.
    if previous_reply_key:
        payload = payload.model_copy(update={"previous_reply_key": previous_reply_key})
    return ReplyRequested(
        event_id=domain.reply_requested_event_id(payload.reply_key),
        stream_id=summary.phone,
        correlation_id=correlation_id,
        causation_id=causation_id,
        payload=payload,
    )


async def _recent(conn: asyncpg.Connection, ctx: ReplyContext, phone: str) -> list[MessageItem]:
    cached = await ctx.history.cache.peek(phone)
    if cached is not None:
        return cached.value
    return await ctx.projection.recent_messages(conn, phone, ctx.history.size)


async def emit_many(
    conn: asyncpg.Connection, ctx: ReplyContext, rows: Sequence[DueBurst]
) -> list[StoredEvent]:
    """:func:`emit` for many contacts' bursts in a few statements: ``rows`` as
    :func:`store.take_due` took them, with their contacts, burst messages, streams' versions
    (read in the same snapshot as the contacts, for the reason given in emit()) and previous
    requests.

    Raises ConcurrencyError when one of the streams moved on since its version was read: the
    caller rolls back and decides each burst alone.
    """
    contacts = {r.reply.phone: r.contact or ContactSummary(phone=r.reply.phone) for r in rows}
    asking = sorted(
        (r for r in rows if r.burst and not contacts[r.reply.phone].state.silenced),
        key=lambda r: r.reply.phone,
    )
    if not asking:
        return []
    phones = [r.reply.phone for r in asking]
    recent = {p: c.value for p, c in (await ctx.history.cache.peek_many(phones)).items()}
    missing = [p for p in phones if p not in recent]
    if missing:
        snapshots = await ctx.projection.history_snapshots(conn, missing, ctx.history.size)
        recent.update({p: snapshots[p][1] if p in snapshots else [] for p in missing})
    events = [
        _reply_requested(
            ctx,
            contacts[r.reply.phone],
            r.burst,
            recent[r.reply.phone],
            r.previous_reply_key,
            r.correlation_id,
            r.causation_id,
        )
        for r in asking
    ]
    at = [r.stream_version + 1 for r in asking]
    # Each request in the trace of its burst's last message, not in the scheduler's (none).
    traces = [r.trace_context for r in asking]
    touched = {e.stream_id: contacts[e.stream_id] for e in events}
    for e, v in zip(events, at, strict=True):
        touched[e.stream_id] = projector.contact_after(touched[e.stream_id], e, v, ctx.opt_in_rule)
    # One statement, no savepoint: a conflict ends the round's transaction (each burst is then
    # decided alone).
    positions = await ctx.projection.append_and_save_contacts(
        conn, ctx.store, list(zip(events, at, strict=True)), traces, list(touched.values())
    )
    return [
        StoredEvent(p, v, e, trace_context=parse_trace_context(t))
        for e, v, p, t in zip(events, at, positions, traces, strict=True)
    ]


def next_round_in(
    due_in: float | None, *, last_took: float, last_emitted: int, round_seconds: float, poll_seconds: float
) -> float:
    """Seconds from the end of a round (it took ``last_took`` and emitted ``last_emitted``
    bursts) to the next one: when the earliest burst is due (``due_in``; None: none waiting,
    poll), but while bursts keep coming due, rounds start some spacing apart, start to start.

    Bursts that come due faster than rounds run pile up between rounds: after a round that took
    several, the spacing is ``round_seconds``, so that each round takes many bursts in its few
    statements. After a round of one burst or none, waiting bought nothing, and the spacing is
    only twice the round's duration: a burst is then emitted within a few milliseconds of its
    due time instead of up to ``round_seconds`` later."""
    if due_in is None:
        return poll_seconds
    spacing = round_seconds if last_emitted > 1 else min(round_seconds, 2 * last_took)
    return min(poll_seconds, max(due_in, spacing - last_took, 0.0))


@dataclass(frozen=True)
class Round:
    emitted: int  # ReplyRequested appended
    waiting: int  # bursts still in the queue
    next_due: datetime | None  # the earliest due time among them


class ReplyScheduler:
    """Emits due bursts; sleeps until the earliest is due (polling for other replicas'), woken by
    the consumer when it saved one while none was waiting."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ctx: ReplyContext,
        *,
        on_emitted: Callable[[Sequence[StoredEvent]], object] = lambda stored: None,
        poll_seconds: float = 0.25,
        batch_size: int = 200,
        concurrency: int = 4,
        round_seconds: float = 0.02,
    ) -> None:
        self.pool = pool
        self.ctx = ctx
        self.on_emitted = on_emitted
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.round_seconds = round_seconds
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def emit_due(self, now: datetime | None = None) -> int:
        """Emit every burst due at ``now`` (up to ``batch_size``); returns how many ReplyRequested
        were appended."""
        return (await self._round(now or utcnow())).emitted

    async def _round(self, now: datetime) -> Round:
        """One short transaction of a few statements for the whole round: take the due rows out
        of the queue (``SKIP LOCKED``: another replica's are left to it), decide, append and
        project them all at once. If that fails (a contact's stream moved meanwhile: a late
        inbound, a lead event), the rows are back and each burst is decided again alone, in a
        transaction of its own.
        """
        taken = store.DueRound([], 0, None)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # Lock order: pending rows first.
                taken = await store.take_due(conn, self.ctx.projection, now, self.batch_size)
                if not taken.rows:
                    return Round(0, taken.waiting, taken.next_due)
                stored = await emit_many(conn, self.ctx, taken.rows)
        except (ConcurrencyError, asyncpg.PostgresError) as exc:
            if not taken.rows:
                raise
            log.info("reply round of %d failed (%r); deciding each burst alone", len(taken.rows), exc)
            emitted = await self._emit_each([r.reply.phone for r in taken.rows], now)
            # Bursts left over (their stream moved again) are due already: the next round soon.
            return Round(emitted, taken.waiting + len(taken.rows) - emitted, now)
        by_phone = {r.reply.phone: r for r in taken.rows}
        for s in stored:
            self._emitted(by_phone[s.event.stream_id])
        if stored:
            self.on_emitted(stored)
        return Round(len(stored), taken.waiting, taken.next_due)

    async def _emit_each(self, phones: Sequence[str], now: datetime) -> int:
        limit = asyncio.Semaphore(max(1, self.concurrency))

        async def one(phone: str) -> bool:
            async with limit:
                return await self._emit_one(phone, now)

        return sum(await asyncio.gather(*(one(phone) for phone in phones)))

    @staticmethod
    def _emitted(row: PendingRow) -> None:
        EMIT_LAG.observe(max(0.0, (utcnow() - row.reply.due_at).total_seconds()))
        log.info(
            "reply requested",
            extra={"phone": mask_phone(row.reply.phone), "messages": len(row.reply.inbound_ids)},
        )

    async def _emit_one(self, phone: str, now: datetime) -> bool:
        """Emit the contact's burst if it is still due; True when a ReplyRequested was appended."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await store.load_pending(conn, phone)  # lock order: the pending row first
                if row is None or row.reply.due_at > now:
                    return False  # emitted by another replica, or the contact wrote again meanwhile
                trace = await self.ctx.store.trace_context_of(conn, row.causation_id)
                joined = otel_context.attach(context_of(trace))  # the trace of the burst's last message
                try:
                    stored = await emit(
                        conn, self.ctx, phone, row.reply.inbound_ids, row.correlation_id, row.causation_id
                    )
                finally:
                    otel_context.detach(joined)
                await store.delete_pending(conn, phone)
        except ConcurrencyError:
            return False  # the contact's stream moved (a late inbound): rolled back, next round
        if stored is None:
            return False
        self._emitted(row)
        # Per burst, in the trace it was appended in: the relay publishes it as soon as it committed.
        self.on_emitted([replace(stored, trace_context=parse_trace_context(trace))])
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                done = await self._round(utcnow())
                PENDING.set(done.waiting)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reply scheduler paused: %r", exc)
                done = Round(0, 0, None)
            if done.emitted >= self.batch_size:
                continue  # a backlog: the next round at once
            wait = next_round_in(
                None if done.next_due is None else (done.next_due - utcnow()).total_seconds(),
                last_took=loop.time() - started,
                last_emitted=done.emitted,
                round_seconds=self.round_seconds,
                poll_seconds=self.poll_seconds,
            )
            # The consumer's wake-up says a burst was saved, due a quiet period from now: it
            # matters only when none was waiting (a known due time is always the earlier one).
            woken = self._wake if done.next_due is None else self._stopping
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=wait)
            self._wake.clear()
