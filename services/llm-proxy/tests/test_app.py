"""HTTP API through the ASGI app: readiness says fallback mode, the outbox is visible with a key."""

from __future__ import annotations

import asyncpg
import httpx
from pydantic import SecretStr

from orbion_llm_proxy.app import create_app

from .conftest import make_settings
from .helpers import build_deps, new_phone, reply_requested


async def test_readyz_states_fallback_mode_and_breakers(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    deps = build_deps(make_settings(urls, tag), pool, schema=schema)
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    info = response.json()["info"]
    assert info["reply_mode"] == "fallback" and info["fallback_only"] is True
    assert info["send_via"] == "outbox"
    assert info["breakers"]["openai"]["state"] == "closed"


async def test_outbox_lists_replies_and_needs_the_api_key(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    settings = make_settings(urls, tag, api_keys=[SecretStr("k-" + tag)])
    deps = build_deps(settings, pool, schema=schema)
    phone = new_phone()
    await deps.handlers.answer_reply_request(reply_requested(phone, "Hello, how much is it?"))
    await deps.sender.drain()
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/api/outbox")).status_code == 401
        headers = {"X-API-Key": "k-" + tag}
        response = await client.get("/api/outbox", params={"phone": phone}, headers=headers)
        assert response.status_code == 200
        [message] = response.json()["messages"]
        assert message["phone"] == phone and message["text"].startswith("Hi!")
        bad = await client.get("/api/outbox", params={"phone": "12ab"}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_phone"
        missing = await client.get("/api/replies/nope", headers=headers)
        assert missing.status_code == 404


async def test_readyz_reports_openai_reachability_without_failing(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> None:
    import asyncio

    from tests.fakes.openai import FakeOpenAI

    fake = FakeOpenAI()
    async with fake as base_url:
        settings = make_settings(urls, tag, openai_api_key="sk-test", openai_base_url=base_url)
        deps = build_deps(settings, pool, schema=schema)
        transport = httpx.ASGITransport(app=create_app(deps))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.get("/readyz")
            for _ in range(50):  # the probe runs in the background
                await asyncio.sleep(0.02)
                body = (await client.get("/readyz")).json()
                if body["checks"]["openai"]["detail"]["openai_last_success_s_ago"] is not None:
                    break
    assert first.status_code == 200
    assert body["info"]["reply_mode"] == "openai" and body["info"]["fallback_only"] is False
    assert body["checks"]["openai"]["detail"]["openai_last_success_s_ago"] is not None
    await deps.responder.aclose()
