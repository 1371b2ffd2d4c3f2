"""Through real JetStream: an inbound event in, a ReplyRequested out (via the relay), history API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import nats
import pytest
from nats.aio.msg import Msg
from redis.asyncio import Redis

from orbion_common.bus import Bus
from orbion_common.events import Event, ReplyRequested, decode, utcnow
from orbion_conversation import consumers
from orbion_conversation.app import create_app
from orbion_conversation.bootstrap import Service, app_deps, build
from orbion_conversation.domain import MessageItem
from orbion_conversation.group import GroupCommit
from orbion_conversation.settings import Settings

from .builders import generated, inbound, new_phone, sent, verification_passed, verification_requested


@pytest.fixture
async def service(
    pool: asyncpg.Pool, schema: str, redis: Redis, nats_test_url: str, redis_test_url: str
) -> AsyncIterator[Service]:
    settings = Settings(
        nats_url=nats_test_url,
        redis_url=redis_test_url,
        reply_quiet_period_seconds=0.2,
        conversation_scheduler_poll_seconds=0.05,
    )
    bus = await Bus.connect(settings, name="conversation-test")
    durable = f"conversation-test-{uuid.uuid4().hex[:8]}"
    svc = build(
        settings,
        pool,
        schema=schema,
        redis=redis,
        bus=bus,
        cache_prefix=f"test:{schema}:h",
    )
    svc.start(durable, deliver_new_only=True)
    for _ in range(100):  # the consumer binds in the background; only new events reach it
        try:
            await bus.js.consumer_info(settings.stream_name, durable)
            break
        except Exception:
            await asyncio.sleep(0.05)
    yield svc
    await svc.stop()
    nc = await nats.connect(nats_test_url)
    try:
        await nc.jetstream().delete_consumer(settings.stream_name, durable)
    finally:
        await nc.close()


async def wait_for(predicate: object, tries: int = 100, delay: float = 0.05) -> None:
    for _ in range(tries):
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(delay)
    raise AssertionError("condition not met in time")


async def test_inbound_on_the_bus_becomes_history_and_one_published_reply_request(
    service: Service, nats_test_url: str
) -> None:
    assert service.bus is not None
    phone = new_phone()
    seen: list[ReplyRequested] = []
    nc = await nats.connect(nats_test_url)

    async def collect(msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, ReplyRequested) and event.stream_id == phone:
            seen.append(event)

    await nc.subscribe("orbion.events.ReplyRequested.*", cb=collect)
    try:
        first = inbound(phone, f"wamid.{uuid.uuid4().hex}", "Oi")
        await service.bus.publish(first)
        await service.bus.publish(first, msg_id=uuid.uuid4().hex)  # a duplicate past the dedupe window
        await service.bus.publish(inbound(phone, f"wamid.{uuid.uuid4().hex}", "quanto custa?", seconds=1))

        async def one_request() -> bool:
            return len(seen) >= 1

        await wait_for(one_request)
        await asyncio.sleep(0.4)  # a second request would have been published by now
        assert len(seen) == 1
        assert seen[0].payload.text == "Oi\nquanto custa?"

        # the llm-proxy answers; the reply shows up in the history API with direction "out".
        # (A real llm-proxy on the shared test NATS may answer the request too: own key here.)
        key = f"test-{uuid.uuid4().hex}"
        await service.bus.publish(generated(phone, key, "Olá! O plano custa R$ 99."))
        await service.bus.publish(sent(phone, key, f"wamid.{uuid.uuid4().hex}", "Olá! O plano custa R$ 99."))
        app = create_app(service.settings, app_deps(service))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:

            async def reply_visible() -> bool:
                r = await http.get(f"/api/conversations/{phone}/messages")
                return r.status_code == 200 and any(
                    m["reply_key"] == key and m["status"] == "sent" for m in r.json()["messages"]
                )

            await wait_for(reply_visible)
            body = (await http.get(f"/api/conversations/{phone}/messages")).json()
        lines = [(m["direction"], m["text"], m["status"]) for m in body["messages"]]
        [ours] = [m for m in body["messages"] if m["reply_key"] == key]
        assert (ours["direction"], ours["text"], ours["status"]) == (
            "out",
            "Olá! O plano custa R$ 99.",
            "sent",
        )
        assert [line for line in lines if line[0] == "in"] == [
            ("in", "quanto custa?", "received"),
            ("in", "Oi", "received"),
        ]
    finally:
        await nc.close()


async def test_a_reply_request_committed_while_the_service_stops_is_published_before_it_stops(
    service: Service, nats_test_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection closes last: a scheduler round that commits as the service stops gets
    its request published, not left to the relay's read at the next start."""
    assert service.relay is not None
    relay = service.relay

    async def leading() -> bool:
        return relay.leader

    await wait_for(leading)
    phone = new_phone()
    seen: list[Event] = []
    nc = await nats.connect(nats_test_url)

    async def collect(msg: Msg) -> None:
        event = decode(msg.data)
        if event.stream_id == phone:
            seen.append(event)

    await nc.subscribe("orbion.events.ReplyRequested.*", cb=collect)
    stop_scheduler = service.scheduler.stop

    async def stop_after_a_last_round() -> None:
        await consumers.record_event(service.deps, inbound(phone, f"wamid.{phone}", "Oi"))
        assert await service.scheduler.emit_due(utcnow() + timedelta(seconds=1)) == 1
        await stop_scheduler()

    monkeypatch.setattr(service.scheduler, "stop", stop_after_a_last_round)
    try:
        await service.stop()

        async def published() -> bool:  # a core subscriber may see a repeat JetStream dropped
            return len({e.event_id for e in seen}) == 1

        await wait_for(published, tries=20)
    finally:
        await nc.close()


async def test_a_message_with_a_nul_character_is_stored_without_it_not_lost(service: Service) -> None:
    # Postgres holds a NUL neither in text nor in jsonb: the event failed in every consumer's
    # store, was redelivered until dead-lettered, and the message never reached the history.
    assert service.bus is not None
    phone = new_phone()
    await service.bus.publish(inbound(phone, f"wamid.{uuid.uuid4().hex}", "Oi\x00 tudo bem?"))
    app = create_app(service.settings, app_deps(service))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:

        async def stored() -> bool:
            r = await http.get(f"/api/conversations/{phone}/messages")
            return r.status_code == 200 and bool(r.json()["messages"])

        await wait_for(stored)
        body = (await http.get(f"/api/conversations/{phone}/messages")).json()
    assert [m["text"] for m in body["messages"]] == ["Oi tudo bem?"]


async def test_a_crash_between_commit_and_ack_is_redelivered_without_a_second_effect(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service.bus is not None
    history = service.deps.ctx.history
    real_write = history.write_through_many
    crashes: list[str] = []
    phone = new_phone()

    async def crash_once(snapshots: dict[str, tuple[int, list[MessageItem]]]) -> None:
        if phone in snapshots and not crashes:
            crashes.append(phone)
            raise ConnectionError("killed after commit, before ack")
        await real_write(snapshots)

    monkeypatch.setattr(history, "write_through_many", crash_once)
    outcomes: list[str] = []
    real_record = GroupCommit.record

    async def observed(group: GroupCommit, event: Event) -> str:
        try:
            outcome: str = await real_record(group, event)
        except Exception:
            outcome = "crashed"
            raise
        finally:
            if event.stream_id == phone and event.type == "MessageReceived":
                outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(GroupCommit, "record", observed)
    await service.bus.publish(inbound(phone, f"wamid.{uuid.uuid4().hex}", "Oi"))

    async def redelivered_and_requested() -> bool:
        async with service.pool.acquire() as conn:
            stream = await service.deps.ctx.store.load_stream(conn, phone)
        return len(outcomes) == 2 and any(s.event.type == "ReplyRequested" for s in stream)

    await wait_for(redelivered_and_requested, tries=60)
    await asyncio.sleep(0.3)  # the redelivery has been handled (50 ms nak delay) by now
    async with service.pool.acquire() as conn:
        stream = await service.deps.ctx.store.load_stream(conn, phone)
    assert [s.event.type for s in stream] == ["MessageReceived", "ReplyRequested"]
    assert outcomes == ["crashed", "duplicate"]  # redelivered, and the redelivery changed nothing
    cached = await history.cache.peek(phone)  # the redelivery wrote the cache the crash skipped
    assert cached is not None and [m.text for m in cached.value] == ["Oi"]
    page = await history.page(phone, 20, None)
    assert page is not None and len(page) == 1


async def test_a_pending_human_verification_on_the_bus_holds_replies_until_it_passes(
    service: Service, nats_test_url: str
) -> None:
    """The lead's verification events reach the real consumer (its durable's filter) in order."""
    assert service.bus is not None
    phone = new_phone()
    answer = inbound(phone, f"wamid.{uuid.uuid4().hex}", "SIM", seconds=1)
    question = inbound(phone, f"wamid.{uuid.uuid4().hex}", "Quanto custa o plano?", seconds=2)
    for event in (verification_requested(phone), answer, verification_passed(phone, answer), question):
        await service.bus.publish(event)

    async def requests() -> list[ReplyRequested]:
        async with service.pool.acquire() as conn:
            stream = await service.deps.ctx.store.load_stream(conn, phone)
        return [s.event for s in stream if isinstance(s.event, ReplyRequested)]

    async def question_answered() -> bool:
        return len(await requests()) > 0

    # Delivered in order: by the time the question's reply is asked, the answer was decided on.
    await wait_for(question_answered)
    [request] = await requests()
    assert request.payload.inbound_message_ids == [question.payload.provider_message_id]
    contact = await service.deps.ctx.projection.load_contact(service.pool, phone)
    assert contact is not None and not contact.state.verification_pending
