"""Sending through the fake WhatsApp Cloud API (and Evolution): threading, splitting, rate-limit
backoff, terminal errors, an outage behind the breaker, and the crash window."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from orbion_common.events import MessageSent, SendFailed
from orbion_llm_proxy import store
from orbion_llm_proxy.deps import Deps
from tests.fakes.evolution import FakeEvolution
from tests.fakes.openai import FakeOpenAI
from tests.fakes.whatsapp import FakeWhatsApp

from .conftest import answered_on_cloud, cloud_settings, make_settings
from .helpers import build_deps, new_phone, reply_requested, reply_state, stored_events


async def _settle(deps: Deps, rounds: int = 60) -> None:
    """Drive the sender until no reply is pending (bounded)."""
    for _ in range(rounds):
        await deps.sender.drain()
        async with deps.pool.acquire() as conn:
            counts = await store.reply_counts(conn)
        if not counts.get("pending") and not counts.get("sending"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"replies still pending: {counts}")


def _in_doubt_windows() -> float:
    return REGISTRY.get_sample_value("orbion_llm_proxy_send_in_doubt_seconds_count") or 0.0


async def test_reply_is_sent_in_thread_with_provider_id(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    async with answered_on_cloud(pool, schema, urls, tag) as (fake, deps, req):
        phone = req.stream_id
        await _settle(deps)
        # A redelivery of the request after the send changes nothing.
        await deps.handlers.answer_reply_request(req)
        await _settle(deps)
    [record] = fake.sent
    assert record["to"] == phone and record["context_message_id"] == req.payload.reply_to_message_id
    [sent] = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
    assert sent.payload.via == "cloud_api" and sent.payload.provider_message_id == record["id"]


async def test_pair_rate_limit_backs_off_then_succeeds(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        fake.script_errors(131056, 130429)
        phone = new_phone()
        await deps.handlers.answer_reply_request(reply_requested(phone))
        await _settle(deps)
    assert [r["code"] for r in fake.rejected] == [131056, 130429]
    assert len(fake.sent) == 1
    assert deps.breakers["whatsapp"].state == "closed"  # rate limits are not an outage
    assert [e.type for e in await stored_events(deps, phone)] == ["ReplyGenerated", "MessageSent"]


async def test_outside_24h_window_fails_without_retry(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        fake.script_errors(131047)
        phone = new_phone()
        await deps.handlers.answer_reply_request(reply_requested(phone))
        await _settle(deps)
        await asyncio.sleep(0.1)
        await deps.sender.drain()
    assert [r["code"] for r in fake.rejected] == [131047] and fake.sent == []
    events = await stored_events(deps, phone)
    assert [e.type for e in events] == ["ReplyGenerated", "SendFailed"]
    failed = events[1]
    assert isinstance(failed, SendFailed)
    assert failed.payload.reason == "outside_window" and failed.payload.code == 131047
    assert failed.payload.retryable is False


async def test_long_reply_is_split_into_ordered_parts(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    long_text = "Esta é uma resposta bem detalhada sobre o nosso produto. " * 160  # ~9100 chars
    openai, whatsapp = FakeOpenAI(reply_text=long_text), FakeWhatsApp()
    async with openai as openai_url, whatsapp as wa_url:
        settings = cloud_settings(urls, tag, wa_url, openai_api_key="sk-test", openai_base_url=openai_url)
        deps = build_deps(settings, pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone, "me explica tudo")
        measured_before = _in_doubt_windows()
        await deps.handlers.answer_reply_request(req)
        await _settle(deps)
    texts = [r["text"] for r in whatsapp.sent]
    assert len(texts) == 3 and all(len(t) <= 4096 for t in texts)
    # Each part's window between WhatsApp accepting it and its result committed is on /metrics.
    assert _in_doubt_windows() - measured_before == 3
    assert " ".join(texts) == long_text.strip()
    assert [r["context_message_id"] for r in whatsapp.sent] == [req.payload.reply_to_message_id, "", ""]
    sent = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
    assert [(e.payload.part, e.payload.parts) for e in sent] == [(1, 3), (2, 3), (3, 3)]


async def test_outage_keeps_replies_pending_then_delivers_each_once_in_order(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        settings = cloud_settings(urls, tag, base_url, whatsapp_breaker_fail_max=3)
        deps = build_deps(settings, pool, schema=schema)
        fake.fail_status = 500
        phones = [new_phone() for _ in range(3)]
        keys: dict[str, list[str]] = {p: [] for p in phones}
        for i in range(3):
            for phone in phones:
                req = reply_requested(phone, f"mensagem {i}")
                keys[phone].append(req.payload.reply_key)
                await deps.handlers.answer_reply_request(req)
        worker = asyncio.create_task(deps.sender.run())
        try:
            for _ in range(100):
                if deps.breakers["whatsapp"].state == "open":
                    break
                await asyncio.sleep(0.02)
            assert deps.breakers["whatsapp"].state == "open"
            assert fake.sent == []
            fake.fail_status = 0  # WhatsApp is back
            for _ in range(200):
                if len(fake.sent) >= 9:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # room for a wrongful duplicate to show up
        finally:
            await deps.sender.stop()
            await worker
    assert len(fake.sent) == 9
    for phone in phones:
        sent = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
        assert [e.payload.reply_key for e in sent] == keys[phone]
        texts = [r["text"] for r in fake.sent if r["to"] == phone]
        assert len(texts) == 3


@contextlib.asynccontextmanager
async def leading_sender(deps: Deps) -> AsyncIterator[None]:
    """The sender's loop running and leading, past its term's first look at every due head."""
    worker = asyncio.create_task(deps.sender.run())
    try:
        for _ in range(100):
            if deps.sender.leader:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        yield
    finally:
        await deps.sender.stop()
        await worker


async def _sent_to(fake: FakeWhatsApp, phone: str, count: int) -> list[dict[str, Any]]:
    for _ in range(100):
        if len([r for r in fake.sent if r["to"] == phone]) >= count:
            break
        await asyncio.sleep(0.02)
    return [r for r in fake.sent if r["to"] == phone]


async def test_a_reply_stored_while_the_sender_leads_goes_out_without_a_look_at_every_contact(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, monkeypatch: Any
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url, sender_poll_seconds=30.0), pool, schema=schema)
        async with leading_sender(deps):
            looks = 0
            due_heads = store.due_heads

            async def counted(*args: Any, **kwargs: Any) -> list[store.ReplyRow]:
                nonlocal looks
                looks += 1
                return await due_heads(*args, **kwargs)

            monkeypatch.setattr(store, "due_heads", counted)
            phone = new_phone()
            req = reply_requested(phone)
            await deps.handlers.answer_reply_request(req)
            await _sent_to(fake, phone, 1)
    [record] = fake.sent
    assert record["to"] == phone and record["context_message_id"] == req.payload.reply_to_message_id
    assert looks == 0  # handed over by the consumer, not found by a read of all due heads


async def test_a_contacts_replies_go_out_in_order_with_one_read_of_its_head_each(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, monkeypatch: Any
) -> None:
    """A drain reads its contact's head again after a send only when there is more to send: a
    reply queued behind it, or one stored meanwhile (handed to the running drain, not left to
    the next poll)."""
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url, sender_poll_seconds=30.0), pool, schema=schema)
        assert deps.sender.provider is not None
        phone = new_phone()
        first = reply_requested(phone, "primeira")
        second = reply_requested(phone, "segunda", previous_reply_key=first.payload.reply_key)
        head_reads = 0
        claim_heads, send_text = store.claim_heads, deps.sender.provider.send_text

        async def counted(*args: Any, **kwargs: Any) -> dict[str, store.ReplyRow]:
            nonlocal head_reads
            head_reads += 1
            return await claim_heads(*args, **kwargs)

        async def second_stored_during_the_first_send(to: str, text: str, reply_to: str) -> str:
            if reply_to == first.payload.reply_to_message_id:
                await deps.handlers.answer_reply_request(second)
            return await send_text(to, text, reply_to)

        monkeypatch.setattr(store, "claim_heads", counted)
        monkeypatch.setattr(deps.sender.provider, "send_text", second_stored_during_the_first_send)
        async with leading_sender(deps):
            await deps.handlers.answer_reply_request(first)
            sent = await _sent_to(fake, phone, 2)
            await asyncio.sleep(0.1)  # a needless third read would show up by now
    assert [r["context_message_id"] for r in sent] == [
        first.payload.reply_to_message_id,
        second.payload.reply_to_message_id,
    ]
    assert head_reads == 2


async def test_with_a_slow_whatsapp_api_150_contacts_are_sent_to_at_once_by_default(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    """A send holds its slot for the API's whole answer time: with 64 slots (the old default),
    a second or more per call capped the sender at 64 replies a second, and under load the
    replies queued behind the slots (pipeline p99 9.5-13.7 s at 340 msg/s, 1.5-6.9 s with 256)."""
    fake = FakeWhatsApp(latency_ms=1000)
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        requests = [reply_requested(new_phone()) for _ in range(150)]
        await asyncio.gather(*(deps.handlers.answer_reply_request(r) for r in requests))
        await _settle(deps)
    arrivals = sorted(r["at"] for r in fake.sent)
    assert len(arrivals) == 150
    first_answer = arrivals[0] + 1.0
    assert sum(1 for at in arrivals if at < first_answer) == 150  # all in flight together


async def test_a_due_reply_is_marked_sending_by_the_read_that_finds_it_before_the_call(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, monkeypatch: Any
) -> None:
    async with answered_on_cloud(pool, schema, urls, tag) as (fake, deps, req):
        assert deps.sender.provider is not None
        states_during_call: list[str] = []
        marks = 0
        send_text, mark_sending = deps.sender.provider.send_text, store.mark_sending

        async def observed(*args: Any) -> str:
            states_during_call.append(await reply_state(deps, req.payload.reply_key))
            return await send_text(*args)

        async def counted(*args: Any) -> None:
            nonlocal marks
            marks += 1
            await mark_sending(*args)

        monkeypatch.setattr(deps.sender.provider, "send_text", observed)
        monkeypatch.setattr(store, "mark_sending", counted)
        await _settle(deps)
    assert len(fake.sent) == 1
    assert states_during_call == ["sending"]  # committed before the call: a crash does not resend
    assert marks == 0  # by the read of the contact's head, not by a statement of its own


async def test_a_pacing_token_taken_for_a_claim_whose_read_failed_is_given_back(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, monkeypatch: Any
) -> None:
    """The claiming read takes the contact's pacing token before it runs: a read that fails
    (a database outage) sent nothing, and must not slow the contact's next send down."""
    fake = FakeWhatsApp()
    async with fake as base_url:
        paced = cloud_settings(
            urls, tag, base_url, whatsapp_pair_interval_seconds=60.0, whatsapp_pair_burst=1
        )
        deps = build_deps(paced, pool, schema=schema)
        phone = new_phone()
        await deps.handlers.answer_reply_request(reply_requested(phone))

        async def outage(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionResetError("database restarting")

        monkeypatch.setattr(store, "claim_heads", outage)
        await deps.sender.drain()
    assert fake.sent == []
    assert deps.sender.pacer.delay(phone) == 0  # the contact's one token is still there


async def test_a_reply_not_due_yet_is_read_but_not_claimed(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    phone = new_phone()
    req = reply_requested(phone)
    await deps.handlers.answer_reply_request(req)
    key = req.payload.reply_key
    async with pool.acquire() as conn:
        await store.reschedule(conn, key, 60.0, "paced", count_attempt=False)
        [head] = (await store.claim_heads(conn, [phone])).values()
        assert (head.reply_key, head.claimed) == (key, False)
        assert await reply_state(deps, key) == "pending"
        await store.reschedule(conn, key, 0.0, "", count_attempt=False)
        [head] = (await store.claim_heads(conn, [phone])).values()
        assert head.claimed and head.state == "pending"  # as it was read
        assert await reply_state(deps, key) == "sending"


async def test_send_in_doubt_after_a_crash_is_not_repeated(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone)
        await deps.handlers.answer_reply_request(req)
        # The process died during the HTTP call: the row says "sending", the result is unknown.
        async with pool.acquire() as conn:
            await store.mark_sending(conn, [req.payload.reply_key])
        fresh = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)  # the restarted process
        assert await fresh.sender.recover_in_doubt() == 1
        await fresh.handlers.answer_reply_request(req)  # JetStream redelivers the request too
        await _settle(fresh)
    assert fake.sent == []
    events = await stored_events(fresh, phone)
    assert [e.type for e in events] == ["ReplyGenerated", "SendFailed"]
    assert events[1].payload.reason == "outcome_unknown"


async def test_evolution_provider_sends_with_quoted_message(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeEvolution()
    async with fake as base_url:
        settings = make_settings(
            urls, tag, whatsapp_provider="evolution", evolution_base_url=base_url,
            evolution_api_key="test-apikey", evolution_instance="orbion",
        )  # fmt: skip
        deps = build_deps(settings, pool, schema=schema)
        phone = new_phone()
        req = reply_requested(phone)
        await deps.handlers.answer_reply_request(req)
        await _settle(deps)
    [record] = fake.sent
    assert record["to"] == phone and record["instance"] == "orbion"
    assert record["context_message_id"] == req.payload.reply_to_message_id
    [sent] = [e for e in await stored_events(deps, phone) if isinstance(e, MessageSent)]
    assert sent.payload.via == "evolution" and sent.payload.provider_message_id == record["id"]


async def test_unexpected_error_during_a_send_is_not_retried_blindly(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        provider = deps.sender.provider
        assert provider is not None
        real_send = provider.send_text
        calls = 0

        async def send_then_explode(phone: str, text: str, reply_to: str = "") -> str:
            nonlocal calls
            calls += 1
            await real_send(phone, text, reply_to)  # WhatsApp accepted it...
            raise RuntimeError("bug after the call")  # ...and we could not tell

        provider.send_text = send_then_explode  # type: ignore[method-assign]
        phone = new_phone()
        first, second = reply_requested(phone, "um"), reply_requested(phone, "dois")
        await deps.handlers.answer_reply_request(first)
        await deps.handlers.answer_reply_request(second)
        await deps.sender.drain()  # the first attempt dies in "sending"
        provider.send_text = real_send  # type: ignore[method-assign]
        await _settle(deps)
    assert calls == 1
    assert len(fake.sent) == 2  # the first reply once (accepted before the bug), the second once
    events = await stored_events(deps, phone)
    assert [e.type for e in events] == ["ReplyGenerated", "ReplyGenerated", "SendFailed", "MessageSent"]
    assert events[2].payload.reason == "outcome_unknown"
    assert events[3].payload.reply_key == second.payload.reply_key  # the next one still goes out
