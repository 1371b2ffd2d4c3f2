"""Composition root of the lead service: Settings once, then pool, Redis, bus, store, cache,
recorder, consumer, relay, verification timers and the HTTP app; graceful shutdown.

Nothing connects at import time. Tests and the benchmark build a :class:`Service` with their
own schema, durable name and cache prefix (``build``); ``main()`` is ``orbion serve lead``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from orbion_common.bus import Bus, ConsumerSpec
from orbion_common.db import create_pool
from orbion_common.events import EVENT_TYPES
from orbion_common.events import lead as lead_events
from orbion_common.logging import configure_logging
from orbion_common.migrations import migrate as migrate_schema
from orbion_common.ratelimit import RateLimiter
from orbion_common.relay import Relay, stored_publisher
from orbion_common.service import run, serve
from orbion_common.telemetry import background_task, finish_tasks, setup_telemetry, shutdown_telemetry

from .app import SERVICE, Deps, build_app
from .consumers import CONSUMER, LeadConsumers, consumer_spec
from .recorder import LeadRecorder, lead_cache
from .settings import Settings
from .store import MIGRATIONS, SCHEMA, LeadStore

log = logging.getLogger(__name__)

# What the relay publishes: every lead event but the per-message bookkeeping. One
# ``LeadActivityRecorded`` per message in or out is most of what the lead appends, and no other
# service consumes it (docs/events.md): it stays in the store (the lead's counts and bot score
# are folded from it; the audit trail lists it) and is not put on the bus.
PUBLISHED_TYPES = frozenset(cls.__name__ for cls in EVENT_TYPES if cls.__module__ == lead_events.__name__) - {
    lead_events.LeadActivityRecorded.__name__
}


async def migrate(settings: Settings, *, schema: str = SCHEMA) -> list[str]:
    """Create or update the lead schema (event store, projection, timers); idempotent."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await migrate_schema(conn, schema, MIGRATIONS)
    finally:
        await conn.close()


@dataclass
class Service:
    settings: Settings
    pool: asyncpg.Pool
    store: LeadStore
    recorder: LeadRecorder
    consumers: LeadConsumers
    redis: Redis | None = None
    bus: Bus | None = None
    relay: Relay | None = None
    durable: str = CONSUMER
    deliver_new_only: bool = False
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def deps(self) -> Deps:
        limiter = RateLimiter(self.redis, prefix=self.settings.rate_limit_prefix) if self.redis else None
        return Deps(
            pool=self.pool,
            store=self.store,
            recorder=self.recorder,
            bus=self.bus,
            redis=self.redis,
            relay=self.relay,
            limiter=limiter,
        )

    def consumer_spec(self) -> ConsumerSpec:
        return consumer_spec(
            durable=self.durable,
            batch_size=self.settings.lead_consumer_batch,
            max_deliver=self.settings.max_deliver,
            deliver_new_only=self.deliver_new_only,
        )

    def start(self) -> None:
        """Start the consumer (when a bus is given), the relay and the verification timers."""
        if self.bus is not None:
            self.bus.consume(self.consumer_spec(), self.consumers.handle)
        if self.relay is not None:
            self.tasks["relay"] = background_task(self.relay.run(), name="lead-relay")
        self.tasks["timers"] = background_task(
            self.recorder.run_timers(self._stop, poll_seconds=self.settings.lead_timer_poll_seconds),
            name="lead-timers",
        )

    async def stop(self) -> None:
        """In the order work flows: the consumer (in-flight handlers finish and ack), the
        timers, the recorder (what it holds commits), the relay (it publishes what committed),
        the connection they publish on, then the pools. Events left unpublished stay in the
        store for the relay's next read."""
        if self.bus is not None:
            await self.bus.stop_consuming()
        self._stop.set()
        await finish_tasks([self.tasks.get("timers")])
        await self.recorder.close()
        if self.relay is not None:
            await self.relay.stop()
        await finish_tasks(self.tasks.values())
        self.tasks.clear()
        if self.bus is not None:
            await self.bus.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        await self.pool.close()


async def build(
    settings: Settings,
    *,
    schema: str = SCHEMA,
    durable: str = CONSUMER,
    cache_prefix: str | None = None,
    with_bus: bool = True,
) -> Service:
    """Connect everything (Redis optional: without it leads are read from Postgres)."""
    pool = await create_pool(settings, service=SERVICE)
    redis = None
    if settings.redis_url:
        # The API's rate limiter fails closed (503) past this timeout: 0.5 s, as
        # RateLimiter.from_url; 0.25 s was exceeded on a busy 2-core machine.
        redis = Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    else:
        log.warning("ORBION_REDIS_URL not set: lead cache and API rate limits are off")
    store = LeadStore(schema)
    bus = await Bus.connect(settings, name=SERVICE) if with_bus else None
    relay = (
        Relay(pool, store.events, bus, name="lead-relay", publish_types=PUBLISHED_TYPES)
        if bus is not None
        else None
    )
    cache = lead_cache(
        redis, prefix=cache_prefix or settings.lead_cache_prefix, ttl_seconds=settings.lead_cache_ttl_seconds
    )
    recorder = LeadRecorder(
        pool,
        store,
        cache,
        # Published as they commit, without a read of the log for each commit (the relay's read
        # passes them at its next poll).
        on_commit=stored_publisher(relay),
        commit_interval=settings.lead_commit_interval_seconds,
    )
    consumers = LeadConsumers(recorder, settings.policy(), consumer=durable)
    return Service(settings, pool, store, recorder, consumers, redis, bus, relay, durable)


async def _main(settings: Settings) -> None:
    applied = await migrate(settings)
    if applied:
        log.info("lead migrations applied", extra={"migrations": applied})
    service = await build(settings)
    try:
        service.start()
        app = build_app(settings, service.deps())
        log.info("lead service listening", extra={"port": settings.lead_port})
        await serve(app, settings, settings.lead_port)
    finally:
        await service.stop()
        shutdown_telemetry()


def main() -> None:
    settings = Settings()
    configure_logging(SERVICE, settings)
    setup_telemetry(SERVICE, settings)
    run(_main(settings))
