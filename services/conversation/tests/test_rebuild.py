"""Rebuild: the projections rebuilt from the event store equal the live ones, online."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest
from redis.asyncio import Redis

from orbion_common.events import ReplyRequested, utcnow
from orbion_common.events.messaging import DeliveryStatus
from orbion_common.eventstore import StoredEvent
from orbion_conversation import store
from orbion_conversation.consumers import Deps, record_event
from orbion_conversation.rebuild import rebuild

from .builders import (
    failed,
    generated,
    inbound,
    new_phone,
    opted_out,
    sent,
    status,
    verification_failed,
    verification_requested,
)
from .conftest import make_deps


async def dump(pool: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    keys = {
        "conversation_messages": "message_key",
        "conversation_message_parts": "provider_message_id",
        "conversation_early_statuses": "provider_message_id",
        "conversation_contacts": "phone",
    }
    async with pool.acquire() as conn:
        return {
            t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY {k}")]
            for t, k in keys.items()
        }


async def indexes(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() ORDER BY indexname"
        )
    return [r[0] for r in rows]


async def converse(deps: Deps, phone: str) -> None:
    await record_event(deps, inbound(phone, f"wamid.{phone}.1", "Oi"))
    async with deps.pool.acquire() as conn:
        [request] = [
            s.event
            for s in await deps.ctx.store.load_stream(conn, phone)
            if isinstance(s.event, ReplyRequested)
        ]
    key = request.payload.reply_key
    await record_event(deps, generated(phone, key, "Olá!"))
    await record_event(deps, failed(phone, key))
    await record_event(deps, sent(phone, key, f"wamid.{phone}.o1", "Olá!", seconds=3, parts=2))
    await record_event(deps, sent(phone, key, f"wamid.{phone}.o2", "!", seconds=3, part=2, parts=2))
    await record_event(deps, status(phone, f"wamid.{phone}.o2", DeliveryStatus.READ, seconds=5))
    await record_event(deps, status(phone, f"wamid.{phone}.unknown", DeliveryStatus.SENT, seconds=5))
    # a status before its message, then the message (our own phone's echo-like from_me line)
    await record_event(deps, status(phone, f"wamid.{phone}.me", DeliveryStatus.DELIVERED, seconds=6))
    await record_event(deps, inbound(phone, f"wamid.{phone}.me", "do celular", seconds=6, from_me=True))
    # second turn: our reply's echo arrives before MessageSent
    await record_event(deps, inbound(phone, f"wamid.{phone}.3", "e o preço?", seconds=7))
    second = [s.event for s in await _stream(deps, phone) if isinstance(s.event, ReplyRequested)][-1]
    key2 = second.payload.reply_key
    await record_event(deps, generated(phone, key2, "R$ 99", seconds=8))
    await record_event(deps, inbound(phone, f"wamid.{phone}.o3", "R$ 99", seconds=9, from_me=True))
    await record_event(deps, sent(phone, key2, f"wamid.{phone}.o3", "R$ 99", seconds=9))
    await record_event(deps, status(phone, f"wamid.{phone}.o3", DeliveryStatus.DELIVERED, seconds=10))
    await record_event(deps, status(phone, f"wamid.{phone}.o3", DeliveryStatus.SENT, seconds=10))
    stop = inbound(phone, f"wamid.{phone}.2", "stop", seconds=11)
    await record_event(deps, stop)
    await record_event(deps, opted_out(phone))
    # the contact's verification state (flag and answer ids) is rebuilt too
    await record_event(deps, verification_requested(phone))
    await record_event(deps, verification_failed(phone, stop))


async def _stream(deps: Deps, phone: str) -> list[StoredEvent]:
    async with deps.pool.acquire() as conn:
        return list(await deps.ctx.store.load_stream(conn, phone))


@pytest.mark.parametrize(("batch_size", "workers"), [(7, 3), (2000, 1)])
async def test_rebuild_gives_an_identical_projection(
    deps: Deps, pool: asyncpg.Pool, schema: str, batch_size: int, workers: int
) -> None:
    for _ in range(5):
        await converse(deps, new_phone())
    before, names = await dump(pool), await indexes(pool)
    async with pool.acquire() as conn:
        logged = await conn.fetchval("SELECT count(*) FROM events")
    report = await rebuild(pool, schema, batch_size=batch_size, workers=workers)
    assert report.events == logged
    assert await dump(pool) == before
    assert await indexes(pool) == names


async def test_events_appended_during_a_rebuild_are_not_lost(
    deps: Deps, pool: asyncpg.Pool, schema: str
) -> None:
    phones = [new_phone() for _ in range(20)]
    for phone in phones[:10]:
        await converse(deps, phone)

    async def keep_writing() -> None:
        for phone in phones[10:]:
            await converse(deps, phone)

    await asyncio.gather(rebuild(pool, schema, batch_size=5, workers=2), keep_writing())
    after = await dump(pool)
    assert sorted(str(r[0]) for r in after["conversation_contacts"]) == sorted(phones)
    # "Oi", reply, "do celular", "e o preço?", reply, "stop": each once
    assert {r[2] for r in after["conversation_contacts"]} == {6}
    assert len(after["conversation_messages"]) == 120
    await rebuild(pool, schema)  # quiet now: a second rebuild agrees with what the live side wrote
    assert await dump(pool) == after


async def test_the_reply_scheduler_takes_due_bursts_after_a_rebuild_swapped_the_tables(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """The swap puts new tables under the live names: a connection whose round read the old
    ones (its statement prepared there) reads the new ones in its next round, not an error."""
    deps = make_deps(pool, schema, redis, quiet=1.5)
    phone = new_phone()
    await record_event(deps, inbound(phone, f"wamid.{phone}.1", "Oi"))
    await record_event(deps, inbound(phone, f"wamid.{phone}.2", "quanto custa?", seconds=1))
    async with pool.acquire() as conn:
        async with conn.transaction():
            assert (await store.take_due(conn, deps.ctx.projection, utcnow(), 10)).rows == []
        await rebuild(pool, schema)
        async with conn.transaction():
            due = await store.take_due(conn, deps.ctx.projection, utcnow() + timedelta(seconds=5), 10)
    [burst] = due.rows
    assert burst.contact is not None and burst.contact.inbound_count == 2
    assert [m.text for m in burst.burst] == ["Oi", "quanto custa?"]
