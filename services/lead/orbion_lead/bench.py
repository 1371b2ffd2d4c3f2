"""``orbion bench lead``: projector events/s, and cached lead lookups vs Postgres (p50/p99).

Runs against real Postgres and Redis (configured URLs, else the running local infra, else
started for the run) in a throw-away schema and Redis prefix, removed afterwards:

1. **projector**: ``--events`` inbound messages (PT/EN sales talk, some with facts) from
   ``--contacts`` contacts go through the consumer's handler (claim, decide, append, project,
   commit, cache write-through), ``--concurrency`` contacts at a time, each contact's
   messages in order, as the bus delivers them. Then the projection is rebuilt from the
   events (pure fold + upserts). With ``--bus``, the same load is also published to
   JetStream and consumed by the service's real consumer (needs NATS).
2. **lookups**: ``--lookups`` reads of random leads through ``LeadRecorder.get`` (the API's
   read): from the cache (a Redis hit), then the same with the cache off (Postgres), one at a time.

Prints figures and the plan's targets; asserts nothing. ``--json``: the same figures as one
JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from orbion_common.bus import Bus
from orbion_common.events import MessageReceived, stable_event_id
from orbion_common.events.messaging import MessageKind, MessageReceivedPayload, Provider
from orbion_common.infra import InfraError, resolve_urls
from orbion_common.migrations import migrate

from .bootstrap import Service, build
from .recorder import LeadRecorder
from .settings import Settings
from .store import MIGRATIONS

TARGET_EVENTS_PER_SECOND = 3000
TARGET_CACHED_P50_MS = 0.5

TEXTS = (
    "Oi, bom dia!",
    "Precisamos de um CRM para o time de vendas",
    "Nosso orçamento é de R$ 20 mil",
    "Sou o diretor comercial",
    "Queremos começar mês que vem",
    "Quanto custa?",
    "We need a chatbot for support",
    "Budget is around $5k",
    "ok, obrigado",
    "Pode me mandar mais detalhes?",
)


def _messages(contacts: int, events: int, seed: int) -> dict[str, list[MessageReceived]]:
    rng = random.Random(seed)
    base = datetime.now(UTC)
    phones = [f"55{rng.randrange(10**10, 10**11)}" for _ in range(contacts)]
    by_phone: dict[str, list[MessageReceived]] = {p: [] for p in phones}
    for n in range(events):
        phone = phones[n % contacts]
        mid = f"wamid.bench.{uuid.uuid4().hex}"
        when = base + timedelta(seconds=n)  # far apart: no quick-reply or repeat bot signals
        by_phone[phone].append(
            MessageReceived.create(
                phone,
                MessageReceivedPayload(
                    provider=Provider.CLOUD_API,
                    provider_message_id=mid,
                    phone=phone,
                    profile_name="Bench",
                    kind=MessageKind.TEXT,
                    text=f"{rng.choice(TEXTS)} #{n}",
                    sent_at=when,
                ),
                event_id=stable_event_id("wa", mid),
                occurred_at=when,
            )
        )
    return by_phone


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _project(
    svc: Service, by_phone: dict[str, list[MessageReceived]], concurrency: int
) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds to handle every message."""
    queue: asyncio.Queue[list[MessageReceived]] = asyncio.Queue()
    for messages in by_phone.values():
        queue.put_nowait(messages)

    async def worker() -> None:
        while not queue.empty():
            for message in queue.get_nowait():
                await svc.consumers.handle(message)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, time.process_time() - cpu


async def _lookups(svc: Service, phones: list[str], count: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    picks = [rng.choice(phones) for _ in range(count)]
    for phone in phones:  # warm: every lead cached (write-through already did; a miss would load it)
        await svc.recorder.get(phone)
    cached: list[float] = []
    for phone in picks:
        t0 = time.perf_counter()
        lead = await svc.recorder.get(phone)
        cached.append((time.perf_counter() - t0) * 1000)
        assert lead is not None
    # The same read with the cache off: what every read costs when Redis is down.
    uncached = LeadRecorder(svc.pool, svc.store, None)
    postgres: list[float] = []
    for phone in picks:
        t0 = time.perf_counter()
        lead = await uncached.get(phone)
        postgres.append((time.perf_counter() - t0) * 1000)
        assert lead is not None
    return {
        "cached_p50_ms": _percentile(cached, 0.50),
        "cached_p99_ms": _percentile(cached, 0.99),
        "postgres_p50_ms": _percentile(postgres, 0.50),
        "postgres_p99_ms": _percentile(postgres, 0.99),
        "cached_mean_ms": statistics.fmean(cached),
    }


async def _via_bus(settings: Settings, schema: str, messages: list[MessageReceived]) -> dict[str, float]:
    """Publish ``messages`` to JetStream, then time the lead consumer through that backlog."""
    durable = f"lead-bench-{uuid.uuid4().hex[:8]}"
    svc = await build(settings, schema=schema, durable=durable, cache_prefix=f"bench:{schema}:lead")
    svc.deliver_new_only = True  # the stream is shared: only what this run publishes
    svc.relay = None  # the lead events stay in the throw-away schema, not on the shared stream
    publisher = await Bus.connect(settings, name="lead-bench")
    try:
        # The durable exists before the messages (it delivers what comes after it), and the
        # service starts on the backlog: publishing does not compete with the consumer.
        # Same config as Bus._bind makes it (subject root; one filter per type from NATS 2.10).
        version = publisher.nc.connected_server_version
        config = svc.consumer_spec().consumer_config(
            publisher.root, multi_filter=(version.major, version.minor) >= (2, 10)
        )
        await publisher.js.add_consumer(settings.stream_name, config)
        started = time.perf_counter()
        for i in range(0, len(messages), 500):
            await publisher.publish_all(messages[i : i + 500])
        published = time.perf_counter() - started
        started = time.perf_counter()
        svc.start()
        done = 0
        async with svc.pool.acquire() as conn:
            for _ in range(15_000):  # polling the store: the consumer has no "done" signal; <= 5 min
                done = await svc.store.count_processed(conn, durable)
                if done >= len(messages):
                    break
                await asyncio.sleep(0.02)
        if done < len(messages):
            raise RuntimeError(f"the consumer handled {done} of {len(messages)} events in 5 minutes")
        handled = time.perf_counter() - started
        return {"bus_events_per_s": len(messages) / handled, "bus_publish_per_s": len(messages) / published}
    finally:
        await svc.stop()
        with contextlib.suppress(Exception):
            await publisher.js.delete_consumer(settings.stream_name, durable)
        await publisher.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    base = Settings()
    try:
        urls, started = resolve_urls(base, start=True, durable=False)
    except InfraError as exc:
        raise SystemExit(f"error: {exc}") from exc
    schema = f"lead_bench_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        nats_url=urls.nats_url,
        database_url=urls.database_url,
        redis_url=urls.redis_url,
        db_pool_max=max(args.concurrency + 2, base.db_pool_max),
    )
    conn = await asyncpg.connect(settings.database_url)
    svc: Service | None = None
    try:
        await migrate(conn, schema, MIGRATIONS)
        svc = await build(settings, schema=schema, cache_prefix=f"bench:{schema}:lead", with_bus=False)
        by_phone = _messages(args.contacts, args.events, args.seed)
        seconds, cpu_seconds = await _project(svc, by_phone, args.concurrency)
        async with svc.pool.acquire() as c:
            appended = await svc.store.count_events(c)
            t0 = time.perf_counter()
            async with c.transaction():
                rebuilt = await svc.store.rebuild_projection(c)
            rebuild_seconds = time.perf_counter() - t0
        figures: dict[str, object] = {
            "events": args.events,
            "contacts": args.contacts,
            "concurrency": args.concurrency,
            "projector_events_per_s": round(args.events / seconds, 1),
            "projector_cpu_ms_per_event": round(cpu_seconds * 1000 / args.events, 3),
            "lead_events_appended": appended,
            "lead_events_appended_per_s": round(appended / seconds, 1),
            "rebuild_events_per_s": round(appended / rebuild_seconds, 1),
            "rebuild_leads": rebuilt,
        }
        lookups = await _lookups(svc, list(by_phone), args.lookups, args.seed)
        figures.update({k: round(v, 3) for k, v in lookups.items()})
        figures["lookups"] = args.lookups
        if args.bus:
            messages = [m for ms in _messages(args.contacts, args.events, args.seed + 1).values() for m in ms]
            messages.sort(key=lambda m: m.occurred_at)  # as contacts write: interleaved
            via_bus = await _via_bus(settings, schema, messages)
            figures.update({k: round(v, 1) for k, v in via_bus.items()})
        figures["cpus"] = os.cpu_count() or 0
        figures["load_avg_1m"] = round(os.getloadavg()[0], 2)
        figures["target_events_per_s"] = TARGET_EVENTS_PER_SECOND
        figures["target_cached_p50_ms"] = TARGET_CACHED_P50_MS
        return figures
    finally:
        if svc is not None:
            if svc.redis is not None:
                keys = [k async for k in svc.redis.scan_iter(match=f"bench:{schema}:lead:*", count=1000)]
                for i in range(0, len(keys), 500):
                    await svc.redis.delete(*keys[i : i + 500])
            await svc.stop()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        if started is not None:
            started.stop()


def _print(figures: dict[str, object]) -> None:
    ok_rate = float(figures["projector_events_per_s"]) >= TARGET_EVENTS_PER_SECOND  # type: ignore[arg-type]
    ok_p50 = float(figures["cached_p50_ms"]) <= TARGET_CACHED_P50_MS  # type: ignore[arg-type]
    print(
        f"lead projector: {figures['events']} inbound events from {figures['contacts']} contacts, "
        f"{figures['concurrency']} at a time"
    )
    print(
        f"  handled            {figures['projector_events_per_s']:>10} events/s   "
        f"(target >= {TARGET_EVENTS_PER_SECOND}: {'met' if ok_rate else 'NOT met'})"
    )
    print(
        f"  service CPU        {figures['projector_cpu_ms_per_event']:>10} ms/event "
        "(this process only; Postgres and Redis work on the same CPUs)"
    )
    print(
        f"  lead events stored {figures['lead_events_appended_per_s']:>10} events/s   "
        f"({figures['lead_events_appended']} appended)"
    )
    print(
        f"  rebuild (fold)     {figures['rebuild_events_per_s']:>10} events/s   "
        f"({figures['rebuild_leads']} leads)"
    )
    print(f"lead lookups: {figures['lookups']} random reads, one at a time")
    print(
        f"  cached   p50 {figures['cached_p50_ms']:>7} ms  p99 {figures['cached_p99_ms']:>7} ms   "
        f"(target p50 <= {TARGET_CACHED_P50_MS} ms: {'met' if ok_p50 else 'NOT met'})"
    )
    print(
        f"  postgres p50 {figures['postgres_p50_ms']:>7} ms  p99 {figures['postgres_p99_ms']:>7} ms   "
        "(cache off)"
    )
    if "bus_events_per_s" in figures:
        print(
            f"through JetStream: consumer {figures['bus_events_per_s']} events/s "
            f"(publishing {figures['bus_publish_per_s']} events/s)"
        )
    print(
        f"machine: {figures['cpus']} CPUs, load average {figures['load_avg_1m']} "
        "(other work on the machine lowers the figures)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench lead", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000, help="inbound messages to project")
    parser.add_argument("--contacts", type=int, default=600, help="distinct contacts")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="contacts handled at once (the consumer's batch size)"
    )
    parser.add_argument("--lookups", type=int, default=5000, help="lead reads per source")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--bus", action="store_true", help="also time the same load through JetStream and the real consumer"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON (last line)")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    _print(figures)
    if args.json:
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
