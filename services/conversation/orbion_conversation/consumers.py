"""JetStream handler of the conversation service, one event at a time: append, project,
decide, ack. ``group.GroupCommit`` records a bus batch's events together and falls back to this
path for each event of a group that failed.

One durable consumer receives the message events (gateway, llm-proxy) and the lead
service's events that hold or stop replies (opt-out/in, block, hand-off, human
verification) or shape them (BANT stage). For each: append it to the contact's stream in our
event store, project it, decide on a reply, all in ONE transaction; then write the history
cache and wake the relay/scheduler. Every event consumed is appended, so its unique event id in
our log is the mark of an event handled: a redelivery, or a webhook retried days later, is
found there and changes nothing (a separate ``processed`` claim would be a second mark of the
same fact, one statement more per event).

Per-contact order with several replicas: the bus runs one contact's events of a batch in
order; across replicas, each append takes the next version of the contact's stream, so two
concurrent writers collide on UNIQUE (stream_id, version): the loser raises ConcurrencyError,
its transaction rolls back, and its event is nakked and re-read after the winner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from orbion_common.bus import ConsumerSpec, Delivery
from orbion_common.events import Event, MessageReceived
from orbion_common.logging import mask_phone

from . import projector, replies
from .replies import ReplyContext

log = logging.getLogger(__name__)

CONSUMED_TYPES = tuple(t for t in projector.PROJECTED_TYPES if t != "ReplyRequested")


# Delivery policy: nak with growing delays (a concurrency conflict settles in milliseconds,
# a database outage in seconds), dead-letter after 8 tries.
def consumer_spec(durable: str = "conversation", batch_size: int = 256, max_deliver: int = 8) -> ConsumerSpec:
    return ConsumerSpec(
        durable=durable,
        event_types=CONSUMED_TYPES,
        max_deliver=max_deliver,
        ack_wait_seconds=10.0,
        nak_delays=(0.05, 0.2, 1.0, 5.0, 15.0),
        batch_size=batch_size,
    )


CONSUMER = consumer_spec()


@dataclass
class Deps:
    pool: asyncpg.Pool
    ctx: ReplyContext
    wake_relay: Callable[[], None] = lambda: None
    wake_scheduler: Callable[[], None] = lambda: None


async def record_event(deps: Deps, event: Event, delivery: Delivery | None = None) -> str:
    """Handle one consumed event; returns the outcome. Raises to get the event redelivered."""
    if event.type not in CONSUMED_TYPES:
        # A server older than NATS 2.10 ignores multi-subject filters and delivers everything.
        return "ignored"
    ctx = deps.ctx
    phone = event.stream_id
    async with deps.pool.acquire() as conn, conn.transaction():
        outcome = await _record(conn, ctx, event)
        snapshot = await ctx.projection.history_snapshot(conn, phone, ctx.history.size)
    # After commit. A crash here means a redelivery, which the append finds in our log
    # ("duplicate") and which writes the cache again (a stale version never replaces a newer one).
    if snapshot is not None:
        await ctx.history.write_through(phone, *snapshot)
    if outcome == "requested":
        deps.wake_relay()
    elif outcome == "scheduled":
        deps.wake_scheduler()
    log.debug("%s %s: %s", event.type, mask_phone(phone), outcome)
    return outcome


async def _record(conn: asyncpg.Connection, ctx: ReplyContext, event: Event) -> str:
    phone = event.stream_id
    # Every event, not only an inbound one: the scheduler appends to the streams whose pending
    # rows it holds, so waiting for the row here means never racing it for the next version.
    pending = await replies.lock_pending(conn, phone)
    # Appended at the next version of the contact's stream; a replica appending to the same
    # contact meanwhile makes this raise ConcurrencyError (nak, re-read after the winner).
    stored = await ctx.store.append(conn, phone, [event], savepoint=False)  # a conflict ends the transaction
    if not stored:
        return "duplicate"  # already in our log: a redelivery, or a provider retry days later
    applied = await projector.apply(conn, ctx.projection, stored[0], ctx.opt_in_rule)
    if isinstance(event, MessageReceived):
        return await replies.on_inbound(conn, ctx, event, applied, pending)
    return "projected"
