"""Group commit (groupcommit.py) on real Postgres: concurrent items share one transaction; when a
batch fails, the others still commit and only the failing item fails (or, after a lost stream
version race, is retried alone and commits)."""

from __future__ import annotations

import asyncio

import asyncpg

from orbion_common.events import ReplyGenerated, stable_event_id
from orbion_common.events.messaging import ReplyGeneratedPayload
from orbion_llm_proxy import store
from orbion_llm_proxy.groupcommit import BATCH_RETRIES, GroupCommit

from .conftest import make_settings
from .helpers import build_deps, new_phone, reply_requested


async def test_a_failing_item_fails_alone_and_the_rest_of_its_batch_commits(pool: asyncpg.Pool) -> None:
    batches: list[int] = []

    async def work(conn: asyncpg.Connection, keys: list[str]) -> list[bool]:
        batches.append(len(keys))
        stored = await store.insert_replies(
            conn,
            [
                store.NewReply(
                    reply_key=k,
                    phone="5511900000000",
                    kind="reply",
                    text=k,
                    parts=[k],
                    reply_to_message_id="",
                    source="llm",
                    correlation_id=k,
                    causation_id=k,
                )
                for k in keys
            ],
        )
        if "bad" in keys:
            raise ValueError("this item cannot be stored")
        return [k in stored for k in keys]

    group: GroupCommit[str, bool] = GroupCommit(pool, work, name="test")
    retries = BATCH_RETRIES.labels("test")._value.get()
    results = await asyncio.gather(*(group.submit(k) for k in ("a", "bad", "b")), return_exceptions=True)
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], ValueError)
    assert batches == [3, 1, 1, 1]  # one batch, then each item alone
    assert BATCH_RETRIES.labels("test")._value.get() == retries + 1
    async with pool.acquire() as conn:
        assert await store.stored_reply_keys(conn, ["a", "b", "bad"]) == {"a", "b"}


async def test_concurrent_requests_share_a_transaction_and_a_lost_version_race_is_retried_alone(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phones = [new_phone() for _ in range(3)]
    reqs = [reply_requested(p) for p in phones]
    rival: asyncpg.Connection = await pool.acquire()
    try:
        # Another writer (the sender's MessageSent) holds version 1 of the first contact's
        # stream, uncommitted: the batch loses that race once it commits.
        rival_tx = rival.transaction()
        await rival_tx.start()
        other = ReplyGenerated.create(
            phones[0],
            ReplyGeneratedPayload(reply_key=f"rk-rival-{tag}", phone=phones[0], text="..."),
            event_id=stable_event_id("ReplyGenerated", "rk-rival", tag),
        )
        await deps.events.append(rival, phones[0], [other])
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(rival_tx.commit()))
        retries = BATCH_RETRIES.labels("replies")._value.get()
        await asyncio.gather(*(deps.handlers.answer_reply_request(r) for r in reqs))
    finally:
        await pool.release(rival)
    assert BATCH_RETRIES.labels("replies")._value.get() == retries + 1
    async with pool.acquire() as conn:
        assert await store.stored_reply_keys(conn, [r.payload.reply_key for r in reqs]) == {
            r.payload.reply_key for r in reqs
        }
        streams = {
            p: [(s.version, s.event.type) for s in await deps.events.load_stream(conn, p)] for p in phones
        }
    assert streams[phones[0]] == [(1, "ReplyGenerated"), (2, "ReplyGenerated")]  # after the rival's
    assert streams[phones[1]] == streams[phones[2]] == [(1, "ReplyGenerated")]
