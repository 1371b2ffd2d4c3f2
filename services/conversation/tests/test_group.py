"""Group commit: a bus batch's events in one transaction, with the one-event path's effects."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from orbion_common.events import Event, utcnow
from orbion_common.eventstore import StoredEvent
from orbion_conversation import projector, replies, store
from orbion_conversation.consumers import Deps, record_event
from orbion_conversation.group import GroupCommit
from orbion_conversation.store import Projection

from .builders import generated, in_trace, inbound, new_phone, sent
from .conftest import make_deps


async def like_the_bus(group: GroupCommit, lanes: Sequence[Sequence[Event]]) -> list[list[str]]:
    """Each contact's events one after the other, the contacts concurrently (as the bus runs a batch)."""

    async def lane(events: Sequence[Event]) -> list[str]:
        return [await group.record(e) for e in events]

    return list(await asyncio.gather(*(lane(events) for events in lanes)))


def conversation(phone: str, n: int) -> list[Event]:
    key = f"reply.{phone}"
    return [
        inbound(phone, f"wamid.{phone}.1", "Oi", seconds=0),
        inbound(phone, f"wamid.{phone}.2", "Quanto custa?", seconds=1),
        generated(phone, key, "Olá!", seconds=2),
        sent(phone, key, f"wamid.{phone}.out", "Olá!", seconds=3),
    ][:n]


async def streams(deps: Deps, phones: Sequence[str]) -> dict[str, list[StoredEvent]]:
    async with deps.pool.acquire() as conn:
        return {p: await deps.ctx.store.load_stream(conn, p) for p in phones}


async def test_a_group_of_several_contacts_keeps_each_contacts_order_in_few_transactions(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps = make_deps(pool, schema, redis, quiet=1.5)
    phones = [new_phone() for _ in range(6)]
    lanes = [conversation(p, 2 + i % 3) for i, p in enumerate(phones)]
    outcomes = await like_the_bus(GroupCommit(deps), lanes)
    assert outcomes[0] == ["scheduled", "scheduled"]
    assert outcomes[2] == ["scheduled", "scheduled", "projected", "projected"]
    stored = await streams(deps, phones)
    for phone, events in zip(phones, lanes, strict=True):
        assert [s.event.event_id for s in stored[phone]] == [e.event_id for e in events]
        assert [s.version for s in stored[phone]] == list(range(1, len(events) + 1))
    async with pool.acquire() as conn:
        transactions = await conn.fetchval("SELECT count(DISTINCT tx_id) FROM events")
        pending = await conn.fetch("SELECT phone, inbound_ids FROM pending_replies")
    assert transactions == 4  # one per round of the lanes, not one per event
    assert {r["phone"]: list(r["inbound_ids"]) for r in pending} == {
        p: [f"wamid.{p}.1", f"wamid.{p}.2"] for p in phones
    }
    page = await deps.ctx.history.page(phones[2], 20, None)  # the cache, written after the commit
    assert page is not None and [m.text for m in reversed(page)] == ["Oi", "Quanto custa?", "Olá!"]
    assert page[0].status == "sent"


async def transaction_of(pool: asyncpg.Pool, events: Sequence[Event]) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_id, tx_id::text AS tx FROM events WHERE event_id = ANY($1)",
            [e.event_id for e in events],
        )
    by_id = {r["event_id"]: r["tx"] for r in rows}
    return [by_id[e.event_id] for e in events]


async def test_a_busy_group_commit_starts_at_most_once_per_interval_and_an_idle_one_at_once(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """What arrives within the interval after a group started waits for it and shares the next
    transaction; the first event after a quiet spell is recorded at once."""
    group = GroupCommit(make_deps(pool, schema, redis, quiet=20.0), commit_interval=1.0)
    first, second, third = (inbound(new_phone(), f"wamid.P{i}", "Oi") for i in range(3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await group.record(first) == "scheduled"
    assert loop.time() - started < 0.8  # idle: nothing to wait for
    later = asyncio.create_task(group.record(second))
    await asyncio.sleep(0.1)
    assert await group.record(third) == "scheduled"
    assert await later == "scheduled"
    assert loop.time() - started >= 0.9  # the second waited for the interval, and the third joined it
    a, b, c = await transaction_of(pool, [first, second, third])
    assert b == c != a


async def test_with_no_quiet_period_a_group_commit_never_waits(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """Each reply is then requested in its message's transaction: pacing would delay it."""
    group = GroupCommit(make_deps(pool, schema, redis, quiet=0.0), commit_interval=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(3):
        assert await group.record(inbound(new_phone(), f"wamid.Q{i}", "Oi")) == "requested"
    assert loop.time() - started < 0.8


async def test_a_group_leaves_what_the_one_event_path_leaves(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    grouped = make_deps(pool, schema, redis, quiet=0)
    alone = make_deps(pool, schema, redis, quiet=0)
    phones = [new_phone() for _ in range(4)]
    others = [new_phone() for _ in range(4)]
    await like_the_bus(GroupCommit(grouped), [conversation(p, 4) for p in phones])
    for p in others:
        for e in conversation(p, 4):
            await record_event(alone, e)

    def shape(stream: list[StoredEvent], phone: str) -> list[tuple[str, int]]:
        return [(s.event.type, s.version) for s in stream]

    a, b = await streams(grouped, phones), await streams(alone, others)
    assert [shape(a[p], p) for p in phones] == [shape(b[p], p) for p in others]
    for p, q in zip(phones, others, strict=True):
        ours, theirs = await grouped.ctx.history.page(p, 20, None), await alone.ctx.history.page(q, 20, None)
        assert ours is not None and theirs is not None
        assert [(m.direction, m.text, m.status) for m in ours] == [
            (m.direction, m.text, m.status) for m in theirs
        ]
        mine = await grouped.ctx.projection.load_contact(pool, p)
        other = await alone.ctx.projection.load_contact(pool, q)
        assert mine is not None and other is not None
        assert (mine.message_count, mine.version, mine.state) == (
            other.message_count,
            other.version,
            other.state,
        )


async def test_one_bad_event_fails_alone_and_the_others_of_its_group_commit(
    pool: asyncpg.Pool, schema: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps = make_deps(pool, schema, redis, quiet=1.5)
    phones = [new_phone() for _ in range(4)]
    events = [inbound(p, f"wamid.{p}.bad", "Oi") for p in phones]
    bad = events[1]
    real_apply = projector.apply

    async def apply(conn: asyncpg.Connection, proj: Projection, stored: StoredEvent, *args: object) -> object:
        if stored.event.event_id == bad.event_id:
            raise ValueError("a bug on this event")
        return await real_apply(conn, proj, stored, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(projector, "apply", apply)
    group = GroupCommit(deps)
    results = await asyncio.gather(*(group.record(e) for e in events), return_exceptions=True)
    assert isinstance(results[1], ValueError)  # the bus naks it
    assert [r for i, r in enumerate(results) if i != 1] == ["scheduled"] * 3
    stored = await streams(deps, phones)
    assert [len(stored[p]) for p in phones] == [1, 0, 1, 1]
    monkeypatch.setattr(projector, "apply", real_apply)
    assert await group.record(bad) == "scheduled"  # rolled back: the redelivery does it all


async def test_a_redelivered_group_changes_nothing(pool: asyncpg.Pool, schema: str, redis: Redis) -> None:
    deps = make_deps(pool, schema, redis, quiet=1.5)
    phones = [new_phone() for _ in range(5)]
    lanes = [conversation(p, 4) for p in phones]
    await like_the_bus(GroupCommit(deps), lanes)
    before = await streams(deps, phones)
    again = await like_the_bus(GroupCommit(deps), lanes)  # a crash after the commit, before the acks
    assert again == [["duplicate"] * 4] * 5
    after = await streams(deps, phones)
    assert {p: [s.position for s in after[p]] for p in phones} == {
        p: [s.position for s in before[p]] for p in phones
    }


async def test_each_event_of_a_group_keeps_its_own_trace(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    deps = make_deps(pool, schema, redis, quiet=0)
    phones = [new_phone() for _ in range(3)]
    group = GroupCommit(deps)

    async def traced(i: int, event: Event) -> str:
        with in_trace(0x1000 + i):
            return await group.record(event)

    outcomes = await asyncio.gather(
        *(traced(i, inbound(p, f"wamid.{p}.t", "Oi")) for i, p in enumerate(phones))
    )
    assert outcomes == ["requested"] * 3
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT stream_id, type, trace_context::text AS t FROM events")
    for i, phone in enumerate(phones):
        traces = {
            r["type"]: orjson.loads(r["t"])["traceparent"].split("-")[1]
            for r in rows
            if r["stream_id"] == phone
        }
        # The inbound and the ReplyRequested it asked for, both in the inbound's own trace.
        assert traces == {"MessageReceived": f"{0x1000 + i:032x}", "ReplyRequested": f"{0x1000 + i:032x}"}


@pytest.mark.parametrize(("path", "round_appends"), [("alone", True), ("group", True), ("group", False)])
async def test_a_reply_event_waits_for_a_scheduler_round_that_holds_the_contacts_burst(
    pool: asyncpg.Pool, schema: str, redis: Redis, path: str, round_appends: bool
) -> None:
    """The scheduler holds the due bursts it claimed while it appends their requests; an event
    of such a contact waits for the round rather than racing it for the stream's next version
    (a lost race made the round redo every one of its bursts alone). The group reads the
    stream's version after that wait, in a statement of its own: its events follow the round's
    request, and the group commits as one (not redone event by event, as when it read the
    version in the statement that waited)."""
    deps = make_deps(pool, schema, redis, quiet=1.5)
    retries_before = group_retries()
    phone, other = new_phone(), new_phone()
    assert await record_event(deps, inbound(phone, f"wamid.{phone}.1", "Oi", seconds=0)) == "scheduled"
    reply = generated(phone, f"reply.{phone}", "Olá!", seconds=2)
    async with pool.acquire() as conn, conn.transaction():
        # As a round does.
        taken = await store.take_due(conn, Projection(), utcnow() + timedelta(seconds=5), 10)
        assert taken.rows
        if round_appends:
            assert len(await replies.emit_many(conn, deps.ctx, taken.rows)) == 1
        if path == "alone":
            recording = asyncio.ensure_future(record_event(deps, reply))
        else:
            lanes = [[reply], [inbound(other, f"wamid.{other}.1", "Oi", seconds=0)]]
            recording = asyncio.ensure_future(like_the_bus(GroupCommit(deps), lanes))
        await asyncio.sleep(0.3)
        assert not recording.done()
    await asyncio.wait_for(recording, 5)
    stream = (await streams(deps, [phone]))[phone]
    requested = ["ReplyRequested"] if round_appends else []
    assert [s.event.type for s in stream] == ["MessageReceived", *requested, "ReplyGenerated"]
    assert [s.version for s in stream] == list(range(1, len(stream) + 1))
    assert group_retries() == retries_before


def group_retries() -> float:
    """Groups redone event by event so far (the conversation's metric)."""
    return REGISTRY.get_sample_value("orbion_conversation_group_retries_total") or 0.0


async def test_the_history_cached_after_a_group_is_at_each_contacts_version(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """The group saves its contacts and reads their history in one statement: a contact it
    wrote is cached at the version written, one with only a redelivery at the version stored."""
    deps = make_deps(pool, schema, redis, quiet=1.5)
    known, fresh = new_phone(), new_phone()
    group = GroupCommit(deps)
    known_events = conversation(known, 3)
    for event in known_events:
        await group.record(event)
    await deps.ctx.history.cache.delete(known)  # the redelivery writes it again
    outcomes = await like_the_bus(group, [[known_events[0]], conversation(fresh, 2)])
    assert outcomes == [["duplicate"], ["scheduled", "scheduled"]]
    for phone, texts in ((known, ["Olá!", "Quanto custa?", "Oi"]), (fresh, ["Quanto custa?", "Oi"])):
        cached = await deps.ctx.history.cache.peek(phone)
        contact = await deps.ctx.projection.load_contact(pool, phone)
        assert cached is not None and contact is not None
        assert cached.version == contact.version == len(texts)
        assert [m.text for m in cached.value] == texts
