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

``--live`` measures instead the service as it runs in the system, CPU per event first: the real
wiring (telemetry, bus consumer, recorder, relay, cache, timers) on a throw-away JetStream stream
of its own, fed by a separate publisher process with the system's traffic at ``--rate`` inbound
messages/s (0: all at once, a backlog): bursts of 1-3 ``MessageReceived`` from ``--contacts``
contacts, and 1.5 s after each burst one ``ReplyGenerated`` (with LLM facts, half the time) and
its ``MessageSent``. It prints consumed events/s, this process's CPU µs per consumed event (the
publisher is another process), the lag from publish to recorded (committed and cached, before
the ack) p50/p99, the group-commit size and what the relay published.

Prints figures and the plan's targets; asserts nothing. ``--json``: the same figures as one
JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta

import asyncpg
import nats
import orjson
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from orbion_common.bus import Bus, Delivery
from orbion_common.events import (
    Envelope,
    Event,
    MessageReceived,
    MessageSent,
    ReplyGenerated,
    stable_event_id,
)
from orbion_common.events.messaging import (
    LeadFacts,
    MessageKind,
    MessageReceivedPayload,
    MessageSentPayload,
    Provider,
    ReplyGeneratedPayload,
)
from orbion_common.infra import InfraError, resolve_urls
from orbion_common.logging import configure_logging
from orbion_common.migrations import migrate
from orbion_common.settings import CommonSettings
from orbion_common.telemetry import setup_telemetry

from .app import SERVICE
from .bootstrap import Service, build
from .consumers import LeadConsumers
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
        by_phone[phone].append(_text_message(phone, mid, f"{rng.choice(TEXTS)} #{n}", when))
    return by_phone


def _text_message(phone: str, mid: str, text: str, when: datetime) -> MessageReceived:
    """A contact's text as the gateway publishes it (event id derived from the WhatsApp id)."""
    return MessageReceived.create(
        phone,
        MessageReceivedPayload(
            provider=Provider.CLOUD_API,
            provider_message_id=mid,
            phone=phone,
            profile_name="Bench",
            kind=MessageKind.TEXT,
            text=text,
            sent_at=when,
        ),
        event_id=stable_event_id("wa", mid),
        occurred_at=when,
    )


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


# --- live: the service as it runs in the system ---------------------------------------------

# The conversation service waits this long for a contact to stop typing, then one reply follows.
REPLY_AFTER_SECONDS = 1.5
BURST_GAP_SECONDS = 0.3
LLM_FACTS = (
    {"need": "CRM para o time de vendas"},
    {"company": "Acme", "sector": "varejo"},
    {"budget": "R$ 20 mil"},
    {"authority": "diretor comercial"},
    {"timing": "mês que vem"},
)

Plan = list[tuple[float, Envelope]]  # (seconds after the start, event), in publishing order


def _live_traffic(contacts: int, messages: int, rate: float, seed: int, base: datetime) -> Plan:
    """``messages`` inbound messages in bursts of 1-3 from random contacts at ``rate`` msg/s, each
    burst answered REPLY_AFTER_SECONDS later by a ``ReplyGenerated`` (LLM facts half the time) and
    its ``MessageSent``: about 0.5 replies per inbound message, as in the system.

    Deterministic (ids included): the publisher process makes the same plan rather than
    receiving it, which would cost this process CPU while it is measured."""
    rng = random.Random(seed)
    phones = [f"55{rng.randrange(10**10, 10**11)}" for _ in range(contacts)]
    plan: Plan = []
    t, made = 0.0, 0
    while made < messages:
        phone = rng.choice(phones)
        size = min(rng.randint(1, 3), messages - made)
        for i in range(size):
            at = t + i * BURST_GAP_SECONDS
            mid = f"wamid.live.{rng.getrandbits(128):032x}"
            plan.append((at, _text_message(phone, mid, rng.choice(TEXTS), base + timedelta(seconds=at))))
        made += size
        at = t + (size - 1) * BURST_GAP_SECONDS + REPLY_AFTER_SECONDS
        key = f"{rng.getrandbits(128):032x}"
        facts = LeadFacts(**rng.choice(LLM_FACTS)) if rng.random() < 0.5 else LeadFacts()
        reply = ReplyGenerated.create(
            phone,
            ReplyGeneratedPayload(reply_key=key, phone=phone, text="Entendi! Posso ajudar.", facts=facts),
            event_id=stable_event_id("bench-reply", key),
            occurred_at=base + timedelta(seconds=at),
        )
        sent = MessageSent.create(
            phone,
            MessageSentPayload(
                reply_key=key, phone=phone, provider_message_id=f"wamid.out.{key}", text=reply.payload.text
            ),
            cause=reply,
            event_id=stable_event_id("bench-sent", key),
            occurred_at=base + timedelta(seconds=at + 0.05),
        )
        plan += [(at, reply), (at + 0.05, sent)]
        if rate > 0:
            t += size / rate
    plan.sort(key=lambda item: item[0])  # stable: a contact's events keep their order
    return plan


def _publish_plan(nats_url: str, stream: str, args: argparse.Namespace, base: datetime) -> dict[str, float]:
    """In the publisher process: publish the plan on its schedule (open loop: a slow consumer
    never slows it down); returns each event's publish time (epoch seconds)."""
    plan = _live_traffic(args.contacts, args.events, args.rate, args.seed, base)
    paced = args.rate > 0

    async def publish() -> dict[str, float]:
        settings = CommonSettings(nats_url=nats_url, stream_name=stream)
        setup_telemetry("lead-bench-publisher", settings)  # trace context in the headers, as the gateway's
        bus = await Bus.connect(settings, name="lead-bench-publisher")
        stamps: dict[str, float] = {}
        try:
            start, i = time.perf_counter(), 0
            while i < len(plan):
                now = time.perf_counter() - start
                due: list[Envelope] = []
                while i < len(plan) and len(due) < 500 and (not paced or plan[i][0] <= now):
                    due.append(plan[i][1])
                    i += 1
                if not due:
                    await asyncio.sleep(min(plan[i][0] - now, 0.005))
                    continue
                stamp = time.time()
                await bus.publish_all(due)
                stamps.update(dict.fromkeys((e.event_id for e in due), stamp))
        finally:
            await bus.close()
        return stamps

    return asyncio.run(publish())


class _StampingConsumers(LeadConsumers):
    """The service's handler, noting when each event was recorded (committed, cached; not yet acked)."""

    def __init__(self, consumers: LeadConsumers, expected: int) -> None:
        super().__init__(consumers.recorder, consumers.policy, consumer=consumers.consumer)
        self.recorded: dict[str, float] = {}
        self.expected = expected
        self.all_recorded = asyncio.Event()

    async def handle(self, event: Event, delivery: Delivery | None = None) -> None:
        await super().handle(event, delivery)
        self.recorded[event.event_id] = time.time()
        if len(self.recorded) >= self.expected:
            self.all_recorded.set()


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def _live(settings: Settings, schema: str, args: argparse.Namespace) -> dict[str, float]:
    stream = f"LEAD_BENCH_{uuid.uuid4().hex[:8].upper()}"  # its own stream: subjects rooted at its name
    live = settings.model_copy(update={"stream_name": stream})
    configure_logging(SERVICE, live)
    setup_telemetry(SERVICE, live)  # as ``main``: instrumented asyncpg and redis, sampled spans
    base = datetime.now(UTC)
    plan = _live_traffic(args.contacts, args.events, args.rate, args.seed, base)
    svc = await build(live, schema=schema, cache_prefix=f"bench:{schema}:lead")
    consumers = svc.consumers = _StampingConsumers(svc.consumers, len(plan))
    groups = (_sample("orbion_lead_commit_batch_size_count"), _sample("orbion_lead_commit_batch_size_sum"))
    relayed = _sample("orbion_relay_published_total", {"schema": schema})
    spawn = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=spawn) as publisher:
            cpu = time.process_time()
            svc.start()
            publishing = asyncio.get_running_loop().run_in_executor(
                publisher, _publish_plan, live.nats_url, stream, args, base
            )
            deadline = time.monotonic() + (plan[-1][0] if args.rate > 0 else 0) + 300
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumers.all_recorded.wait(), deadline - time.monotonic())
            async with svc.pool.acquire() as conn:  # the relay's part counts too: wait until it caught up
                while time.monotonic() < deadline:
                    cursor = await svc.store.events.cursor(conn, "lead-relay")
                    if not (await svc.store.events.read_page(conn, cursor, limit=1)).read:
                        break
                    await asyncio.sleep(0.05)
                appended = await svc.store.count_events(conn)
            cpu = time.process_time() - cpu
            published = await publishing
    finally:
        await _drop_bench_keys(svc.redis, schema)
        await svc.stop()
        nc = await nats.connect(live.nats_url)
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
        await nc.close()
    if len(consumers.recorded) < len(plan):
        raise RuntimeError(f"the service recorded {len(consumers.recorded)} of {len(plan)} events in time")
    lags = [(consumers.recorded[eid] - published[eid]) * 1000 for eid in published]
    seconds = max(consumers.recorded.values()) - min(published.values())
    batches = _sample("orbion_lead_commit_batch_size_count") - groups[0]
    return {
        "live_events": len(plan),
        "live_inbound": args.events,
        "live_rate": args.rate,
        "live_events_per_s": len(plan) / seconds,
        "live_cpu_us_per_event": cpu * 1e6 / len(plan),
        "live_lag_p50_ms": _percentile(lags, 0.50),
        "live_lag_p99_ms": _percentile(lags, 0.99),
        "live_group_commit_avg": (_sample("orbion_lead_commit_batch_size_sum") - groups[1]) / max(batches, 1),
        "live_lead_events_per_input": appended / len(plan),
        "live_relayed_per_input": (_sample("orbion_relay_published_total", {"schema": schema}) - relayed)
        / len(plan),
    }


async def _drop_bench_keys(redis: Redis | None, schema: str) -> None:
    if redis is None:
        return
    keys = [k async for k in redis.scan_iter(match=f"bench:{schema}:lead:*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


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
    try:
        await migrate(conn, schema, MIGRATIONS)
        if args.live:
            live = await _live(settings, schema, args)
            figures: dict[str, object] = {k: round(v, 2) for k, v in live.items()}
        else:
            figures = await _offline(settings, schema, args)
        figures["cpus"] = os.cpu_count() or 0
        figures["load_avg_1m"] = round(os.getloadavg()[0], 2)
        figures["target_events_per_s"] = TARGET_EVENTS_PER_SECOND
        figures["target_cached_p50_ms"] = TARGET_CACHED_P50_MS
        return figures
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        if started is not None:
            started.stop()


async def _offline(settings: Settings, schema: str, args: argparse.Namespace) -> dict[str, object]:
    """The projector, rebuild and lookup figures (and ``--bus``), on the migrated ``schema``."""
    svc = await build(settings, schema=schema, cache_prefix=f"bench:{schema}:lead", with_bus=False)
    try:
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
        return figures
    finally:
        await _drop_bench_keys(svc.redis, schema)
        await svc.stop()


def _print(figures: dict[str, object]) -> None:
    if "live_events" in figures:
        _print_live(figures)
    else:
        _print_offline(figures)
    print(
        f"machine: {figures['cpus']} CPUs, load average {figures['load_avg_1m']} "
        "(other work on the machine lowers the figures)"
    )


def _print_live(f: dict[str, object]) -> None:
    rate = f"{f['live_rate']} inbound msg/s" if f["live_rate"] else "all at once (a backlog)"
    print(f"lead service, live: {f['live_events']} events ({f['live_inbound']} inbound messages), {rate}")
    print(f"  consumed           {f['live_events_per_s']:>10} events/s")
    print(
        f"  service CPU        {f['live_cpu_us_per_event']:>10} µs/event "
        "(this process: consumer, recorder, relay, cache)"
    )
    print(f"  lag p50 / p99      {f['live_lag_p50_ms']} / {f['live_lag_p99_ms']} ms (published -> recorded)")
    print(f"  group commit       {f['live_group_commit_avg']:>10} inputs per transaction on average")
    print(
        f"  lead events        {f['live_lead_events_per_input']:>10} appended, "
        f"{f['live_relayed_per_input']} relayed, per input event"
    )


def _print_offline(figures: dict[str, object]) -> None:
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
    parser.add_argument(
        "--live",
        action="store_true",
        help="only the live figure: the whole service on a stream of its own, fed by another process",
    )
    parser.add_argument(
        "--rate", type=float, default=250.0, help="--live: inbound messages/s offered (0: all at once)"
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
