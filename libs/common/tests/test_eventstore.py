"""The event store against a real PostgreSQL, each test in its own schema."""

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from orbion_common.events import Envelope, MessageReceived
from orbion_common.events.messaging import MessageReceivedPayload
from orbion_common.eventstore import START, ConcurrencyError, EventStore
from orbion_common.migrations import migrate


def inbound(phone: str, n: int) -> MessageReceived:
    return MessageReceived.create(
        phone,
        MessageReceivedPayload(
            provider="cloud_api",
            provider_message_id=f"wamid.{n}",
            phone=phone,
            kind="text",
            text=f"message {n}",
            sent_at=datetime.now(UTC),
        ),
    )


@pytest.fixture
async def store(database_url, fresh_schema):
    conn = await asyncpg.connect(database_url)
    await migrate(conn, fresh_schema)
    yield EventStore(fresh_schema), conn
    await conn.close()


async def test_migrations_apply_once(database_url, fresh_schema):
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn, fresh_schema) == ["000_event_store.sql"]
        assert await migrate(conn, fresh_schema) == []
    finally:
        await conn.close()


async def test_appended_events_are_numbered_per_stream_and_read_back_in_order(store):
    es, conn = store
    stored = await es.append(conn, "551100", [inbound("551100", 1), inbound("551100", 2)])
    await es.append(conn, "551177", [inbound("551177", 3)])
    assert [s.version for s in stored] == [1, 2]
    assert [s.event.payload.text for s in await es.load_stream(conn, "551100")] == ["message 1", "message 2"]
    assert await es.stream_version(conn, "551177") == 1


async def test_appending_at_a_stale_version_is_a_conflict(store):
    es, conn = store
    await es.append(conn, "551100", [inbound("551100", 1)], expected_version=0)
    with pytest.raises(ConcurrencyError, match="expected 0"):
        await es.append(conn, "551100", [inbound("551100", 2)], expected_version=0)
    assert await es.stream_version(conn, "551100") == 1


@pytest.mark.parametrize("savepoint", [True, False])
async def test_concurrent_appends_to_one_stream_let_exactly_one_win(store, database_url, savepoint):
    es, observer = store
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        trs = [c.transaction() for c in conns]
        for t in trs:
            await t.start()
        await es.append(conns[0], "551100", [inbound("551100", 1)], expected_version=0)
        loser = asyncio.create_task(
            es.append(conns[1], "551100", [inbound("551100", 2)], expected_version=0, savepoint=savepoint)
        )
        # The loser read version 0 and waits on the winner's uncommitted row: the insert conflicts.
        sql = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
        for _ in range(500):
            if await observer.fetchval(sql, conns[1].get_server_pid()) == "Lock":
                break
            await asyncio.sleep(0.01)
        await trs[0].commit()
        with pytest.raises(ConcurrencyError):
            await loser
        if savepoint:  # the loser's transaction is still usable, for a caller that goes on
            assert await conns[1].fetchval("SELECT 1") == 1
        else:
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conns[1].fetchval("SELECT 1")
        await trs[1].rollback()
    finally:
        for c in conns:
            await c.close()


async def test_appending_an_event_twice_stores_it_once(store):
    es, conn = store
    event = inbound("551100", 1)
    assert len(await es.append(conn, "551100", [event])) == 1
    assert await es.append(conn, "551100", [event]) == []
    assert len(await es.load_stream(conn, "551100")) == 1


async def test_a_follower_never_skips_an_event_that_commits_late(store, database_url):
    es, conn = store
    slow = await asyncpg.connect(database_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await es.append(slow, "551100", [inbound("551100", 1)])  # takes the lower position
        await es.append(conn, "551177", [inbound("551177", 2)])  # commits first
        seen = await es.read_after(conn, START)
        assert seen == []  # the later position waits for the earlier transaction to finish
        await tx.commit()
        seen = await es.read_after(conn, START)
        assert sorted(s.event.payload.text for s in seen) == ["message 1", "message 2"]
        assert await es.read_after(conn, seen[-1].cursor) == []
    finally:
        await slow.close()


async def test_a_claim_and_a_projection_commit_together_or_not_at_all(store):
    es, conn = store
    await conn.execute(f'CREATE TABLE "{es.schema}".counter (n int)')
    await conn.execute(f'INSERT INTO "{es.schema}".counter VALUES (0)')

    async def handle(crash: bool) -> None:
        async with conn.transaction():
            if await es.claim(conn, "projector", "event-1"):
                await conn.execute(f'UPDATE "{es.schema}".counter SET n = n + 1')
                await es.save_checkpoint(conn, "projector", 1)
                if crash:
                    raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError):
        await handle(crash=True)
    assert await conn.fetchval(f'SELECT n FROM "{es.schema}".counter') == 0
    assert await es.checkpoint(conn, "projector") == 0
    await handle(crash=False)  # the redelivery does the work
    await handle(crash=False)  # a duplicate does nothing
    assert await conn.fetchval(f'SELECT n FROM "{es.schema}".counter') == 1
    assert await es.checkpoint(conn, "projector") == 1


async def test_a_batch_across_streams_is_stored_whole_or_not_at_all(store):
    es, conn = store
    await es.append_at_versions(
        conn, [(inbound("551100", 1), 1), (inbound("551177", 2), 1), (inbound("551100", 3), 2)]
    )
    assert await es.stream_version(conn, "551100") == 2
    with pytest.raises(ConcurrencyError):
        # 551177 is already at version 1: the batch loses the race and stores nothing.
        await es.append_at_versions(conn, [(inbound("551100", 4), 3), (inbound("551177", 5), 1)])
    assert await es.stream_version(conn, "551100") == 2
    assert await es.stream_version(conn, "551177") == 1


async def test_a_batch_and_the_writers_own_rows_are_stored_in_one_statement_or_not_at_all(store):
    es, conn = store
    await conn.execute(f'CREATE TABLE "{es.schema}".seen (phone text PRIMARY KEY)')

    def seen(condition: str) -> str:
        return f'INSERT INTO "{es.schema}".seen SELECT unnest($1::text[]) WHERE {condition}'

    first = [(inbound("551100", 1), 1), (inbound("551177", 2), 1)]
    positions = await es.append_at_versions_with(conn, first, [None, None], seen, [["551100", "551177"]])
    assert positions == sorted(positions) and len(set(positions)) == 2
    with pytest.raises(ConcurrencyError):
        # 551177 is already at version 1: neither the events nor the rows are stored.
        await es.append_at_versions_with(
            conn, [(inbound("551188", 3), 1), (inbound("551177", 4), 1)], [None, None], seen, [["551188"]]
        )
    assert await es.stream_version(conn, "551188") == 0
    assert await conn.fetchval(f'SELECT array_agg(phone ORDER BY phone) FROM "{es.schema}".seen') == [
        "551100",
        "551177",
    ]


async def append_next(es: EventStore, conn: asyncpg.Connection, events: list[Envelope]) -> list[int]:
    """What a batch writer does with ``insert_next``: the positions of ``events``, in order."""
    sql, args = es.insert_next(events)
    rows = await es.fetch_appending(conn, sql, args)
    positions = {r["event_id"]: r["position"] for r in rows}
    return [positions[e.event_id] for e in events]


async def test_a_batch_appended_next_follows_each_streams_last_version_in_the_order_given(store):
    es, conn = store
    await es.append(conn, "551100", [inbound("551100", 1), inbound("551100", 2)])
    a, b, c, d = inbound("551100", 3), inbound("551177", 4), inbound("551100", 5), inbound("551177", 6)
    positions = await append_next(es, conn, [a, b, c, d])
    rows = await conn.fetch(f'SELECT event_id, position, version FROM "{es.schema}".events')
    stored = {r["event_id"]: (r["position"], r["version"]) for r in rows}
    assert [stored[e.event_id][1] for e in (a, b, c, d)] == [3, 1, 4, 2]
    assert positions == [stored[e.event_id][0] for e in (a, b, c, d)] and positions == sorted(positions)


async def test_a_batch_appended_next_loses_to_a_concurrent_writer_whole(database_url, store):
    es, conn = store
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            # Another writer holds version 1 of 551177, uncommitted: the batch waits for it.
            await es.append_at_versions(other, [(inbound("551177", 1), 1)], savepoint=False)
            batch = asyncio.create_task(append_next(es, conn, [inbound("551100", 2), inbound("551177", 3)]))
            await asyncio.sleep(0.2)
            assert not batch.done()
        with pytest.raises(ConcurrencyError):
            await batch
    finally:
        await other.close()
    assert {s: await es.stream_version(conn, s) for s in ("551100", "551177")} == {"551100": 0, "551177": 1}
    await append_next(es, conn, [inbound("551100", 4), inbound("551177", 5)])  # tried again, it goes in
    assert {s: await es.stream_version(conn, s) for s in ("551100", "551177")} == {"551100": 1, "551177": 2}


async def test_a_batch_returns_its_positions_and_keeps_each_events_trace_context(store):
    es, conn = store
    a, b = inbound("551100", 1), inbound("551177", 2)
    traces = ['{"traceparent": "00-0000000000000000000000000000000a-000000000000000a-01"}', None]
    positions = await es.append_at_versions(conn, [(a, 1), (b, 1)], traces)
    rows = await conn.fetch(f'SELECT event_id, position, trace_context::text AS t FROM "{es.schema}".events')
    by_id = {r["event_id"]: (r["position"], r["t"]) for r in rows}
    assert positions == [by_id[a.event_id][0], by_id[b.event_id][0]]
    assert "0000000000000000000000000000000a" in by_id[a.event_id][1] and by_id[b.event_id][1] is None
    versions = {s: await es.stream_version(conn, s) for s in ("551100", "551177", "551199")}
    found = await conn.fetch(
        f'SELECT event_id FROM "{es.schema}".events WHERE event_id = ANY($1::text[])', [a.event_id, "x"]
    )
    stored = {r["event_id"] for r in found}
    assert versions == {"551100": 1, "551177": 1, "551199": 0} and stored == {a.event_id}
    assert await es.claim_many(conn, "c", [a.event_id, b.event_id]) == {a.event_id, b.event_id}
    assert await es.claim_many(conn, "c", [a.event_id, "other"]) == {"other"}  # a redelivery: not again


async def test_a_follower_of_some_types_passes_the_others_without_reading_them(store):
    es, conn = store
    await es.append(conn, "551100", [inbound("551100", 1), inbound("551100", 2)])
    page = await es.read_page(conn, START, {"ReplyRequested"})
    assert (page.events, page.read) == ([], 2)  # nothing to publish, but the cursor moves past both
    assert await es.read_page(conn, page.cursor, {"ReplyRequested"}) == (page.events, page.cursor, 0)
    everything = await es.read_page(conn, START)
    assert [s.event.payload.text for s in everything.events] == ["message 1", "message 2"]
    assert everything.cursor == page.cursor
