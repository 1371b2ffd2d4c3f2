"""The bus against a real NATS JetStream; each test has its own stream and consumers."""

import asyncio
import json
import logging
from datetime import UTC, datetime

import pytest

from orbion_common.bus import Bus, ConsumerSpec, dlq_subject
from orbion_common.events import MessageReceived
from orbion_common.events.messaging import MessageReceivedPayload
from orbion_common.pull import ContinuousPull, LostConsumer
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
async def bus(nats_url, unique):
    settings = CommonSettings(nats_url=nats_url, stream_name=f"T{unique}".upper())
    bus = await Bus.connect(settings, name="test")
    yield bus
    await bus.close()
    cleanup = await Bus.connect(settings, name="cleanup")
    for name in (settings.stream_name, f"{settings.stream_name}_DLQ"):
        await cleanup.js.delete_stream(name)
    await cleanup.close()


async def wait_for(predicate, within=5.0):
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def stream_count(bus: Bus, name: str) -> int:
    return (await bus.js.stream_info(name)).state.messages


async def test_a_duplicate_msg_id_is_stored_once(bus):
    event = inbound("5511", 1)
    assert await bus.publish(event, msg_id="wamid.1") is True
    assert await bus.publish(inbound("5511", 1), msg_id="wamid.1") is False
    assert await stream_count(bus, bus.settings.stream_name) == 1


async def test_provisioning_twice_changes_nothing(bus):
    await bus.publish(inbound("5511", 1))
    await bus.provision()
    assert await stream_count(bus, bus.settings.stream_name) == 1


async def test_a_failing_handler_gets_the_event_again_and_it_is_acked_once_handled(bus, unique):
    attempts: list[int] = []
    done = asyncio.Event()

    async def flaky(event, delivery):
        attempts.append(delivery.num_delivered)
        if len(attempts) < 3:
            raise RuntimeError("database hiccup")
        done.set()

    bus.consume(
        ConsumerSpec(durable=f"flaky{unique}", event_types=("MessageReceived",), nak_delays=(0.05,)), flaky
    )
    await bus.publish(inbound("5511", 1))
    await asyncio.wait_for(done.wait(), 5)
    assert attempts == [1, 2, 3]
    await wait_for(lambda: True)
    await asyncio.sleep(0.3)
    info = await bus.js.consumer_info(bus.settings.stream_name, f"flaky{unique}")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_after_max_deliveries_the_event_is_dead_lettered_with_its_error(bus, unique):
    durable = f"poison{unique}"

    async def broken(event, delivery):
        raise ValueError("cannot handle this one")

    bus.consume(
        ConsumerSpec(durable=durable, event_types=("MessageReceived",), max_deliver=3, nak_delays=(0.05,)),
        broken,
    )
    event = inbound("5511", 1)
    await bus.publish(event)
    dlq = f"{bus.settings.stream_name}_DLQ"
    deadline = asyncio.get_running_loop().time() + 5
    while await stream_count(bus, dlq) < 1:
        assert asyncio.get_running_loop().time() < deadline, "nothing dead-lettered"
        await asyncio.sleep(0.05)
    msg = await bus.js.get_last_msg(dlq, dlq_subject(durable, bus.root))
    assert (
        msg.data
        == (await bus.js.get_last_msg(bus.settings.stream_name, f"{bus.root}.events.MessageReceived.>")).data
    )
    assert "cannot handle this one" in msg.headers["Orbion-Error"]


async def test_bytes_that_are_not_an_event_are_dead_lettered_at_once(bus, unique):
    durable = f"junk{unique}"
    handled = []

    async def handler(event, delivery):
        handled.append(event)

    bus.consume(ConsumerSpec(durable=durable, event_types=("MessageReceived",)), handler)
    await bus.js.publish(
        f"{bus.root}.events.MessageReceived.3", b"{not json", stream=bus.settings.stream_name
    )
    await bus.publish(inbound("5511", 2))
    await wait_for(lambda: len(handled) == 1)
    dlq = f"{bus.settings.stream_name}_DLQ"
    await asyncio.sleep(0.2)
    assert await stream_count(bus, dlq) == 1


async def test_events_of_one_contact_are_handled_in_order_even_when_one_fails_once(bus, unique):
    seen: list[int] = []
    failed = set()

    async def handler(event, delivery):
        n = int(event.payload.text.split()[-1])
        if n == 2 and n not in failed:
            failed.add(n)
            raise RuntimeError("transient")
        seen.append(n)

    await bus.publish_all([inbound("5511", n) for n in range(1, 6)])
    bus.consume(
        ConsumerSpec(durable=f"order{unique}", event_types=("MessageReceived",), nak_delays=(0.05,)), handler
    )
    await wait_for(lambda: len(seen) == 5)
    assert seen == [1, 2, 3, 4, 5]


async def test_a_contacts_later_events_wait_out_a_failed_events_growing_delay(bus, unique):
    seen: list[int] = []

    async def handler(event, delivery):
        n = number(event)
        if n == 2 and delivery.num_delivered <= 2:
            raise RuntimeError("transient")
        seen.append(n)

    await bus.publish_all([inbound("5511", n) for n in range(1, 5)])
    # The second failure naks event 2 for 0.5 s: 3 and 4, nakked with it, must not come back first.
    spec = ConsumerSpec(durable=f"delay{unique}", event_types=("MessageReceived",), nak_delays=(0.05, 0.5))
    bus.consume(spec, handler)
    await wait_for(lambda: len(seen) == 4)
    assert seen == [1, 2, 3, 4]


def number(event) -> int:
    return int(event.payload.text.split()[-1])


async def test_a_contact_whose_handling_is_slow_does_not_hold_up_other_contacts(bus, unique):
    started: list[int] = []
    release = asyncio.Event()

    async def handler(event, delivery):
        started.append(number(event))
        if event.stream_id == "5511":
            await release.wait()

    bus.consume(ConsumerSpec(durable=f"hol{unique}", event_types=("MessageReceived",)), handler)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: started == [1])
    try:
        # Fetched while the first contact's batch is still in hand.
        await bus.publish(inbound("5522", 2))
        await wait_for(lambda: started == [1, 2], within=3.0)
    finally:
        release.set()


@pytest.mark.parametrize("first_fails", [False, True])
async def test_a_contacts_event_fetched_while_its_earlier_one_is_handled_waits_for_it(
    bus, unique, first_fails
):
    started: list[int] = []
    done: list[int] = []
    release = asyncio.Event()

    async def handler(event, delivery):
        n = number(event)
        started.append(n)
        if n == 1 and delivery.num_delivered == 1:
            await release.wait()
            if first_fails:
                raise RuntimeError("transient")
        done.append(n)

    spec = ConsumerSpec(durable=f"chain{unique}", event_types=("MessageReceived",), nak_delays=(0.05,))
    bus.consume(spec, handler)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: started == [1])
    try:
        await bus.publish(inbound("5511", 2))
        await bus.publish(inbound("5522", 3))
        await wait_for(lambda: 3 in done)  # the next fetch came while 1 was in hand
        assert 2 not in started
    finally:
        release.set()
    await wait_for(lambda: sorted(done) == [1, 2, 3])
    assert done == [3, 1, 2]


async def test_a_consumer_whose_durable_vanished_binds_again_and_keeps_receiving(bus, unique):
    durable = f"lost{unique}"
    received: list[str] = []

    async def handler(event, delivery):
        received.append(event.payload.text)

    spec = ConsumerSpec(durable=durable, event_types=("MessageReceived",))
    bus.consume(spec, handler)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: received == ["message 1"])
    # What a NATS restart without its store (or an operator's mistake) leaves behind.
    await bus.js.delete_consumer(bus.settings.stream_name, durable)
    await bus.publish(inbound("5511", 2))
    # The new durable starts from the beginning of the stream: message 1 comes again (handlers
    # are idempotent), and message 2 is not lost.
    await wait_for(lambda: "message 2" in received, within=15)
    assert received[0] == "message 1"


async def pull_requests(bus: Bus, durable: str) -> list[dict]:
    """The pull requests a consumer sends, as the server receives them (a second subscriber)."""
    seen: list[dict] = []

    async def record(msg):
        seen.append(json.loads(msg.data))

    await bus.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{bus.settings.stream_name}.{durable}", cb=record)
    await bus.nc.flush()
    return seen


async def test_a_consumer_keeps_its_pull_requests_open_instead_of_asking_for_each_message(bus, unique):
    durable = f"open{unique}"
    requests = await pull_requests(bus, durable)
    handled: list[str] = []

    async def handler(event, delivery):
        handled.append(event.payload.text)

    # Requests that outlive the test: none expires and is replaced while it runs.
    spec = ConsumerSpec(durable, ("MessageReceived",), batch_size=16, pull_expires_seconds=120)
    bus.consume(spec, handler)
    for n in range(20):  # one at a time, as a quiet system sees them
        await bus.publish(inbound("5511", n))
        await wait_for(lambda n=n: len(handled) == n + 1)
    assert handled == [f"message {n}" for n in range(20)]
    # A request for up to 16, topped up once half of it was used: not a request per message.
    assert [r["batch"] for r in requests] == [16, 8, 8]


async def test_a_message_after_an_idle_spell_longer_than_a_pull_request_is_handled_at_once(bus, unique):
    durable = f"idle{unique}"
    requests = await pull_requests(bus, durable)
    handled: list[float] = []

    async def handler(event, delivery):
        handled.append(asyncio.get_running_loop().time())

    spec = ConsumerSpec(durable=durable, event_types=("MessageReceived",), pull_expires_seconds=0.3)
    bus.consume(spec, handler)
    await asyncio.sleep(1.2)
    assert len(requests) >= 3  # each expired request was followed by the next
    published_at = asyncio.get_running_loop().time()
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: handled)
    # Not after a silence of expiry plus grace (1.3 s): an open request took it.
    assert handled[0] - published_at < 0.5


async def test_a_consumer_whose_pull_request_was_lost_asks_again_after_a_silence(bus, unique, monkeypatch):
    # A request the server never got (lost with a connection the client did not see drop):
    # no message and no expiry come back, and only the silence tells.
    ask = ContinuousPull._ask
    lost: list[int] = []

    async def losing_the_first(self, count):
        if not lost:
            lost.append(count)
            self._requested += count
            return
        await ask(self, count)

    monkeypatch.setattr(ContinuousPull, "_ask", losing_the_first)
    handled: list[str] = []

    async def handler(event, delivery):
        handled.append(event.payload.text)

    spec = ConsumerSpec(f"silent{unique}", ("MessageReceived",), pull_expires_seconds=0.3)
    bus.consume(spec, handler)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: lost)
    await wait_for(lambda: handled == ["message 1"], within=5)  # after 0.3 s + 1 s of silence


async def test_pulling_from_a_durable_that_does_not_exist_says_so_at_once(bus, unique):
    # The server answers "no responders" (503) at once, every time: asking again would spin.
    pull = ContinuousPull(bus.nc, bus.js, bus.settings.stream_name, f"missing{unique}", batch=4, expires=5.0)
    await pull.start()
    try:
        async with asyncio.timeout(2):
            with pytest.raises(LostConsumer, match="no such consumer"):
                await pull.take(8)
    finally:
        await pull.stop()


async def test_a_consumer_never_holds_more_than_two_batches_delivered_and_unacked(bus, unique):
    durable = f"flow{unique}"
    started: list[str] = []
    release = asyncio.Event()

    async def handler(event, delivery):
        started.append(event.stream_id)
        await release.wait()

    bus.consume(ConsumerSpec(durable=durable, event_types=("MessageReceived",), batch_size=4), handler)
    await bus.publish_all([inbound(f"55{n:02d}", n) for n in range(30)])  # 30 contacts at once
    try:
        await wait_for(lambda: len(started) == 8)
        await asyncio.sleep(0.5)
        info = await bus.js.consumer_info(bus.settings.stream_name, durable)
        # Delivered to this process: only what is in hand (the rest stays on the server).
        assert (len(started), info.num_ack_pending) == (8, 8)
    finally:
        release.set()
    await wait_for(lambda: len(started) == 30)
    assert sorted(started) == sorted(f"55{n:02d}" for n in range(30))


async def test_stopping_a_consumer_does_not_wait_for_its_open_pull_request(nats_url, unique):
    settings = CommonSettings(nats_url=nats_url, stream_name=f"S{unique}".upper())
    bus = await Bus.connect(settings, name="stop-test")
    durable = f"stop{unique}"
    requests = await pull_requests(bus, durable)

    async def handler(event, delivery):
        pass

    try:
        bus.consume(ConsumerSpec(durable, ("MessageReceived",), pull_expires_seconds=30), handler)
        await wait_for(lambda: requests)
        started = asyncio.get_running_loop().time()
        await bus.stop_consuming()
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        for name in (settings.stream_name, f"{settings.stream_name}_DLQ"):
            await bus.js.delete_stream(name)
        await bus.close()


async def test_two_systems_on_one_server_do_not_see_each_others_events(bus, nats_url, unique):
    other = await Bus.connect(
        CommonSettings(nats_url=nats_url, stream_name=f"O{unique}".upper()), name="other"
    )
    try:
        await bus.publish(inbound("5511", 1))
        await other.publish(inbound("5511", 2))
        assert await stream_count(bus, bus.settings.stream_name) == 1
        assert await stream_count(other, other.settings.stream_name) == 1
    finally:
        for name in (other.settings.stream_name, f"{other.settings.stream_name}_DLQ"):
            await other.js.delete_stream(name)
        await other.close()


def test_on_a_server_without_multi_subject_filters_a_consumer_takes_the_whole_stream():
    spec = ConsumerSpec(durable="d", event_types=("MessageReceived", "MessageStatusChanged"))
    assert spec.consumer_config("orbion").filter_subjects == [
        "orbion.events.MessageReceived.*",
        "orbion.events.MessageStatusChanged.*",
    ]
    assert spec.consumer_config("orbion", multi_filter=False).filter_subject == "orbion.events.>"
    single = ConsumerSpec(durable="d", event_types=("ReplyRequested",))
    assert (
        single.consumer_config("orbion", multi_filter=False).filter_subject
        == "orbion.events.ReplyRequested.*"
    )


async def test_a_consumer_only_hands_its_own_event_types_to_its_handler(bus, unique):
    from orbion_common.events import MessageStatusChanged
    from orbion_common.events.messaging import MessageStatusChangedPayload

    seen: list[str] = []

    async def handler(event, delivery):
        seen.append(event.type)

    bus.consume(ConsumerSpec(durable=f"types{unique}", event_types=("MessageReceived",)), handler)
    status = MessageStatusChanged.create(
        "5511",
        MessageStatusChangedPayload(
            provider="cloud_api",
            provider_message_id="wamid.9",
            phone="5511",
            status="read",
            changed_at=datetime.now(UTC),
        ),
    )
    await bus.publish(status)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: seen == ["MessageReceived"])


async def test_a_handler_slower_than_ack_wait_is_not_redelivered_while_it_works(bus, unique):
    deliveries: list[int] = []

    async def slow(event, delivery):
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(2.5)

    bus.consume(
        ConsumerSpec(durable=f"slow{unique}", event_types=("MessageReceived",), ack_wait_seconds=1.0), slow
    )
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: deliveries == [1])
    await asyncio.sleep(3.5)
    assert deliveries == [1]


def test_unreachable_dependencies_are_outages_and_bad_data_is_not():
    import asyncpg

    from orbion_common.bus import is_outage

    assert is_outage(ConnectionRefusedError(111, "Connection refused"))
    assert is_outage(asyncpg.CannotConnectNowError("the database system is starting up"))
    wrapped = RuntimeError("while recording")
    wrapped.__cause__ = ConnectionResetError()
    assert is_outage(wrapped)
    assert not is_outage(ValueError("bad payload"))
    assert not is_outage(KeyError("phone"))


async def test_an_outage_longer_than_max_deliver_does_not_dead_letter_the_message(bus, unique):
    attempts: list[int] = []

    async def database_down_for_a_while(event, delivery):
        attempts.append(delivery.num_delivered)
        if len(attempts) <= 6:
            raise ConnectionRefusedError(111, "Connection refused")

    spec = ConsumerSpec(
        durable=f"outage{unique}", event_types=("MessageReceived",), max_deliver=2, nak_delays=(0.05,)
    )
    bus.consume(spec, database_down_for_a_while)
    await bus.publish(inbound("5511", 1))
    await wait_for(lambda: len(attempts) == 7, within=10)
    await asyncio.sleep(0.2)
    assert await stream_count(bus, f"{bus.settings.stream_name}_DLQ") == 0


@pytest.fixture(scope="module")
def spans():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from orbion_common import telemetry

    telemetry.setup_telemetry("test", CommonSettings())  # every trace sampled (the root conftest sets it)
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.mark.parametrize("sampled", [True, False])
async def test_a_handler_runs_in_the_publishers_trace_with_a_consumer_span_only_when_sampled(
    bus, unique, spans, sampled
):
    from opentelemetry import trace
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    trace_id, parent_span_id = 0x1234 + sampled, 0x99
    flags = "01" if sampled else "00"
    seen: list[tuple[int, int, bool]] = []
    instrumented: list[bool] = []

    async def handler(event, delivery):
        current = trace.get_current_span().get_span_context()
        seen.append((current.trace_id, current.span_id, current.trace_flags.sampled))
        instrumented.append(is_instrumentation_enabled())

    await bus.publish(
        inbound("5511", 1), parent={"traceparent": f"00-{trace_id:032x}-{parent_span_id:016x}-{flags}"}
    )
    spans.clear()
    bus.consume(ConsumerSpec(durable=f"c{unique}", event_types=("MessageReceived",)), handler)
    await wait_for(lambda: seen)
    [(current_trace, current_span, current_sampled)] = seen
    assert current_trace == trace_id and current_sampled is sampled
    # asyncpg's and redis's spans (non-recording ones too) only in a sampled trace
    assert instrumented == [sampled]
    consumer_spans = [s for s in spans.get_finished_spans() if s.name == "process MessageReceived"]
    if sampled:
        [span] = consumer_spans
        assert span.context.trace_id == trace_id and span.context.span_id == current_span
    else:
        # No span of its own: the handler continues the publisher's context as it came.
        assert consumer_spans == [] and current_span == parent_span_id


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-0000000000000099-00",  # zero trace id: invalid
        "00-1234-99-00",  # ids of the wrong length
        "00-zz34000000000000000000000000000z-0000000000000099-00",  # not hex
    ],
)
async def test_a_stored_trace_context_that_is_not_valid_is_not_passed_on(bus, unique, traceparent):
    seen: list[dict[str, str]] = []

    async def handler(event, delivery):
        seen.append(delivery.headers)

    await bus.publish(inbound("5511", 1), parent={"traceparent": traceparent})
    bus.consume(ConsumerSpec(durable=f"bad{unique}", event_types=("MessageReceived",)), handler)
    await wait_for(lambda: seen)
    assert seen[0].get("traceparent") != traceparent


async def test_closing_the_bus_is_not_reported_as_a_lost_connection(nats_url, unique, caplog):
    """A stop is not an outage: the drain's disconnect logs no warning."""
    settings = CommonSettings(nats_url=nats_url, stream_name=f"C{unique}".upper())
    bus = await Bus.connect(settings, name="closing")
    await bus.js.delete_stream(settings.stream_name)
    await bus.js.delete_stream(f"{settings.stream_name}_DLQ")
    with caplog.at_level(logging.INFO, logger="orbion_common.bus"):
        await bus.close()
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "nats connection closed" in caplog.text
