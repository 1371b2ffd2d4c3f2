"""Hostile input against the running system: refused or contained, never a 500, nothing leaked.

One system (five processes, fakes) for the module. Webhooks with missing, malformed or wrong
signatures, replays of an old signed body, oversized and chunked bodies, deeply nested JSON,
invalid UTF-8, huge texts and one phone flooding at >1,000 msg/min; every /api route without or
with a wrong key; then the captured logs and every response body are searched for secrets, full
phone numbers and stack traces. Each case records what it measured for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import pytest_asyncio

from orbion_common.cli.webhooks import cloud_text_webhook, sign
from tests.reliability.harness import (
    API_KEY,
    APP_SECRET,
    SECRETS,
    Fakes,
    FaultSystem,
    eventually,
    record,
    running_system,
    scan_logs,
)

WEBHOOK = "/webhooks/whatsapp"
STACK_MARKERS = ("Traceback", 'File "/', "site-packages", "asyncpg.exceptions", "Error: ")
PHONES: set[str] = set()  # every phone this module used, for the log scan
RESPONSES: list[tuple[str, str]] = []  # (what, body) of every answer, for the leak scan


def new_phone() -> str:
    phone = "55119" + str(uuid.uuid4().int)[:8]
    PHONES.add(phone)
    return phone


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hostile(
    nats_url: str, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FaultSystem, Fakes]]:
    async with running_system(
        nats_url=nats_url,
        database_url=database_url,
        redis_url=redis_url,
        workdir=tmp_path_factory.mktemp("hostile"),
        # The limits as shipped: the tests below hit them on purpose.
        ORBION_RATE_LIMIT_IP_PER_MINUTE="100",
        ORBION_RATE_LIMIT_API_KEY_PER_MINUTE="1000",
    ) as pair:
        yield pair


async def post(
    client: httpx.AsyncClient,
    system: FaultSystem,
    body: bytes,
    *,
    signature: str | None = "auto",
    **headers: str,
) -> httpx.Response:
    h = {"Content-Type": "application/json", **headers}
    if signature == "auto":
        h["X-Hub-Signature-256"] = sign(body, APP_SECRET)
    elif signature is not None:
        h["X-Hub-Signature-256"] = signature
    response = await client.post(system.url("gateway") + WEBHOOK, content=body, headers=h)
    RESPONSES.append((f"POST {WEBHOOK}", response.text[:2000]))
    return response


def webhook(phone: str, text: str, **kw: Any) -> bytes:
    return orjson.dumps(cloud_text_webhook(phone, text, **kw))


async def inbound_count(system: FaultSystem, phone: str) -> int:
    conn = await asyncpg.connect(system.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM conversation.conversation_messages WHERE phone = $1 AND direction = 'in'",
            phone,
        )
        return count
    finally:
        await conn.close()


async def wait_inbound(system: FaultSystem, phone: str, n: int, within: float = 15.0) -> int:
    deadline = time.monotonic() + within
    count = 0
    while time.monotonic() < deadline:
        count = await inbound_count(system, phone)
        if count >= n:
            return count
        await asyncio.sleep(0.2)
    return count


async def still_serves_others(client: httpx.AsyncClient, system: FaultSystem, fakes: Fakes) -> float:
    """A normal contact's webhook is acked and answered; returns its ack time in ms."""
    phone = new_phone()
    mid = f"wamid.ok.{uuid.uuid4().hex[:10]}"
    started = time.perf_counter()
    response = await post(
        client, system, webhook(phone, "Olá, tudo bem? Quero um orçamento.", message_id=mid)
    )
    ack_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(s["context_message_id"] == mid for s in fakes.whatsapp.sent):
            return ack_ms
        await asyncio.sleep(0.1)
    raise AssertionError("a normal contact got no reply while the system was under hostile input")


def assert_json_error(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    assert "error" in response.json()


# --------------------------------------------------------------------------- signatures


@pytest.mark.slow
async def test_unsigned_forged_and_malformed_signatures_are_refused_and_store_nothing(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, _ = hostile
    phone = new_phone()
    body = webhook(phone, "mensagem forjada")
    cases = {
        "missing": None,
        "empty": "",
        "no prefix": sign(body, APP_SECRET).removeprefix("sha256="),
        "not hex": "sha256=" + "zz" * 32,
        "truncated": sign(body, APP_SECRET)[:-2],
        "wrong secret": sign(body, "not-the-secret"),
        "other body": sign(body + b" ", APP_SECRET),
        "sha1": "sha1=" + "0" * 40,
    }
    outcomes = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, signature in cases.items():
            response = await post(client, system, body, signature=signature)
            outcomes[name] = response.status_code
            assert_json_error(response, 401)
        await asyncio.sleep(1.0)
    assert await inbound_count(system, phone) == 0
    record(
        "hostile", "webhook with missing/malformed/forged X-Hub-Signature-256 (8 variants)",
        "401 JSON, nothing published or stored", f"statuses {sorted(set(outcomes.values()))}, stored 0",
        {"statuses": outcomes}, passed=True,
    )  # fmt: skip


@pytest.mark.slow
async def test_a_replayed_old_signed_body_changes_nothing(hostile: tuple[FaultSystem, Fakes]) -> None:
    system, fakes = hostile
    phone = new_phone()
    mid = f"wamid.replay.{uuid.uuid4().hex[:10]}"
    three_days_ago = int(time.time()) - 3 * 86400
    body = webhook(phone, "Oi, qual o preço do plano anual?", message_id=mid, timestamp=three_days_ago)
    async with httpx.AsyncClient(timeout=10) as client:
        statuses = [(await post(client, system, body)).status_code for _ in range(5)]
        await wait_inbound(system, phone, 1)
        await eventually(lambda: any(s["context_message_id"] == mid for s in fakes.whatsapp.sent), 15)
        await asyncio.sleep(1.5)
        replays_later = [(await post(client, system, body)).status_code for _ in range(3)]
        await asyncio.sleep(1.5)
    sends = sum(1 for s in fakes.whatsapp.sent if s["context_message_id"] == mid)
    stored = await inbound_count(system, phone)
    assert set(statuses + replays_later) == {200}, statuses + replays_later
    assert stored == 1
    assert sends == 1
    record(
        "hostile", "the same signed webhook (3 days old) replayed 8 times",
        "accepted as a duplicate: stored once, answered once", f"stored {stored}, replies {sends}",
        {"statuses": statuses + replays_later, "stored": stored, "replies": sends}, passed=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- malformed bodies


@pytest.mark.slow
async def test_oversized_nested_and_invalid_bodies_get_4xx_and_the_gateway_keeps_serving(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = hostile
    big = b'{"object":"whatsapp_business_account","entry":[],"pad":"' + b"x" * (3 * 1024 * 1024 + 10) + b'"}'
    nested = b"[" * 200_000 + b"]" * 200_000
    nested_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    phone = new_phone()
    deep_in_webhook = cloud_text_webhook(phone, "x", message_id=f"wamid.deep.{uuid.uuid4().hex[:8]}")
    value: Any = "fundo"
    for _ in range(500):
        value = {"v": value}
    deep_in_webhook["entry"][0]["changes"][0]["value"]["messages"][0]["text"] = value
    cases: dict[str, tuple[bytes, dict[str, str], tuple[int, ...]]] = {
        "oversized 3 MiB + 10 B": (big, {}, (413,)),
        "nested arrays 200k deep": (nested, {}, (400,)),
        "nested objects 50k deep": (nested_object, {}, (400,)),
        "invalid UTF-8": (b'{"object": "whatsapp_business_account", "entry": ["\xff\xfe\xfa"]}', {}, (400,)),
        "not JSON": (b"\x00\x01garbage", {}, (400,)),
        "JSON scalar": (b"42", {}, (400,)),
        "wrong object": (b'{"object": "page", "entry": []}', {}, (400,)),
        "text/plain": (webhook(new_phone(), "oi"), {"Content-Type": "text/plain"}, (415,)),
        # orjson refuses to write this depth; the stdlib writes it as Meta's would arrive.
        "500-deep object as message text": (json.dumps(deep_in_webhook).encode(), {}, (200, 400)),
    }
    outcomes: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for name, (body, headers, expected) in cases.items():
            response = await post(client, system, body, **headers)
            outcomes[name] = response.status_code
            assert_json_error(response, *expected) if expected != (200, 400) else None
            assert response.status_code in expected, (name, response.status_code, response.text[:300])

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"x" * (1024 * 1024)

        response = await client.post(
            system.url("gateway") + WEBHOOK,
            content=chunks(),
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + "0" * 64},
        )
        outcomes["chunked 5 MiB, no Content-Length"] = response.status_code
        assert response.status_code == 413, response.text[:300]
        ack_ms = await still_serves_others(client, system, fakes)
    record(
        "hostile",
        "oversized, chunked, 200k-deep JSON, invalid UTF-8, not JSON, wrong object, wrong content type",
        "4xx JSON error, no 500; the gateway keeps answering others",
        f"statuses {sorted(set(outcomes.values()))}; a normal contact acked in {ack_ms:.0f} ms and answered",
        {"statuses": outcomes, "normal_contact_ack_ms": round(ack_ms, 1)}, passed=True,
    )  # fmt: skip


@pytest.mark.slow
async def test_a_64_kib_message_text_is_stored_and_answered_within_whatsapp_limits(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = hostile
    outcome = await send_huge_text(hostile, 64 * 1024)
    assert outcome["status"] == 200, outcome
    assert outcome["stored"] == 1
    assert outcome["replies"] >= 1, "no reply to a 64 KiB message"
    assert outcome["longest_reply"] <= 4096
    async with httpx.AsyncClient(timeout=30) as client:
        await still_serves_others(client, system, fakes)
    record(
        "hostile", "a 64 KiB message text (WhatsApp's own limit is 4,096 chars)",
        "stored, answered, reply within 4,096 chars",
        f"status {outcome['status']}, stored {outcome['stored']}, replies {outcome['replies']}",
        outcome, passed=True,
    )  # fmt: skip


@pytest.mark.slow
async def test_a_1_mib_message_text_is_refused_for_good_or_stored_never_left_to_retry_forever(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = hostile
    outcome = await send_huge_text(hostile, 1024 * 1024)
    async with httpx.AsyncClient(timeout=30) as client:
        await still_serves_others(client, system, fakes)
    # A body under Meta's 3 MiB limit whose event exceeds NATS' max_payload (1 MiB by default).
    # 503 tells Meta to retry for 7 days a message that can never be published.
    retried_forever = outcome["status"] == 503
    record(
        "hostile", "a 1 MiB message text (under the 3 MiB body limit, over NATS max_payload)",
        "refused for good (4xx) or stored; never a 503 that Meta retries for 7 days",
        f"status {outcome['status']}, stored {outcome['stored']}"
        + (" - KNOWN GAP: 503 on MaxPayloadError, Meta would retry it for days" if retried_forever else ""),
        outcome, passed=not retried_forever, known_gap=retried_forever,
    )  # fmt: skip
    if retried_forever:
        pytest.xfail(
            "known gap: the gateway answers 503 (retry later) when the event exceeds NATS max_payload "
            "(BusUnavailable(MaxPayloadError)); the message is never stored and Meta retries it for days"
        )
    assert outcome["status"] in (200, 400, 413), outcome
    if outcome["status"] == 200:
        assert outcome["stored"] == 1


async def send_huge_text(hostile: tuple[FaultSystem, Fakes], size: int) -> dict[str, Any]:
    system, fakes = hostile
    phone = new_phone()
    mid = f"wamid.huge.{uuid.uuid4().hex[:10]}"
    text = ("Quero saber o preço. " * (size // 21 + 1))[:size]
    async with httpx.AsyncClient(timeout=30) as client:
        response = await post(client, system, webhook(phone, text, message_id=mid))
    accepted = response.status_code == 200
    stored = await wait_inbound(system, phone, 1, within=15 if accepted else 1)
    if accepted:
        await eventually(lambda: any(s["context_message_id"] == mid for s in fakes.whatsapp.sent), 20)
    replies = [s for s in fakes.whatsapp.sent if s["to"] == phone]
    return {
        "size": size,
        "status": response.status_code,
        "stored": stored,
        "replies": len(replies),
        "longest_reply": max((len(s["text"]) for s in replies), default=0),
    }


# --------------------------------------------------------------------------- a flooding phone


@pytest.mark.slow
async def test_a_phone_flooding_at_over_1000_per_minute_is_throttled_and_others_still_served(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = hostile
    flooder = new_phone()
    n = 200
    bodies = [
        webhook(flooder, f"MENU {i}: digite 1 para vendas", message_id=f"wamid.flood.{uuid.uuid4().hex}")
        for i in range(n)
    ]
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=20)) as client:
        started = time.monotonic()
        sem = asyncio.Semaphore(20)

        async def one(body: bytes) -> None:
            async with sem:
                statuses.append((await post(client, system, body)).status_code)

        flood = asyncio.gather(*(one(b) for b in bodies))
        await asyncio.sleep(0.5)
        ack_ms = await still_serves_others(client, system, fakes)
        await flood
        seconds = time.monotonic() - started
        stored = await wait_inbound(system, flooder, n, within=30)
        await asyncio.sleep(3.0)
    replies = sum(1 for s in fakes.whatsapp.sent if s["to"] == flooder)
    rate = n / seconds * 60
    assert rate > 1000
    assert statuses.count(200) == n, {s: statuses.count(s) for s in set(statuses)}  # verified: never refused
    assert stored == n  # nothing lost: over the limit is still history
    assert replies <= 40, f"the flooder got {replies} replies: the per-phone limit did not hold"
    record(
        "hostile", f"one phone sending {n} webhooks as fast as it can (over 1,000/min)",
        "all accepted and stored (nothing lost), at most ~20/min answered, others still served",
        f"{rate:.0f}/min; acked {statuses.count(200)}/{n}, stored {stored}, flooder answered {replies} "
        f"times; a normal contact acked in {ack_ms:.0f} ms and answered",
        {"sent": n, "rate_per_min": round(rate), "acked": statuses.count(200), "stored": stored,
         "flooder_replies": replies, "normal_contact_ack_ms": round(ack_ms, 1)},
        passed=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- API keys


async def api_routes(client: httpx.AsyncClient, system: FaultSystem) -> list[tuple[str, str, str]]:
    """(service, method, path with sample parameters) of every /api route in the OpenAPI documents."""
    out = []
    for service in system.services:
        doc = (await client.get(system.url(service) + "/openapi.json")).json()
        for path, item in doc.get("paths", {}).items():
            if not path.startswith("/api"):
                continue
            concrete = path.replace("{phone}", "5511999990000").replace("{reply_key}", "abc")
            concrete = concrete.replace("{", "").replace("}", "")
            for method in item:
                if method in {"get", "post", "put", "patch", "delete"}:
                    out.append((service, method.upper(), concrete))
    return out


@pytest.mark.slow
async def test_every_api_route_without_or_with_a_wrong_key_is_401(hostile: tuple[FaultSystem, Fakes]) -> None:
    system, _ = hostile
    outcomes: dict[str, list[int]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        routes = await api_routes(client, system)
        assert len(routes) >= 5, routes
        for service, method, path in routes:
            url = system.url(service) + path
            missing = await client.request(method, url, json={})
            wrong = await client.request(method, url, json={}, headers={"X-API-Key": API_KEY + "x"})
            empty = await client.request(method, url, json={}, headers={"X-API-Key": ""})
            for r in (missing, wrong, empty):
                RESPONSES.append((f"{method} {path}", r.text[:2000]))
            outcomes[f"{service} {method} {path}"] = [
                missing.status_code,
                wrong.status_code,
                empty.status_code,
            ]
    bad = {k: v for k, v in outcomes.items() if v != [401, 401, 401]}
    record(
        "hostile", "every /api route of every service without, with a wrong, with an empty X-API-Key",
        "401 each", f"{len(routes) - len(bad)}/{len(routes)} routes answered 401 to all three",
        {"routes": outcomes}, passed=not bad,
    )  # fmt: skip
    assert not bad, bad


# 5xx reported to their owners; the test xfails while only these remain. (The lead's
# after_version over 2**31 is fixed: the route bounds it to a Postgres integer.)
KNOWN_BOUNDARY_5XX: tuple[str, ...] = ()


@pytest.mark.slow
async def test_integer_query_parameters_at_their_extremes_give_4xx_not_500(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, _ = hostile
    extremes = (-1, 2**31, 2**63, 10**30)
    tried: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": API_KEY}) as client:
        for service in system.services:
            doc = (await client.get(system.url(service) + "/openapi.json")).json()
            for path, item in doc.get("paths", {}).items():
                get = item.get("get")
                if not path.startswith("/api") or not get:
                    continue
                concrete = path.replace("{phone}", "5511999990000").replace("{reply_key}", "abc")
                for param in get.get("parameters", []):
                    schema = param.get("schema", {})
                    types = {schema.get("type")} | {s.get("type") for s in schema.get("anyOf", [])}
                    if param.get("in") != "query" or "integer" not in types:
                        continue
                    for value in extremes:
                        r = await client.get(system.url(service) + concrete, params={param["name"]: value})
                        RESPONSES.append((f"GET {concrete}", r.text[:2000]))
                        tried[f"{service} GET {concrete}?{param['name']}={value}"] = r.status_code
    errors = {k: v for k, v in tried.items() if v >= 500}
    unknown = {k: v for k, v in errors.items() if not k.startswith(KNOWN_BOUNDARY_5XX)}
    record(
        "hostile",
        "every integer query parameter of every GET /api route at -1, 2^31, 2^63, 10^30",
        "4xx (422) or a page, never 500",
        f"{len(tried) - len(errors)}/{len(tried)} requests without a 5xx; 5xx: {sorted(errors)}",
        {"tried": tried, "errors": errors},
        passed=not errors,
        known_gap=bool(errors) and not unknown,
    )
    assert len(tried) >= 4, tried
    assert not unknown, unknown
    if errors:
        pytest.xfail(
            f"known gap: 500 on out-of-range integers (asyncpg int4 OverflowError): {sorted(errors)}"
        )


# --------------------------------------------------------------------------- leaks (runs last)


@pytest.mark.slow
async def test_zz_no_secret_stack_trace_or_full_phone_in_responses_or_logs(
    hostile: tuple[FaultSystem, Fakes],
) -> None:
    system, _ = hostile
    async with httpx.AsyncClient(timeout=10) as client:
        for service in system.services:
            for path in ("/livez", "/readyz", "/metrics", "/openapi.json"):
                r = await client.get(system.url(service) + path)
                RESPONSES.append((f"{service} {path}", r.text))
            for path in ("/api/breakers", "/api/outbox"):
                if service == "llm-proxy":
                    r = await client.get(system.url(service) + path, headers={"X-API-Key": API_KEY})
                    RESPONSES.append((f"{service} {path}", r.text))
    leaks = []
    for what, body in RESPONSES:
        for secret in SECRETS:
            if secret in body:
                leaks.append(f"{what}: secret {secret[:6]}...")
        for marker in STACK_MARKERS[:3]:
            if marker in body:
                leaks.append(f"{what}: stack trace marker {marker!r}")
    log_leaks = scan_logs(system.all_logs(), PHONES)
    record(
        "hostile", "every response of this module and every service log searched",
        "no secret, stack trace or unmasked phone number",
        f"{len(RESPONSES)} responses: {len(leaks)} leaks; logs: {len(log_leaks)} leaks",
        {"responses": len(RESPONSES), "response_leaks": leaks[:10], "log_leaks": log_leaks[:10]},
        passed=not leaks and not log_leaks,
    )  # fmt: skip
    assert not leaks, leaks[:10]
    assert not log_leaks, log_leaks[:10]
