"""The relay: publishes what a service appended to its event store, so handlers never dual-write.

A handler appends the events it decides in its own transaction; the relay follows the log
(:meth:`EventStore.read_after`), publishes each event with ``Nats-Msg-Id`` = its event id, and
moves its cursor only after JetStream acked. While it leads, a relay keeps its cursor
in memory and writes it at most once a ``checkpoint_seconds`` (and when it stops leading): a
crash publishes again, on restart, what it published since the last write. JetStream drops
those repeats inside its duplicate window, and consumers dedupe on the event id beyond it.

A store may also keep copies of events the service consumed (its history is rebuilt from them);
``publish_types`` names the types the service owns, and the relay moves past the others without
publishing them, which would hand every consumer a duplicate once JetStream's window passed.

Only one relay per schema publishes at a time (``leadership``): replicas stand by and take
over when the holder's connection dies.

A service that has just committed events hands them to :meth:`Relay.publish_committed`, which
publishes them without waiting for the relay's wake-up and read of the log; that read, at its
next poll, then passes them. One task publishes what is handed over, in the order handed over,
several hand-overs in one go when they come faster than JetStream acks. The log stays the
source of truth: an event whose early publish failed, or was cut short by a crash, is published
by the read, and nothing is published early again until a read has caught up (nor, in a new
term, before its first read has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence

import asyncpg
from prometheus_client import Counter, Gauge

from .bus import Bus, BusUnavailable
from .events import Envelope
from .eventstore import Cursor, EventStore, parse_trace_context
from .leadership import leadership

log = logging.getLogger(__name__)

RELAYED = Counter("orbion_relay_published_total", "Events published by a relay", ["schema"])
RELAY_LAG = Gauge("orbion_relay_lag_events", "Events read but not yet published by a relay", ["schema"])

# How long an event published ahead of the relay's read is remembered, for that read to pass it.
# The leading relay reads within a poll; an entry outlives it only when the read came first
# (the event was then published twice, and JetStream dropped the second).
AHEAD_MEMORY_SECONDS = 60.0


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        bus: Bus,
        *,
        name: str = "relay",
        batch_size: int = 500,
        poll_seconds: float = 0.2,
        publish_types: Collection[str] | None = None,
        checkpoint_seconds: float = 1.0,
    ) -> None:
        self.pool = pool
        self.store = store
        self.bus = bus
        self.name = name
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.publish_types = frozenset(publish_types) if publish_types is not None else None
        self.checkpoint_seconds = checkpoint_seconds
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.leader = False
        # While leading, only this relay moves the cursor: the one in memory is current, and
        # reading it back before every batch, or writing it after each, costs a round trip.
        self._cursor: Cursor | None = None
        self._saved: Cursor | None = None
        self._saved_at = -math.inf  # a term's first batch is written
        # Event id -> when it was published ahead of the read (publish_committed), in that order.
        self._ahead: dict[str, float] = {}
        self._handed: list[tuple[Envelope, dict[str, str] | None]] = []  # waiting for the task
        self._publishing_ahead: asyncio.Task[None] | None = None
        # The log holds events not handed over (a new term's backlog, a failed early publish):
        # until a read catches up, the read publishes everything, in the log's order.
        self._read_behind = True

    def wake(self) -> None:
        """Publish now rather than at the next poll (call after committing appended events)."""
        self._wake.set()

    def publish_committed(
        self, events: Sequence[Envelope], trace_contexts: Sequence[dict[str, str] | None]
    ) -> asyncio.Task[None] | None:
        """Publish events the caller has just committed (each with the trace context it was
        stored with), in the background, ahead of the relay's read of the log, which then passes
        them. Only while this relay leads and no early publish has failed since its last read
        caught up: otherwise the read publishes them. Returns the publishing task, if any."""
        owned = [
            (e, t)
            for e, t in zip(events, trace_contexts, strict=True)
            if self.publish_types is None or e.type in self.publish_types
        ]
        if not owned:
            return None
        if not self.leader or self._read_behind:
            self.wake()
            return None
        self._handed.extend(owned)
        if self._publishing_ahead is None or self._publishing_ahead.done():
            self._publishing_ahead = asyncio.create_task(
                self._publish_handed(), name=f"relay-ahead:{self.store.schema}"
            )
        return self._publishing_ahead

    async def _publish_handed(self) -> None:
        while self._handed and not self._read_behind:
            batch, self._handed = self._handed, []
            try:
                await self.bus.publish_all([e for e, _ in batch], parents=[t for _, t in batch])
            except Exception as exc:  # the read publishes them: nothing is lost
                log.warning(
                    "relay %s.%s: %d events left to the log's read: %r",
                    self.store.schema,
                    self.name,
                    len(batch) + len(self._handed),
                    exc,
                )
                self._read_behind = True
                self._handed.clear()
                self.wake()
                return
            now = time.monotonic()
            while self._ahead and now - next(iter(self._ahead.values())) > AHEAD_MEMORY_SECONDS:
                del self._ahead[next(iter(self._ahead))]
            self._ahead.update((e.event_id, now) for e, _ in batch)
            RELAYED.labels(self.store.schema).inc(len(batch))

    async def stop(self) -> None:
        """Call once nothing hands events over any more: those handed over go out first, so
        that the last read passes them instead of publishing them a second time."""
        if self._publishing_ahead is not None:
            await asyncio.gather(self._publishing_ahead, return_exceptions=True)
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Publish for as long as the service runs; survives Postgres and NATS outages."""
        while not self._stopping.is_set():
            try:
                async with leadership(self.pool, f"orbion-relay:{self.store.schema}:{self.name}") as leading:
                    if not leading:
                        await self._sleep(1.0)
                        continue
                    self.leader = True
                    try:
                        while not self._stopping.is_set():
                            published = await self.publish_pending()
                            if published < self.batch_size:
                                await self._sleep(self.poll_seconds)
                        # What committed before the stop goes out now, not at the next
                        # leader's read: services close their bus after their relay.
                        await self.publish_pending()
                    finally:
                        self.leader = False
                        # The next term reads from the saved cursor: what was handed over and
                        # not published yet is in the log it reads.
                        self._ahead.clear()
                        self._handed.clear()
                        self._read_behind = True
                        await self._save_unsaved()
                        self._cursor = None
                        self._saved_at = -math.inf
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, BusUnavailable) as exc:
                log.warning("relay %s.%s paused: %r", self.store.schema, self.name, exc)
                await self._sleep(0.5)

    async def publish_pending(self) -> int:
        """Publish one batch of the log; returns how many events it read (published or passed)."""
        async with self.pool.acquire() as conn:
            cursor = self._cursor if self.leader else None
            if cursor is None:
                cursor = await self.store.cursor(conn, self.name)
            page = await self.store.read_encoded_page(conn, cursor, self.publish_types, limit=self.batch_size)
            owned = [s for s in page.events if self._ahead.pop(s.event.event_id, None) is None]
            RELAY_LAG.labels(self.store.schema).set(len(owned))
            if owned:
                await self.bus.publish_all([s.event for s in owned], parents=[s.trace_context for s in owned])
            if page.read < self.batch_size:
                self._read_behind = False
            if self.leader:
                self._cursor = page.cursor
            now = time.monotonic()
            if page.read and (not self.leader or now - self._saved_at >= self.checkpoint_seconds):
                await self.store.save_cursor(conn, self.name, page.cursor)
                self._saved, self._saved_at = page.cursor, now
        RELAYED.labels(self.store.schema).inc(len(owned))
        return page.read

    async def _save_unsaved(self) -> None:
        """Write the cursor in memory if it moved since the last write: the next leader, or
        this relay after a restart, then starts where it stopped. Best effort: when the
        database is what failed, that leader publishes the last events again instead."""
        cursor = self._cursor
        if cursor is None or cursor == self._saved:
            return
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            async with asyncio.timeout(5), self.pool.acquire() as conn:
                await self.store.save_cursor(conn, self.name, cursor)
            self._saved = cursor

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()


def stored_publisher(relay: Relay | None) -> Callable[[Sequence[Envelope], Sequence[str | None]], None]:
    """The after-commit hook of a writer that has its events' trace contexts as it stored them
    (:func:`~orbion_common.eventstore.trace_context`'s JSON): hands what it committed to
    ``relay`` (:meth:`Relay.publish_committed`). Without a relay (no bus) it does nothing."""

    def publish(events: Sequence[Envelope], traces: Sequence[str | None]) -> None:
        if relay is not None:
            relay.publish_committed(events, [parse_trace_context(t) for t in traces])

    return publish
