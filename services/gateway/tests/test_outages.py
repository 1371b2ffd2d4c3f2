"""NATS or Redis stopped and started again under a running gateway (servers of the test's own)."""

from __future__ import annotations

import asyncio

from gateway_testkit import Gateway, new_phone, text_webhook
from redis.asyncio import Redis

from orbion_common.infra import LocalInfra


async def eventually_ready(gateway: Gateway, attempts: int = 100) -> None:
    for _ in range(attempts):
        if (await gateway.client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("gateway not ready again")


async def test_nats_stopped_gives_503_then_accepts_again(restartable: LocalInfra, make_gateway) -> None:
    # restartable first, so that it outlives the gateway (its bus drains on a live server)
    gateway: Gateway = await make_gateway(
        nats_url=restartable.url("nats"), redis_url=restartable.url("redis"), publish_timeout_seconds=1.0
    )
    assert (await gateway.post_cloud(text_webhook(new_phone()))).status_code == 200

    await restartable.astop_server("nats")
    refused = await gateway.post_cloud(text_webhook(new_phone()))
    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert refused.json()["error"]["type"] == "unavailable"
    assert (await gateway.client.get("/readyz")).status_code == 503

    await restartable.astart_server("nats")
    await eventually_ready(gateway)
    retried = await gateway.post_cloud(text_webhook(new_phone()))
    assert retried.status_code == 200
    assert len(await gateway.events()) == 2  # the refused one is the provider's to retry


async def test_redis_stopped_webhooks_still_accepted(restartable: LocalInfra, make_gateway) -> None:
    redis_url = restartable.url("redis")
    gateway: Gateway = await make_gateway(nats_url=restartable.url("nats"), redis_url=redis_url)
    phone = new_phone()
    assert (await gateway.post_cloud(text_webhook(phone))).status_code == 200

    await restartable.astop_server("redis")
    answers = [await gateway.post_cloud(text_webhook(phone)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    readiness = await gateway.client.get("/readyz")
    assert readiness.status_code == 200  # failing open: still worth routing webhooks here

    await restartable.astart_server("redis")
    await asyncio.sleep(1.1)  # the limiter's back-off after an error
    assert (await gateway.post_cloud(text_webhook(phone))).status_code == 200
    assert len(await gateway.events()) == 5
    client = Redis.from_url(redis_url)
    try:
        assert await client.exists(f"{gateway.settings.rate_limit_prefix}:phone:{phone}")
    finally:
        await client.aclose()
