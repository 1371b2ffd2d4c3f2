"""The HTTP API through the ASGI app: pages, cursors, 404/422/401, active contacts."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from orbion_conversation.app import AppDeps, create_app
from orbion_conversation.consumers import Deps, record_event
from orbion_conversation.settings import Settings

from .builders import inbound, new_phone


def client_for(deps: Deps, **settings: object) -> httpx.AsyncClient:
    app = create_app(
        Settings(**settings),
        AppDeps(pool=deps.pool, projection=deps.ctx.projection, history=deps.ctx.history),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def http(deps: Deps) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(deps) as client:
        yield client


async def seed(deps: Deps, phone: str, n: int) -> None:
    for i in range(n):
        await record_event(deps, inbound(phone, f"wamid.{phone}.{i}", f"m{i}", seconds=i))


async def test_pages_walk_the_whole_history_newest_first(deps: Deps, http: httpx.AsyncClient) -> None:
    phone = new_phone()
    await seed(deps, phone, 45)
    texts: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "20", **({"before": cursor} if cursor else {})}
        r = await http.get(f"/api/conversations/{phone}/messages", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        texts += [m["text"] for m in body["messages"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert texts == [f"m{i}" for i in range(44, -1, -1)]
    assert pages == 3


async def test_a_big_page_is_served_from_postgres(deps: Deps, http: httpx.AsyncClient) -> None:
    phone = new_phone()
    await seed(deps, phone, 30)
    r = await http.get(f"/api/conversations/{phone}/messages", params={"limit": "25"})
    assert [m["text"] for m in r.json()["messages"]] == [f"m{i}" for i in range(29, 4, -1)]


async def test_unknown_phone_is_404(http: httpx.AsyncClient) -> None:
    r = await http.get(f"/api/conversations/{new_phone()}/messages")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("path", "params", "needle"),
    [
        ("/api/conversations/5511999990000/messages", {"before": "garbage!"}, "cursor"),
        ("/api/conversations/5511999990000/messages", {"limit": "0"}, "limit"),
        ("/api/conversations/5511999990000/messages", {"limit": "1000"}, "limit"),
        ("/api/conversations/not-a-phone/messages", {}, "phone"),
        ("/api/conversations", {"active_since": "yesterday"}, "active_since"),
        ("/api/conversations", {"cursor": "nope"}, "cursor"),
        # Times that exist only in their own offset: in UTC they fall outside the calendar.
        ("/api/conversations", {"active_since": "0001-01-01T00:00:00+05:00"}, "active_since"),
        ("/api/conversations", {"cursor": _b64("0001-01-01T00:00:00+05:00|5511")}, "cursor"),
        ("/api/conversations/5511999990000/messages", {"before": _b64("0001-01-01T00:00+05:00|1")}, "cursor"),
    ],
)
async def test_bad_input_is_422_with_a_clear_message(
    http: httpx.AsyncClient, path: str, params: dict[str, str], needle: str
) -> None:
    r = await http.get(path, params=params)
    assert r.status_code == 422
    assert needle in r.text


async def test_active_contacts_are_listed_most_recent_first(deps: Deps, http: httpx.AsyncClient) -> None:
    a, b = new_phone(), new_phone()
    await seed(deps, a, 1)
    await record_event(deps, inbound(b, f"wamid.{b}", "later", seconds=60))
    r = await http.get("/api/conversations", params={"active_since": "2026-11-28T11:59:00Z", "limit": "100"})
    assert r.status_code == 200
    phones = [c["phone"] for c in r.json()["contacts"]]
    assert phones.index(b) < phones.index(a)
    contact = (await http.get(f"/api/conversations/{a}")).json()
    assert contact["message_count"] == 1 and contact["inbound_count"] == 1


async def test_active_contacts_are_listed_since_a_time_given_with_any_offset(
    deps: Deps, http: httpx.AsyncClient
) -> None:
    phone = new_phone()
    await seed(deps, phone, 1)
    for since in ("2026-11-28T06:59:00-05:00", "2026-11-28T20:59:00+09:00"):
        r = await http.get("/api/conversations", params={"active_since": since, "limit": "100"})
        assert r.status_code == 200, r.text
        assert phone in [c["phone"] for c in r.json()["contacts"]]


async def test_active_contacts_paginate_without_gaps(deps: Deps, http: httpx.AsyncClient) -> None:
    phones = [new_phone() for _ in range(5)]
    for i, phone in enumerate(phones):
        await record_event(deps, inbound(phone, f"wamid.{phone}", "x", seconds=3600 * 24 * 400 + i))
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {
            "active_since": "2027-12-01T00:00:00Z",
            "limit": "2",
            **({"cursor": cursor} if cursor else {}),
        }
        body = (await http.get("/api/conversations", params=params)).json()
        seen += [c["phone"] for c in body["contacts"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == phones[::-1]


async def test_api_key_is_required_when_configured(deps: Deps) -> None:
    async with client_for(deps, api_keys=[SecretStr("k1")]) as client:
        assert (await client.get("/api/conversations")).status_code == 401
        ok = await client.get("/api/conversations", headers={"X-API-Key": "k1"})
        assert ok.status_code == 200


async def test_index_serves_the_history_query(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # an empty table would be scanned
        rows = await conn.fetch(
            "EXPLAIN SELECT * FROM conversation_messages WHERE phone = $1 "
            "ORDER BY created_at DESC, position DESC LIMIT 20",
            "5511999990000",
        )
    plan = "\n".join(r[0] for r in rows)
    assert "Sort" not in plan
    assert "conversation_messages_phone_created" in plan
