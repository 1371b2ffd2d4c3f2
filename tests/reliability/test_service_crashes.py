"""SIGKILL each service in turn under a steady load of signed webhooks, restart it, lose nothing.

One system, one load (30 msg/s for 20 s, contacts of two messages 4 s apart, retried by the
generator until 200 as Meta retries). While it runs, gateway, conversation, lead, llm-proxy and
monitor are each killed with SIGKILL (no drain), restarted half a second later and waited for.
Then: every acknowledged webhook is in history once, every message got exactly one WhatsApp
reply, in order per contact, and every lead equals the replay of its events.
"""

from __future__ import annotations

import asyncio
import time

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

VICTIMS = ("gateway", "conversation", "lead", "llm-proxy", "monitor")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_every_service_killed_in_turn_under_load_loses_nothing_and_replies_once(
    fault_system: tuple[FaultSystem, Fakes],
) -> None:
    system, fakes = fault_system
    messages = plan_contacts(30, 20, per_contact=2, gap=4.0)
    load = MetaLoad(system.url("gateway"), messages)
    recovery: dict[str, float] = {}

    async def crashes() -> None:
        await asyncio.sleep(2.0)
        for victim in VICTIMS:
            system.kill(victim)
            await asyncio.sleep(0.5)
            restarted = time.monotonic()
            system.start([victim])
            await system.wait_ready([victim], timeout=60)
            recovery[victim] = round(time.monotonic() - restarted, 2)
            await asyncio.sleep(1.0)

    await asyncio.gather(load.run(), crashes())
    waited = await wait_for_replies(system, fakes, messages, within=60)
    v = await verdict(system, fakes, messages)
    judge(
        "service_crashes",
        "SIGKILL gateway, conversation, lead, llm-proxy, monitor in turn, 30 msg/s",
        "every acked webhook in history once; one reply per message, in order; lead = replay",
        v,
        {
            "restart_to_ready_s": recovery,
            "max_recovery_s": max(recovery.values()),
            "drain_s": round(waited, 1),
        },
        # A SIGKILL between WhatsApp's acceptance and the commit is the one documented gap
        # (docs/llm-proxy.md): such a reply is marked outcome_unknown and never resent.
        allow_unknown_outcome=True,
        order_gap_known=False,  # fixed: replies name their predecessor (docs/llm-proxy.md)
    )
