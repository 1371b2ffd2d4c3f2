"""The load tool end to end, briefly: a few seconds of open-loop webhooks against the real stack.

Starts the five services (tests/integration/system.py, through the load tool's Stack) against
this session's Postgres and Redis, a JetStream server of the run's own and the instrumented
fakes, sends 4 msg/s for 3 s and checks what the tool reports: every webhook accepted, every
due reply delivered once, latencies measured, a report written; and a system that fails to
start leaves nothing running. The full ladder is `orbion loadtest`, not a test.
"""

from __future__ import annotations

import os
import subprocess

import asyncpg
import nats
import pytest
from redis.asyncio import Redis

from orbion_loadtest import report, stack
from orbion_loadtest.runner import Runner, StepPlan
from orbion_loadtest.scenarios import Scenario
from orbion_loadtest.schedule import constant
from orbion_loadtest.stack import Stack, spawn_fake


@pytest.fixture
def urls(request) -> tuple[str, str]:
    found = []
    for fixture, env in (
        ("database_url", "ORBION_TEST_DATABASE_URL"),
        ("redis_url", "ORBION_TEST_REDIS_URL"),
    ):
        try:
            found.append(request.getfixturevalue(fixture))
        except pytest.FixtureLookupError:
            value = os.environ.get(env, "")
            if not value:
                pytest.skip(f"no {fixture} fixture and no {env}")
            found.append(value)
    return found[0], found[1]


async def redis_keys(redis_url: str, pattern: str) -> list[bytes]:
    redis = Redis.from_url(redis_url)
    try:
        return [key async for key in redis.scan_iter(match=pattern, count=1000)]
    finally:
        await redis.aclose()


async def ephemeral_consumers(nats_url: str, stream: str) -> list[str]:
    nc = await nats.connect(nats_url)
    try:
        infos = await nc.jetstream().consumers_info(stream)
    finally:
        await nc.close()
    return [c.name for c in infos if not c.config.durable_name]


@pytest.mark.slow
async def test_a_short_open_loop_run_delivers_every_due_reply_once_and_reports_it(urls, tmp_path):
    database_url, redis_url = urls
    stack = Stack(tmp_path / "stack", quiet_period=0.5, urls=("", database_url, redis_url), own_nats=True)
    async with (
        stack as target,
        Runner(
            target, Scenario(seed=3, run_tag=77), progress=False, drain_timeout=20, history_sample=50
        ) as runner,
    ):
        step = await runner.run_step(StepPlan("smoke 4/s", constant(4.0, 3.0)))
        left = await ephemeral_consumers(target.nats_url, target.stream)
        run_prefix = stack.redis_prefix
        cached_leads = await redis_keys(redis_url, f"{run_prefix}lead:*")
    # Every key of the run (caches, rate limits) lives under its prefix, removed with the run:
    # none is left to answer, or block, the next run's same contacts on a shared Redis.
    assert cached_leads, "the run's leads are cached under its own key prefix"
    assert await redis_keys(redis_url, f"{run_prefix}*") == []
    # The run's own JetStream store goes with it; the logs stay for reading.
    assert not (tmp_path / "stack" / "nats" / "nats").exists()
    assert (tmp_path / "stack" / "nats" / "logs" / "nats.log").is_file()

    # The relay's share is read from JetStream through an ephemeral consumer, deleted with the
    # read: not left behind, counting the next step's messages.
    assert step["stages_ms"]["relayed"]["count"] > 0, step["stages_ms"]
    assert left == []
    # Every service's durable consumer is listed with what it had left once the replies were in.
    backlog = step["backlog_after_drain"]
    assert {"conversation", "lead-events", "llm-proxy-replies"} <= set(backlog), backlog
    assert all(isinstance(n, int) and n >= 0 for n in backlog.values())
    assert step["waited_for_backlog_s"] < 1  # a fresh system has nothing left to work off
    assert step["sent"] == 12
    assert step["errors"] == 0, step["error_kinds"]
    assert step["replies_due"] > 0
    assert step["lost"] == 0, step["lost_examples"]
    assert step["duplicate_sends"] == 0, step["duplicate_examples"]
    assert step["unwanted_replies"] == 0
    assert step["missing_in_history"]["missing"] == 0, step["missing_in_history"]
    assert step["e2e_ms"]["count"] > 0 and step["ack_ms"]["count"] == 12
    assert step["e2e_ms"]["p50"] >= 500  # a reply never beats the 0.5 s quiet period
    assert step["reply_sources"].get("llm", 0) > 0  # answered through the fake OpenAI
    assert all(step["resources"][s]["rss_peak_mb"] for s in ("gateway", "conversation", "lead", "llm-proxy"))

    meta = {
        "mode": "smoke",
        "machine": report.machine(),
        "slo": {"p99_ms": 1000.0, "error_rate": 0.001},
        "quiet_period_s": 0.5,
        "settings": target.settings,
    }
    path = report.write(tmp_path, meta, [step])
    assert "| smoke 4/s |" in path.read_text()


async def test_a_system_that_fails_to_start_leaves_no_process_and_no_database_behind(
    urls, tmp_path, monkeypatch
):
    database_url, redis_url = urls
    fakes: list[subprocess.Popen[str]] = []

    def spawn(*args: object) -> tuple[subprocess.Popen[str], str]:
        proc, url = spawn_fake(*args)  # type: ignore[arg-type]
        fakes.append(proc)
        return proc, url

    async def databases() -> set[str]:
        admin = await asyncpg.connect(database_url)
        try:
            return {
                r[0]
                for r in await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'loadtest_%'")
            }
        finally:
            await admin.close()

    monkeypatch.setattr(stack, "spawn_fake", spawn)
    before = await databases()
    failing = Stack(
        tmp_path / "stack",
        urls=("", database_url, redis_url),
        own_nats=True,
        extra_env={"ORBION_DB_POOL_MAX": "many"},  # every service refuses its settings and exits
    )
    with pytest.raises(AssertionError, match="exited"):
        await failing.start()
    assert len(fakes) == 2 and all(proc.poll() is not None for proc in fakes)
    assert failing.system is None and failing.nats is None
    assert await databases() == before
