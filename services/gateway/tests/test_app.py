"""The gateway over HTTP (ASGI) with real NATS JetStream and Redis."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from gateway_testkit import (
    APP_SECRET,
    VERIFY_TOKEN,
    Gateway,
    load_fixture,
    new_phone,
    signed,
    text_webhook,
)
from prometheus_client import REGISTRY

from orbion_common.bus import partition_of
from orbion_common.events import MessageReceived, MessageStatusChanged, stable_event_id, utcnow
from orbion_common.eventstore import EventStore
from orbion_common.migrations import migrate


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


# -- the walking skeleton ---------------------------------------------------------------------


async def test_a_signed_text_webhook_becomes_one_acked_event(gateway: Gateway) -> None:
    phone = new_phone()
    body = text_webhook(phone, "Olá, quanto custa?")
    answer = await gateway.post_cloud(body)
    assert answer.status_code == 200
    assert answer.json()["published"] == 1
    [event] = await gateway.events()
    assert isinstance(event, MessageReceived)
    wamid = body["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    assert event.event_id == stable_event_id("cloud_api", wamid)
    assert event.stream_id == phone
    assert event.payload.text == "Olá, quanto custa?"
    assert event.payload.profile_name == "Ana"
    assert not event.payload.throttled
    info = await gateway.bus.js.stream_info(gateway.settings.stream_name)
    assert info.state.messages == 1
    msg = await gateway.bus.js.get_msg(gateway.settings.stream_name, info.state.last_seq)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == wamid
    assert msg.subject == f"{gateway.bus.root}.events.MessageReceived.{partition_of(phone)}"


async def test_a_webhook_with_messages_and_statuses_publishes_each(gateway: Gateway) -> None:
    answer = await gateway.post_cloud(load_fixture("cloud_status_failed")["webhook"])
    assert answer.status_code == 200
    answer = await gateway.post_cloud(load_fixture("cloud_image")["webhook"])
    assert answer.status_code == 200
    events = await gateway.events()
    assert [type(e) for e in events] == [MessageStatusChanged, MessageReceived]
    assert events[0].payload.errors[0].code == 131047


# -- duplicates -------------------------------------------------------------------------------


async def test_a_duplicate_webhook_is_stored_once(gateway: Gateway) -> None:
    body = text_webhook(new_phone())
    first = await gateway.post_cloud(body)
    again = await gateway.post_cloud(body)
    assert first.json()["published"] == 1
    assert again.status_code == 200  # the provider must stop retrying
    assert again.json() == {**again.json(), "published": 0, "duplicates": 1}
    assert len(await gateway.stored()) == 1


async def test_a_retry_after_the_jetstream_window_is_stored_once_by_the_event_store(
    make_gateway, db_pool, fresh_schema: str
) -> None:
    # Meta retries for days; JetStream only dedupes inside its window (shortened here to 1 s).
    # Past it the retry is in the stream again, with the same event id, and the event store the
    # consumers append to (the conversation service's) keeps one.
    gateway: Gateway = await make_gateway(duplicate_window_seconds=1)
    body = text_webhook(new_phone())
    assert (await gateway.post_cloud(body)).json()["published"] == 1
    await asyncio.sleep(1.3)
    assert (await gateway.post_cloud(body)).json()["published"] == 1
    first, second = await gateway.events()
    assert first.event_id == second.event_id
    assert first.payload == second.payload
    await migrate(db_pool, fresh_schema)
    store = EventStore(fresh_schema)
    async with db_pool.acquire() as conn:
        stored = [await store.append(conn, e.stream_id, [e]) for e in (first, second)]
        assert [len(s) for s in stored] == [1, 0]
        assert len(await store.load_stream(conn, first.stream_id)) == 1


async def test_an_event_occurs_when_its_webhook_arrived_not_after_the_rate_limit_decision(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """occurred_at is where a reply's quiet period starts: the gateway's own work is inside it."""
    assert gateway.limiter is not None
    decide = gateway.limiter.decide

    async def slow_decide(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await decide(*args, **kwargs)

    monkeypatch.setattr(gateway.limiter, "decide", slow_decide)
    posted = utcnow()
    assert (await gateway.post_cloud(text_webhook(new_phone()))).status_code == 200
    [event] = await gateway.events()
    assert (event.occurred_at - posted).total_seconds() < 0.2


# -- per-phone limit --------------------------------------------------------------------------


async def test_the_21st_message_of_a_phone_in_a_minute_is_published_flagged_throttled(
    gateway: Gateway,
) -> None:
    phone, other = new_phone(), new_phone()
    answers = [await gateway.post_cloud(text_webhook(phone, f"msg {i}")) for i in range(21)]
    answers.append(await gateway.post_cloud(text_webhook(other, "hello")))
    assert [a.status_code for a in answers] == [200] * 22
    events = await gateway.events()
    assert len(events) == 22  # nothing lost
    assert [e.payload.throttled for e in events] == [False] * 20 + [True, False]
    assert answers[20].json()["throttled"] == 1


async def test_redis_unreachable_verified_webhooks_are_still_accepted(make_gateway) -> None:
    gateway: Gateway = await make_gateway(limiter_url=dead_redis_url())
    before = metric("orbion_gateway_rate_limit_fail_open_total")
    answers = [await gateway.post_cloud(text_webhook(new_phone())) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(await gateway.events()) == 3
    assert metric("orbion_gateway_rate_limit_fail_open_total") > before
    readiness = await gateway.client.get("/readyz")
    assert readiness.status_code == 200
    assert "unreachable" in readiness.json()["checks"]["redis"]["detail"]


# -- authentication ---------------------------------------------------------------------------


async def test_bad_missing_and_tampered_signatures_are_refused_with_401(gateway: Gateway) -> None:
    raw, headers = signed(text_webhook(new_phone()))
    before = metric("orbion_gateway_signature_failures_total", provider="cloud_api", reason="mismatch")
    wrong = await gateway.client.post("/webhooks/whatsapp", content=raw, headers=signed(raw, "other")[1])
    tampered = await gateway.client.post(
        "/webhooks/whatsapp", content=raw.replace(b"Ol", b"Xx"), headers=headers
    )
    missing = await gateway.client.post(
        "/webhooks/whatsapp", content=raw, headers={"Content-Type": "application/json"}
    )
    assert [r.status_code for r in (wrong, tampered, missing)] == [401, 401, 401]
    assert wrong.json()["error"]["type"] == "bad_signature"
    assert (
        metric("orbion_gateway_signature_failures_total", provider="cloud_api", reason="mismatch")
        == before + 2
    )
    assert await gateway.stored() == []


async def test_a_repeated_signature_header_is_judged_by_its_first_value(gateway: Gateway) -> None:
    raw, headers = signed(text_webhook(new_phone()))
    good = headers["X-Hub-Signature-256"]
    bad = signed(raw, "other")[1]["X-Hub-Signature-256"]
    base = [("Content-Type", "application/json")]
    answers = [
        await gateway.client.post(
            "/webhooks/whatsapp",
            content=raw,
            headers=[*base, ("X-Hub-Signature-256", first), ("X-Hub-Signature-256", second)],
        )
        for first, second in ((bad, good), (good, bad))
    ]
    assert [a.status_code for a in answers] == [401, 200]


async def test_unverified_requests_are_limited_per_ip_with_429_and_headers(make_gateway) -> None:
    gateway: Gateway = await make_gateway(rate_limit_ip_per_minute=3)
    raw, _ = signed(text_webhook(new_phone()))
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + "0" * 64}
    answers = [
        await gateway.client.post("/webhooks/whatsapp", content=raw, headers=headers) for _ in range(4)
    ]
    assert [a.status_code for a in answers] == [401, 401, 401, 429]
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == '"ip";q=3;w=60'
    assert refused.headers["RateLimit"].startswith('"ip";r=0;t=')
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > 0
    assert refused.json()["error"]["type"] == "rate_limited"


async def test_a_verified_webhook_is_never_refused_for_its_ip(make_gateway) -> None:
    gateway: Gateway = await make_gateway(rate_limit_ip_per_minute=1)
    answers = [await gateway.post_cloud(text_webhook(new_phone())) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5


async def test_development_mode_without_a_secret_accepts_unsigned_and_says_so(make_gateway) -> None:
    gateway: Gateway = await make_gateway(whatsapp_app_secret=None)
    raw = orjson.dumps(text_webhook(new_phone()))
    answer = await gateway.client.post(
        "/webhooks/whatsapp", content=raw, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 200
    readiness = (await gateway.client.get("/readyz")).json()
    assert readiness["info"]["signature"] == "disabled (development)"


async def test_the_verification_handshake(gateway: Gateway) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    ok = await gateway.client.get("/webhooks/whatsapp", params=params)
    assert ok.status_code == 200
    assert ok.text == "1158201444"
    assert ok.headers["content-type"].startswith("text/plain")
    wrong = await gateway.client.get("/webhooks/whatsapp", params={**params, "hub.verify_token": "nope"})
    bad_mode = await gateway.client.get("/webhooks/whatsapp", params={**params, "hub.mode": "unsubscribe"})
    assert [wrong.status_code, bad_mode.status_code] == [403, 403]


# -- bad input --------------------------------------------------------------------------------


async def test_bad_input_gets_a_4xx_json_error(make_gateway) -> None:
    gateway: Gateway = await make_gateway(max_body_bytes=1024)
    big_raw, big_headers = signed(text_webhook(new_phone(), "x" * 2000))
    not_json, nj_headers = signed(b"{not json")
    wrong_shape, ws_headers = signed({"object": "page", "entry": []})
    plain_raw, plain_headers = signed(text_webhook(new_phone()))
    plain_headers["Content-Type"] = "text/plain"
    post = gateway.client.post
    answers = {
        413: await post("/webhooks/whatsapp", content=big_raw, headers=big_headers),
        400: await post("/webhooks/whatsapp", content=not_json, headers=nj_headers),
        415: await post("/webhooks/whatsapp", content=plain_raw, headers=plain_headers),
    }
    shape = await post("/webhooks/whatsapp", content=wrong_shape, headers=ws_headers)
    for status, answer in answers.items():
        assert answer.status_code == status
        assert set(answer.json()["error"]) >= {"type", "detail"}
    assert shape.status_code == 400
    assert await gateway.stored() == []


async def test_a_malformed_message_is_dead_lettered_and_the_others_published(gateway: Gateway) -> None:
    answer = await gateway.post_cloud(load_fixture("cloud_batch_with_malformed")["webhook"])
    assert answer.status_code == 200
    assert answer.json() == {
        "published": 4,
        "duplicates": 0,
        "throttled": 0,
        "dead_lettered": 1,
        "ignored": 1,
    }
    assert len(await gateway.events()) == 4
    [dead] = await gateway.dead_letters()
    assert orjson.loads(dead)["id"] == "wamid.BAD"


# -- Evolution API ----------------------------------------------------------------------------


async def test_an_evolution_webhook_needs_its_api_key(gateway: Gateway) -> None:
    body = load_fixture("evolution_text")["webhook"]
    assert (await gateway.post_evolution(body, key=None)).status_code == 401
    assert (await gateway.post_evolution(body, key="wrong")).status_code == 401
    answer = await gateway.post_evolution(body)
    assert answer.status_code == 200
    [event] = await gateway.events()
    assert event.payload.provider == "evolution"
    assert event.payload.text == "Olá, quanto custa?"


async def test_evolution_without_a_key_is_refused_in_production(make_gateway) -> None:
    gateway: Gateway = await make_gateway(mode="production", evolution_api_key=None)
    answer = await gateway.post_evolution(load_fixture("evolution_text")["webhook"], key="anything")
    assert answer.status_code == 401
    assert (await gateway.client.get("/readyz")).json()["info"]["evolution_auth"] == "refused (no key)"
    assert await gateway.stored() == []


async def test_our_own_evolution_messages_are_published_as_from_me_and_not_throttled(make_gateway) -> None:
    gateway: Gateway = await make_gateway(rate_limit_phone_per_minute=1)
    body = load_fixture("evolution_from_me")["webhook"]
    for i in range(3):
        body["data"]["key"]["id"] = f"BAE5{i}"
        assert (await gateway.post_evolution(body)).status_code == 200
    events = await gateway.events()
    assert [(e.payload.from_me, e.payload.throttled) for e in events] == [(True, False)] * 3


# -- observability ----------------------------------------------------------------------------


async def test_openapi_documents_the_webhooks(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    assert {"get", "post"} <= set(spec["paths"]["/webhooks/whatsapp"])
    post = spec["paths"]["/webhooks/whatsapp"]["post"]
    assert "application/json" in post["requestBody"]["content"]
    assert {"200", "401", "413", "415", "429", "503"} <= set(post["responses"])
    assert "post" in spec["paths"]["/webhooks/evolution"]


async def test_metrics_count_published_events_and_requests(gateway: Gateway) -> None:
    before = metric("orbion_gateway_events_published_total", type="MessageReceived")
    route = {"route": "/webhooks/whatsapp", "method": "POST", "status": "200"}
    requests_before = metric("orbion_http_requests_total", **route)
    await gateway.post_cloud(text_webhook(new_phone()))
    assert metric("orbion_gateway_events_published_total", type="MessageReceived") == before + 1
    assert metric("orbion_http_requests_total", **route) == requests_before + 1
    text = (await gateway.client.get("/metrics")).text
    for name in (
        "orbion_gateway_webhooks_total",
        "orbion_gateway_publish_seconds_bucket",
        "orbion_gateway_signature_failures_total",
        "orbion_gateway_rate_limit_refusals_total",
    ):
        assert name in text
    assert APP_SECRET not in text


async def test_the_fastapi_routes_behind_the_fast_path_answer_the_same(gateway: Gateway) -> None:
    # The POST routes are served by WebhookFastPath; the FastAPI routes it shadows (kept for
    # OpenAPI) must give the same answers if the middleware is ever taken out.
    app = gateway.client._transport.app  # type: ignore[attr-defined]
    app.build_middleware_stack = app.state.build_without_fast_path
    app.middleware_stack = None  # rebuilt on the next request, without the fast path
    first = await gateway.post_cloud(text_webhook(new_phone()))
    evolution = await gateway.post_evolution(load_fixture("evolution_text")["webhook"])
    unsigned = await gateway.client.post(
        "/webhooks/whatsapp", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert [first.status_code, evolution.status_code, unsigned.status_code] == [200, 200, 401]
    assert len(await gateway.events()) == 2
