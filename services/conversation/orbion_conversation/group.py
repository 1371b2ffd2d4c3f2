"""Group commit of the consumer: the events of one fetched bus batch in one transaction.

The bus runs a batch's events concurrently, one contact's one after the other. Each handler
call hands its event to :class:`GroupCommit` and waits; the events gathered meanwhile (oldest
first, at most one per contact, so a contact's order holds) are recorded in ONE transaction
of a few set-based statements, whatever their number (a single event too): one statement
locks the pending rows of their contacts (phone order: two groups never deadlock), the next
appends the events not stored yet at their streams' next versions and reads the projection
rows they refer to; they are projected with ``BatchProjection`` (the rebuild's in-memory projector,
tested to match the live SQL) and the replies decided; then the messages are written, the
pending rows upserted or deleted, and one statement saves the contacts and reads every history
snapshot. After the commit: the cache writes in one pipeline, then each call returns, so the
bus acks each event only after the commit. A crash at any line before the commit leaves
nothing (every event is redelivered); after it, the redeliveries are in our log already and
change nothing.

A group that failed (another replica appended to one of its streams; a bad event; a Postgres
error) goes through the one-event path (``consumers.record_event``),
each event alone: one bad event only fails itself, and the bus naks it.

Each event keeps its trace: its append stores the trace context of its own handler call, and
the work done for it alone (a quiet-period-0 ReplyRequested, the one-event path) runs in that
call's context. The group's shared statements are traced under the call that opened the group.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import Counter, Histogram

from orbion_common.bus import Delivery
from orbion_common.events import Event, MessageReceived, utcnow
from orbion_common.eventstore import StoredEvent, trace_context

from . import consumers, projector, replies, store
from .batch import BatchProjection
from .consumers import CONSUMED_TYPES, Deps
from .domain import ContactSummary, MessageItem
from .replies import InboundDecision
from .store import PendingRow

log = logging.getLogger(__name__)

GROUP_SIZE = Histogram(
    "orbion_conversation_commit_group_size",
    "Events recorded per transaction by the consumer (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
GROUP_RETRIES = Counter(
    "orbion_conversation_group_retries_total", "Groups recorded again event by event after a failure"
)


@dataclass(eq=False)
class _Work:
    event: Event
    done: asyncio.Future[str] = field(repr=False)
    # The handler call's context (its consumer span): the event's own trace.
    context: contextvars.Context = field(default_factory=contextvars.copy_context, repr=False)


@dataclass
class _Recorded:
    outcomes: dict[int, str]  # by id(work)
    decisions: dict[int, InboundDecision]  # of the inbound messages, by id(work)
    snapshots: dict[str, tuple[int, list[MessageItem]]]


class GroupCommit:
    """``commit_interval``: under load, a group starts at most this long after the previous one
    started (after a quiet spell, at once), so that the events arriving meanwhile share its
    transaction; 0 starts each group as soon as the previous one ended. Never more than a tenth
    of the quiet period: the inbound messages' wait is then hidden in it, and with no quiet
    period (each reply requested in its message's transaction) there is none."""

    def __init__(self, deps: Deps, *, max_group: int = 256, commit_interval: float = 0.0) -> None:
        self.deps = deps
        self.max_group = max_group
        self.commit_interval = min(commit_interval, deps.ctx.quiet_seconds / 10)
        self._pending: list[_Work] = []
        self._flusher: asyncio.Task[None] | None = None
        self._last_start = -math.inf

    async def handle(self, event: Event, delivery: Delivery) -> None:
        """The bus handler: returns after the event's transaction committed."""
        await self.record(event)

    async def record(self, event: Event) -> str:
        """Record ``event`` with the others arriving meanwhile; returns its outcome (as
        ``consumers.record_event``). Raises to get the event redelivered."""
        if event.type not in CONSUMED_TYPES:
            return "ignored"  # a server older than NATS 2.10 delivers every type
        work = _Work(event, asyncio.get_running_loop().create_future())
        self._pending.append(work)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="conversation-group-commit")
        return await work.done

    async def _flush(self) -> None:
        # The other handlers of the same bus batch start in this loop turn: let them join.
        await asyncio.sleep(0)
        while self._pending:
            await self._pace()
            group = self._take()
            try:
                await self._run(group)
            except BaseException as exc:  # a bug (or a cancel) must not leave callers waiting for ever
                log.exception("conversation group commit failed on %d events", len(group))
                for work in group:
                    if not work.done.done():
                        # An error, not the cancel itself: the bus naks the event and goes on.
                        work.done.set_exception(RuntimeError(f"group commit interrupted: {exc!r}"))
                if not isinstance(exc, Exception):
                    raise

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_start + self.commit_interval - loop.time()
        if wait > 0 and len(self._pending) < self.max_group:
            await asyncio.sleep(wait)
        self._last_start = loop.time()

    def _take(self) -> list[_Work]:
        """Oldest first, one event per contact (its next one waits for the next group)."""
        group: list[_Work] = []
        rest: list[_Work] = []
        phones: set[str] = set()
        for work in self._pending:
            if work.event.stream_id in phones or len(group) >= self.max_group:
                rest.append(work)
            else:
                phones.add(work.event.stream_id)
                group.append(work)
        self._pending = rest
        return group

    async def _run(self, group: list[_Work]) -> None:
        GROUP_SIZE.observe(len(group))
        try:
            recorded = await self._transact(group)
        except Exception as exc:
            GROUP_RETRIES.inc()
            log.info("conversation group of %d failed (%r); recording each event alone", len(group), exc)
            await self._each_alone(group)
            return
        for decision in recorded.decisions.values():
            if decision.metric is not None:
                replies.DECISIONS.labels(decision.metric).inc()
        # After the commit. A crash here means redeliveries, claimed already: "duplicate", and
        # they write the cache again (a stale version never replaces a newer one).
        await self.deps.ctx.history.write_through_many(recorded.snapshots)
        outcomes = set(recorded.outcomes.values())
        if "requested" in outcomes:
            self.deps.wake_relay()
        if "scheduled" in outcomes:
            self.deps.wake_scheduler()
        for work in group:
            if not work.done.done():  # its caller may have been cancelled meanwhile (shutdown)
                work.done.set_result(recorded.outcomes[id(work)])

    async def _each_alone(self, group: list[_Work]) -> None:
        async def alone(work: _Work) -> None:
            try:
                outcome = await consumers.record_event(self.deps, work.event)
            except Exception as exc:
                if not work.done.done():
                    work.done.set_exception(exc)
            else:
                if not work.done.done():
                    work.done.set_result(outcome)

        await asyncio.gather(*(asyncio.create_task(alone(w), context=w.context) for w in group))

    async def _transact(self, group: list[_Work]) -> _Recorded:
        deps, ctx = self.deps, self.deps.ctx
        outcomes = {id(w): "duplicate" for w in group}
        decisions: dict[int, InboundDecision] = {}
        phones = [w.event.stream_id for w in group]
        async with deps.pool.acquire() as conn, conn.transaction():
            # By stream: the order the scheduler appends in too, so their row locks never deadlock.
            ordered = sorted(group, key=lambda w: w.event.stream_id)
            projection = BatchProjection(ctx.projection.suffix)
            pending, stored = await self._lock_append_and_load(conn, ordered, projection)
            new = [w for w in ordered if w.event.event_id in stored]
            contacts: dict[str, ContactSummary] = {}
            now = utcnow()
            for work in new:
                applied = await projector.apply(
                    conn, projection, stored[work.event.event_id], ctx.opt_in_rule, contacts
                )
                outcomes[id(work)] = "projected"
                if isinstance(work.event, MessageReceived):
                    decision = replies.decide_inbound(
                        ctx, work.event, applied, pending.get(work.event.stream_id), now
                    )
                    decisions[id(work)] = decision
                    outcomes[id(work)] = decision.outcome
            asks = [(w, decisions[id(w)].ask) for w in new if id(w) in decisions and decisions[id(w)].ask]
            # A quiet-period-0 request reads the contact: saved before it, as the projection.
            await projection.flush(conn, contacts if asks else {})
            await store.delete_pending_many(
                conn, [w.event.stream_id for w in new if id(w) in decisions and decisions[id(w)].delete]
            )
            await store.save_pending_many(conn, [d.save for d in decisions.values() if d.save is not None])
            for work, ids in asks:  # quiet period 0: the request in this transaction, in the event's trace
                assert isinstance(work.event, MessageReceived)
                ask = replies.ask(conn, ctx, work.event, ids)
                outcomes[id(work)] = await asyncio.create_task(ask, context=work.context)
            if asks:
                snapshots = await ctx.projection.history_snapshots(conn, phones, ctx.history.size)
            else:
                snapshots = await ctx.projection.save_contacts_and_snapshots(
                    conn, list(contacts.values()), phones, ctx.history.size
                )
        return _Recorded(outcomes, decisions, snapshots)

    async def _lock_append_and_load(
        self, conn: asyncpg.Connection, group: list[_Work], projection: BatchProjection
    ) -> tuple[dict[str, PendingRow], dict[str, StoredEvent]]:
        """Two statements. The first locks the contacts' pending rows. The second appends the
        group's events not in our log yet (a redelivery, or a provider retry days later, is),
        each at its stream's next version, and reads the projection rows they refer to. Returns
        the pending rows by phone and the events appended by id.

        Lock order (replies.py): the pending rows first, then the streams. Of every contact,
        not only those with an inbound message: the scheduler appends to the streams whose rows
        it holds, and waiting for them here means never racing it. The append is a statement of
        its own because a statement reads the data as it was when it started: one that waited
        for a scheduler round's row would count the versions from before the round's request,
        conflict with it (ConcurrencyError), and send the whole group down the one-event path.
        Under overload that happened every few seconds, to groups of 200-256 events. Another
        replica appending to one of the streams still conflicts: the group is then redone
        event by event."""
        events = self.deps.ctx.store
        pending = await store.lock_pending_many(conn, [w.event.stream_id for w in group])
        insert, insert_args = events.insert_next(
            [w.event for w in group], [w.context.run(trace_context) for w in group], unstored_only=True
        )
        ctes, columns, load_args = projection.load_query([w.event for w in group], first=len(insert_args) + 1)
        [row] = await events.fetch_appending(
            conn,
            f"""WITH appended AS ({insert}), {ctes}
                SELECT ARRAY(SELECT ROW(event_id, position, version) FROM appended) AS appended,
                       {columns}""",
            [*insert_args, *load_args],
            savepoint=False,  # a conflict ends this transaction: the events are redone alone
        )
        projection.loaded(row)
        by_id = {w.event.event_id: w.event for w in group}
        stored = {
            event_id: StoredEvent(position, version, by_id[event_id])
            for event_id, position, version in row["appended"]
        }
        return pending, stored
