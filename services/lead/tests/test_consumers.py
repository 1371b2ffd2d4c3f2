"""Handlers against real Postgres and Redis: one transaction per event, idempotent, timers durable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from asyncpg.connection import LoggedQuery
from lead_builders import at, inbound, lead_settings, new_phone, reply, sent
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.asyncio import Redis

from orbion_common.events import EVENTS_BY_NAME, Envelope
from orbion_lead import domain
from orbion_lead.bootstrap import Service, build
from orbion_lead.rebuild import rebuild
from orbion_lead.recorder import LeadRecorder, lead_cache
from orbion_lead.store import Change

pytestmark = pytest.mark.skipif(
    "LeadActivityRecorded" not in EVENTS_BY_NAME,
    reason="LeadActivityRecorded is not registered in orbion_common.events yet",
)


async def event_types(svc: Service, phone: str) -> list[str]:
    async with svc.pool.acquire() as conn:
        return [s.event.type for s in await svc.store.load_events(conn, phone, limit=1000)]


async def handle_all(svc: Service, *events: Envelope) -> None:
    for event in events:
        await svc.consumers.handle(event)  # type: ignore[arg-type]


async def test_a_first_message_creates_the_lead_in_store_projection_and_cache(service: Service) -> None:
    phone = new_phone()
    await handle_all(service, inbound(phone, "Oi! Precisamos de um CRM para o time de vendas"))
    assert await event_types(service, phone) == [
        "LeadCreated",
        "LeadActivityRecorded",
        "LeadFieldsCaptured",
        "BantStageAdvanced",
        "LeadChanged",
    ]
    async with service.pool.acquire() as conn:
        projected = await service.store.load_lead(conn, phone)
    assert projected.exists and projected.version == 5 and projected.stage is domain.Stage.BUDGET
    assert service.recorder.cache is not None
    cached = await service.recorder.cache.peek(phone)
    assert cached is not None and cached.version == 5
    assert domain.Lead.model_validate_json(cached.value) == projected


async def test_a_decisions_events_and_its_lead_are_written_in_one_statement(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events of a group's decisions and the leads they fold into go to Postgres together:
    one round trip, and both are there after the commit."""
    statements: list[str] = []
    append_and_project = service.store.append_and_project

    async def counted(conn: asyncpg.Connection, changes: Sequence[Change]) -> None:
        def logged(query: LoggedQuery) -> None:
            statements.append(query.query)

        conn.add_query_logger(logged)
        try:
            await append_and_project(conn, changes)
            await asyncio.sleep(0)  # the logger is called soon after the statement, not in it
        finally:
            conn.remove_query_logger(logged)

    monkeypatch.setattr(service.store, "append_and_project", counted)
    phones = [new_phone() for _ in range(3)]
    await asyncio.gather(*(service.consumers.handle(inbound(p, "Oi")) for p in phones))
    writes = [q for q in statements if "INSERT INTO" in q]  # not the pool's checks of a new statement
    assert writes and all("WITH appended AS" in q for q in writes)  # before: the events, then the leads
    async with service.pool.acquire() as conn:
        for phone in phones:
            events = await service.store.load_events(conn, phone, limit=100)
            lead = await service.store.load_lead(conn, phone)
            assert lead.exists and lead.version == len(events) == events[-1].version


async def test_a_redelivered_event_changes_nothing(service: Service) -> None:
    phone = new_phone()
    first = inbound(phone, "Sou o diretor e temos orçamento de R$ 10 mil")
    await handle_all(service, first, reply(phone, need="crm", when=at(1)))
    before = await event_types(service, phone)
    lead_before = await service.recorder.get(phone)
    await handle_all(service, first)  # JetStream redelivery after a lost ack
    assert await event_types(service, phone) == before
    assert await service.recorder.get(phone) == lead_before


async def test_concurrent_deliveries_of_one_event_record_it_once(service: Service) -> None:
    phone = new_phone()
    msg = inbound(phone, "Preciso de um site")
    await asyncio.gather(*(service.consumers.handle(msg) for _ in range(4)))
    assert (await event_types(service, phone)).count("LeadCreated") == 1
    lead = await service.recorder.get(phone)
    assert lead is not None and lead.messages_in == 1


async def test_a_failure_mid_handler_commits_nothing_and_the_redelivery_succeeds(service: Service) -> None:
    phone = new_phone()
    msg = inbound(phone, "Oi")

    def crash(lead: domain.Lead) -> list[Envelope]:
        raise RuntimeError("crash after claim, before append")

    with pytest.raises(RuntimeError):
        await service.recorder.record(phone, crash, claim=(service.consumers.consumer, msg.event_id))
    assert await event_types(service, phone) == []
    await handle_all(service, msg)  # the redelivery: the claim was rolled back with the rest
    assert "LeadCreated" in await event_types(service, phone)


async def test_many_contacts_at_once_each_get_their_own_lead(service: Service) -> None:
    phones = [new_phone() for _ in range(20)]
    await asyncio.gather(*(service.consumers.handle(inbound(p, "Oi")) for p in phones))
    leads = await asyncio.gather(*(service.recorder.get(p) for p in phones))
    assert all(lead is not None and lead.messages_in == 1 for lead in leads)


async def test_bot_is_asked_once_then_blocked_after_two_wrong_answers(service: Service) -> None:
    phone = new_phone()
    await handle_all(
        service,
        inbound(phone, "Mensagem automática: digite 1 para vendas", when=at(0)),
        sent(phone, when=at(1)),
        inbound(phone, "Mensagem automática: digite 1 para vendas", when=at(2)),
        inbound(phone, "Mensagem automática: digite 1 para vendas", when=at(3)),
        inbound(phone, "digite 1", when=at(4)),
    )
    types = await event_types(service, phone)
    assert types.count("HumanVerificationRequested") == 1
    assert types.count("HumanVerificationFailed") == 2 and types.count("ContactBlocked") == 1
    lead = await service.recorder.get(phone)
    assert lead is not None and lead.blocked and not lead.agent_replies
    assert await service.recorder.fire_due_timers(at(1000)) == 0  # the block cleared the timer


async def test_an_unanswered_verification_blocks_once_even_with_two_timer_runners(service: Service) -> None:
    phone = new_phone()
    now = datetime.now(UTC)
    await handle_all(
        service,
        inbound(phone, "Resposta automática: fora do horário de atendimento", when=now),
        inbound(
            phone, "Resposta automática: fora do horário de atendimento", when=now + timedelta(seconds=1)
        ),
    )
    lead = await service.recorder.get(phone)
    assert lead is not None and lead.verification.pending
    assert await service.recorder.fire_due_timers(now + timedelta(seconds=30)) == 0  # not due yet
    later = now + timedelta(seconds=120)
    # A second replica's runner uses another recorder on the same tables.
    other = LeadRecorder(service.pool, service.store, None)
    fired = await asyncio.gather(service.recorder.fire_due_timers(later), other.fire_due_timers(later))
    assert sum(fired) == 1
    types = await event_types(service, phone)
    assert types.count("ContactBlocked") == 1
    blocked = await service.recorder.get(phone)
    assert blocked is not None and blocked.blocked and blocked.block_reasons[0] == "verification_timeout"


async def test_a_passed_verification_clears_its_timer(service: Service) -> None:
    phone = new_phone()
    now = datetime.now(UTC)
    await handle_all(
        service,
        inbound(phone, "Sou a assistente virtual. Digite 1", when=now),
        inbound(phone, "Sou a assistente virtual. Digite 1", when=now + timedelta(seconds=1)),
        inbound(phone, "SIM", when=now + timedelta(seconds=5)),
    )
    assert await service.recorder.fire_due_timers(now + timedelta(seconds=600)) == 0
    lead = await service.recorder.get(phone)
    assert lead is not None and not lead.blocked and lead.verification.passed


async def test_the_lead_is_read_from_postgres_when_redis_is_down(service: Service) -> None:
    phone = new_phone()
    await handle_all(service, inbound(phone, "Oi"))
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    recorder = LeadRecorder(service.pool, service.store, lead_cache(dead, prefix="x", ttl_seconds=60))
    lead = await recorder.get(phone)
    assert lead is not None and lead.messages_in == 1
    await recorder.record(phone, lambda lead: domain.on_message_received(lead, inbound(phone, "tudo bem?")))
    assert (await recorder.get(phone)).messages_in == 2  # type: ignore[union-attr]
    await dead.aclose()


async def test_a_stale_cache_write_never_replaces_a_newer_lead(service: Service) -> None:
    phone = new_phone()
    await handle_all(service, inbound(phone, "Oi"), inbound(phone, "Preciso de um site", when=at(5)))
    cache = service.recorder.cache
    assert cache is not None
    fresh = await service.recorder.get(phone)
    assert fresh is not None
    old = domain.Lead(phone=phone, version=1, created_at=at(0), updated_at=at(0))
    assert not await cache.put(phone, 1, old.model_dump_json().encode())
    assert await service.recorder.get(phone) == fresh


async def test_the_projection_rebuilt_from_events_equals_the_live_one(service: Service) -> None:
    phones = [new_phone() for _ in range(3)]
    for i, phone in enumerate(phones):
        await handle_all(
            service,
            inbound(phone, "Precisamos de um chatbot", when=at(i)),
            reply(phone, budget="R$ 20 mil", when=at(i + 1)),
            sent(phone, when=at(i + 2)),
        )
    live = [await service.recorder.get(p) for p in phones]
    async with service.pool.acquire() as conn, conn.transaction():
        rebuilt = await service.store.rebuild_projection(conn)
    assert rebuilt >= 3
    async with service.pool.acquire() as conn:
        assert [await service.store.load_lead(conn, p) for p in phones] == live


async def test_a_failing_decision_in_a_batch_fails_only_itself(service: Service) -> None:
    phones = [new_phone() for _ in range(5)]

    def broken(lead: domain.Lead) -> list[Envelope]:
        raise ValueError("a bug in one decision")

    def decide_for(phone: str) -> Callable[[domain.Lead], list[Envelope]]:
        if phone == phones[2]:
            return broken
        return lambda lead: domain.on_message_received(lead, inbound(phone, "Oi"))

    outcomes = await asyncio.gather(
        *(service.recorder.record(p, decide_for(p)) for p in phones), return_exceptions=True
    )
    assert isinstance(outcomes[2], ValueError)
    assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 2)
    assert [await service.recorder.get(p) is not None for p in phones] == [True, True, False, True, True]


async def test_a_timer_skips_a_lead_another_transaction_holds_and_fires_later(service: Service) -> None:
    phone = new_phone()
    now = datetime.now(UTC)
    await handle_all(
        service,
        inbound(phone, "Mensagem automática: digite 1", when=now),
        inbound(phone, "Mensagem automática: digite 1", when=now + timedelta(seconds=1)),
    )
    later = now + timedelta(seconds=300)
    async with service.pool.acquire() as conn, conn.transaction():
        await service.store.lock_leads(conn, [phone])  # a consumer busy with this contact
        assert await service.recorder.fire_due_timers(later) == 0
    assert await service.recorder.fire_due_timers(later) == 1
    lead = await service.recorder.get(phone)
    assert lead is not None and lead.blocked


async def test_rebuild_refolds_the_projection_and_empties_the_cache(service: Service, schema: str) -> None:
    phone = new_phone()
    await handle_all(
        service, inbound(phone, "Precisamos de um CRM"), reply(phone, budget="R$ 9 mil", when=at(1))
    )
    live = await service.recorder.get(phone)
    assert service.recorder.cache is not None and await service.recorder.cache.peek(phone) is not None
    settings = service.settings.model_copy(update={"lead_cache_prefix": f"test:{schema}:lead"})
    leads, dropped = await rebuild(settings, schema=schema)
    assert leads == 1 and dropped >= 1
    assert await service.recorder.cache.peek(phone) is None
    assert await service.recorder.get(phone) == live


def _in_trace(trace_id: int) -> otel_context.Context:
    span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id, 1, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    )
    return trace.set_span_in_context(span)


async def _first_message_in_trace(recorder: LeadRecorder, phone: str, trace_id: int) -> None:
    """Record a contact's first message in a sampled trace of ``trace_id``."""
    message = inbound(phone, "Oi")
    token = otel_context.attach(_in_trace(trace_id))
    try:
        await recorder.record(phone, lambda lead: domain.on_message_received(lead, message))
    finally:
        otel_context.detach(token)


async def _stored(service: Service, schema: str, phones: list[str], column: str) -> dict[str, set[str]]:
    """``column`` of each phone's stored events, as text."""
    async with service.pool.acquire() as conn:
        rows = await conn.fetch(
            f'SELECT stream_id, {column}::text AS v FROM "{schema}".events WHERE stream_id = ANY($1)', phones
        )
    found: dict[str, set[str]] = {p: set() for p in phones}
    for row in rows:
        found[row["stream_id"]].add(row["v"])
    return found


async def test_each_input_of_a_group_stores_its_events_in_its_own_trace(
    service: Service, schema: str
) -> None:
    phones = [new_phone() for _ in range(2)]
    await asyncio.gather(
        _first_message_in_trace(service.recorder, phones[0], 0xA1),
        _first_message_in_trace(service.recorder, phones[1], 0xB2),
    )
    tx_ids = await _stored(service, schema, phones, "tx_id")
    assert tx_ids[phones[0]] == tx_ids[phones[1]]  # one group, one transaction
    traces = await _stored(service, schema, phones, "trace_context")
    assert [len(t) for t in traces.values()] == [1, 1]
    assert f"{0xA1:032x}" in traces[phones[0]].pop() and f"{0xB2:032x}" in traces[phones[1]].pop()


async def test_the_recorder_hands_what_each_commit_stored_to_its_relay_in_order_with_traces(
    service: Service, schema: str
) -> None:
    handed: list[tuple[list[str], list[str | None]]] = []
    recorder = LeadRecorder(
        service.pool,
        service.store,
        None,
        on_commit=lambda events, traces: handed.append(([e.event_id for e in events], list(traces))),
    )
    phones = [new_phone() for _ in range(2)]
    await asyncio.gather(
        _first_message_in_trace(recorder, phones[0], 0xA1), _first_message_in_trace(recorder, phones[1], 0xB2)
    )
    await recorder.record(phones[0], lambda lead: domain.on_message_sent(lead, sent(phones[0])))
    async with service.pool.acquire() as conn:
        rows = await conn.fetch(
            f'SELECT event_id, stream_id, trace_context::text AS trace FROM "{schema}".events '
            "WHERE stream_id = ANY($1) ORDER BY position",
            phones,
        )
    # One hand-over per commit (the group of both first messages, then the send), in the
    # store's order, each event with the trace context it was stored with.
    assert [len(ids) for ids, _ in handed] == [len(rows) - 1, 1]
    assert [i for ids, _ in handed for i in ids] == [r["event_id"] for r in rows]
    traces = [t for _, ts in handed for t in ts]
    assert [orjson.loads(t) if t else None for t in traces] == [
        orjson.loads(r["trace"]) if r["trace"] else None for r in rows
    ]
    expected = {phones[0]: f"{0xA1:032x}", phones[1]: f"{0xB2:032x}"}
    assert all(expected[r["stream_id"]] in (t or "") for r, t in zip(rows[:-1], traces, strict=False))
    assert traces[-1] is None  # the send was recorded outside any trace


async def test_a_busy_recorder_commits_at_most_once_per_interval_and_an_idle_one_at_once(
    pg_url: str, schema: str
) -> None:
    service = await build(
        lead_settings(pg_url, lead_commit_interval_seconds=1.0), schema=schema, with_bus=False
    )
    try:
        await _commits_at_most_once_per_interval(service, schema)
    finally:
        await service.stop()


async def _commits_at_most_once_per_interval(service: Service, schema: str) -> None:
    recorder = service.recorder
    phones = [new_phone() for _ in range(3)]

    def first_message(phone: str) -> Callable[[domain.Lead], list[Envelope]]:
        return lambda lead: domain.on_message_received(lead, inbound(phone, "Oi"))

    loop = asyncio.get_running_loop()
    started = loop.time()
    await recorder.record(phones[0], first_message(phones[0]))
    assert loop.time() - started < 0.8  # idle: nothing to wait for
    second = asyncio.create_task(recorder.record(phones[1], first_message(phones[1])))
    await asyncio.sleep(0.1)
    await recorder.record(phones[2], first_message(phones[2]))
    await second
    assert loop.time() - started >= 0.9  # the second waited for the interval, and the third joined it
    await recorder.close()
    tx_ids = await _stored(service, schema, phones, "tx_id")
    assert tx_ids[phones[1]] == tx_ids[phones[2]] != tx_ids[phones[0]]


async def test_the_recorder_hands_events_to_its_relay_once_their_lead_is_cached_in_commit_order(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lead API reads the cache: whoever gets a published event (``LeadOptedOut``) and reads
    the lead must find the version the event came from, not the one before (still opted in).
    Two commits of one contact whose cache writes end in reverse order still reach the relay
    in commit order, the contact's stream order."""
    cache = service.recorder.cache
    assert cache is not None
    put_many = cache.put_many
    delays = iter((0.3, 0.0))  # the first commit's write is the slow one
    cached: list[int] = []  # lead versions, in the order their writes ended

    async def slow_then_fast(items: Sequence[tuple[str, int, bytes]]) -> int:
        await asyncio.sleep(next(delays, 0.0))
        stored = await put_many(items)
        cached.extend(version for _, version, _ in items)
        return stored

    monkeypatch.setattr(cache, "put_many", slow_then_fast)
    handed: list[tuple[list[str], list[int]]] = []  # event types, lead versions cached by then
    recorder = LeadRecorder(
        service.pool,
        service.store,
        cache,
        on_commit=lambda events, traces: handed.append(([e.type for e in events], list(cached))),
        commit_interval=0,
    )
    phone = new_phone()
    hello, stop = inbound(phone, "Oi"), inbound(phone, "Parar")
    first, second = await asyncio.gather(
        recorder.record(phone, lambda lead: domain.on_message_received(lead, hello)),
        recorder.record(phone, lambda lead: domain.on_message_received(lead, stop)),
    )
    assert first is not None and second is not None and second.lead.opted_out
    assert cached == [second.lead.version, first.lead.version]  # two transactions; writes reversed
    assert [types for types, _ in handed] == [[e.type for e in first.events], [e.type for e in second.events]]
    assert first.lead.version in handed[0][1] and second.lead.version in handed[1][1]
