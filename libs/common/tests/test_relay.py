"""The relay publishes stored events exactly as the store holds them, once, even after a crash."""

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from orbion_common.bus import Bus
from orbion_common.events import MessageReceived, decode
from orbion_common.events.messaging import MessageReceivedPayload
from orbion_common.eventstore import START, EventStore
from orbion_common.migrations import migrate
from orbion_common.relay import Relay
from orbion_common.settings import CommonSettings


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
async def parts(nats_url, database_url, fresh_schema, unique):
    settings = CommonSettings(nats_url=nats_url, database_url=database_url, stream_name=f"R{unique}".upper())
    bus = await Bus.connect(settings, name="relay-test")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await migrate(pool, fresh_schema)
    yield pool, EventStore(fresh_schema), bus
    await pool.close()
    for name in (settings.stream_name, f"{settings.stream_name}_DLQ"):
        await bus.js.delete_stream(name)
    await bus.close()


async def test_committed_events_are_published_once_even_when_the_cursor_write_is_lost(parts):
    pool, store, bus = parts
    async with pool.acquire() as conn:
        await store.append(conn, "5511", [inbound("5511", 1), inbound("5511", 2)])
    relay = Relay(pool, store, bus)
    assert await relay.publish_pending() == 2
    # A crash after the publish but before the cursor commit: publish the same batch again.
    async with pool.acquire() as conn:
        await store.save_cursor(conn, relay.name, START)
    assert await relay.publish_pending() == 2
    info = await bus.js.stream_info(bus.settings.stream_name)
    assert info.state.messages == 2  # JetStream dropped the repeats (Nats-Msg-Id = event id)
    assert await relay.publish_pending() == 0


async def test_a_running_relay_publishes_soon_after_a_commit_and_only_one_replica_leads(parts):
    pool, store, bus = parts
    relays = [Relay(pool, store, bus, poll_seconds=0.05) for _ in range(2)]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        async with pool.acquire() as conn:
            await store.append(conn, "5511", [inbound("5511", 1)])
        relays[0].wake()
        relays[1].wake()
        for _ in range(100):
            if (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 1:
                break
            await asyncio.sleep(0.05)
        assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 1
        assert sum(r.leader for r in relays) == 1
    finally:
        for r in relays:
            await r.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_stopping_relay_publishes_what_committed_before_its_stop(parts):
    """Not left to the next leader's read: a stop right after a commit (the service's last
    handlers and rounds finishing) still publishes it, as the bus closes after the relay."""
    pool, store, bus = parts
    relay = Relay(pool, store, bus, poll_seconds=60)
    task = asyncio.create_task(relay.run())
    for _ in range(100):
        if relay.leader:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # its first read done, it waits for a wake-up or a minute
    async with pool.acquire() as conn:
        await store.append(conn, "5511", [inbound("5511", 1)])
    await relay.stop()
    await asyncio.wait_for(task, 5)
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 1


async def test_a_leading_relay_writes_its_cursor_at_most_once_an_interval_and_when_it_stops(parts):
    pool, store, bus = parts
    relay = Relay(pool, store, bus, poll_seconds=0.05, checkpoint_seconds=3600)

    async def published(n: int) -> None:
        relay.wake()
        for _ in range(100):
            if (await bus.js.stream_info(bus.settings.stream_name)).state.messages == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{n} events were not published")

    async def saved_cursor(wait_for: int | None = None) -> int:
        for _ in range(100):
            async with pool.acquire() as conn:
                position = (await store.cursor(conn, relay.name)).position
            if wait_for is None or position == wait_for:
                break
            await asyncio.sleep(0.05)
        return position

    task = asyncio.create_task(relay.run())
    try:
        async with pool.acquire() as conn:
            first = await store.append(conn, "5511", [inbound("5511", 1)])
        await published(1)
        # A term's first batch is written (after the publish: the same call, a moment later).
        assert await saved_cursor(wait_for=first[0].position) == first[0].position
        async with pool.acquire() as conn:
            second = await store.append(conn, "5511", [inbound("5511", 2)])
        await published(2)
        await asyncio.sleep(0.2)  # a few more polls
        assert await saved_cursor() == first[0].position  # kept in memory meanwhile
    finally:
        await relay.stop()
        await task
    assert await saved_cursor() == second[0].position
    # A relay that crashed before that write publishes the second event again: JetStream
    # drops the repeat (the first test), and the consumers' claims beyond its window.


async def test_a_relayed_event_is_published_in_the_trace_that_appended_it(parts):
    from opentelemetry.sdk.trace import TracerProvider

    pool, store, bus = parts
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("handle webhook") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        async with pool.acquire() as conn:
            await store.append(conn, "5511", [inbound("5511", 1)])
    await Relay(pool, store, bus).publish_pending()  # outside any span, as the relay's loop is
    msg = await bus.js.get_last_msg(bus.settings.stream_name, f"{bus.root}.events.>")
    assert msg.headers is not None
    assert msg.headers["traceparent"].split("-")[1] == trace_id


async def test_a_relay_publishes_only_the_types_its_service_owns(parts):
    from orbion_common.events import ReplyRequested
    from orbion_common.events.messaging import ReplyRequestedPayload

    pool, store, bus = parts
    consumed = inbound("5511", 1)
    decided = ReplyRequested.create(
        "5511",
        ReplyRequestedPayload(reply_key="k1", phone="5511", inbound_message_ids=["wamid.1"], text="oi"),
        cause=consumed,
    )
    async with pool.acquire() as conn:
        await store.append(conn, "5511", [consumed, decided])
    relay = Relay(pool, store, bus, publish_types={"ReplyRequested"})
    assert await relay.publish_pending() == 2
    assert await relay.publish_pending() == 0
    info = await bus.js.stream_info(bus.settings.stream_name)
    assert info.state.messages == 1
    msg = await bus.js.get_last_msg(bus.settings.stream_name, f"{bus.root}.events.>")
    assert decode(msg.data) == decided  # passed on as stored, without being parsed


def handed(stored):
    """What a writer hands to ``publish_committed``: the events and their trace contexts."""
    return [s.event for s in stored], [s.trace_context for s in stored]


async def leading(relay):
    """As while its run() leads: it leads, and its first read caught up."""
    relay.leader = True
    await relay.publish_pending()


async def test_events_published_as_they_committed_are_passed_by_the_relays_read(parts, monkeypatch):
    pool, store, bus = parts
    relay = Relay(pool, store, bus)
    await leading(relay)
    async with pool.acquire() as conn:
        first, second = await store.append(conn, "5511", [inbound("5511", 1), inbound("5511", 2)])
    task = relay.publish_committed(*handed([first]))
    assert task is not None
    await task
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 1

    read_published: list[str] = []
    publish_all = bus.publish_all

    async def spy(events, *args, **kwargs):
        read_published.extend(e.event_id for e in events)
        return await publish_all(events, *args, **kwargs)

    monkeypatch.setattr(bus, "publish_all", spy)
    assert await relay.publish_pending() == 2
    assert read_published == [second.event.event_id]  # the first went out already
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 2


async def test_events_handed_over_while_a_publish_waits_go_out_after_it_in_one_batch(parts, monkeypatch):
    pool, store, bus = parts
    relay = Relay(pool, store, bus)
    await leading(relay)
    async with pool.acquire() as conn:
        stored = await store.append(conn, "5511", [inbound("5511", n) for n in range(1, 4)])
    publish_all = bus.publish_all
    batches: list[list[str]] = []

    async def slow_first(events, *args, **kwargs):
        batches.append([e.event_id for e in events])
        if len(batches) == 1:
            await asyncio.sleep(0.2)  # JetStream slow to ack the first
        return await publish_all(events, *args, **kwargs)

    monkeypatch.setattr(bus, "publish_all", slow_first)
    first = relay.publish_committed(*handed(stored[:1]))
    await asyncio.sleep(0.05)
    relay.publish_committed(*handed(stored[1:2]))
    last = relay.publish_committed(*handed(stored[2:]))
    assert first is last is not None
    await last
    ids = [s.event.event_id for s in stored]
    assert batches == [ids[:1], ids[1:]]
    sub = await bus.js.pull_subscribe(f"{bus.root}.events.>", stream=bus.settings.stream_name)
    in_stream = [decode(m.data).event_id for m in await sub.fetch(3, timeout=2)]
    assert in_stream == ids  # in the order they committed


async def test_after_a_failed_early_publish_the_read_publishes_until_it_caught_up(parts, monkeypatch):
    from orbion_common.bus import BusUnavailable

    pool, store, bus = parts
    relay = Relay(pool, store, bus)
    await leading(relay)
    async with pool.acquire() as conn:
        first, second = await store.append(conn, "5511", [inbound("5511", 1), inbound("5511", 2)])
    publish_all = bus.publish_all

    async def unavailable(*args, **kwargs):
        raise BusUnavailable("NATS restarting")

    monkeypatch.setattr(bus, "publish_all", unavailable)
    task = relay.publish_committed(*handed([first]))
    assert task is not None
    await task  # logged, not raised
    monkeypatch.setattr(bus, "publish_all", publish_all)
    # Published early now, the second would overtake the first in the stream.
    assert relay.publish_committed(*handed([second])) is None
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 0
    assert await relay.publish_pending() == 2
    sub = await bus.js.pull_subscribe(f"{bus.root}.events.>", stream=bus.settings.stream_name)
    assert [decode(m.data).event_id for m in await sub.fetch(2, timeout=2)] == [
        first.event.event_id,
        second.event.event_id,
    ]
    async with pool.acquire() as conn:
        [third] = await store.append(conn, "5511", [inbound("5511", 3)])
    assert relay.publish_committed(*handed([third])) is not None  # caught up: early again


async def test_a_relay_publishes_nothing_early_before_its_first_read(parts):
    pool, store, bus = parts
    async with pool.acquire() as conn:
        stored = await store.append(conn, "5511", [inbound("5511", 1)])
    relay = Relay(pool, store, bus)
    relay.leader = True  # a new term: the log may hold a backlog the read publishes first
    assert relay.publish_committed(*handed(stored)) is None
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 0


async def test_a_relay_that_does_not_lead_publishes_nothing_early(parts):
    pool, store, bus = parts
    async with pool.acquire() as conn:
        stored = await store.append(conn, "5511", [inbound("5511", 1)])
    assert Relay(pool, store, bus).publish_committed(*handed(stored)) is None
    assert (await bus.js.stream_info(bus.settings.stream_name)).state.messages == 0
