"""One WhatsApp message is one trace in the monitor: webhook -> conversation -> llm-proxy -> send.

Runs the five services as real processes (real NATS, Postgres, Redis), every one exporting its
spans over OTLP/HTTP to the monitor of the same system, sampling everything. The llm-proxy talks
to a fake OpenAI and a fake WhatsApp Cloud API with a known latency, so the spans of those calls
must each be at least that long. The monitor must list the message with every stage of its
critical path, and its end-to-end latency must be exactly the sum of the stages.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from orbion_common.cli.webhooks import cloud_text_webhook, sign
from tests.fakes.openai import FakeOpenAI
from tests.fakes.whatsapp import FakeWhatsApp

from .system import System

APP_SECRET = "trace-app-secret"
API_KEY = "trace-api-key"
OPENAI_LATENCY = 0.15  # seconds the fake OpenAI waits before answering
WHATSAPP_LATENCY = 0.15  # seconds the fake Cloud API waits before accepting a send
TIMED_STAGES = ("gateway", "conversation", "llm", "send")


async def wait_for_complete_message(client: httpx.AsyncClient, monitor: str, within: float) -> dict[str, Any]:
    """The monitor's only completed message, once spans of every stage have arrived."""
    deadline = time.monotonic() + within
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            response = await client.get(
                monitor + "/api/traces/recent", params={"slowest": 20}, headers={"X-API-Key": API_KEY}
            )
        except httpx.HTTPError:
            response = None
        if response is not None:
            assert response.status_code == 200, response.text
            seen = response.json()["traces"]
            # Spans arrive in batches per service: the breakdown fills in as they do.
            if len(seen) == 1 and all(seen[0]["stages"].get(s, 0) > 0 for s in TIMED_STAGES):
                return dict(seen[0])
        await asyncio.sleep(0.2)
    raise AssertionError(f"no message with every stage within {within}s; monitor lists {seen}")


@pytest.mark.slow
async def test_one_message_is_one_trace_from_webhook_to_send(
    nats_url: str, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    db = f"trace_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    openai, whatsapp = FakeOpenAI(latency_ms=OPENAI_LATENCY * 1000), FakeWhatsApp(token="trace-token")
    whatsapp.faults.latency_ms = WHATSAPP_LATENCY * 1000
    system: System | None = None
    try:
        async with openai as openai_url, whatsapp as whatsapp_url:
            system = System(
                nats_url=nats_url,
                database_url=database_url.rsplit("/", 1)[0] + f"/{db}",
                redis_url=redis_url,
                workdir=tmp_path / "system",
                extra_env={
                    "ORBION_STREAM_NAME": f"TRC{uuid.uuid4().hex[:8]}".upper(),
                    "ORBION_WHATSAPP_APP_SECRET": APP_SECRET,
                    "ORBION_API_KEYS": orjson.dumps([API_KEY]).decode(),
                    "ORBION_REPLY_QUIET_PERIOD_SECONDS": "0",
                    "ORBION_REDIS_KEY_PREFIX": f"{db}:",
                    "ORBION_TRACE_SAMPLE_RATIO": "1",
                    "OTEL_BSP_SCHEDULE_DELAY": "200",  # export every 0.2 s, not every 5 s
                    "ORBION_OPENAI_API_KEY": "sk-test",
                    "ORBION_OPENAI_BASE_URL": openai_url,
                    "ORBION_OPENAI_MODEL": "gpt-4o-mini",
                    "ORBION_RESPONSE_CACHE_TTL_SECONDS": "0",
                    "ORBION_WHATSAPP_TOKEN": "trace-token",
                    "ORBION_WHATSAPP_API_BASE_URL": whatsapp_url,
                    "ORBION_WHATSAPP_PHONE_NUMBER_ID": "1000001",
                },
            )
            # Every service, the monitor included, gets the same endpoint: the monitor sees that it
            # is its own /v1/traces and does not export its spans to itself.
            monitor = system.url("monitor")
            system.extra_env["ORBION_OTLP_ENDPOINT"] = monitor + "/v1/traces"
            system.start()
            await system.wait_ready()

            phone = "55119" + str(uuid.uuid4().int)[:8]
            body = orjson.dumps(
                cloud_text_webhook(
                    phone, "Oi! Quanto custa o plano?", message_id="wamid.trace1", profile_name="Ana"
                )
            )
            async with httpx.AsyncClient(timeout=5) as client:
                posted = time.monotonic()
                response = await client.post(
                    system.url("gateway") + "/webhooks/whatsapp",
                    content=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-Hub-Signature-256": sign(body, APP_SECRET),
                    },
                )
                assert response.status_code == 200, response.text
                # Spans leave each service in batches (every few seconds): room for a loaded machine.
                message = await wait_for_complete_message(client, monitor, within=60)
                waited = time.monotonic() - posted
                detail = await client.get(
                    monitor + f"/api/traces/{message['trace_id']}", headers={"X-API-Key": API_KEY}
                )
            assert detail.status_code == 200, detail.text
            trace = detail.json()

        stages = message["stages"]
        rounded = {k: round(v, 4) for k, v in stages.items()}
        print(f"\nend to end {message['end_to_end_seconds']:.4f} s: {rounded}")
        for span in trace["spans"]:
            print(
                f"  {span['offset_ms']:9.3f} ms {span['duration_ms']:9.3f} ms  {span['service']:<12} "
                f"{span['stage']:<12} {span['name']}"
            )

        # The reply really went out, once, to the contact who wrote.
        assert [s["to"] for s in whatsapp.sent] == [phone]
        assert len(openai.requests) == 1
        # Every stage of the critical path is there and the stages add up to the end-to-end latency.
        assert set(stages) == {"gateway", "queue", "conversation", "llm", "send"}
        assert stages["queue"] >= 0
        assert math.isclose(sum(stages.values()), message["end_to_end_seconds"], abs_tol=1e-6)
        # The llm and send spans cover the calls to OpenAI and WhatsApp (whose latency we set).
        # (Not the stages: work beside the critical path, e.g. the conversation recording
        # ReplyGenerated while the reply is being sent, may take some of their time.)
        by_name = {s["name"]: s for s in trace["spans"]}
        assert by_name["chat gpt-4o-mini"]["duration_ms"] >= OPENAI_LATENCY * 1000
        assert by_name["whatsapp send"]["duration_ms"] >= WHATSAPP_LATENCY * 1000
        # The whole cannot be longer than the test waited for it.
        assert message["end_to_end_seconds"] < waited
        # One trace across the services: the trace context crossed every hop, no stitching needed.
        assert trace["complete"] is True
        assert trace["trace_ids"] == [message["trace_id"]]
        assert {"gateway", "conversation", "llm-proxy"} <= set(trace["services"])
        assert by_name["POST /webhooks/whatsapp"]["stage"] == "gateway"
        assert by_name["chat gpt-4o-mini"]["stage"] == "llm"
        assert by_name["whatsapp send"]["stage"] == "send"
        assert by_name["whatsapp send"]["service"] == "llm-proxy"
        assert by_name["whatsapp send"]["error"] is False
    finally:
        if system is not None:
            system.stop()
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
