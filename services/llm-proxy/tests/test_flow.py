"""The walking skeleton through real NATS and Postgres: ReplyRequested in, ReplyGenerated and
MessageSent out through the relay as they commit, the reply in the outbox; a redelivered
request sends nothing."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from orbion_common.bus import Bus
from orbion_common.events import MessageSent, ReplyGenerated, decode
from orbion_llm_proxy import store
from orbion_llm_proxy.bootstrap import start_workers, stop_workers

from .conftest import make_settings
from .helpers import build_deps, new_phone, reply_requested


async def _wait_for(predicate: Any, attempts: int = 100, delay: float = 0.05) -> bool:
    for _ in range(attempts):
        if await predicate():
            return True
        await asyncio.sleep(delay)
    return False


async def test_reply_request_over_the_bus_is_answered_once_via_outbox(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    settings = make_settings(urls, tag)
    bus = await Bus.connect(settings, name=f"test-llmp-{tag}")
    phone = new_phone()
    seen: list[Any] = []

    async def collect(msg: Any) -> None:
        event = decode(msg.data)
        if event.stream_id == phone:
            seen.append(event)

    sub = await bus.nc.subscribe("orbion.events.*.*", cb=collect)
    deps = build_deps(settings, pool, schema=schema, bus=bus)
    relay = deps.relay
    assert relay is not None
    relay.poll_seconds = 30.0  # only a wake-up would make it read the log during the test
    log_reads = 0
    read_log = relay.publish_pending

    async def counted_read() -> int:
        nonlocal log_reads
        log_reads += 1
        return await read_log()

    relay.publish_pending = counted_read  # type: ignore[method-assign]
    tasks = start_workers(deps, consumer_prefix=f"test-llmp-{tag}", deliver_new_only=True)
    try:

        async def consumer_ready() -> bool:
            try:
                await bus.js.consumer_info(settings.stream_name, f"test-llmp-{tag}-replies")
                return True
            except Exception:
                return False

        assert await _wait_for(consumer_ready)  # deliver_new_only: publish after it exists

        async def relay_caught_up() -> bool:  # leading, and its term's first read done
            return relay.leader and log_reads > 0

        assert await _wait_for(relay_caught_up)
        reads_before = log_reads
        req = reply_requested(phone, "Olá, quanto custa?")
        await bus.publish(req)
        # The same request again, as a redelivery would bring it (another Nats-Msg-Id).
        await bus.publish(req, msg_id=req.event_id + "-again")

        async def relayed() -> bool:
            types = [e.type for e in seen]
            return "ReplyGenerated" in types and "MessageSent" in types

        assert await _wait_for(relayed)
        assert log_reads == reads_before  # published as they committed, not by reading the log
        await asyncio.sleep(0.3)  # give a wrongful second send the time to show up
        generated = [e for e in seen if isinstance(e, ReplyGenerated)]
        sent = [e for e in seen if isinstance(e, MessageSent)]
        assert len(generated) == 1 and len(sent) == 1
        assert sent[0].payload.via == "outbox"
        assert sent[0].payload.reply_key == req.payload.reply_key
        async with pool.acquire() as conn:
            outbox = await store.list_outbox(conn, phone=phone, limit=10)
        assert [m["text"] for m in outbox] == [generated[0].payload.text]
    finally:
        await sub.unsubscribe()
        await stop_workers(deps, tasks)  # closes the bus connection
        cleanup = await Bus.connect(settings, name=f"test-llmp-{tag}-cleanup")
        for name in ("replies", "verification"):
            with contextlib.suppress(Exception):
                await cleanup.js.delete_consumer(settings.stream_name, f"test-llmp-{tag}-{name}")
        await cleanup.close()
