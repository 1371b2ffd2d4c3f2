"""The lead API through its ASGI app, against real Postgres and Redis."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from lead_builders import API_KEY, at, inbound, new_phone, reply

from orbion_common.events import EVENTS_BY_NAME
from orbion_lead.app import build_app
from orbion_lead.bootstrap import Service

pytestmark = pytest.mark.skipif(
    "LeadActivityRecorded" not in EVENTS_BY_NAME,
    reason="LeadActivityRecorded is not registered in orbion_common.events yet",
)

AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(service.settings, service.deps())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lead") as c:
        yield c


async def test_a_lead_is_served_by_phone(service: Service, client: httpx.AsyncClient) -> None:
    phone = new_phone()
    await service.consumers.handle(inbound(phone, "Precisamos de um CRM", profile_name="Bia"))
    response = await client.get(f"/api/leads/{phone}", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["phone"] == phone and body["profile_name"] == "Bia" and body["stage"] == "budget"
    assert body["status"] == "active" and body["agent_replies"] is True and body["score"] == 30
    assert "recent_digests" not in body
    assert (await client.get(f"/api/leads/+{phone}", headers=AUTH)).json()["phone"] == phone
    assert "ratelimit-policy" in {h.lower() for h in response.headers}


async def test_reading_leads_needs_an_api_key(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/api/leads/{new_phone()}")
    assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
    assert (await client.get("/api/leads", headers={"X-API-Key": "wrong"})).status_code == 401


async def test_unknown_lead_and_bad_phone_are_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"/api/leads/{new_phone()}", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "lead_not_found"
    bad = await client.get("/api/leads/not-a-phone", headers=AUTH)
    assert bad.status_code == 422 and "error" in bad.json()


async def _seed(service: Service) -> dict[str, str]:
    """Four leads in known states, updated one minute apart."""
    phones = {name: new_phone() for name in ("new", "budget", "qualified", "opted_out")}
    await service.consumers.handle(inbound(phones["new"], "Oi", when=at(0)))
    await service.consumers.handle(inbound(phones["budget"], "Preciso de um site", when=at(60)))
    await service.consumers.handle(inbound(phones["qualified"], "Oi", when=at(100)))
    await service.consumers.handle(
        reply(phones["qualified"], need="crm", budget="R$ 40 mil", authority="CEO", when=at(120))
    )
    await service.consumers.handle(inbound(phones["opted_out"], "Sair", when=at(180)))
    return phones


async def _all_pages(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(20):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/api/leads", params=query, headers=AUTH)).json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


async def test_leads_are_listed_by_filter(service: Service, client: httpx.AsyncClient) -> None:
    phones = await _seed(service)

    async def phones_for(**params: Any) -> set[str]:
        response = await client.get("/api/leads", params=params, headers=AUTH)
        assert response.status_code == 200
        return {item["phone"] for item in response.json()["items"]}

    assert await phones_for() == set(phones.values())
    assert await phones_for(stage="budget") == {phones["budget"]}
    assert await phones_for(min_score=70) == {phones["qualified"]}
    assert await phones_for(agent="scheduler") == {phones["qualified"]}
    assert await phones_for(status="opted_out") == {phones["opted_out"]}
    assert await phones_for(updated_since=at(100).isoformat()) == {phones["qualified"], phones["opted_out"]}


async def test_pages_walk_every_lead_once_in_update_order(
    service: Service, client: httpx.AsyncClient
) -> None:
    phones = await _seed(service)
    items = await _all_pages(client, limit=1)
    assert [i["phone"] for i in items] == [
        phones["new"],
        phones["budget"],
        phones["qualified"],
        phones["opted_out"],
    ]
    assert [i["phone"] for i in await _all_pages(client, limit=3, stage="need")] == [
        phones["new"],
        phones["opted_out"],
    ]


async def test_bad_filters_and_cursors_are_refused(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/leads", params={"stage": "nope"}, headers=AUTH)).status_code == 422
    assert (await client.get("/api/leads", params={"min_score": 101}, headers=AUTH)).status_code == 422
    assert (await client.get("/api/leads", params={"limit": 0}, headers=AUTH)).status_code == 422
    bad = await client.get("/api/leads", params={"cursor": "garbage!"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_cursor"
    crafted = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|5511").decode()  # no time zone
    assert (await client.get("/api/leads", params={"cursor": crafted}, headers=AUTH)).status_code == 200
    beyond = base64.urlsafe_b64encode(b"0001-01-01T00:00:00+05:00|5511").decode()  # not a time in UTC
    out_of_range = await client.get("/api/leads", params={"cursor": beyond}, headers=AUTH)
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["type"] == "invalid_cursor"


async def test_the_audit_trail_lists_the_leads_events_in_order(
    service: Service, client: httpx.AsyncClient
) -> None:
    phone = new_phone()
    await service.consumers.handle(inbound(phone, "Oi"))
    await service.consumers.handle(inbound(phone, "stop", when=at(5)))
    body = (await client.get(f"/api/leads/{phone}/events", headers=AUTH)).json()
    types = [item["event"]["type"] for item in body["items"]]
    assert types[0] == "LeadCreated" and "LeadOptedOut" in types
    assert [item["version"] for item in body["items"]] == list(range(1, len(types) + 1))
    page = (
        await client.get(f"/api/leads/{phone}/events", params={"after_version": 2, "limit": 1}, headers=AUTH)
    ).json()
    assert [item["version"] for item in page["items"]] == [3] and page["next_after_version"] == 3
    assert (await client.get(f"/api/leads/{new_phone()}/events", headers=AUTH)).status_code == 404


async def test_handoff_stops_the_agent_once(service: Service, client: httpx.AsyncClient) -> None:
    phone = new_phone()
    await service.consumers.handle(inbound(phone, "Quero falar com um humano"))
    response = await client.post(
        f"/api/leads/{phone}/handoff", json={"to": "maria", "reason": "pediu humano"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["status"] == "handed_off" and response.json()["agent_replies"] is False
    again = await client.post(f"/api/leads/{phone}/handoff", json={"to": "joão"}, headers=AUTH)
    assert again.status_code == 200 and again.json()["handed_off_to"] == "maria"
    events = (await client.get(f"/api/leads/{phone}/events", headers=AUTH)).json()["items"]
    assert [e["event"]["type"] for e in events].count("LeadHandedOff") == 1
    cached = await client.get(f"/api/leads/{phone}", headers=AUTH)
    assert cached.json()["status"] == "handed_off"


async def test_handoff_of_an_unknown_lead_or_with_a_bad_body_is_refused(client: httpx.AsyncClient) -> None:
    missing = await client.post(f"/api/leads/{new_phone()}/handoff", json={}, headers=AUTH)
    assert missing.status_code == 404
    bad = await client.post(f"/api/leads/{new_phone()}/handoff", json={"to": ""}, headers=AUTH)
    assert bad.status_code == 422
