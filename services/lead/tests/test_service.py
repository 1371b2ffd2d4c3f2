"""The lead service wired to real NATS JetStream, Postgres and Redis: events in, lead events out."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import nats
import nats.js.errors
import orjson
import pytest
from lead_builders import drop_test_keys, inbound, lead_settings, new_phone, sent

from orbion_common.bus import Bus
from orbion_common.events import EVENTS_BY_NAME, MessageReceived, stable_event_id
from orbion_lead.bootstrap import Service, build

pytestmark = pytest.mark.skipif(
    "LeadActivityRecorded" not in EVENTS_BY_NAME,
    reason="LeadActivityRecorded is not registered in orbion_common.events yet",
)


@pytest.fixture
async def running(
    pg_url: str, redis_test_url: str, nats_test_url: str, schema: str
) -> AsyncIterator[tuple[Service, Bus]]:
    settings = lead_settings(pg_url, redis_test_url, nats_test_url, lead_timer_poll_seconds=0.05)
    durable = f"lead-test-{uuid.uuid4().hex[:8]}"
    svc = await build(settings, schema=schema, durable=durable, cache_prefix=f"test:{schema}:lead")
    svc.deliver_new_only = True  # the stream is shared with other tests: only what this test publishes
    svc.start()
    publisher = await Bus.connect(settings, name="lead-test-publisher")
    await consumer_ready(publisher, durable)
    try:
        yield svc, publisher
    finally:
        await drop_test_keys(svc.redis, schema)
        await svc.stop()
        with contextlib.suppress(Exception):
            await publisher.js.delete_consumer(settings.stream_name, durable)
        await publisher.close()


async def consumer_ready(bus: Bus, durable: str) -> None:
    """A new-only consumer misses what is published before it exists: wait for it."""

    async def exists() -> bool:
        try:
            await bus.js.consumer_info(bus.settings.stream_name, durable)
        except nats.js.errors.NotFoundError:
            return False
        return True

    await eventually(exists)


async def eventually(check: Callable[[], object], *, within: float = 10.0) -> None:
    """Bounded retry: polls ``check`` (sync or async) until truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def subscribe(nats_url: str, event_type: str, phone: str) -> tuple[nats.NATS, list[dict[str, object]]]:
    """Core NATS subscription that collects the published ``event_type`` events of ``phone``."""
    nc = await nats.connect(nats_url)
    seen: list[dict[str, object]] = []

    async def collect(msg: nats.aio.msg.Msg) -> None:
        body = orjson.loads(msg.data)
        if body["stream_id"] == phone:
            seen.append(body)

    await nc.subscribe(f"orbion.events.{event_type}.*", cb=collect)
    return nc, seen


async def test_a_first_message_on_the_bus_creates_a_lead_and_publishes_its_events(
    running: tuple[Service, Bus], nats_test_url: str
) -> None:
    svc, bus = running
    phone = new_phone()
    nc, created = await subscribe(nats_test_url, "LeadCreated", phone)
    try:
        await bus.publish(inbound(phone, "Olá, meu nome é Carla e preciso de um CRM", profile_name="Carla S"))
        await eventually(lambda: svc.recorder.get(phone))
        lead = await svc.recorder.get(phone)
        assert lead is not None and lead.profile_name == "Carla S" and lead.fields["name"] == "Carla"
        await eventually(lambda: len(created) == 1)  # the relay published what the handler appended
    finally:
        await nc.close()


async def test_a_stop_word_opts_out_and_the_opt_out_is_published(
    running: tuple[Service, Bus], nats_test_url: str
) -> None:
    svc, bus = running
    phone = new_phone()
    nc, opted = await subscribe(nats_test_url, "LeadOptedOut", phone)
    try:
        await bus.publish(inbound(phone, "Oi"))
        await bus.publish(sent(phone))
        await bus.publish(inbound(phone, "Parar"))
        await eventually(lambda: len(opted) == 1)
        lead = await svc.recorder.get(phone)
        assert lead is not None and lead.opted_out and not lead.agent_replies and lead.messages_out == 1
    finally:
        await nc.close()


async def test_the_same_message_published_twice_is_recorded_once(running: tuple[Service, Bus]) -> None:
    svc, bus = running
    phone = new_phone()
    msg = inbound(phone, "Preciso de um site")
    await bus.publish(msg)
    # Beyond JetStream's duplicate window a provider retry arrives again: a new message id.
    await bus.publish(msg, msg_id=stable_event_id("retry", msg.event_id))
    await bus.publish(inbound(phone, "tudo bem?"))  # a later message, so we know both were handled

    async def two_messages() -> bool:
        lead = await svc.recorder.get(phone)
        return lead is not None and lead.messages_in >= 2

    await eventually(two_messages)
    await asyncio.sleep(0.2)
    lead = await svc.recorder.get(phone)
    assert lead is not None and lead.messages_in == 2


async def test_an_unanswered_verification_blocks_the_contact_and_publishes_it(
    pg_url: str, redis_test_url: str, nats_test_url: str, schema: str
) -> None:
    settings = lead_settings(
        pg_url,
        redis_test_url,
        nats_test_url,
        human_verification_timeout_seconds=0.3,
        lead_timer_poll_seconds=0.05,
    )
    durable = f"lead-test-{uuid.uuid4().hex[:8]}"
    svc = await build(settings, schema=schema, durable=durable, cache_prefix=f"test:{schema}:lead")
    svc.deliver_new_only = True
    svc.start()
    assert svc.bus is not None
    await consumer_ready(svc.bus, durable)
    phone = new_phone()
    nc, blocked = await subscribe(nats_test_url, "ContactBlocked", phone)
    asked_nc, asked = await subscribe(nats_test_url, "HumanVerificationRequested", phone)
    try:
        bus = svc.bus
        assert bus is not None
        for _ in range(2):
            await bus.publish(_auto_reply(phone))
        await eventually(lambda: len(blocked) == 1)
        assert len(asked) == 1 and "SIM" in str(asked[0]["payload"])
        lead = await svc.recorder.get(phone)
        assert lead is not None and lead.blocked
    finally:
        await nc.close()
        await asked_nc.close()
        await drop_test_keys(svc.redis, schema)
        await svc.stop()
        with contextlib.suppress(Exception):
            cleanup = await nats.connect(nats_test_url)
            await cleanup.jetstream().delete_consumer(settings.stream_name, durable)
            await cleanup.close()


def _auto_reply(phone: str) -> MessageReceived:
    return inbound(
        phone, "Olá! Esta é uma mensagem automática. Digite 1 para falar com vendas.", when=datetime.now(UTC)
    )


async def test_the_relay_publishes_lead_facts_but_keeps_per_message_activity_in_the_store(
    running: tuple[Service, Bus], nats_test_url: str
) -> None:
    svc, bus = running
    phone = new_phone()
    nc, created = await subscribe(nats_test_url, "LeadCreated", phone)
    activity_nc, activity = await subscribe(nats_test_url, "LeadActivityRecorded", phone)
    try:
        await bus.publish(inbound(phone, "Oi"))
        await eventually(lambda: len(created) == 1)
        await asyncio.sleep(0.3)  # published together with LeadCreated, had it been published
        assert activity == []
        async with svc.pool.acquire() as conn:
            stored = [s.event.type for s in await svc.store.load_events(conn, phone)]
        assert "LeadActivityRecorded" in stored
    finally:
        await nc.close()
        await activity_nc.close()
