"""OpenAI and WhatsApp outages under load: degrade, don't fail; nothing lost, nothing sent twice.

- OpenAI answers 500 to everything for 30 s, then recovers: the llm-proxy's OpenAI breaker opens
  (``BreakerStateChanged`` to open), the contacts written to meanwhile get the fallback reply,
  the breaker closes again once OpenAI answers, and every message gets exactly one reply.
- The WhatsApp Cloud API answers 500 to every send for 30 s: replies wait (pending in Postgres),
  then go out once each, in order per contact, with no ``SendFailed``.

The breakers' reset is set to 2 s (harness.system_env), so each half-opens many times during
the outage and the test sees the trial calls fail and the breaker open again.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import orjson
import pytest

from tests.reliability.harness import (
    Fakes,
    FaultSystem,
    MetaLoad,
    judge,
    plan_contacts,
    verdict,
    wait_for_replies,
)

OUTAGE_SECONDS = 30.0  # as the issue asks; the load spans it at a lower rate
RATE = 10.0
OPENAI_FAULT = f"OpenAI fake answers 500 to every call for {OUTAGE_SECONDS:.0f} s, {RATE:.0f} msg/s"
OPENAI_PROMISE = "breaker opens, fallback replies go out, breaker closes; one reply per message"


async def breaker_transitions(database_url: str, breaker: str) -> list[tuple[float, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch from recorded_at) AS t, body::text AS body FROM llm_proxy.events "
            "WHERE type = 'BreakerStateChanged' ORDER BY position"
        )
    finally:
        await conn.close()
    out = []
    for row in rows:
        payload = orjson.loads(row["body"])["payload"]
        if payload["breaker"] == breaker:
            out.append((float(row["t"]), str(payload["to_state"])))
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_openai_outage_opens_the_breaker_sends_fallbacks_and_recovers(
    fault_system: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = fault_system
    messages = plan_contacts(RATE, OUTAGE_SECONDS + 7, per_contact=2, gap=4.0)
    load = MetaLoad(system.url("gateway"), messages)
    window: dict[str, float] = {}

    async def outage() -> None:
        await asyncio.sleep(3.0)
        window["down"] = time.time()
        fakes.openai.faults.error_rate = 1.0
        await asyncio.sleep(OUTAGE_SECONDS)
        fakes.openai.faults.error_rate = 0.0
        window["up"] = time.time()

    await asyncio.gather(load.run(), outage())
    waited = await wait_for_replies(system, fakes, messages, within=60)
    v = await verdict(system, fakes, messages)
    transitions = await breaker_transitions(system.database_url, "openai")
    opened = [t for t, state in transitions if state == "open" and window["down"] <= t]
    closed = [t for t, state in transitions if state == "closed" and opened and t > opened[0]]
    extra = {
        "outage_s": OUTAGE_SECONDS,
        "breaker_transitions": [s for _, s in transitions],
        "breaker_open_after_s": round(opened[0] - window["down"], 2) if opened else None,
        "breaker_closed_after_recovery_s": round(closed[0] - window["up"], 2) if closed else None,
        "max_recovery_s": round(closed[0] - window["up"], 2) if closed else None,
        "drain_s": round(waited, 1),
    }
    fallbacks = v.reply_sources.get("fallback", 0)
    try:
        assert opened, f"the OpenAI breaker never opened: {transitions}"
        assert fallbacks > 0, f"no fallback reply during the outage: {v.reply_sources}"
        assert closed, f"the OpenAI breaker did not close after recovery: {transitions}"
        assert v.reply_sources.get("llm", 0) > 0
    except AssertionError:
        from tests.reliability.harness import record

        record("openai_outage", OPENAI_FAULT, OPENAI_PROMISE, "breaker or fallback check failed",
               {**v.figures(), **extra}, passed=False)  # fmt: skip
        raise
    judge(
        "openai_outage",
        OPENAI_FAULT,
        OPENAI_PROMISE,
        v,
        extra,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_whatsapp_outage_keeps_replies_pending_then_sends_each_once_in_order(
    fault_system: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = fault_system
    messages = plan_contacts(RATE, OUTAGE_SECONDS + 7, per_contact=2, gap=4.0)
    load = MetaLoad(system.url("gateway"), messages)
    window: dict[str, float] = {}

    async def outage() -> None:
        await asyncio.sleep(3.0)
        window["down"] = time.time()
        fakes.whatsapp.fail_status = 500
        await asyncio.sleep(OUTAGE_SECONDS)
        fakes.whatsapp.fail_status = 0
        window["up"] = time.time()

    await asyncio.gather(load.run(), outage())
    waited = await wait_for_replies(system, fakes, messages, within=60)
    v = await verdict(system, fakes, messages)
    during = [s for s in fakes.whatsapp.rejected if window["down"] <= s["at"] <= window["up"]]
    after = [s["at"] - window["up"] for s in fakes.whatsapp.sent if s["at"] >= window["up"]]
    transitions = await breaker_transitions(system.database_url, "whatsapp")
    extra = {
        "outage_s": OUTAGE_SECONDS,
        "refused_sends_during_outage": len(during),
        "breaker_transitions": [s for _, s in transitions],
        "last_backlog_send_after_recovery_s": round(max(after), 2) if after else None,
        "max_recovery_s": round(max(after), 2) if after else None,
        "drain_s": round(waited, 1),
    }
    assert during, "the outage refused no send: the test did not test anything"
    assert not v.send_failed, f"replies given up during a short outage: {v.send_failed}"
    judge(
        "whatsapp_outage",
        f"WhatsApp fake answers 500 to every send for {OUTAGE_SECONDS:.0f} s, {RATE:.0f} msg/s",
        "replies wait, then each is delivered once, in order per contact",
        v,
        extra,
    )
