"""Replies from the fake OpenAI server: facts extracted, breaker opens on failures and recovers,
generic questions served from the Redis response cache."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis

from orbion_common.events import BreakerStateChanged, ReplyGenerated
from orbion_common.events.messaging import ReplySource
from orbion_llm_proxy import store
from tests.fakes.openai import FakeOpenAI

from .conftest import make_settings
from .helpers import build_deps, delivery, new_phone, reply_requested


def _openai_settings(urls: dict[str, str], tag: str, base_url: str, **kw: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {"openai_retries": 1, "openai_breaker_fail_max": 3, **kw}
    return make_settings(urls, tag, openai_api_key="sk-test", openai_base_url=base_url, **values)


async def _generated(deps, phone: str) -> list[ReplyGenerated]:  # type: ignore[no-untyped-def]
    async with deps.pool.acquire() as conn:
        stored = await deps.events.load_stream(conn, phone)
    return [s.event for s in stored if isinstance(s.event, ReplyGenerated)]


async def test_reply_round_trip_carries_extracted_facts(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeOpenAI()
    async with fake as base_url:
        deps = build_deps(_openai_settings(urls, tag, base_url), pool, schema=schema)
        assert deps.responder.mode == "openai"
        phone = new_phone()
        await deps.handlers.answer_reply_request(
            reply_requested(phone, "Preciso de um CRM, tenho orçamento de R$ 10 mil")
        )
    [generated] = await _generated(deps, phone)
    p = generated.payload
    assert p.source is ReplySource.LLM
    assert p.text.startswith("Obrigado pela mensagem!")
    assert "orçamento" in p.facts.budget and "Preciso" in p.facts.need
    assert p.usage.prompt_tokens > 0 and p.usage.completion_tokens > 0
    assert p.model == "gpt-4o-mini" and p.prompt_version == "sdr-v1"
    request = fake.requests[0]
    assert request["response_format"]["type"] == "json_schema"
    assert request["messages"][0]["role"] == "system" and "BANT" in request["messages"][0]["content"]


async def test_openai_outage_opens_breaker_gives_fallbacks_then_recovers(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeOpenAI(error_rate=1.0)
    async with fake as base_url:
        deps = build_deps(_openai_settings(urls, tag, base_url), pool, schema=schema)
        breaker = deps.breakers["openai"]
        phone = new_phone()
        # 2 requests x 2 attempts = 4 failures >= fail_max 3: open; both answered by the fallback.
        for i in range(2):
            await deps.handlers.answer_reply_request(reply_requested(phone, f"oi {i}"))
        assert breaker.state == "open"
        calls_when_opened = fake.calls
        await deps.handlers.answer_reply_request(reply_requested(phone, "oi de novo"))
        assert fake.calls == calls_when_opened  # open: OpenAI not called at all
        assert [g.payload.source for g in await _generated(deps, phone)] == [ReplySource.FALLBACK] * 3

        fake.faults.error_rate = 0.0
        await asyncio.sleep(breaker.reset_timeout + 0.05)
        await deps.handlers.answer_reply_request(reply_requested(phone, "voltou?"))
        assert breaker.state == "closed"
        assert (await _generated(deps, phone))[-1].payload.source is ReplySource.LLM

    await deps.recorder.flush()
    async with pool.acquire() as conn:
        changes = [s.event for s in await deps.events.load_stream(conn, "breaker-openai")]
    assert all(isinstance(c, BreakerStateChanged) for c in changes)
    assert [(c.payload.from_state, c.payload.to_state) for c in changes] == [  # type: ignore[union-attr]
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed"),
    ]  # fmt: skip


async def test_generic_question_is_answered_from_cache_the_second_time(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    redis = aioredis.from_url(urls["redis_url"])
    fake = FakeOpenAI()
    try:
        async with fake as base_url:
            settings = _openai_settings(urls, tag, base_url, response_cache_ttl_seconds=60)
            deps = build_deps(settings, pool, schema=schema, redis=redis)
            question = f"Quanto custa o plano {tag}?"
            await deps.handlers.answer_reply_request(reply_requested(new_phone(), question))
            phone = new_phone()
            await deps.handlers.answer_reply_request(reply_requested(phone, question.upper()))
            await deps.handlers.answer_reply_request(reply_requested(phone, f"Sou {tag}, preciso de ajuda"))
        assert len(fake.requests) == 2  # the repeated generic question did not reach OpenAI
        sources = [g.payload.source for g in await _generated(deps, phone)]
        assert sources == [ReplySource.CACHE, ReplySource.LLM]
    finally:
        await redis.aclose()


async def test_rate_limited_openai_is_retried_then_answered_by_the_fallback(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeOpenAI(rate_limit_rate=1.0)
    async with fake as base_url:
        deps = build_deps(_openai_settings(urls, tag, base_url, openai_retries=2), pool, schema=schema)
        phone = new_phone()
        await deps.handlers.answer_reply_request(reply_requested(phone, "Hello, can you help me?"))
    assert len(fake.requests) == 3  # one call and our two counted retries; the SDK's are off
    [generated] = await _generated(deps, phone)
    assert generated.payload.source is ReplySource.FALLBACK
    assert generated.payload.text.startswith("Hi!")  # the contact wrote in English


async def test_a_redelivered_request_is_not_asked_again_and_a_late_copy_is_still_sent_once(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeOpenAI()
    async with fake as base_url:
        deps = build_deps(_openai_settings(urls, tag, base_url), pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone, "Preciso de um CRM para a minha equipe")
        await deps.handlers.answer_reply_request(req, delivery(1))
        await deps.handlers.answer_reply_request(req, delivery(2))  # its ack was lost
        assert len(fake.requests) == 1  # a redelivery is looked up: OpenAI is not asked again
        # A copy published again beyond JetStream's duplicate window comes as a first delivery:
        # it is not looked up, so OpenAI answers once more, but the stored row stops a second reply.
        await deps.handlers.answer_reply_request(req, delivery(1))
        assert len(fake.requests) == 2
        await deps.sender.drain()
    assert len(await _generated(deps, phone)) == 1
    async with pool.acquire() as conn:
        assert len(await store.list_outbox(conn, phone=phone, limit=10)) == 1
