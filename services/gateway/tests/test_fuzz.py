"""Property: whatever the body and headers, the gateway answers without a 500.

Bodies are random bytes, random JSON, and webhook-shaped JSON with random values in every
field (signed, so that they reach the parsers). Runs against real NATS and Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from gateway_testkit import APP_SECRET, EVOLUTION_KEY, close_gateway, open_gateway, signed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
MESSAGE_KEYS = [
    "from", "id", "timestamp", "type", "text", "image", "audio", "document", "location", "contacts",
    "interactive", "button", "reaction", "context", "errors",
]  # fmt: skip
plausible = {
    "from": st.sampled_from(["5511999990000", "", "+55 (11) 99999-0000", "abc"]),
    "id": st.sampled_from(["wamid.X1", "wamid.X2", ""]),
    "timestamp": st.sampled_from(["1750090702", "0", "-1", "99999999999999", "soon"]),
    "type": st.sampled_from(["text", "image", "location", "interactive", "reaction", "button", "order", ""]),
}
cloud_message = st.dictionaries(st.sampled_from(MESSAGE_KEYS), json_values, max_size=8).flatmap(
    lambda d: st.fixed_dictionaries({k: plausible.get(k, st.just(v)) | st.just(v) for k, v in d.items()})
)
cloud_webhook = st.fixed_dictionaries(
    {
        "object": st.just("whatsapp_business_account") | json_values,
        "entry": st.lists(
            st.fixed_dictionaries(
                {
                    "changes": st.lists(
                        st.fixed_dictionaries(
                            {
                                "field": st.just("messages") | json_values,
                                "value": st.fixed_dictionaries(
                                    {
                                        "messages": st.lists(cloud_message, max_size=3) | json_values,
                                        "statuses": st.lists(
                                            st.dictionaries(
                                                st.sampled_from(
                                                    ["id", "status", "timestamp", "recipient_id", "errors"]
                                                ),
                                                json_values
                                                | st.sampled_from(["read", "failed", "5511999990000"]),
                                            ),
                                            max_size=2,
                                        ),
                                        "contacts": json_values,
                                        "metadata": json_values,
                                    }
                                ),
                            }
                        ),
                        max_size=2,
                    )
                    | json_values
                }
            ),
            max_size=2,
        )
        | json_values,
    }
)
evolution_webhook = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["messages.upsert", "messages.update", "MESSAGES_UPSERT"]) | json_values,
        "data": json_values
        | st.fixed_dictionaries(
            {
                "key": st.dictionaries(
                    st.sampled_from(["remoteJid", "fromMe", "id", "remoteJidAlt"]),
                    json_values | st.sampled_from(["5511999990000@s.whatsapp.net", "1@lid", "x@g.us"]),
                ),
                "message": st.dictionaries(
                    st.sampled_from(
                        ["conversation", "extendedTextMessage", "imageMessage", "locationMessage"]
                    ),
                    json_values,
                ),
                "messageTimestamp": json_values,
                "status": json_values,
            }
        ),
        "date_time": json_values,
    }
)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "", "x/y"]
)
headers = st.dictionaries(
    st.sampled_from(["x-hub-signature-256", "apikey", "content-type", "x-forwarded-for", "content-encoding"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    max_size=3,
)


@pytest.fixture
def gateway_loop(gw_nats_url: str, gw_redis_url: str) -> Iterator[tuple[asyncio.Runner, httpx.AsyncClient]]:
    """A gateway on an event loop of its own, so that synchronous hypothesis tests can drive it."""
    with asyncio.Runner() as runner:
        gateway = runner.run(open_gateway(gw_nats_url, gw_redis_url, rate_limit_ip_per_minute=100_000))
        yield runner, gateway.client
        runner.run(close_gateway(gateway))


def post(
    runner: asyncio.Runner, client: httpx.AsyncClient, path: str, raw: bytes, hdrs: dict[str, str]
) -> int:
    return runner.run(client.post(path, content=raw, headers=hdrs)).status_code


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=st.binary(max_size=300) | json_values.map(orjson.dumps), extra=headers, ctype=content_types)
def test_random_bodies_and_headers_never_give_500(
    gateway_loop: Any, body: bytes, extra: dict[str, str], ctype: str
) -> None:
    runner, client = gateway_loop
    for path in ("/webhooks/whatsapp", "/webhooks/evolution"):
        assert post(runner, client, path, body, {"content-type": ctype, **extra}) < 500


@FUZZ
@given(webhook=cloud_webhook)
def test_signed_cloud_api_shaped_webhooks_never_give_500(gateway_loop: Any, webhook: dict[str, Any]) -> None:
    runner, client = gateway_loop
    raw, hdrs = signed(webhook, APP_SECRET)
    assert post(runner, client, "/webhooks/whatsapp", raw, hdrs) in (200, 400)


@FUZZ
@given(webhook=evolution_webhook)
def test_authenticated_evolution_shaped_webhooks_never_give_500(
    gateway_loop: Any, webhook: dict[str, Any]
) -> None:
    runner, client = gateway_loop
    hdrs = {"content-type": "application/json", "apikey": EVOLUTION_KEY}
    assert post(runner, client, "/webhooks/evolution", orjson.dumps(webhook), hdrs) in (200, 400)
