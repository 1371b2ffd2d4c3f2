"""The reliability suite's sender defects (docs/reliability.md, "Defects found"), each replayed
on real Postgres with the fake WhatsApp Cloud API:

- a delivered reply must be recorded as sent although the consumer appended to the contact's
  stream at the same time (defect 2) or the database connection broke meanwhile (defect 3);
- a live sender never settles its own in-flight send as in doubt (defect 3);
- a contact's replies go out in the order they were requested, not the order the requests
  reached the llm-proxy, and a reply waits (bounded) for the contact's previous request (defect 1).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from orbion_common.events import MessageSent, ReplyGenerated, ReplyRequested, stable_event_id
from orbion_common.events.messaging import ReplyGeneratedPayload
from orbion_llm_proxy import store
from orbion_llm_proxy.deps import Deps
from tests.fakes.whatsapp import FakeWhatsApp

from .conftest import answered_on_cloud, cloud_settings
from .helpers import build_deps, new_phone, reply_requested, reply_state, stored_events

SendText = Callable[[str, str, str], Awaitable[str]]


def _after_send(deps: Deps, then: Callable[[], Awaitable[None]]) -> None:
    """WhatsApp accepts the first send, then ``then`` runs before the sender records it."""
    provider = deps.sender.provider
    assert provider is not None
    real_send: SendText = provider.send_text
    done = False

    async def send(phone: str, text: str, reply_to: str = "") -> str:
        nonlocal done
        provider_id = await real_send(phone, text, reply_to)
        if not done:
            done = True
            await then()
        return provider_id

    provider.send_text = send  # type: ignore[method-assign]


@pytest.fixture
async def named_pool(urls: dict[str, str], schema: str, tag: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose server sessions carry this test's application_name, so that the test can
    kill exactly them (a database restart, as the sender sees it)."""
    p = await asyncpg.create_pool(
        urls["database_url"], min_size=1, max_size=8,
        server_settings={"search_path": f"{schema},public", "application_name": f"llmp-{tag}"},
    )  # fmt: skip
    assert p is not None
    try:
        yield p
    finally:
        await p.close()


async def test_delivered_reply_is_recorded_although_the_consumer_appended_meanwhile(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    async with answered_on_cloud(pool, schema, urls, tag) as (fake, deps, req):
        phone = req.stream_id
        rival: asyncpg.Connection = await pool.acquire()
        rival_tx = rival.transaction()

        async def consumer_appends_the_next_reply() -> None:
            # The consumer's transaction holds the contact's next version, uncommitted: the
            # sender's append reads the old version, waits on the row, then loses the race.
            await rival_tx.start()
            other = ReplyGenerated.create(
                phone,
                ReplyGeneratedPayload(reply_key="rk-next", phone=phone, text="..."),
                event_id=stable_event_id("ReplyGenerated", "rk-next", tag),
            )
            await deps.events.append(rival, phone, [other])
            asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(rival_tx.commit()))

        _after_send(deps, consumer_appends_the_next_reply)
        try:
            await deps.sender.drain()
            await deps.sender.drain()  # a row left in "sending" would be settled here
        finally:
            await pool.release(rival)
    assert len(fake.sent) == 1
    assert await reply_state(deps, req.payload.reply_key) == store.SENT
    types = [e.type for e in await stored_events(deps, phone)]
    assert types == ["ReplyGenerated", "ReplyGenerated", "MessageSent"]


async def test_delivered_reply_is_recorded_after_the_database_connections_broke(
    named_pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), named_pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone)
        await deps.handlers.answer_reply_request(req)

        async def database_restarts() -> None:
            admin = await asyncpg.connect(urls["database_url"])
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = $1",
                    f"llmp-{tag}",
                )
            finally:
                await admin.close()
            assert killed >= 1

        _after_send(deps, database_restarts)
        await deps.sender.drain()
        await deps.sender.drain()
    assert len(fake.sent) == 1
    assert await reply_state(deps, req.payload.reply_key) == store.SENT
    assert [e.type for e in await stored_events(deps, phone)] == ["ReplyGenerated", "MessageSent"]


async def test_a_result_committed_whose_answer_was_lost_is_recorded_once(
    pool: asyncpg.Pool,
    schema: str,
    urls: dict[str, str],
    tag: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection breaks after the result's statement committed: the sender records it
    again, which must neither append a second MessageSent nor a second provider id, nor fail."""
    record_sent = store.record_sent
    answers_lost = 0

    async def committed_then_lost(*args: Any, **kwargs: Any) -> None:
        nonlocal answers_lost
        await record_sent(*args, **kwargs)
        if not answers_lost:
            answers_lost += 1
            raise ConnectionResetError("connection lost before the answer")

    monkeypatch.setattr(store, "record_sent", committed_then_lost)
    async with answered_on_cloud(pool, schema, urls, tag) as (fake, deps, req):
        phone = req.stream_id
        await deps.sender.drain()
    assert answers_lost == 1 and len(fake.sent) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await reply_state(deps, req.payload.reply_key) == store.SENT
    assert [e.type for e in await stored_events(deps, phone)] == ["ReplyGenerated", "MessageSent"]
    async with pool.acquire() as conn:
        ids = await conn.fetchval(
            "SELECT provider_message_ids FROM replies WHERE reply_key = $1", req.payload.reply_key
        )
    assert len(ids) == 1


async def test_live_sender_does_not_settle_its_own_send_in_flight_as_in_doubt(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    async with answered_on_cloud(pool, schema, urls, tag) as (_, deps, req):
        phone = req.stream_id
        settled: list[int] = []

        async def leadership_regained() -> None:  # e.g. its lock connection died and came back
            settled.append(await deps.sender.recover_in_doubt())

        _after_send(deps, leadership_regained)
        await deps.sender.drain()
    assert settled == [0]
    assert [e.type for e in await stored_events(deps, phone)] == ["ReplyGenerated", "MessageSent"]


def _requested(phone: str, text: str, at_offset_s: float, **payload: Any) -> ReplyRequested:
    req = reply_requested(phone, text, **payload)
    return req.model_copy(update={"occurred_at": req.occurred_at + timedelta(seconds=at_offset_s)})


async def test_replies_go_out_in_request_order_not_arrival_order(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        phone = new_phone()
        first, second = _requested(phone, "um", 0.0), _requested(phone, "dois", 1.0)
        await deps.handlers.answer_reply_request(second)  # the first was redelivered late
        await deps.handlers.answer_reply_request(first)
        await deps.sender.drain()
        await deps.sender.drain()
    assert [r["context_message_id"] for r in fake.sent] == [
        first.payload.reply_to_message_id,
        second.payload.reply_to_message_id,
    ]


async def test_reply_waits_for_the_contacts_previous_request(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        phone = new_phone()
        first = _requested(phone, "um", 0.0)
        second = _requested(phone, "dois", 1.0, previous_reply_key=first.payload.reply_key)
        await deps.handlers.answer_reply_request(second)
        await deps.sender.drain()
        held = list(fake.sent)
        await deps.handlers.answer_reply_request(first)  # redelivered after ack_wait
        await deps.sender.drain()
        await deps.sender.drain()
    assert held == []
    assert [r["context_message_id"] for r in fake.sent] == [
        first.payload.reply_to_message_id,
        second.payload.reply_to_message_id,
    ]


async def test_a_previous_request_that_never_comes_holds_the_reply_only_briefly(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        settings = cloud_settings(urls, tag, base_url, sender_order_hold_seconds=0.5)
        deps = build_deps(settings, pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone, previous_reply_key="rk-dead-lettered")
        await deps.handlers.answer_reply_request(req)
        await deps.sender.drain()
        held = list(fake.sent)
        for _ in range(40):  # bounded: the hold is 0.5 s
            await asyncio.sleep(0.05)
            await deps.sender.drain()
            if fake.sent:
                break
    assert held == []
    assert [r["context_message_id"] for r in fake.sent] == [req.payload.reply_to_message_id]
    assert MessageSent.__name__ in [e.type for e in await stored_events(deps, phone)]
