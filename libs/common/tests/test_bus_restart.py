"""The bus survives a NATS server restart: consumers bind again and publishing resumes by itself."""

import asyncio
from datetime import UTC, datetime

from orbion_common.bus import Bus, BusUnavailable, ConsumerSpec
from orbion_common.events import MessageReceived
from orbion_common.events.messaging import MessageReceivedPayload
from orbion_common.infra import LocalInfra
from orbion_common.settings import CommonSettings
from tests.reliability.harness import eventually


def inbound(n: int) -> MessageReceived:
    return MessageReceived.create(
        "5511",
        MessageReceivedPayload(
            provider="cloud_api",
            provider_message_id=f"wamid.{n}",
            phone="5511",
            kind="text",
            text=f"message {n}",
            sent_at=datetime.now(UTC),
        ),
    )


async def publish_until_acked(bus: Bus, event: MessageReceived, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await bus.publish(event)
            return
        except BusUnavailable:
            assert asyncio.get_running_loop().time() < deadline, "publishing never resumed"
            await asyncio.sleep(0.2)


async def test_a_consumer_keeps_receiving_after_the_nats_server_restarts(local_infra, unique):
    settings = CommonSettings(nats_url=local_infra.url("nats"), stream_name=f"RS{unique}".upper())
    bus = await Bus.connect(settings, name="restart-test")
    received: list[str] = []

    async def handler(event, delivery):
        received.append(event.payload.text)

    try:
        bus.consume(ConsumerSpec(durable=f"r{unique}", event_types=("MessageReceived",)), handler)
        await bus.publish(inbound(1))
        await eventually(lambda: bool(received), within=5)
        assert received == ["message 1"]

        await local_infra.arestart_server("nats")
        await publish_until_acked(bus, inbound(2))
        await eventually(lambda: len(received) == 2, within=15)
        assert received == ["message 1", "message 2"]
    finally:
        await bus.js.delete_stream(settings.stream_name)
        await bus.js.delete_stream(f"{settings.stream_name}_DLQ")
        await bus.close()


async def test_after_a_nats_restart_a_consumer_asks_again_at_once(infra_data_dir, unique):
    # A killed server says nothing (a stopped one ends its requests with a 409 "Server
    # Shutdown"), and its successor knows nothing of the old connection's open pull requests:
    # the reconnect, not a silence of expiry plus grace (6 s here), makes the consumer ask again.
    # A server of its own: the session's shared one is not killed under the other tests.
    local_infra = LocalInfra(infra_data_dir, servers=("nats",), durable=False)
    local_infra.start()
    settings = CommonSettings(nats_url=local_infra.url("nats"), stream_name=f"RA{unique}".upper())
    bus = await Bus.connect(settings, name="reconnect-test")
    handled: list[float] = []

    async def handler(event, delivery):
        handled.append(asyncio.get_running_loop().time())

    try:
        bus.consume(ConsumerSpec(durable=f"a{unique}", event_types=("MessageReceived",)), handler)
        await bus.publish(inbound(1))
        await eventually(lambda: bool(handled), within=5)
        assert len(handled) == 1

        await local_infra.arestart_server("nats", kill=True)
        await publish_until_acked(bus, inbound(2))
        published_at = asyncio.get_running_loop().time()
        await eventually(lambda: len(handled) == 2, within=10)
        assert len(handled) == 2
        assert handled[1] - published_at < 1.5
    finally:
        await bus.close()
        local_infra.stop()
