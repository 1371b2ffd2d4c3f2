"""The consumer's handler against real Postgres and Redis: store, projection, cache, replies."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from redis.asyncio import Redis

from orbion_common.events import MessageReceived, ReplyRequested, utcnow
from orbion_common.events.messaging import DeliveryStatus, MessageKind
from orbion_conversation import consumers, domain
from orbion_conversation.consumers import Deps, record_event

from .builders import (
    blocked,
    failed,
    generated,
    inbound,
    new_phone,
    opted_out,
    sent,
    status,
    verification_failed,
    verification_passed,
    verification_requested,
)
from .conftest import make_deps


async def reply_requests(deps: Deps, phone: str) -> list[ReplyRequested]:
    async with deps.pool.acquire() as conn:
        stream = await deps.ctx.store.load_stream(conn, phone)
    return [s.event for s in stream if isinstance(s.event, ReplyRequested)]


async def history(deps: Deps, phone: str) -> list[tuple[str, str, str]]:
    page = await deps.ctx.history.page(phone, 50, None)
    assert page is not None
    return [(m.direction, m.text, m.status) for m in reversed(page)]


async def test_history_keeps_order_across_in_out_and_statuses(deps: Deps) -> None:
    phone = new_phone()
    assert await record_event(deps, inbound(phone, "wamid.A", "Oi", seconds=0)) == "requested"
    [request] = await reply_requests(deps, phone)
    key = request.payload.reply_key
    await record_event(deps, generated(phone, key, "Olá! Como posso ajudar?", seconds=1))
    await record_event(deps, sent(phone, key, "wamid.OUT1", "Olá! Como posso ajudar?", seconds=2))
    await record_event(deps, status(phone, "wamid.OUT1", DeliveryStatus.READ, seconds=4))
    await record_event(deps, status(phone, "wamid.OUT1", DeliveryStatus.DELIVERED, seconds=3))  # late
    await record_event(deps, inbound(phone, "wamid.B", "Quanto custa?", seconds=5))
    assert await history(deps, phone) == [
        ("in", "Oi", "received"),
        ("out", "Olá! Como posso ajudar?", "read"),
        ("in", "Quanto custa?", "received"),
    ]
    contact = await deps.ctx.projection.load_contact(deps.pool, phone)
    assert contact is not None
    assert (contact.message_count, contact.inbound_count, contact.outbound_count) == (3, 2, 1)


async def test_duplicate_and_late_retried_inbound_store_one_message_and_one_request(deps: Deps) -> None:
    phone = new_phone()
    event = inbound(phone, "wamid.DUP", "Olá")
    assert await record_event(deps, event) == "requested"
    assert await record_event(deps, event) == "duplicate"  # JetStream redelivery
    # Meta retries days later: a new webhook for the same provider message, published again.
    assert await record_event(deps, inbound(phone, "wamid.DUP", "Olá", seconds=60)) == "duplicate"
    assert await history(deps, phone) == [("in", "Olá", "received")]
    assert len(await reply_requests(deps, phone)) == 1


async def test_status_before_its_message_is_applied_when_the_message_arrives(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.E0", "Oi"))
    await record_event(deps, status(phone, "wamid.ECHO", DeliveryStatus.DELIVERED))
    await record_event(deps, inbound(phone, "wamid.ECHO", "enviado do celular", seconds=1, from_me=True))
    assert (await history(deps, phone))[-1] == ("out", "enviado do celular", "delivered")


async def test_send_failure_then_retry_success_shows_sent(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.F", "Oi"))
    [request] = await reply_requests(deps, phone)
    key = request.payload.reply_key
    await record_event(deps, generated(phone, key, "Resposta"))
    await record_event(deps, failed(phone, key))
    assert (await history(deps, phone))[-1] == ("out", "Resposta", "failed")
    await record_event(deps, sent(phone, key, "wamid.F-OUT", "Resposta", seconds=9))
    assert (await history(deps, phone))[-1] == ("out", "Resposta", "sent")


async def test_sent_before_generated_still_shows_the_whole_reply(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.G", "Oi"))
    [request] = await reply_requests(deps, phone)
    key = request.payload.reply_key
    await record_event(deps, sent(phone, key, "wamid.G1", "Parte 1", parts=2))
    await record_event(deps, sent(phone, key, "wamid.G2", "Parte 2", part=2, parts=2, seconds=3))
    await record_event(deps, generated(phone, key, "Parte 1\nParte 2"))
    await record_event(deps, status(phone, "wamid.G2", DeliveryStatus.DELIVERED, seconds=4))
    assert await history(deps, phone) == [("in", "Oi", "received"), ("out", "Parte 1\nParte 2", "delivered")]


@pytest.mark.parametrize(
    ("event_kw", "outcome"),
    [
        ({"text": "stop"}, "cancelled"),
        ({"text": "Olá", "throttled": True}, "skipped:throttled"),
        ({"text": "", "kind": MessageKind.IMAGE}, "skipped:kind:image"),
        ({"text": "eco", "from_me": True}, "skipped:from_me"),
    ],
)
async def test_messages_that_get_no_reply_request(
    deps: Deps, event_kw: dict[str, object], outcome: str
) -> None:
    phone = new_phone()
    text = str(event_kw.pop("text"))
    assert await record_event(deps, inbound(phone, "wamid.N", text, **event_kw)) == outcome
    assert await reply_requests(deps, phone) == []


async def test_opted_out_contact_gets_no_reply_until_opt_in(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, opted_out(phone))
    assert await record_event(deps, inbound(phone, "wamid.O1", "oi de novo")) == "skipped:opted_out"
    assert await record_event(deps, inbound(phone, "wamid.O2", "voltar", seconds=1)) == "requested"


async def test_no_sales_reply_while_a_human_verification_is_pending_and_replies_resume_after_it(
    deps: Deps,
) -> None:
    phone = new_phone()
    assert await record_event(deps, inbound(phone, "wamid.V0", "Digite 1 para vendas")) == "requested"
    assert await record_event(deps, verification_requested(phone)) == "projected"
    contact = await deps.ctx.projection.load_contact(deps.pool, phone)
    assert contact is not None and contact.to_json(utcnow())["verification_pending"]
    answer = inbound(phone, "wamid.V1", "SIM", seconds=5)
    assert await record_event(deps, answer) == "skipped:verification_pending"
    assert await record_event(deps, verification_passed(phone, answer)) == "projected"
    assert await record_event(deps, inbound(phone, "wamid.V2", "Quanto custa?", seconds=9)) == "requested"
    requests = await reply_requests(deps, phone)
    assert [r.payload.inbound_message_ids for r in requests] == [["wamid.V0"], ["wamid.V2"]]
    # the answer is still part of the conversation the LLM sees
    assert [h.text for h in requests[-1].payload.history if h.direction == "in"] == [
        "Digite 1 para vendas",
        "SIM",
    ]


async def test_failed_verification_then_block_stops_replies_for_good(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, verification_requested(phone))
    wrong = inbound(phone, "wamid.F1", "Digite 1", seconds=1)
    assert await record_event(deps, wrong) == "skipped:verification_pending"
    await record_event(deps, verification_failed(phone, wrong))
    again = inbound(phone, "wamid.F2", "Digite 1", seconds=2)
    assert await record_event(deps, again) == "skipped:verification_pending"
    await record_event(deps, verification_failed(phone, again, attempt=2))
    await record_event(deps, blocked(phone, again))
    assert await record_event(deps, inbound(phone, "wamid.F3", "SIM", seconds=3)) == "skipped:blocked"
    assert await reply_requests(deps, phone) == []


async def test_an_answer_redelivered_after_the_pass_gets_no_reply(deps: Deps) -> None:
    """Its first handling lost a race (nakked), and the lead's Passed was recorded before it."""
    phone = new_phone()
    await record_event(deps, verification_requested(phone))
    answer = inbound(phone, "wamid.L1", "SIM", seconds=1)
    await record_event(deps, verification_passed(phone, answer))
    assert await record_event(deps, answer) == "skipped:verification_answer"
    assert await record_event(deps, inbound(phone, "wamid.L2", "Oi", seconds=2)) == "requested"
    [request] = await reply_requests(deps, phone)
    assert request.payload.inbound_message_ids == ["wamid.L2"]


async def test_cache_follows_every_event_and_a_stale_snapshot_never_wins(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.C1", "um"))
    first = await deps.ctx.history.cache.peek(phone)
    assert first is not None and [m.text for m in first.value] == ["um"]
    await record_event(deps, inbound(phone, "wamid.C2", "dois", seconds=1))
    fresh = await deps.ctx.history.cache.peek(phone)
    assert fresh is not None and fresh.version > first.version
    # A slow writer that read before "dois" committed arrives last: refused.
    assert not await deps.ctx.history.cache.put(phone, first.version, first.value)
    after = await deps.ctx.history.cache.peek(phone)
    assert after is not None and [m.text for m in after.value] == ["dois", "um"]


async def test_history_answers_from_postgres_when_redis_is_down(pool: asyncpg.Pool, schema: str) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    deps = make_deps(pool, schema, dead)
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.R1", "sem cache"))
    assert await history(deps, phone) == [("in", "sem cache", "received")]
    await dead.aclose()


async def test_crash_after_commit_before_ack_has_no_second_effect(deps: Deps) -> None:
    """The bus redelivers an event whose transaction committed but whose ack was lost."""
    phone = new_phone()
    event = inbound(phone, "wamid.K", "Oi")
    await record_event(deps, event)
    # simulated crash: no ack; JetStream delivers the same message again
    assert await record_event(deps, event) == "duplicate"
    assert len(await reply_requests(deps, phone)) == 1
    assert len(await history(deps, phone)) == 1


async def test_crash_mid_transaction_leaves_nothing_and_the_retry_does_everything_once(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    phone = new_phone()
    event = inbound(phone, "wamid.X", "Oi")

    async def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("process killed")

    monkeypatch.setattr(consumers.replies, "on_inbound", boom)
    with pytest.raises(RuntimeError):
        await record_event(deps, event)
    assert await deps.ctx.history.page(phone, 20, None) is None  # rolled back: nothing stored
    monkeypatch.undo()
    assert await record_event(deps, event) == "requested"
    assert len(await reply_requests(deps, phone)) == 1


async def test_reply_request_carries_history_and_a_key_from_the_inbound_id(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.H1", "Oi"))
    [first] = await reply_requests(deps, phone)
    await record_event(deps, generated(phone, first.payload.reply_key, "Olá!"))
    await record_event(deps, inbound(phone, "wamid.H2", "Quanto custa?", seconds=5))
    second = (await reply_requests(deps, phone))[-1]
    assert second.payload.reply_key == domain.reply_key(["wamid.H2"])
    assert second.payload.text == "Quanto custa?"
    assert [(h.direction, h.text) for h in second.payload.history] == [("in", "Oi"), ("out", "Olá!")]
    assert second.causation_id == inbound(phone, "wamid.H2").event_id


async def test_reply_request_knows_the_lead_stage_and_language(deps: Deps) -> None:
    from orbion_common.events import BantStageAdvanced
    from orbion_common.events.lead import BantStageAdvancedPayload
    from orbion_common.events.messaging import LeadFacts

    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.L1", "Oi"))
    [first] = await reply_requests(deps, phone)
    reply = generated(phone, first.payload.reply_key, "Hi!")
    reply = reply.model_copy(
        update={"payload": reply.payload.model_copy(update={"facts": LeadFacts(language="en")})}
    )
    await record_event(deps, reply)
    stage = BantStageAdvancedPayload(phone=phone, from_stage="need", to_stage="budget")
    await record_event(deps, BantStageAdvanced.create(phone, stage))
    await record_event(deps, inbound(phone, "wamid.L2", "How much?", seconds=9))
    second = (await reply_requests(deps, phone))[-1]
    assert (second.payload.lead_stage, second.payload.language) == ("budget", "en")


async def test_two_replicas_on_one_contact_keep_one_order_and_lose_nothing(
    pool: asyncpg.Pool, schema: str, redis: Redis
) -> None:
    """Replicas race on the same contact: the loser's append conflicts, it retries, both land."""
    from orbion_common.eventstore import ConcurrencyError

    a, b = make_deps(pool, schema, redis), make_deps(pool, schema, redis)
    phone = new_phone()
    await record_event(a, inbound(phone, "wamid.R0", "Oi"))
    events = [inbound(phone, f"wamid.R{i}", f"m{i}", seconds=i) for i in range(1, 21)]

    async def replica(deps: Deps, mine: list[MessageReceived]) -> int:
        conflicts = 0
        for event in mine:
            for _ in range(50):  # the bus would nak and redeliver; here: retry at once
                try:
                    await record_event(deps, event)
                    break
                except ConcurrencyError:
                    conflicts += 1
        return conflicts

    await asyncio.gather(replica(a, events[0::2]), replica(b, events[1::2]))
    async with pool.acquire() as conn:
        stream = await a.ctx.store.load_stream(conn, phone)
    assert [s.version for s in stream] == list(range(1, len(stream) + 1))  # no gap, no fork
    received = [s.event.payload.provider_message_id for s in stream if s.event.type == "MessageReceived"]
    assert sorted(received) == sorted(["wamid.R0", *(f"wamid.R{i}" for i in range(1, 21))])
    assert len(await history(a, phone)) == 21


async def test_our_own_echo_seen_before_the_send_leaves_one_outbound_line(deps: Deps) -> None:
    phone = new_phone()
    await record_event(deps, inbound(phone, "wamid.E1", "Oi"))
    [request] = await reply_requests(deps, phone)
    key = request.payload.reply_key
    await record_event(deps, generated(phone, key, "Olá!"))
    # Evolution echoes the reply (from_me) before the llm-proxy's MessageSent lands.
    await record_event(deps, inbound(phone, "wamid.E1-OUT", "Olá!", seconds=3, from_me=True))
    await record_event(deps, sent(phone, key, "wamid.E1-OUT", "Olá!", seconds=2))
    await record_event(deps, status(phone, "wamid.E1-OUT", DeliveryStatus.DELIVERED, seconds=4))
    assert await history(deps, phone) == [("in", "Oi", "received"), ("out", "Olá!", "delivered")]
    contact = await deps.ctx.projection.load_contact(deps.pool, phone)
    assert contact is not None and (contact.message_count, contact.outbound_count) == (2, 1)


async def test_event_types_we_do_not_consume_are_acked_untouched(deps: Deps) -> None:
    """A NATS server older than 2.10 ignores multi-subject filters and delivers every type."""
    from orbion_common.events import LeadCreated
    from orbion_common.events.lead import LeadCreatedPayload

    phone = new_phone()
    assert await record_event(deps, LeadCreated.create(phone, LeadCreatedPayload(phone=phone))) == "ignored"
    async with deps.pool.acquire() as conn:
        assert await deps.ctx.store.load_stream(conn, phone) == []
