"""``orbion bench conversation``: projector throughput and history read latency, on real servers.

Figures (targets on a 2-core machine in brackets):

- projector throughput, batched transactions (the rebuild path) [>= 3,000 events/s], and the
  live handler path (one transaction per event, 16 contacts at a time, cache write-through);
- history read (newest 20 messages of a contact) p50/p99: from the Redis cache [p50 <= 0.5 ms],
  from Postgres with the ``(phone, created_at DESC)`` index [p50 <= 2 ms] and without it, on a
  table of ``--rows`` messages (default 1,000,000: the plan's before/after).

Everything happens in a throw-away schema and Redis prefix, dropped at the end. Servers: the
ORBION_* URLs, else ORBION_TEST_* URLs, else the running (or started) local ones.
With ``--json`` the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis

from orbion_common.events import Envelope, stable_event_id
from orbion_common.events.messaging import (
    DeliveryStatus,
    MessageKind,
    MessageReceived,
    MessageReceivedPayload,
    MessageSent,
    MessageSentPayload,
    MessageStatusChanged,
    MessageStatusChangedPayload,
    Provider,
    ReplyGenerated,
    ReplyGeneratedPayload,
)
from orbion_common.eventstore import EventStore
from orbion_common.migrations import migrate

from . import domain
from .bootstrap import MIGRATIONS
from .consumers import Deps, record_event
from .history import History, history_cache
from .rebuild import rebuild
from .replies import ReplyContext
from .store import Projection

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def conversation_events(phone: str, n: int) -> list[Envelope]:
    """A realistic conversation: inbound, reply generated, sent, delivered, read (5 events per turn)."""
    t0 = T0
    events: list[Envelope] = []
    for turn in range(n):
        at = t0 + timedelta(minutes=turn)
        mid = f"wamid.bench.{phone}.{turn}"
        events.append(
            MessageReceived.create(
                phone,
                MessageReceivedPayload(
                    provider=Provider.CLOUD_API,
                    provider_message_id=mid,
                    phone=phone,
                    kind=MessageKind.TEXT,
                    text=f"Olá, mensagem {turn}: quanto custa o plano?",
                    sent_at=at,
                    profile_name="Bench",
                ),
                event_id=stable_event_id("MessageReceived", mid),
            )
        )
        key = domain.reply_key([mid])
        reply = "Olá! O plano Pro custa R$ 99 por mês. Posso ajudar com mais alguma coisa?"
        events.append(
            ReplyGenerated.create(
                phone,
                ReplyGeneratedPayload(reply_key=key, phone=phone, text=reply),
                occurred_at=at + timedelta(seconds=1),
            )
        )
        out = f"wamid.bench.out.{phone}.{turn}"
        events.append(
            MessageSent.create(
                phone,
                MessageSentPayload(reply_key=key, phone=phone, provider_message_id=out, text=reply),
                occurred_at=at + timedelta(seconds=2),
            )
        )
        for i, st in enumerate((DeliveryStatus.DELIVERED, DeliveryStatus.READ)):
            events.append(
                MessageStatusChanged.create(
                    phone,
                    MessageStatusChangedPayload(
                        provider=Provider.CLOUD_API,
                        provider_message_id=out,
                        phone=phone,
                        status=st,
                        changed_at=at + timedelta(seconds=3 + i),
                    ),
                )
            )
    return events


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(n: int, call: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "samples": n,
    }


def _phone(i: int) -> str:
    return f"5511{i:09d}"


async def bench_projector(
    pool: asyncpg.Pool, schema: str, redis: Redis | None, contacts: int, turns: int
) -> dict[str, Any]:
    store = EventStore(schema)
    # 1. the batched path: append a log, then replay it into fresh tables (rebuild)
    async with pool.acquire() as conn:
        for start in range(0, contacts, 200):
            async with conn.transaction():
                for i in range(start, min(contacts, start + 200)):
                    await store.append(conn, _phone(i), conversation_events(_phone(i), turns))
    report = await rebuild(pool, schema, batch_size=2000, workers=4)
    # 2. the live path: one transaction per event (claim, append, project, snapshot) + cache write
    projection = Projection()
    history = History(pool, projection, history_cache(redis, prefix=f"bench:{schema}:h"))
    deps = Deps(pool=pool, ctx=ReplyContext(store, projection, history, quiet_seconds=1.5))
    live_contacts = max(16, contacts // 10)
    streams = [conversation_events(_phone(10_000_000 + i), turns) for i in range(live_contacts)]

    async def lane(events: list[Envelope]) -> None:
        for e in events:
            await record_event(deps, e)  # type: ignore[arg-type]

    started = time.perf_counter()
    for chunk in range(0, live_contacts, 16):  # 16 contacts at a time, like a bus batch
        await asyncio.gather(*(lane(s) for s in streams[chunk : chunk + 16]))
    live_seconds = time.perf_counter() - started
    live_events = sum(len(s) for s in streams)
    return {
        "batched_events": report.events,
        "batched_events_per_second": round(report.events_per_second, 1),
        "live_events": live_events,
        "live_events_per_second": round(live_events / live_seconds, 1),
    }


async def bench_reads(pool: asyncpg.Pool, schema: str, redis: Redis | None, rows: int) -> dict[str, Any]:
    phones = max(1, rows // 100)  # 100 messages per contact
    async with pool.acquire() as conn:
        # Load without indexes (fast), measure the plan's "before", then add the index.
        await conn.execute("DROP INDEX conversation_messages_phone_created")
        await conn.execute("ALTER TABLE conversation_messages DROP CONSTRAINT conversation_messages_pkey")
        await conn.execute(
            "ALTER TABLE conversation_messages DROP CONSTRAINT conversation_messages_provider_message_id_key"
        )
        await conn.execute("TRUNCATE conversation_messages, conversation_contacts")
        await conn.execute(
            """INSERT INTO conversation_messages
                   (message_key, phone, direction, kind, text, status, created_at, position,
                    provider_message_id)
               SELECT 'bench.' || g, '5521' || lpad((g % $2)::text, 9, '0'),
                      CASE WHEN g % 2 = 0 THEN 'in' ELSE 'out' END, 'text',
                      'mensagem de teste número ' || g, 'read',
                      timestamptz '2026-01-01' + g * interval '1 second', g, 'wamid.bench.' || g
               FROM generate_series(1, $1) g""",
            rows,
            phones,
        )
        await conn.execute(
            """INSERT INTO conversation_contacts (phone, message_count, version)
               SELECT '5521' || lpad(g::text, 9, '0'), 100, 100 FROM generate_series(0, $1 - 1) g""",
            phones,
        )
        await conn.execute("ANALYZE conversation_messages")
        await conn.execute("ANALYZE conversation_contacts")
    projection = Projection()
    history = History(pool, projection, history_cache(redis, prefix=f"bench:{schema}:reads"))

    def phone(i: int) -> str:
        return f"5521{(i * 7919) % phones:09d}"

    unindexed = await timed(20, lambda i: projection.recent_messages(pool, phone(i), 20))
    async with pool.acquire() as conn:
        started = time.perf_counter()
        await conn.execute(
            "CREATE INDEX conversation_messages_phone_created "
            "ON conversation_messages (phone, created_at DESC, position DESC)"
        )
        index_seconds = time.perf_counter() - started
        await conn.execute("ANALYZE conversation_messages")
    indexed = await timed(2000, lambda i: projection.recent_messages(pool, phone(i), 20))
    cold_snapshot = await timed(2000, lambda i: projection.history_snapshot(pool, phone(i), 20))
    cached: dict[str, Any] = {"skipped": "no Redis"}
    if redis is not None:
        hot = [phone(i) for i in range(200)]
        for p in hot:
            await history.recent(p)  # warm: what write-through keeps for active contacts
        cached = await timed(5000, lambda i: history.recent(hot[i % len(hot)]))
    return {
        "rows": rows,
        "contacts": phones,
        "cache": cached,
        "postgres_indexed": indexed,
        "postgres_indexed_with_version": cold_snapshot,
        "postgres_without_index": unindexed,
        "index_build_seconds": round(index_seconds, 2),
    }


def _urls() -> tuple[str, str, Any]:
    from orbion_common.infra import resolve_urls
    from orbion_common.settings import CommonSettings

    settings = CommonSettings()
    db = settings.database_url or os.environ.get("ORBION_TEST_DATABASE_URL", "")
    rd = settings.redis_url or os.environ.get("ORBION_TEST_REDIS_URL", "")
    if db and rd:
        return db, rd, None
    urls, started = resolve_urls(settings, start=True)
    return db or urls.database_url, rd or urls.redis_url, started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    database_url, redis_url, started = _urls()
    schema = f"conversation_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await migrate(conn, schema, MIGRATIONS)
    pool = await asyncpg.create_pool(
        database_url, min_size=2, max_size=8, server_settings={"search_path": schema}
    )
    assert pool is not None
    redis = Redis.from_url(redis_url, socket_timeout=1.0) if redis_url else None
    try:
        projector = await bench_projector(pool, schema, redis, args.contacts, args.turns)
        reads = await bench_reads(pool, schema, redis, args.rows)
    finally:
        await pool.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        if redis is not None:
            async for key in redis.scan_iter(match=f"bench:{schema}:*", count=1000):
                await redis.delete(key)
            await redis.aclose()
        if started is not None:
            started.stop()
    return {"projector": projector, "history_reads": reads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench conversation", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="messages in the read benchmark table")
    parser.add_argument("--contacts", type=int, default=1000, help="contacts in the projector benchmark")
    parser.add_argument("--turns", type=int, default=4, help="turns per contact (5 events each)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    p, r = figures["projector"], figures["history_reads"]
    print(
        f"projector, batched transactions : {p['batched_events_per_second']:>10,.0f} events/s "
        f"({p['batched_events']} events; target >= 3,000)"
    )
    print(
        f"projector, live (tx per event)  : {p['live_events_per_second']:>10,.0f} events/s "
        f"({p['live_events']} events)"
    )
    print(f"history read on {r['rows']:,} messages ({r['contacts']:,} contacts), newest 20:")
    for label, key, target in (
        ("from Redis cache", "cache", " (target p50 <= 0.5 ms)"),
        ("Postgres, indexed", "postgres_indexed", " (target p50 <= 2 ms)"),
        ("Postgres, indexed + version", "postgres_indexed_with_version", ""),
        ("Postgres, no index", "postgres_without_index", ""),
    ):
        f = r[key]
        if "p50_ms" in f:
            print(f"  {label:<28}: p50 {f['p50_ms']:>9.3f} ms  p99 {f['p99_ms']:>9.3f} ms{target}")
        else:
            print(f"  {label:<28}: {f}")
    if args.json:
        print(json.dumps(figures))
    return 0
