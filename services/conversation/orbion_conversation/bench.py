"""``orbion bench conversation``: projector throughput and history read latency, on real servers.

Figures (targets on a 2-core machine in brackets):

- projector throughput, batched transactions (the rebuild path) [>= 3,000 events/s], and the
  live handler path (one transaction per event, 16 contacts at a time, cache write-through);
- history read (newest 20 messages of a contact) p50/p99: from the Redis cache [p50 <= 0.5 ms],
  from Postgres with the ``(phone, created_at DESC)`` index [p50 <= 2 ms] and without it, on a
  table of ``--rows`` messages (default 1,000,000: the plan's before/after);
- the live consumer: the real service wiring (bus consumer, reply scheduler, relay) fed through
  JetStream by a separate publisher process at ``--live-rate`` events/s: MessageReceived in
  short bursts from many contacts, ReplyGenerated and MessageSent for the replies. Consumed
  events/s, ReplyRequested relayed/s, the service process's CPU per event [well under 250 µs:
  issue 9 needs > 2,000 events/s in half a core], lag published -> committed and due ->
  ReplyRequested in JetStream, p50/p99.

Everything happens in a throw-away schema, stream and Redis prefix, dropped at the end. Servers:
the ORBION_* URLs, else ORBION_TEST_* URLs, else the running (or started) local ones.
With ``--json`` the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
from nats.aio.msg import Msg
from redis.asyncio import Redis

from orbion_common.bus import Bus, ConsumerSpec, Handler
from orbion_common.db import create_pool
from orbion_common.events import Envelope, Event, ReplyRequested, decode, stable_event_id
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
from .bootstrap import MIGRATIONS, build
from .consumers import Deps, record_event
from .history import History, history_cache
from .rebuild import rebuild
from .replies import ReplyContext
from .settings import Settings
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


# -- the live consumer ------------------------------------------------------------------------

FIGURES = ("live", "projector", "reads")
LIVE_QUIET_SECONDS = 0.3  # short, so that bursts close soon; turns are 2 s apart


@dataclass(frozen=True)
class Planned:
    """One event of the live run: when to publish it (seconds after the start) and what it is."""

    at: float
    kind: str  # "in", "generated" or "sent"
    phone: str
    mid: str  # the inbound's provider id; for a reply, its burst's last inbound


def live_plan(events: int, rate: float, seed: int = 9) -> list[Planned]:
    """Contacts writing 2 turns of 1-3 messages (50 ms apart), 2 s apart, each turn answered
    (ReplyGenerated, MessageSent) shortly after its quiet period: about 1 : 0.5 : 0.5, like the
    system's traffic. Contacts start at random over ``events / rate`` seconds."""
    rng = random.Random(seed)
    span = max(0.0, events / rate - 4.0)
    plan: list[Planned] = []
    contact = 0
    while len(plan) < events:
        phone = _phone(20_000_000 + contact)
        start = rng.uniform(0, span)
        for turn in range(2):
            at = start + 2.0 * turn
            mids = [f"wamid.live.{phone}.{turn}.{i}" for i in range(rng.choice((1, 2, 2, 3)))]
            plan += [Planned(at + 0.05 * i, "in", phone, mid) for i, mid in enumerate(mids)]
            answered = at + 0.05 * (len(mids) - 1) + LIVE_QUIET_SECONDS + 0.2
            plan.append(Planned(answered, "generated", phone, mids[-1]))
            plan.append(Planned(answered + 0.1, "sent", phone, mids[-1]))
        contact += 1
    plan.sort(key=lambda p: p.at)
    return plan[:events]


def live_event(p: Planned) -> Envelope:
    """The event as its producer publishes it, stamped now (``occurred_at`` = publish time)."""
    if p.kind == "in":
        payload = MessageReceivedPayload(
            provider=Provider.CLOUD_API,
            provider_message_id=p.mid,
            phone=p.phone,
            kind=MessageKind.TEXT,
            text="Oi, quanto custa o plano?",
            sent_at=datetime.now(UTC),
            profile_name="Bench",
        )
        return MessageReceived.create(p.phone, payload, event_id=stable_event_id("MessageReceived", p.mid))
    key = domain.reply_key([p.mid])
    text = "O plano Pro custa R$ 99 por mês."
    if p.kind == "generated":
        return ReplyGenerated.create(p.phone, ReplyGeneratedPayload(reply_key=key, phone=p.phone, text=text))
    out = MessageSentPayload(reply_key=key, phone=p.phone, provider_message_id=f"{p.mid}.out", text=text)
    return MessageSent.create(p.phone, out)


def publish_plan(nats_url: str, stream_name: str, events: int, rate: float) -> None:
    """The publisher process: the plan, open loop (each event at its time, whatever the consumer does)."""

    async def publish() -> None:
        bus = await Bus.connect(Settings(nats_url=nats_url, stream_name=stream_name), name="bench-publisher")
        plan = live_plan(events, rate)
        times = [p.at for p in plan]
        started = time.monotonic()
        sent = 0
        while sent < len(plan):
            now = time.monotonic() - started
            due = bisect.bisect_right(times, now, lo=sent)
            if due == sent:
                await asyncio.sleep(min(0.005, plan[sent].at - now))
                continue
            await bus.publish_all([live_event(p) for p in plan[sent:due]])
            sent = due
        await bus.nc.close()

    asyncio.run(publish())


class _TimedBus(Bus):
    """The real bus; it notes when each handler returned (its transaction committed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed: dict[str, float] = {}
        self.lags: list[float] = []
        self.expected = 0
        self.all_committed = asyncio.Event()

    def consume(self, spec: ConsumerSpec, handler: Handler) -> None:
        async def timed(event: Event, delivery: Any) -> None:
            await handler(event, delivery)
            now = time.time()
            if event.event_id not in self.committed:
                self.committed[event.event_id] = now
                self.lags.append(now - event.occurred_at.timestamp())
                if len(self.committed) >= self.expected:
                    self.all_committed.set()

        super().consume(spec, timed)


def _ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
    }


async def bench_live(
    database_url: str, redis: Redis | None, nats_url: str, schema: str, events: int, rate: float
) -> dict[str, Any]:
    stream = f"CONVBENCH{uuid.uuid4().hex[:8].upper()}"
    settings = Settings(
        nats_url=nats_url,
        database_url=database_url,
        stream_name=stream,
        reply_quiet_period_seconds=LIVE_QUIET_SECONDS,
    )
    pool = await create_pool(settings, service=schema)  # the service's pool, on the throw-away schema
    bus = await _TimedBus.connect(settings, name="conversation-bench")
    assert isinstance(bus, _TimedBus)
    relayed: list[tuple[float, ReplyRequested]] = []

    async def on_reply(msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, ReplyRequested)
        relayed.append((time.time(), event))

    await bus.nc.subscribe(f"{bus.root}.events.ReplyRequested.*", cb=on_reply)
    service = build(settings, pool, schema=schema, redis=redis, bus=bus, cache_prefix=f"bench:{schema}:live")
    service.start("conversation-bench")
    publisher = multiprocessing.get_context("spawn").Process(
        target=publish_plan, args=(nats_url, stream, events, rate), daemon=True
    )
    bus.expected = events
    cpu = time.process_time()
    publisher.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.all_committed.wait(), timeout=60 + 20 * events / rate)
        settled = len(relayed), time.monotonic()
        while time.monotonic() - settled[1] < LIVE_QUIET_SECONDS + 1.5:  # the last bursts' replies
            await asyncio.sleep(0.05)
            if len(relayed) != settled[0]:
                settled = len(relayed), time.monotonic()
        cpu = time.process_time() - cpu
    finally:
        publisher.join(timeout=10)
        await service.stop()
        await pool.close()
        nc = await nats.connect(nats_url)
        for name in (stream, f"{stream}_DLQ"):
            await nc.jetstream().delete_stream(name)
        await nc.close()
    done = sorted(bus.committed.values())
    consumed = len(done)
    window = max(done[-1] - done[0], 1e-3) if done else 1.0
    reply_lags = []
    for at, event in relayed:
        last = bus.committed.get(stable_event_id("MessageReceived", event.payload.inbound_message_ids[-1]))
        if last is not None:
            reply_lags.append(max(0.0, at - last - LIVE_QUIET_SECONDS))
    reply_times = [at for at, _ in relayed]
    return {
        "events": events,
        "offered_per_second": rate,
        "consumed": consumed,
        "consumed_per_second": round(consumed / window, 1),
        "relayed": len(relayed),
        "relayed_per_second": round(len(relayed) / max(max(reply_times) - min(reply_times), 1e-3), 1)
        if relayed
        else 0.0,
        "cpu_us_per_event": round(cpu / max(consumed, 1) * 1e6, 1),
        "committed_lag": _ms(bus.lags),
        "reply_lag": _ms(reply_lags),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _urls() -> tuple[str, str, str, Any]:
    from orbion_common.infra import resolve_urls
    from orbion_common.settings import CommonSettings

    settings = CommonSettings()
    db = settings.database_url or os.environ.get("ORBION_TEST_DATABASE_URL", "")
    rd = settings.redis_url or os.environ.get("ORBION_TEST_REDIS_URL", "")
    nt = settings.nats_url or os.environ.get("ORBION_TEST_NATS_URL", "")
    if db and rd and nt:
        return db, rd, nt, None
    urls, started = resolve_urls(settings, start=True)
    return db or urls.database_url, rd or urls.redis_url, nt or urls.nats_url, started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    database_url, redis_url, nats_url, started = _urls()
    schema = f"conversation_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await migrate(conn, schema, MIGRATIONS)
    pool = await asyncpg.create_pool(
        database_url, min_size=2, max_size=8, server_settings={"search_path": schema}
    )
    assert pool is not None
    redis = Redis.from_url(redis_url, socket_timeout=1.0) if redis_url else None
    figures: dict[str, Any] = {}
    try:
        if "live" in args.only:
            figures["live"] = await bench_live(
                database_url, redis, nats_url, schema, args.live_events, args.live_rate
            )
        if "projector" in args.only:
            figures["projector"] = await bench_projector(pool, schema, redis, args.contacts, args.turns)
        if "reads" in args.only:
            figures["history_reads"] = await bench_reads(pool, schema, redis, args.rows)
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
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench conversation", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="messages in the read benchmark table")
    parser.add_argument("--contacts", type=int, default=1000, help="contacts in the projector benchmark")
    parser.add_argument("--turns", type=int, default=4, help="turns per contact (5 events each)")
    parser.add_argument("--live-events", type=int, default=15_000, help="events of the live consumer run")
    parser.add_argument("--live-rate", type=float, default=1500.0, help="events/s the live run offers")
    parser.add_argument(
        "--only", nargs="+", choices=FIGURES, default=list(FIGURES), help="figures to measure (default: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    if "live" in figures:
        print_live(figures["live"])
    if "projector" in figures:
        print_projector(figures["projector"])
    if "history_reads" in figures:
        print_reads(figures["history_reads"])
    if args.json:
        print(json.dumps(figures))
    return 0


def print_live(f: dict[str, Any]) -> None:
    c, r = f["committed_lag"], f["reply_lag"]
    print(
        f"live consumer ({f['events']:,} events offered at {f['offered_per_second']:,.0f}/s, "
        f"load average {', '.join(str(x) for x in f['load_average'])}):\n"
        f"  consumed              : {f['consumed_per_second']:>10,.0f} events/s ({f['consumed']:,} events)\n"
        f"  ReplyRequested relayed: {f['relayed_per_second']:>10,.0f} /s ({f['relayed']:,})\n"
        f"  service CPU           : {f['cpu_us_per_event']:>10,.0f} µs per event\n"
        f"  published -> committed: p50 {c['p50_ms']:,.1f} ms  p99 {c['p99_ms']:,.1f} ms\n"
        f"  due -> ReplyRequested : p50 {r['p50_ms']:,.1f} ms  p99 {r['p99_ms']:,.1f} ms"
    )


def print_projector(p: dict[str, Any]) -> None:
    print(
        f"projector, batched transactions : {p['batched_events_per_second']:>10,.0f} events/s "
        f"({p['batched_events']} events; target >= 3,000)"
    )
    print(
        f"projector, live (tx per event)  : {p['live_events_per_second']:>10,.0f} events/s "
        f"({p['live_events']} events)"
    )


def print_reads(r: dict[str, Any]) -> None:
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
