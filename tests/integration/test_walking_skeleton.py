"""A WhatsApp message crosses the whole system: webhook -> JetStream -> history -> reply -> outbox.

Runs the five services as real processes against real NATS, Postgres and Redis. The second
test kills each service with SIGKILL right after the gateway acknowledged a webhook and checks
that nothing is lost and nothing is done twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import orjson
import pytest
import pytest_asyncio

from orbion_common.cli.webhooks import cloud_text_webhook, sign

from .system import System

APP_SECRET = "test-app-secret"
API_KEY = "test-api-key"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(nats_url, database_url, redis_url, tmp_path_factory):
    """One running system for the module: each test writes from its own phone number."""
    db = f"sys_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    system = System(
        nats_url=nats_url,
        database_url=database_url.rsplit("/", 1)[0] + f"/{db}",
        redis_url=redis_url,
        workdir=tmp_path_factory.mktemp("system"),
        extra_env={
            "ORBION_STREAM_NAME": f"SYS{uuid.uuid4().hex[:8]}".upper(),
            "ORBION_WHATSAPP_APP_SECRET": APP_SECRET,
            "ORBION_API_KEYS": orjson.dumps([API_KEY]).decode(),
            "ORBION_REPLY_QUIET_PERIOD_SECONDS": "0",
            "ORBION_REDIS_KEY_PREFIX": f"{db}:",
        },
    )
    system.start()
    try:
        await system.wait_ready()
        yield system
    finally:
        system.stop()
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


def new_phone() -> str:
    return "55119" + str(uuid.uuid4().int)[:8]


async def post_webhook(
    client: httpx.AsyncClient, system: System, phone: str, text: str, message_id: str
) -> None:
    body = orjson.dumps(cloud_text_webhook(phone, text, message_id=message_id, profile_name="Maria"))
    response = await client.post(
        system.url("gateway") + "/webhooks/whatsapp",
        content=body,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, APP_SECRET)},
    )
    assert response.status_code == 200, response.text


async def history(client: httpx.AsyncClient, system: System, phone: str) -> list[dict]:
    response = await client.get(
        system.url("conversation") + f"/api/conversations/{phone}/messages",
        params={"limit": 50},
        headers={"X-API-Key": API_KEY},
    )
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def wait_for_reply(client: httpx.AsyncClient, system: System, phone: str, within: float) -> list[dict]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            messages = await history(client, system, phone)
        except httpx.HTTPError:
            messages = []
        if any(m["direction"] == "out" for m in messages):
            return messages
        await asyncio.sleep(0.1)
    raise AssertionError(f"no reply for {phone} within {within}s")


async def outbox_count(client: httpx.AsyncClient, system: System, phone: str) -> int:
    response = await client.get(
        system.url("llm-proxy") + "/api/outbox", params={"phone": phone}, headers={"X-API-Key": API_KEY}
    )
    assert response.status_code == 200, response.text
    return len(response.json()["messages"])


@pytest.mark.slow
async def test_a_signed_webhook_gets_one_fallback_reply_in_history(system):
    phone = new_phone()
    async with httpx.AsyncClient(timeout=5) as client:
        await post_webhook(client, system, phone, "Olá, quanto custa?", "wamid.skeleton1")
        messages = await wait_for_reply(client, system, phone, within=15)
        # Meta retries the same webhook: nothing new happens.
        await post_webhook(client, system, phone, "Olá, quanto custa?", "wamid.skeleton1")
        await asyncio.sleep(1.5)
        messages = await history(client, system, phone)
        assert [m["direction"] for m in messages].count("in") == 1
        assert [m["direction"] for m in messages].count("out") == 1
        assert await outbox_count(client, system, phone) == 1
        inbound = next(m for m in messages if m["direction"] == "in")
        assert inbound["text"] == "Olá, quanto custa?"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["gateway", "conversation", "lead", "llm-proxy", "monitor"])
async def test_a_service_killed_right_after_the_ack_loses_nothing_and_replies_once(system, victim):
    phone = new_phone()
    async with httpx.AsyncClient(timeout=5) as client:
        await post_webhook(client, system, phone, "Oi! Quero saber o preço.", f"wamid.kill-{victim}")
        system.kill(victim)
        await asyncio.sleep(0.5)
        system.start([victim])
        await system.wait_ready([victim])
        messages = await wait_for_reply(client, system, phone, within=30)
        await asyncio.sleep(1.5)  # room for a duplicate to show up, if one were coming
        messages = await history(client, system, phone)
        assert [m["direction"] for m in messages].count("in") == 1
        assert [m["direction"] for m in messages].count("out") == 1
        assert await outbox_count(client, system, phone) == 1


@pytest.mark.slow
async def test_a_contact_who_writes_a_stop_word_gets_no_more_replies(system):
    phone = new_phone()
    async with httpx.AsyncClient(timeout=5) as client:
        await post_webhook(client, system, phone, "Oi, quero saber do plano", "wamid.optout1")
        await wait_for_reply(client, system, phone, within=15)
        await post_webhook(client, system, phone, "PARAR", "wamid.optout2")
        await asyncio.sleep(2.0)  # the lead's LeadOptedOut reaches the conversation service
        await post_webhook(client, system, phone, "quanto custa?", "wamid.optout3")
        await asyncio.sleep(3.0)  # room for a reply, if one were (wrongly) coming
        messages = await history(client, system, phone)
        assert [m["direction"] for m in messages].count("in") == 3
        assert [m["direction"] for m in messages].count("out") == 1
        assert await outbox_count(client, system, phone) == 1
        lead = await client.get(system.url("lead") + f"/api/leads/{phone}", headers={"X-API-Key": API_KEY})
        assert lead.status_code == 200, lead.text
        assert lead.json()["status"] == "opted_out"
