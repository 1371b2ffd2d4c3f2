"""The relay: publishes what a service appended to its event store, so handlers never dual-write.

A handler appends the events it decides in its own transaction; the relay follows the log
(:meth:`EventStore.read_after`), publishes each event with ``Nats-Msg-Id`` = its event id, and
moves its cursor only after JetStream acked. A crash between the publish and the cursor write
publishes again on restart: JetStream drops the repeat inside its duplicate window, and
consumers dedupe on the event id beyond it.

A store may also keep copies of events the service consumed (its history is rebuilt from them);
``publish_types`` names the types the service owns, and the relay moves past the others without
publishing them, which would hand every consumer a duplicate once JetStream's window passed.

Only one relay per schema publishes at a time (``leadership``): replicas stand by and take
over when the holder's connection dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection

import asyncpg
from prometheus_client import Counter, Gauge

from .bus import Bus, BusUnavailable
from .eventstore import Cursor, EventStore
from .leadership import leadership

log = logging.getLogger(__name__)

RELAYED = Counter("orbion_relay_published_total", "Events published by a relay", ["schema"])
RELAY_LAG = Gauge("orbion_relay_lag_events", "Events read but not yet published by a relay", ["schema"])


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
    ) -> None:
        self.pool = pool
        self.store = store
        self.bus = bus
        self.name = name
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.publish_types = frozenset(publish_types) if publish_types is not None else None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.leader = False
        # While leading, only this relay moves the cursor: the one it saved last is current,
        # and reading it back before every batch would be a round trip for nothing.
        self._cursor: Cursor | None = None

    def wake(self) -> None:
        """Publish now rather than at the next poll (call after committing appended events)."""
        self._wake.set()

    async def stop(self) -> None:
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
                    finally:
                        self.leader = False
                        self._cursor = None
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
            page = await self.store.read_page(conn, cursor, self.publish_types, limit=self.batch_size)
            owned = page.events
            RELAY_LAG.labels(self.store.schema).set(len(owned))
            if owned:
                await self.bus.publish_all([s.event for s in owned], parents=[s.trace_context for s in owned])
            if page.read:
                await self.store.save_cursor(conn, self.name, page.cursor)
            if self.leader:
                self._cursor = page.cursor
        RELAYED.labels(self.store.schema).inc(len(owned))
        return page.read

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()
