"""Composition root of the llm-proxy: reads Settings once, builds pool, bus, Redis, breakers,
responder, sender, relay and consumers, serves the app, and shuts down gracefully.

Nothing connects at import time. Tests build their own :class:`Deps` with :func:`build_deps`
and start the workers with :func:`start_workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from orbion_common.breakers import Breaker
from orbion_common.bus import Bus
from orbion_common.db import create_pool
from orbion_common.eventstore import EventStore
from orbion_common.migrations import migrate as migrate_schema
from orbion_common.relay import Relay, stored_publisher
from orbion_common.telemetry import background_task, finish_tasks

from . import store
from .consumers import Handlers, consumer_specs
from .deps import Deps
from .openai_client import Responder, ResponseCache, openai_breaker_excludes
from .operations import BreakerRecorder
from .sender import Sender
from .settings import Settings
from .whatsapp import SendError, make_provider

log = logging.getLogger(__name__)

SERVICE = "llm-proxy"


async def migrate(settings: Settings, *, schema: str = store.SCHEMA) -> list[str]:
    """Create or update the llm_proxy schema (event store + service tables); idempotent."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await migrate_schema(conn, schema, store.MIGRATIONS)
    finally:
        await conn.close()


def _send_error_excluded(exc: BaseException) -> bool:
    return isinstance(exc, SendError) and not exc.counts_against_dependency


def build_deps(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    schema: str = store.SCHEMA,
    bus: Bus | None = None,
    redis: Any = None,
    openai_client: Any = None,
) -> Deps:
    events = EventStore(schema)
    relay = Relay(pool, events, bus, name="relay") if bus is not None else None
    wake_relay = relay.wake if relay is not None else (lambda: None)
    # Replies and sends, wanted downstream at once: published as they commit, without a read
    # of the log for each (the relay's read passes them at its next poll).
    publish_committed = stored_publisher(relay)

    recorder = BreakerRecorder(pool, events, on_appended=wake_relay)
    breakers = {
        "openai": Breaker(
            "openai",
            fail_max=settings.openai_breaker_fail_max,
            reset_timeout=settings.openai_breaker_reset_seconds,
            call_timeout=settings.openai_timeout_seconds + 1.0,
            exclude=openai_breaker_excludes(),
            on_change=recorder.on_change,
        ),
        "whatsapp": Breaker(
            "whatsapp",
            fail_max=settings.whatsapp_breaker_fail_max,
            reset_timeout=settings.whatsapp_breaker_reset_seconds,
            call_timeout=settings.whatsapp_send_timeout_seconds + 1.0,
            exclude=[_send_error_excluded],
            on_change=recorder.on_change,
        ),
        "sheets": Breaker(
            "sheets",
            fail_max=settings.sheets_breaker_fail_max,
            reset_timeout=settings.sheets_breaker_reset_seconds,
            call_timeout=60.0,
            on_change=recorder.on_change,
        ),
    }
    cache = (
        ResponseCache(redis, settings.response_cache_ttl_seconds)
        if redis is not None and settings.response_cache_ttl_seconds > 0
        else None
    )
    responder = Responder(settings, breakers["openai"], cache=cache, client=openai_client)
    sender = Sender(
        pool, events, settings, make_provider(settings), breakers["whatsapp"], on_appended=publish_committed
    )
    exporter = None
    if settings.sheets_enabled:
        from .sheets import Exporter

        exporter = Exporter(pool, events, settings, breakers["sheets"], on_appended=wake_relay)
    handlers = Handlers(
        pool,
        events,
        responder,
        on_reply_stored=sender.offer,
        on_appended=publish_committed,
        on_export_queued=exporter.wake if exporter is not None else (lambda: None),
    )
    return Deps(
        settings=settings,
        pool=pool,
        events=events,
        breakers=breakers,
        responder=responder,
        sender=sender,
        handlers=handlers,
        recorder=recorder,
        bus=bus,
        relay=relay,
        redis=redis,
        exporter=exporter,
    )


# A send in flight gets this long to end on a stop (a WhatsApp call, then its commit); the relay
# then gets finish_tasks' default.
WORKERS_STOP_GRACE_SECONDS = 10.0


def start_workers(
    deps: Deps, *, consumer_prefix: str = SERVICE, deliver_new_only: bool = False
) -> dict[str, asyncio.Task[None]]:
    """Consumers (on the bus), relay, sender, breaker recorder and Sheets exporter as tasks."""
    specs = consumer_specs(consumer_prefix, deps.settings.max_deliver, deliver_new_only=deliver_new_only)
    if deps.bus is not None:
        deps.bus.consume(specs["replies"], deps.handlers.answer_reply_request)
        deps.bus.consume(specs["verification"], deps.handlers.ask_human_verification)
        if deps.exporter is not None:
            deps.bus.consume(specs["exports"], deps.handlers.queue_lead_export)
    tasks = {
        "sender": background_task(deps.sender.run(), name="llm-proxy-sender"),
        "breaker-events": background_task(deps.recorder.run(), name="llm-proxy-breaker-events"),
    }
    if deps.relay is not None:
        tasks["relay"] = background_task(deps.relay.run(), name="llm-proxy-relay")
    if deps.exporter is not None:
        tasks["sheets"] = background_task(deps.exporter.run(), name="llm-proxy-sheets")
    return tasks


async def stop_workers(deps: Deps, tasks: dict[str, asyncio.Task[None]]) -> None:
    """In the order work flows: consuming (in-flight handlers finish), the sender, the Sheets
    exporter and the breaker events (their last commits), the relay (it publishes what
    committed), and the connection they publish on last."""
    if deps.bus is not None:
        await deps.bus.stop_consuming()
    await deps.sender.stop()
    if deps.exporter is not None:
        await deps.exporter.stop()
    with contextlib.suppress(Exception):
        await deps.recorder.flush()
    await deps.recorder.stop()
    await finish_tasks(
        [task for name, task in tasks.items() if name != "relay"], grace=WORKERS_STOP_GRACE_SECONDS
    )
    if deps.relay is not None:
        await deps.relay.stop()
    await finish_tasks(tasks.values())
    if deps.bus is not None:
        await deps.bus.close()
    if deps.sender.provider is not None:
        await deps.sender.provider.aclose()
    await deps.responder.aclose()


async def _main() -> None:
    from orbion_common.logging import configure_logging
    from orbion_common.service import ServiceServer, tune_garbage_collector
    from orbion_common.telemetry import setup_telemetry

    from .app import create_app

    settings = Settings()
    configure_logging(SERVICE, settings)
    setup_telemetry(SERVICE, settings)
    applied = await migrate(settings)
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    pool = await create_pool(settings, service=SERVICE)
    bus = await Bus.connect(settings, name=SERVICE)
    redis = None
    if settings.redis_url:
        import redis.asyncio as aioredis

        redis = aioredis.from_url(settings.redis_url)
    deps = build_deps(settings, pool, bus=bus, redis=redis)
    if deps.responder.mode == "fallback":
        log.warning("no OpenAI API key (ORBION_OPENAI_API_KEY): fallback responder only")
    else:
        log.info("replies by %s at %s", settings.openai_model, settings.openai_base_url)
    log.info("replies are sent via %s", deps.sender.via)
    tasks = start_workers(deps)
    server = ServiceServer(create_app(deps), settings, settings.llm_proxy_port)
    tune_garbage_collector()
    try:
        with server.capture_signals():
            await server.serve()
    finally:
        await stop_workers(deps, tasks)
        if redis is not None:
            await redis.aclose()
        await pool.close()


def main() -> None:
    """``orbion serve llm-proxy``."""
    from orbion_common.service import run

    run(_main())
