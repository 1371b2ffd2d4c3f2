"""Builders and readers shared by the gateway's tests (imported as ``gateway_testkit``)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis

from orbion_common.bus import Bus
from orbion_common.cli.webhooks import cloud_text_webhook
from orbion_common.events import Event, decode
from orbion_common.ratelimit import RateLimiter
from orbion_gateway.app import Deps, build_app
from orbion_gateway.settings import Settings
from orbion_gateway.signature import sign

FIXTURES = Path(__file__).parent / "fixtures"
APP_SECRET = "test-app-secret"
EVOLUTION_KEY = "test-evolution-key"
VERIFY_TOKEN = "test-verify-token"


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{name}.json").read_bytes())
    return data


def fixture_names(prefix: str) -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob(f"{prefix}_*.json"))


def signed(body: dict[str, Any] | bytes, secret: str = APP_SECRET) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return raw, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(secret.encode(), raw)}


def text_webhook(phone: str, text: str = "Olá", message_id: str | None = None) -> dict[str, Any]:
    return cloud_text_webhook(phone, text, message_id=message_id, profile_name="Ana")


def new_phone() -> str:
    return "55119" + str(uuid.uuid4().int)[:8]


async def connect_bus(settings: Settings, name: str = "gateway-test") -> Bus:
    # Another test session may briefly own a stream on the same subjects; try again a little.
    for attempt in range(20):
        try:
            return await Bus.connect(settings, name=name)
        except Exception:
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def delete_streams(settings: Settings) -> None:
    cleanup = await Bus.connect(settings, name="gateway-test-cleanup")
    for name in (settings.stream_name, f"{settings.stream_name}_DLQ"):
        with contextlib.suppress(Exception):
            await cleanup.js.delete_stream(name)
    await cleanup.nc.close()


async def delete_keys(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"{prefix}:*", count=500):
        await client.delete(key)
    await client.aclose()


@dataclass
class Gateway:
    settings: Settings
    bus: Bus
    client: httpx.AsyncClient
    limiter: RateLimiter | None = None

    async def post_cloud(self, body: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
        raw, headers = signed(body)
        headers.update(kw.pop("headers", {}))
        return await self.client.post("/webhooks/whatsapp", content=raw, headers=headers, **kw)

    async def post_evolution(self, body: dict[str, Any], key: str | None = EVOLUTION_KEY) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["apikey"] = key
        return await self.client.post("/webhooks/evolution", content=orjson.dumps(body), headers=headers)

    async def stored(self, stream: str | None = None) -> list[bytes]:
        """Every message in the gateway's event stream (or ``stream``), oldest first."""
        name = stream or self.settings.stream_name
        info = await self.bus.js.stream_info(name)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(Exception):
                out.append((await self.bus.js.get_msg(name, seq)).data or b"")
        return out

    async def events(self) -> list[Event]:
        return [decode(data) for data in await self.stored()]

    async def dead_letters(self) -> list[bytes]:
        return await self.stored(f"{self.settings.stream_name}_DLQ")


async def open_gateway(
    nats_url: str, redis_url: str, *, limiter_url: str | None = None, **overrides: Any
) -> Gateway:
    """A gateway app on its own stream and Redis key prefix; ``close_gateway`` undoes it.

    ``limiter_url`` points the rate limiter elsewhere (e.g. at a Redis that is down).
    """
    unique = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "redis_url": redis_url,
        "stream_name": f"GW{unique}".upper(),
        "rate_limit_prefix": f"gwtest:{unique}",
        "whatsapp_app_secret": APP_SECRET,
        "whatsapp_verify_token": VERIFY_TOKEN,
        "evolution_api_key": EVOLUTION_KEY,
        "publish_timeout_seconds": 15.0,  # a loaded CI machine is not an outage
    }
    values.update(overrides)
    settings = Settings(**values)
    bus = await connect_bus(settings)
    limiter = None
    if settings.redis_url:
        limiter = RateLimiter.from_url(limiter_url or settings.redis_url, prefix=settings.rate_limit_prefix)
    app = build_app(settings, Deps(bus=bus, limiter=limiter))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    return Gateway(settings, bus, client, limiter)


async def close_gateway(gateway: Gateway) -> None:
    await gateway.client.aclose()
    await gateway.bus.close()
    if gateway.limiter is not None:
        await gateway.limiter.close()
    # A test may have stopped its own servers: clean up what can be reached, quickly.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await delete_streams(gateway.settings)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await delete_keys(gateway.settings.redis_url, gateway.settings.rate_limit_prefix)
