"""Bursts and the quiet period: one reply request per burst, surviving a crash in between."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from orbion_common.events import ReplyRequested, utcnow
from orbion_conversation import domain
from orbion_conversation.consumers import Deps, record_event
from orbion_conversation.replies import ReplyScheduler
from redis.asyncio import Redis

from .builders import inbound, new_phone, opted_out
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
