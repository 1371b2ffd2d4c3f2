"""Bursts and the quiet period: one reply request per burst, surviving a crash in between."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from orbion_common.events import Event, ReplyRequested, utcnow
from orbion_common.events.messaging import ReplyRequestedPayload
from orbion_common.eventstore import ConcurrencyError, EventStore, StoredEvent
from orbion_conversation import domain, projector, store
from orbion_conversation.consumers import Deps, record_event
from orbion_conversation.group import GroupCommit
from orbion_conversation.replies import ReplyContext, ReplyScheduler, next_round_in
from orbion_conversation.store import PendingRow, Projection

from .builders import (
    generated,
    in_trace,
    inbound,
    new_phone,
    opted_out,
    verification_passed,
    verification_requested,
)
from .conftest import make_deps

QUIET = 1.5
LATER = timedelta(seconds=QUIET + 1)


async def reply_requests(deps: Deps, phone: str) -> list[ReplyRequested]:
    async with deps.pool.acquire() as conn:
        stream = await deps.ctx.store.load_stream(conn, phone)
    return [s.event for s in stream if isinstance(s.event, ReplyRequested)]


def quiet_deps(pool: asyncpg.Pool, schema: str, redis: Redis) -> tuple[Deps, ReplyScheduler]:
    deps = make_deps(pool, schema, redis, quiet=QUIET)
    return deps, ReplyScheduler(pool, deps.ctx)


async def test_a_burst_of_three_messages_gets_one_reply_request(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    for i, text in enumerate(["Oi", "tudo bem?", "quanto custa o plano?"]):
        assert await record_event(deps, inbound(phone, f"wamid.B{i}", text, seconds=i)) == "scheduled"
    assert await scheduler.emit_due(utcnow()) == 0  # still inside the quiet period
    assert await scheduler.emit_due(utcnow() + LATER) == 1
    [request] = await reply_requests(deps, phone)
    assert request.payload.inbound_message_ids == ["wamid.B0", "wamid.B1", "wamid.B2"]
    assert request.payload.text == "Oi\ntudo bem?\nquanto custa o plano?"
    assert request.payload.reply_key == domain.reply_key(["wamid.B0", "wamid.B1", "wamid.B2"])
    assert request.payload.quiet_period_ms == 1500
    assert await scheduler.emit_due(utcnow() + LATER) == 0  # emitted once


async def test_a_bursts_quiet_period_counts_from_the_gateways_receipt(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, _ = quiet_deps(pool, schema, redis)
    phone = new_phone()
    received = utcnow() - timedelta(milliseconds=60)  # the trip from the gateway
    event = inbound(phone, "wamid.R1", "Oi").model_copy(update={"occurred_at": received})
    assert await record_event(deps, event) == "scheduled"
    async with pool.acquire() as conn:
        row = await store.load_pending(conn, phone)
    assert row is not None
    assert row.reply.due_at == received + timedelta(seconds=QUIET)


async def test_each_reply_request_names_the_contacts_previous_one_so_replies_keep_their_order(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.O1", "Oi"))
    assert await scheduler.emit_due(utcnow() + LATER) == 1
    await record_event(deps, inbound(phone, "wamid.O2", "quanto custa?", seconds=5))
    assert await scheduler.emit_due(utcnow() + LATER + LATER) == 1
    first, second = await reply_requests(deps, phone)
    assert first.payload.previous_reply_key == ""
    assert second.payload.previous_reply_key == first.payload.reply_key


async def test_a_pending_reply_survives_a_crash_of_the_service(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.S1", "Oi"))
    del deps, scheduler  # the process dies during the quiet period
    restarted, scheduler = quiet_deps(pool, schema, redis)
    assert await scheduler.emit_due(utcnow() + LATER) == 1
    assert len(await reply_requests(restarted, phone)) == 1


async def test_a_redelivered_message_after_the_request_asks_nothing_more(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    event = inbound(phone, "wamid.D1", "Oi")
    await record_event(deps, event)
    await scheduler.emit_due(utcnow() + LATER)
    assert await record_event(deps, event) == "duplicate"
    assert await scheduler.emit_due(utcnow() + LATER * 2) == 0
    assert len(await reply_requests(deps, phone)) == 1


async def test_a_stop_word_withdraws_the_waiting_reply(pool: asyncpg.Pool, schema: str, redis: Redis) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.W1", "Oi"))
    assert await record_event(deps, inbound(phone, "wamid.W2", "PARE", seconds=1)) == "cancelled"
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    assert await reply_requests(deps, phone) == []


async def test_an_opt_out_during_the_quiet_period_cancels_the_reply(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.P1", "Oi"))
    await record_event(deps, opted_out(phone))
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    assert await reply_requests(deps, phone) == []


async def test_two_schedulers_never_emit_the_same_burst(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    import asyncio

    deps, a = quiet_deps(pool, schema, redis)
    b = ReplyScheduler(pool, deps.ctx)
    phones = [new_phone() for _ in range(10)]
    for i, phone in enumerate(phones):
        await record_event(deps, inbound(phone, f"wamid.T{i}", "Oi"))
    counts = await asyncio.gather(a.emit_due(utcnow() + LATER), b.emit_due(utcnow() + LATER))
    assert sum(counts) == 10
    for phone in phones:
        assert len(await reply_requests(deps, phone)) == 1


async def test_a_verification_requested_during_the_quiet_period_drops_the_waiting_reply(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """The lead's request lands after the contact's message was scheduled: the scheduler
    re-reads the contact when the reply comes due and asks nothing."""
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    assert await record_event(deps, inbound(phone, "wamid.Q1", "Digite 1 para vendas")) == "scheduled"
    await record_event(deps, verification_requested(phone))
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    assert await reply_requests(deps, phone) == []
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pending_replies") == 0  # dropped, not retried


async def test_after_a_passed_verification_the_next_burst_is_answered_without_the_answer(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps, scheduler = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, verification_requested(phone))
    answer = inbound(phone, "wamid.A1", "SIM")
    assert await record_event(deps, answer) == "skipped:verification_pending"
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    await record_event(deps, verification_passed(phone, answer))
    assert await record_event(deps, inbound(phone, "wamid.A2", "Quanto custa?", seconds=5)) == "scheduled"
    assert await scheduler.emit_due(utcnow() + LATER) == 1
    [request] = await reply_requests(deps, phone)
    assert (request.payload.inbound_message_ids, request.payload.text) == (["wamid.A2"], "Quanto custa?")


async def append_without_the_pending_row(deps: Deps, event: Event) -> None:
    """What a consumer replica of an earlier release did (it can run beside this one during a
    rolling upgrade): append and project without taking the contact's pending row first, so
    that it races a scheduler round holding the row instead of waiting for it."""
    async with deps.pool.acquire() as conn, conn.transaction():
        [stored] = await deps.ctx.store.append(conn, event.stream_id, [event])
        await projector.apply(conn, deps.ctx.projection, stored, deps.ctx.opt_in_rule)


def land_after_the_round_reads(monkeypatch: pytest.MonkeyPatch, land: Callable[[], Awaitable[None]]) -> None:
    """Run ``land`` once, right after a scheduler round has taken its rows and read their
    contacts, before it appends."""
    take_due = store.take_due
    landed = False

    async def taking(conn: asyncpg.Connection, proj: Projection, now: datetime, limit: int) -> store.DueRound:
        nonlocal landed
        taken = await take_due(conn, proj, now, limit)
        if taken.rows and not landed:
            landed = True
            await land()
        return taken

    monkeypatch.setattr(store, "take_due", taking)


class _VerificationLandsMidDecision(Projection):
    """The scheduler's projection: right after it has read the contact, a consumer replica that
    does not wait for the pending row (another connection) commits HumanVerificationRequested."""

    def __init__(self, consumer: Deps, phone: str) -> None:
        super().__init__()
        self.consumer, self.phone, self.landed = consumer, phone, False

    async def load_contact(
        self, conn: asyncpg.Connection | asyncpg.Pool, phone: str
    ) -> domain.ContactSummary | None:
        summary = await super().load_contact(conn, phone)
        await self._land()
        return summary

    async def _land(self) -> None:
        if not self.landed:
            self.landed = True
            await append_without_the_pending_row(self.consumer, verification_requested(self.phone))


async def test_a_verification_committed_while_the_scheduler_decides_is_never_overtaken(
    pool: asyncpg.Pool, schema: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps, _ = quiet_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.Z1", "Oi"))
    ctx = deps.ctx
    projection = _VerificationLandsMidDecision(deps, phone)
    land_after_the_round_reads(monkeypatch, projection._land)
    racing = ReplyContext(EventStore(schema), projection, ctx.history, ctx.quiet_seconds)
    scheduler = ReplyScheduler(pool, racing)
    # It decided on a contact read before the request committed: its append conflicts, the
    # burst stays queued, and the next round sees the verification and drops it.
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    assert await scheduler.emit_due(utcnow() + LATER) == 0
    async with pool.acquire() as conn:
        stream = await ctx.store.load_stream(conn, phone)
        assert await conn.fetchval("SELECT count(*) FROM pending_replies") == 0
    assert [s.event.type for s in stream] == ["MessageReceived", "HumanVerificationRequested"]


async def test_a_round_emits_every_due_burst_in_one_short_transaction(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """Set-based: the round's requests commit together (one transaction id), each contact's own
    ReplyRequested at its next version, naming its previous request, and the rows are gone."""
    deps, scheduler = quiet_deps(pool, schema, redis)
    phones = [new_phone() for _ in range(5)]
    for i, phone in enumerate(phones):
        await record_event(deps, inbound(phone, f"wamid.R{i}", "Oi", seconds=i))
    assert await scheduler.emit_due(utcnow() + LATER) == 5
    await record_event(deps, inbound(phones[0], "wamid.R0b", "E o preço?", seconds=9))
    assert await scheduler.emit_due(utcnow() + LATER) == 1
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT stream_id, version, tx_id::text AS tx FROM events WHERE type = 'ReplyRequested' "
            "ORDER BY position"
        )
        assert await conn.fetchval("SELECT count(*) FROM pending_replies") == 0
    assert len({r["tx"] for r in rows[:5]}) == 1
    assert sorted(r["stream_id"] for r in rows[:5]) == sorted(phones)
    assert all(r["version"] == 2 for r in rows[:5])
    first, second = await reply_requests(deps, phones[0])
    assert second.payload.previous_reply_key == first.payload.reply_key
    assert second.payload.history[-1].text == "Oi"


async def test_a_round_appends_its_requests_and_saves_their_contacts_in_one_statement(
    pool: asyncpg.Pool, schema: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the take, a round runs one statement before its commit: every request appended at
    its contact's next version, and the contacts saved at those versions."""
    deps, scheduler = quiet_deps(pool, schema, redis)
    phones = [new_phone() for _ in range(3)]
    for i, phone in enumerate(phones):
        await record_event(deps, inbound(phone, f"wamid.S{i}", "Oi", seconds=i))
    after_take: list[str] = []
    take_due = store.take_due

    async def taking(conn: asyncpg.Connection, proj: Projection, now: datetime, limit: int) -> store.DueRound:
        taken = await take_due(conn, proj, now, limit)
        conn.add_query_logger(lambda logged: after_take.append(logged.query))
        return taken

    monkeypatch.setattr(store, "take_due", taking)
    assert await scheduler.emit_due(utcnow() + LATER) == 3
    await asyncio.sleep(0)  # the logger is called soon after each statement, not in it
    # Then the pool's reset of the connection. Before: the append, the contacts, the commit.
    assert after_take[1] == "COMMIT;"
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT phone, version FROM conversation_contacts WHERE phone = ANY($1)", phones
        )
        versions = await conn.fetch(
            "SELECT stream_id, version FROM events WHERE type = 'ReplyRequested' AND stream_id = ANY($1)",
            phones,
        )
    assert {r["phone"]: r["version"] for r in rows} == dict.fromkeys(phones, 2)
    assert {r["stream_id"]: r["version"] for r in versions} == dict.fromkeys(phones, 2)


async def test_a_round_where_one_stream_moved_still_emits_the_others(
    pool: asyncpg.Pool, schema: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One contact's stream moves while the round decides: its append conflicts, the round rolls
    back and is redone burst by burst, and every burst is still emitted, once."""
    deps, scheduler = quiet_deps(pool, schema, redis)
    phones = [new_phone() for _ in range(3)]
    for i, phone in enumerate(phones):
        await record_event(deps, inbound(phone, f"wamid.M{i}", "Oi", seconds=i))
    # Another replica appends to the first contact's stream meanwhile.
    late = generated(phones[0], "reply.x", "Olá", seconds=3)
    land_after_the_round_reads(monkeypatch, lambda: append_without_the_pending_row(deps, late))
    assert await scheduler.emit_due(utcnow() + LATER) == 3
    for phone in phones:
        assert len(await reply_requests(deps, phone)) == 1


@pytest.mark.parametrize("recorded", ["alone", "group"])
@pytest.mark.parametrize("emitted", ["round", "each"])
async def test_a_scheduled_reply_request_continues_the_trace_of_its_bursts_last_message(
    pool: asyncpg.Pool, schema: str, redis: Redis, recorded: str, emitted: str
) -> None:
    """The scheduler runs in no trace: a request it appended used to start a trace of its own at
    the llm-proxy, with its own sampling decision, so a sampled message's trace ended at the
    conversation service nine times in ten. Stored with the request, and handed with it to the
    relay's early publish."""
    deps, _ = quiet_deps(pool, schema, redis)
    handed: list[StoredEvent] = []
    scheduler = ReplyScheduler(pool, deps.ctx, on_emitted=handed.extend)
    phones = [new_phone() for _ in range(3)]
    group = GroupCommit(deps)

    async def traced(i: int, event: Event) -> str:
        with in_trace(0x1000 + i):
            return await (group.record(event) if recorded == "group" else record_event(deps, event))

    # Each contact's burst: a first message, then the last one in the trace checked below.
    for n, offset in ((1, 0x100), (2, 0)):
        outcomes = await asyncio.gather(
            *(traced(i + offset, inbound(p, f"wamid.{p}.{n}", "Oi", seconds=n)) for i, p in enumerate(phones))
        )
        assert outcomes == ["scheduled"] * 3

    class _Moved(EventStore):  # the round's append fails: each burst is then emitted alone
        async def append_at_versions(self, *args: object, **kwargs: object) -> list[int]:
            raise ConcurrencyError("a stream moved")

    if emitted == "each":
        ctx = deps.ctx
        moved = ReplyContext(_Moved(schema), ctx.projection, ctx.history, ctx.quiet_seconds)
        scheduler = ReplyScheduler(pool, moved, on_emitted=handed.extend)
    assert await scheduler.emit_due(utcnow() + LATER) == 3
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT stream_id, trace_context::text AS t FROM events WHERE type = 'ReplyRequested'"
        )
    expected = {p: f"{0x1000 + i:032x}" for i, p in enumerate(phones)}
    traces = {r["stream_id"]: orjson.loads(r["t"])["traceparent"].split("-")[1] for r in rows}
    assert traces == expected
    assert len(handed) == 3 and all(isinstance(s.event, ReplyRequested) and s.trace_context for s in handed)
    assert {
        s.event.stream_id: (s.trace_context or {})["traceparent"].split("-")[1] for s in handed
    } == expected


async def test_a_round_takes_its_due_bursts_out_of_the_queue_and_a_rolled_back_round_puts_them_back(
    pool: asyncpg.Pool, schema: str
) -> None:
    now = utcnow()
    due = [new_phone() for _ in range(2)]
    later = new_phone()

    def requested(phone: str, reply_key: str) -> ReplyRequested:
        payload = ReplyRequestedPayload(reply_key=reply_key, phone=phone, inbound_message_ids=[], text="Oi")
        return ReplyRequested.create(phone, payload)

    def row(phone: str, due_at: datetime) -> PendingRow:
        return PendingRow(domain.PendingReply(phone, (f"wamid.{phone}",), due_at), "corr", "cause")

    rows = [row(due[1], now - timedelta(seconds=1)), row(due[0], now - timedelta(seconds=2))]
    async with pool.acquire() as conn:
        events = EventStore(schema)
        await events.append(conn, due[0], [requested(due[0], "rk-0"), generated(due[0], "rk-other", "Oi!")])
        await store.save_pending_many(conn, [*rows, row(later, now + timedelta(seconds=10))])

        class Crash(Exception):
            pass

        with contextlib.suppress(Crash):
            async with conn.transaction():
                taken = await store.take_due(conn, Projection(), now, 10)
                assert [r.reply.phone for r in taken.rows] == due  # earliest due first
                # With what the round reads of each contact's stream: its version, its last request.
                read = [(r.stream_version, r.previous_reply_key) for r in taken.rows]
                assert read == [(2, "rk-0"), (0, "")]
                assert (taken.waiting, taken.next_due) == (1, now + timedelta(seconds=10))  # the rest
                raise Crash  # the round fails before its requests commit
        assert await conn.fetchval("SELECT count(*) FROM pending_replies") == 3  # nothing lost

        async with conn.transaction():
            assert len((await store.take_due(conn, Projection(), now, 10)).rows) == 2
        assert await conn.fetchval("SELECT array_agg(phone) FROM pending_replies") == [later]
        empty = await store.take_due(conn, Projection(), now, 10)
        assert (empty.rows, empty.waiting, empty.next_due) == ([], 1, now + timedelta(seconds=10))


def test_a_burst_due_after_the_round_spacing_is_emitted_when_due_not_a_spacing_later() -> None:
    # A round of one burst that took 5 ms; the next burst is due in 12 ms: then, not 20 ms from now.
    assert (
        next_round_in(0.012, last_took=0.005, last_emitted=1, round_seconds=0.02, poll_seconds=0.25) == 0.012
    )


def test_after_a_round_of_one_burst_the_next_waits_only_as_long_as_the_round_took() -> None:
    def wait(took: float, emitted: int) -> float:
        return round(
            next_round_in(-0.01, last_took=took, last_emitted=emitted, round_seconds=0.02, poll_seconds=0.25),
            6,
        )

    # Overdue bursts after a quick round (2 ms) wait 2 ms more, after a slower one (8 ms) 8 ms...
    assert wait(0.002, 1) == 0.002
    assert wait(0.008, 0) == 0.008
    # ... and never more than the spacing, start to start: after a 15 ms round, 5 ms more.
    assert wait(0.015, 1) == 0.005


def test_after_a_round_of_several_bursts_rounds_start_the_full_spacing_apart() -> None:
    # Bursts pile up between rounds (a busy system): each round should take many of them.
    assert (
        round(next_round_in(-0.01, last_took=0.002, last_emitted=3, round_seconds=0.02, poll_seconds=0.25), 6)
        == 0.018
    )
    # A round that took longer than the spacing is followed at once.
    assert next_round_in(-0.01, last_took=0.05, last_emitted=3, round_seconds=0.02, poll_seconds=0.25) == 0.0


def test_with_no_burst_waiting_or_a_far_one_the_scheduler_polls() -> None:
    assert next_round_in(None, last_took=0.0, last_emitted=0, round_seconds=0.02, poll_seconds=0.25) == 0.25
    assert next_round_in(10.0, last_took=0.0, last_emitted=1, round_seconds=0.02, poll_seconds=0.25) == 0.25
