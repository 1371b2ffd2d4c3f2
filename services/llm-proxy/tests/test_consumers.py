"""Reply requests against real Postgres: one reply and one send per reply_key, outbox fallback mode."""

from __future__ import annotations

import asyncio

import asyncpg

from orbion_common.events import HumanVerificationRequested, MessageSent, ReplyGenerated
from orbion_common.events.lead import HumanVerificationPayload
from orbion_common.events.messaging import ReplySource
from orbion_llm_proxy import store

from .conftest import make_settings
from .helpers import build_deps, delivery, new_phone, reply_requested, stored_events


async def test_fallback_reply_goes_to_outbox_with_both_events(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    assert deps.responder.mode == "fallback"
    phone = new_phone()
    req = reply_requested(phone, "Olá, quanto custa?", profile_name="João")

    await deps.handlers.answer_reply_request(req)
    await deps.sender.drain()

    events = await stored_events(deps, phone)
    assert [e.type for e in events] == ["ReplyGenerated", "MessageSent"]
    generated, sent = events
    assert isinstance(generated, ReplyGenerated) and isinstance(sent, MessageSent)
    assert generated.payload.source is ReplySource.FALLBACK
    assert generated.payload.text.startswith("Olá, João!")
    assert generated.correlation_id == req.correlation_id and generated.causation_id == req.event_id
    assert sent.payload.via == "outbox" and sent.payload.provider_message_id.startswith("outbox.")
    assert sent.payload.text == generated.payload.text
    assert sent.payload.reply_to_message_id == req.payload.reply_to_message_id
    async with pool.acquire() as conn:
        outbox = await store.list_outbox(conn, phone=phone, limit=10)
    assert [m["text"] for m in outbox] == [generated.payload.text]


async def test_redelivered_request_generates_and_sends_once(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phone = new_phone()
    req = reply_requested(phone)
    await deps.handlers.answer_reply_request(req)
    await deps.sender.drain()
    # Redelivery after the reply went out, and a twin request with another event id, same key.
    await deps.handlers.answer_reply_request(req)
    twin = reply_requested(phone, reply_key=req.payload.reply_key)
    await deps.handlers.answer_reply_request(twin)
    await deps.sender.drain()

    assert [e.type for e in await stored_events(deps, phone)] == ["ReplyGenerated", "MessageSent"]
    async with pool.acquire() as conn:
        assert len(await store.list_outbox(conn, phone=phone, limit=10)) == 1


async def test_a_batch_with_a_copy_of_a_stored_request_appends_only_the_new_reply_at_the_next_version(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phone = new_phone()
    first, second = reply_requested(phone, "primeira"), reply_requested(phone, "segunda")
    await deps.handlers.answer_reply_request(first)
    # A copy of the first, delivered as new (not looked up), in one batch with the second.
    await asyncio.gather(
        deps.handlers.answer_reply_request(first, delivery(1)),
        deps.handlers.answer_reply_request(second, delivery(1)),
    )
    async with pool.acquire() as conn:
        stream = [(s.version, s.event.payload.reply_key) for s in await deps.events.load_stream(conn, phone)]
    assert stream == [(1, first.payload.reply_key), (2, second.payload.reply_key)]  # no gap, no copy


async def test_replies_of_one_contact_leave_in_request_order(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phone = new_phone()
    reqs = [reply_requested(phone, f"mensagem {i}") for i in range(4)]
    for req in reqs:
        await deps.handlers.answer_reply_request(req)
    await deps.sender.drain()
    sent = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
    assert [e.payload.reply_key for e in sent] == [r.payload.reply_key for r in reqs]


async def test_human_verification_question_is_sent_once(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phone = new_phone()
    event = HumanVerificationRequested.create(
        phone, HumanVerificationPayload(phone=phone, question="Quanto é 3 + 4?")
    )
    await deps.handlers.ask_human_verification(event)
    await deps.handlers.ask_human_verification(event)
    await deps.sender.drain()
    sent = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
    assert [e.payload.text for e in sent] == ["Quanto é 3 + 4?"]
    assert sent[0].causation_id == event.event_id
