"""Composition root of the conversation service: Settings once, then pool, Redis, bus, event
store, cache, consumer, reply scheduler, relay and the HTTP app; graceful shutdown.

Nothing connects at import time. Tests build :class:`Service` pieces with their own schema,
consumer name and cache prefix (``build``), and the app with ``app.create_app``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from orbion_common.bus import Bus
from orbion_common.db import create_pool
from orbion_common.eventstore import EventStore, StoredEvent
from orbion_common.health import bus_check, postgres_check, redis_check
from orbion_common.logging import configure_logging
from orbion_common.migrations import migrate as migrate_schema
from orbion_common.ratelimit import RateLimiter, Tier, limit_requests
from orbion_common.relay import Relay
from orbion_common.service import run, serve
from orbion_common.telemetry import background_task, finish_tasks, setup_telemetry

from .app import AppDeps, create_app
from .consumers import Deps, consumer_spec
from .group import GroupCommit
from .history import History, history_cache
from .replies import ReplyContext, ReplyScheduler
from .settings import Settings
from .store import Projection

log = logging.getLogger(__name__)

SERVICE = "conversation"
SCHEMA = "conversation"
MIGRATIONS = Path(__file__).parent / "migrations"


async def migrate(settings: Settings, *, schema: str = SCHEMA) -> list[str]:
    """Create or update the conversation schema (event store + projections); idempotent."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await migrate_schema(conn, schema, MIGRATIONS)
    finally:
        await conn.close()


@dataclass
class Service:
    settings: Settings
    pool: asyncpg.Pool
    deps: Deps
    scheduler: ReplyScheduler
    redis: Redis | None = None
    bus: Bus | None = None
    relay: Relay | None = None
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self, durable: str = SERVICE, *, deliver_new_only: bool = False) -> None:
        """Start the consumer (when a bus is given), the relay and the reply scheduler."""
        if self.bus is not None:
            spec = consumer_spec(
                durable, self.settings.conversation_consumer_batch, self.settings.max_deliver
            )
            if deliver_new_only:
                spec = replace(spec, deliver_new_only=True)
            interval = self.settings.conversation_commit_interval_seconds
            self.bus.consume(spec, GroupCommit(self.deps, commit_interval=interval).handle)
        if self.relay is not None:
            self.tasks["relay"] = background_task(self.relay.run(), name="conversation-relay")
        self.tasks["scheduler"] = background_task(self.scheduler.run(), name="conversation-replies")

    async def stop(self) -> None:
        """In the order work flows: the consumer (in-flight handlers finish and ack), the
        scheduler (its round in flight ends), the relay (its publishes of what committed
        meanwhile finish), and the connection they publish on last. Events left unpublished
        stay in the store for the relay's next read."""
        if self.bus is not None:
            await self.bus.stop_consuming()
        await self.scheduler.stop()
        await finish_tasks([self.tasks.get("scheduler")])
        if self.relay is not None:
            await self.relay.stop()
        await finish_tasks(self.tasks.values())
        self.tasks.clear()
        if self.bus is not None:
            await self.bus.close()


def build(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    schema: str = SCHEMA,
    redis: Redis | None = None,
    bus: Bus | None = None,
    cache_prefix: str | None = None,
) -> Service:
    store = EventStore(schema)
    projection = Projection()
    prefix = cache_prefix or f"{settings.redis_key_prefix}conversation:history"
    cache = history_cache(redis, prefix=prefix, ttl_seconds=settings.conversation_cache_ttl_seconds)
    history = History(pool, projection, cache, settings.conversation_history_size)
    ctx = ReplyContext(
        store, projection, history, settings.reply_quiet_period_seconds, opt_in_rule=settings.opt_in_rule
    )
    # The store also keeps copies of the events it consumed; only its own decisions are published.
    relay = None
    if bus is not None:
        relay = Relay(pool, store, bus, name="relay", publish_types={"ReplyRequested"})
    wake_relay = relay.wake if relay is not None else (lambda: None)

    def publish_requests(stored: Sequence[StoredEvent]) -> None:
        """A request is what the llm-proxy waits for: published as soon as its round committed."""
        if relay is not None:
            relay.publish_committed([s.event for s in stored], [s.trace_context for s in stored])

    scheduler = ReplyScheduler(
        pool,
        ctx,
        on_emitted=publish_requests,
        poll_seconds=settings.conversation_scheduler_poll_seconds,
    )
    deps = Deps(pool=pool, ctx=ctx, wake_relay=wake_relay, wake_scheduler=scheduler.wake)
    return Service(settings, pool, deps, scheduler, redis=redis, bus=bus, relay=relay)


def app_deps(service: Service) -> AppDeps:
    s = service.settings
    checks = {"postgres": postgres_check(service.pool)}
    rate_limit = None
    if service.redis is not None:
        checks["redis"] = redis_check(service.redis)
        limiter = RateLimiter(service.redis, prefix=s.rate_limit_prefix)
        rate_limit = limit_requests(
            limiter,
            api_key=Tier("api_key", s.rate_limit_api_key_per_minute),
            ip=Tier("ip", s.rate_limit_ip_per_minute),
        )
    if service.bus is not None:
        checks["nats"] = bus_check(service.bus)
    history = service.deps.ctx.history

    def info() -> dict[str, object]:
        return {
            "reply_quiet_period_seconds": s.reply_quiet_period_seconds,
            "history_cache": {
                "enabled": history.cache.redis is not None,
                "available": history.cache.available,
            },
            "relay_leader": service.relay.leader if service.relay is not None else False,
        }

    return AppDeps(
        pool=service.pool,
        projection=service.deps.ctx.projection,
        history=history,
        checks=checks,
        info=info,
        rate_limit=rate_limit,
    )


async def _main() -> None:
    settings = Settings()
    configure_logging(SERVICE, settings)
    setup_telemetry(SERVICE, settings)
    applied = await migrate(settings)
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    pool = await create_pool(settings, service=SERVICE)
    redis = (
        Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.conversation_cache_timeout_seconds,
            socket_connect_timeout=settings.conversation_cache_timeout_seconds,
        )
        if settings.redis_url
        else None
    )
    bus = await Bus.connect(settings, name=SERVICE)
    service = build(settings, pool, redis=redis, bus=bus)
    service.start()
    try:
        await serve(create_app(settings, app_deps(service)), settings, settings.conversation_port)
    finally:
        await service.stop()
        if redis is not None:
            await redis.aclose()
        await pool.close()


def main() -> None:
    run(_main())
