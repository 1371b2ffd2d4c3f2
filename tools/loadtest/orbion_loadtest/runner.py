"""Drives a running system through one step: sends on schedule, collects, judges.

A step: plan the messages (schedule.py + scenarios.py), sign every body before the clock
starts, then fire each webhook at its scheduled time without waiting for earlier answers
(open loop), while a ticker shows sent / errors / ack p99 / replies live. When the last
answer is in, wait (bounded) until every due reply reached the WhatsApp fake, then a short
settle time for late duplicates, and judge (stats.py). Resource use is sampled during the step
(psutil on the services' pids when known, else their Prometheus ``process_*`` metrics) and the
cache counters are read before and after it from each service's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from orbion_common.cli.webhooks import cloud_text_webhook, signed_headers
from orbion_common.events.messaging import quiet_period_start

from . import stats
from .scenarios import Planned, Role, Scenario
from .schedule import Segment, arrivals, duration
from .stack import Target


@dataclass(frozen=True)
class Slo:
    p99_ms: float = 1000.0  # pipeline share: beyond the LLM's own latency and the quiet period
    error_rate: float = 0.001


@dataclass
class StepPlan:
    name: str
    segments: list[Segment]
    poisson: bool = False

    @property
    def offered_rate(self) -> float:
        total = duration(self.segments)
        return sum(s.rate * s.seconds for s in self.segments) / total if total else 0.0


# Where a reply's time goes, from the event stores' own clocks (``recorded_at`` is the commit's
# ``now()``; a MessageReceived's ``occurred_at`` is the gateway's receipt). Four plain reads
# joined here: joined in SQL on JSON fields, the planner's row guesses made it a nested loop
# that ran for minutes (and held back every relay's horizon meanwhile).
STAGE_QUERIES = {
    "inbound": "select body->'payload'->>'provider_message_id', extract(epoch from occurred_at), "
    "extract(epoch from recorded_at) from conversation.events "
    "where type = 'MessageReceived' and occurred_at >= to_timestamp($1)",
    "requested": "select body->'payload'->>'reply_key', body->'payload'->>'reply_to_message_id', "
    "coalesce((body->'payload'->>'quiet_period_ms')::float, 0) / 1000, extract(epoch from recorded_at) "
    "from conversation.events where type = 'ReplyRequested' and recorded_at >= to_timestamp($1)",
    "generated": "select body->'payload'->>'reply_key', extract(epoch from recorded_at), "
    "extract(epoch from occurred_at) from llm_proxy.events "
    "where type = 'ReplyGenerated' and recorded_at >= to_timestamp($1)",
    "sent": "select body->'payload'->>'reply_key', extract(epoch from min(recorded_at)) "
    "from llm_proxy.events where type = 'MessageSent' and recorded_at >= to_timestamp($1) group by 1",
}


def _quiet_from(gateway_at: float, stored_at: float) -> float:
    """When the conversation service started the quiet period (epoch s), by its own rule."""
    start = quiet_period_start(
        datetime.fromtimestamp(gateway_at, UTC), datetime.fromtimestamp(stored_at, UTC)
    )
    return start.timestamp()


def join_stages(
    inbound: list[Any], requested: list[Any], generated: list[Any], sent: list[Any]
) -> list[dict[str, Any]]:
    """One row per reply with its stage durations (s), from the rows of ``STAGE_QUERIES``."""
    received = {mid: (gw_at, conv_at) for mid, gw_at, conv_at in inbound}
    made = {rk: (gen_at, gen_occurred) for rk, gen_at, gen_occurred in generated}
    sent_at = dict((rk, at) for rk, at in sent)
    rows = []
    for rk, mid, quiet, req_at in requested:
        if mid not in received or rk not in made or rk not in sent_at:
            continue
        gw_at, conv_at = (float(x) for x in received[mid])
        gen_at, gen_occurred = (float(x) for x in made[rk])
        rows.append({
            "rk": rk, "req_epoch": float(req_at), "gen_epoch": gen_occurred,
            "stored": conv_at - gw_at,
            "scheduled": float(req_at) - _quiet_from(gw_at, conv_at) - float(quiet),
            "generated": gen_at - float(req_at), "sent": float(sent_at[rk]) - gen_at,
        })  # fmt: skip
    return rows


STAGE_NAMES = {
    "stored": "gateway receipt -> inbound stored by conversation (publish, JetStream, consumer, projection)",
    "scheduled": "quiet period over (it starts at the gateway's receipt, the stored stage within it) "
    "-> ReplyRequested stored (reply scheduler)",
    "generated": "ReplyRequested -> ReplyGenerated stored (relay, JetStream, llm-proxy consumer, LLM)",
    "sent": "ReplyGenerated -> MessageSent stored (sender wake-up, WhatsApp call, commit)",
}
# The "generated" stage split by JetStream's own timestamp of the ReplyRequested message.
SPLIT_NAMES = {
    "relayed": "ReplyRequested stored -> in JetStream (conversation's relay)",
    "consumed": "in JetStream -> ReplyGenerated created (llm-proxy fetch, claim, LLM call)",
}


async def jetstream_times(
    nats_url: str, stream: str, event_type: str, since_epoch: float
) -> dict[str, float]:
    """reply_key -> JetStream timestamp (epoch s) of each ``event_type`` message since ``since_epoch``."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    out: dict[str, float] = {}
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        start = datetime.fromtimestamp(since_epoch, UTC)
        # The event subjects hang under the stream's own root ("<root>.events.<Type>.<partition>").
        events_subject = next(
            s for s in (await js.stream_info(stream)).config.subjects or [] if ".events." in s + "."
        )
        sub = await js.pull_subscribe(
            f"{events_subject.removesuffix('.>')}.{event_type}.>", stream=stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start,
                                  inactive_threshold=30.0),
        )  # fmt: skip
        try:
            while True:
                try:
                    msgs = await sub.fetch(500, timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                for m in msgs:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        key = orjson.loads(m.data)["payload"]["reply_key"]
                        out[key] = m.metadata.timestamp.timestamp()
                if len(msgs) < 500:
                    break
        finally:
            # Deleted now, not left to its inactivity threshold: until then the server keeps
            # counting the next step's messages for it, and the monitor lists it with that backlog.
            with contextlib.suppress(nats.errors.Error):
                await js.delete_consumer(stream, (await sub.consumer_info()).name)
            await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def consumer_backlogs(nats_url: str, stream: str) -> dict[str, int]:
    """Events each durable consumer of ``stream`` has not handled yet: not delivered, or
    delivered and not acked. What is left once a step's replies are in says whether every
    service kept up, the ones off the reply path (the lead) included."""
    import nats

    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        infos = await nc.jetstream().consumers_info(stream)
    finally:
        await nc.close()
    return {c.name: (c.num_pending or 0) + (c.num_ack_pending or 0) for c in infos if c.config.durable_name}


async def wait_for_backlogs(
    read: Callable[[], Awaitable[dict[str, int] | None]],
    *,
    limit: float,
    stall: float = 10.0,
    interval: float = 0.5,
) -> float:
    """Wait until no consumer has a backlog (``read`` returns all zeros, or None: unknown), for
    at most ``limit`` seconds, and no longer than ``stall`` seconds without the backlog
    shrinking (a consumer nobody runs never works it off); returns how long it waited."""
    loop = asyncio.get_running_loop()
    started = progressed = loop.time()
    smallest: int | None = None
    while loop.time() - started < limit and loop.time() - progressed < stall:
        backlog = await read()
        if not backlog or not any(backlog.values()):
            break
        if smallest is None or sum(backlog.values()) < smallest:
            smallest, progressed = sum(backlog.values()), loop.time()
        await asyncio.sleep(interval)
    return round(loop.time() - started, 2)


async def stage_times(
    database_url: str, since_epoch: float, *, nats_url: str = "", stream: str = ""
) -> dict[str, Any]:
    """p50/p99 ms of each stage of the replies recorded since ``since_epoch``; {} when unreadable."""
    import asyncpg

    try:
        conn = await asyncpg.connect(database_url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return {}
    try:
        found = {name: await conn.fetch(sql, since_epoch) for name, sql in STAGE_QUERIES.items()}
    except asyncpg.PostgresError as exc:
        return {"error": str(exc)[:200]}
    finally:
        await conn.close()
    rows = join_stages(**found)
    out: dict[str, Any] = {"replies": len(rows)}
    for key in STAGE_NAMES:
        out[key] = stats.summary([float(r[key]) for r in rows if r[key] is not None], scale=1000)
    if nats_url and stream:
        try:
            published = await jetstream_times(nats_url, stream, "ReplyRequested", since_epoch)
        except Exception as exc:  # analysis only: never lose a step's figures for it
            out["jetstream_error"] = f"{type(exc).__name__}: {exc}"[:200]
            return out
        relayed, consumed = [], []
        for r in rows:
            at = published.get(r["rk"])
            if at is not None:
                relayed.append(at - float(r["req_epoch"]))
                consumed.append(float(r["gen_epoch"]) - at)
        out["relayed"] = stats.summary(relayed, scale=1000)
        out["consumed"] = stats.summary(consumed, scale=1000)
    return out


class Sends:
    """Incremental reader of the WhatsApp fake's accepted sends and the OpenAI fake's calls."""

    def __init__(self, client: httpx.AsyncClient, target: Target) -> None:
        self.client = client
        self.target = target
        self.sends: list[stats.Send] = []
        self.llm: dict[int, float] = {}
        self._wa_after = 0
        self._oa_after = 0
        # The live ticker and the drain loop both poll: one at a time, or a page is read twice
        # (phantom duplicates) and the cursor skips the next one (phantom losses).
        self._lock = asyncio.Lock()

    async def skip_existing(self) -> None:
        r = await self.client.get(f"{self.target.whatsapp_fake_url}/_sent_since", params={"after": 10**12})
        self._wa_after = int(r.json()["total"])
        if self.target.openai_fake_url:
            r = await self.client.get(f"{self.target.openai_fake_url}/_calls", params={"after": 10**12})
            self._oa_after = int(r.json()["total"])

    async def poll(self) -> None:
        async with self._lock:
            r = await self.client.get(
                f"{self.target.whatsapp_fake_url}/_sent_since", params={"after": self._wa_after}
            )
            data = r.json()
            self.sends.extend(stats.Send(s["to"], s["ctx"], s["text"], s["at"]) for s in data["sent"])
            self._wa_after = int(data["after"]) + len(data["sent"])
            if self.target.openai_fake_url:
                r = await self.client.get(
                    f"{self.target.openai_fake_url}/_calls", params={"after": self._oa_after}
                )
                body = r.json()
                self.llm.update({int(c["n"]): float(c["ms"]) / 1000 for c in body["calls"]})
                self._oa_after = int(body["after"]) + len(body["calls"])


def parse_process_metrics(text: str) -> dict[str, Any]:
    """RSS, CPU seconds and cache counters from one service's Prometheus text."""
    out: dict[str, Any] = {"rss": None, "cpu": None, "cache": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "process_resident_memory_bytes":
                out["rss"] = float(s.value)
            elif s.name == "process_cpu_seconds_total":
                out["cpu"] = float(s.value)
            elif s.name == "orbion_cache_requests_total":
                key = f"{s.labels.get('cache', '')}:{s.labels.get('result', '')}"
                out["cache"][key] = out["cache"].get(key, 0.0) + float(s.value)
            elif s.name == "orbion_llm_proxy_response_cache_total":
                key = f"llm_response:{s.labels.get('result', '')}"
                out["cache"][key] = out["cache"].get(key, 0.0) + float(s.value)
    return out


def cache_ratios(before: Mapping[str, dict[str, Any]], after: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Hit ratio per cache over the step, from counter deltas (hits / (hits + misses + errors))."""
    deltas: dict[str, dict[str, float]] = {}
    for service, now in after.items():
        old = before.get(service, {}).get("cache", {})
        for key, value in now.get("cache", {}).items():
            cache, _, result = key.rpartition(":")
            d = deltas.setdefault(cache, {})
            d[result] = d.get(result, 0.0) + value - old.get(key, 0.0)
    out: dict[str, Any] = {}
    for cache, d in sorted(deltas.items()):
        reads = d.get("hit", 0.0) + d.get("miss", 0.0) + d.get("error", 0.0)
        out[cache] = {
            "hits": d.get("hit", 0.0),
            "reads": reads,
            "hit_ratio": round(d.get("hit", 0.0) / reads, 4) if reads else None,
        }
    return out


class ResourceSampler:
    """Peak RSS and average CPU of each service during a step."""

    def __init__(self, client: httpx.AsyncClient, target: Target, interval: float = 1.0) -> None:
        self.client = client
        self.target = target
        self.interval = interval
        self.peak_rss: dict[str, float] = {}
        self._procs: dict[str, psutil.Process] = {}
        for name, pid in target.pids.items():
            with contextlib.suppress(psutil.Error):
                self._procs[name] = psutil.Process(pid)
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0
        self.metrics_before: dict[str, dict[str, Any]] = {}

    async def scrape(self) -> dict[str, dict[str, Any]]:
        async def one(name: str, url: str) -> tuple[str, dict[str, Any]]:
            try:
                r = await self.client.get(f"{url}/metrics", timeout=5)
                return name, parse_process_metrics(r.text)
            except httpx.HTTPError:
                return name, {"rss": None, "cpu": None, "cache": {}}

        pairs = await asyncio.gather(*(one(n, u) for n, u in self.target.service_urls.items()))
        return dict(pairs)

    def _cpu_seconds(self, name: str) -> float | None:
        proc = self._procs.get(name)
        if proc is None:
            return None
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            return float(t.user + t.system)
        return None

    def _sample(self) -> None:
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                rss = float(proc.memory_info().rss)
                self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss)

    async def start(self) -> None:
        self.metrics_before = await self.scrape()
        self._t0 = time.monotonic()
        for name in self.target.service_urls:
            cpu = self._cpu_seconds(name)
            if cpu is None:
                cpu = self.metrics_before.get(name, {}).get("cpu")
            if cpu is not None:
                self._cpu0[name] = cpu

    async def run(self) -> None:
        while True:
            if self._procs:
                self._sample()
            else:
                for name, m in (await self.scrape()).items():
                    if m["rss"] is not None:
                        self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), m["rss"])
            await asyncio.sleep(self.interval)

    async def finish(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        after = await self.scrape()
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        out: dict[str, Any] = {}
        for name in self.target.service_urls:
            cpu = self._cpu_seconds(name)
            if cpu is None:
                cpu = after.get(name, {}).get("cpu")
            rss_end = after.get(name, {}).get("rss")
            peak = max(self.peak_rss.get(name, 0.0), rss_end or 0.0)
            out[name] = {
                "rss_peak_mb": round(peak / 2**20, 1) if peak else None,
                "cpu_percent": round(100 * (cpu - self._cpu0[name]) / elapsed, 1)
                if cpu is not None and name in self._cpu0
                else None,
            }
        me = psutil.Process()
        out["loadgen"] = {"rss_peak_mb": round(me.memory_info().rss / 2**20, 1), "cpu_percent": None}
        return out, after


class Live:
    """The progress line: rich when installed and on a terminal, else a line every few seconds."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        self.enabled = enabled
        self.name = name
        self.total = total
        self._progress: Any = None
        self._task: Any = None
        self._last_print = 0.0
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        console = Console(stderr=True)
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=False,
            )

    def __enter__(self) -> Live:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, info="")
        return self

    def update(self, done: int, info: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=info)
        elif time.monotonic() - self._last_print > 5:
            self._last_print = time.monotonic()
            print(f"  {self.name}: {done}/{self.total} {info}", flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


class Runner:
    def __init__(
        self,
        target: Target,
        scenario: Scenario,
        *,
        slo: Slo | None = None,
        drain_timeout: float = 60.0,
        drain_max: float = 600.0,
        settle: float = 1.5,
        history_sample: int = 100,
        progress: bool = True,
        seed: int = 1,
    ) -> None:
        self.target = target
        self.scenario = scenario
        self.slo = slo or Slo()
        self.drain_timeout = drain_timeout
        self.drain_max = drain_max
        self.settle = settle
        self.history_sample = history_sample
        self.progress = progress
        self.rng = random.Random(seed)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(15.0, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=256),
        )
        # The webhooks go through aiohttp: it costs a third of httpx's CPU per request, and the
        # generator shares the cores with the system it measures.
        self._webhooks: aiohttp.ClientSession | None = None

    def webhook_session(self) -> aiohttp.ClientSession:
        if self._webhooks is None:
            self._webhooks = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15.0, connect=5.0),
                connector=aiohttp.TCPConnector(limit=512),
            )
        return self._webhooks

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._webhooks is not None:
            await self._webhooks.close()

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one step ------------------------------------------------------------------------------

    def _bodies(self, planned: list[Planned]) -> dict[str, tuple[bytes, dict[str, str]]]:
        out: dict[str, tuple[bytes, dict[str, str]]] = {}
        for p in planned:
            if p.message_id in out:
                continue  # a duplicate webhook is the same bytes again
            body = orjson.dumps(
                cloud_text_webhook(p.phone, p.text, message_id=p.message_id, profile_name=p.profile_name)
            )
            out[p.message_id] = (body, signed_headers(body, self.target.app_secret or None))
        return out

    async def run_step(self, plan: StepPlan, *, seed: int = 0) -> dict[str, Any]:
        # A step after one past the limit would otherwise start while the services off the reply
        # path (the lead) still work off that step's events, and share the cores with them.
        waited = await wait_for_backlogs(self.backlogs, limit=self.drain_max)
        load_before = os.getloadavg()[0]
        planned = self.scenario.plan(arrivals(plan.segments, poisson=plan.poisson, seed=seed))
        bodies = self._bodies(planned)
        sends = Sends(self.client, self.target)
        await sends.skip_existing()
        sampler = ResourceSampler(self.client, self.target)
        await sampler.start()
        sampler_task = asyncio.create_task(sampler.run())
        outcomes: dict[int, stats.Outcome] = {}
        loop = asyncio.get_running_loop()
        url = f"{self.target.gateway_url}/webhooks/whatsapp"
        errors = 0
        recent_ack: list[float] = []

        session = self.webhook_session()

        async def post(p: Planned, scheduled: float) -> None:
            nonlocal errors
            body, headers = bodies[p.message_id]
            lag = loop.time() - scheduled
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    status, answer = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[p.seq] = stats.Outcome(None, loop.time() - scheduled, lag, error=type(exc).__name__)
                errors += 1
                return
            ack = loop.time() - scheduled
            throttled = duplicate = False
            if status == 200:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    data = orjson.loads(answer)
                    throttled = int(data.get("throttled", 0)) > 0
                    duplicate = int(data.get("duplicates", 0)) > 0
            else:
                errors += 1
            outcomes[p.seq] = stats.Outcome(status, ack, lag, throttled, duplicate)
            recent_ack.append(ack)
            if len(recent_ack) > 2000:
                del recent_ack[:1000]

        t0 = loop.time() + 0.3
        epoch0 = time.time() + (t0 - loop.time())
        scheduled_epoch = {p.seq: epoch0 + p.at for p in planned}
        tasks: set[asyncio.Task[None]] = set()
        step_seconds = duration(plan.segments)
        with Live(self.progress, plan.name, len(planned)) as live:

            async def ticker() -> None:
                last_poll = 0.0
                while True:
                    if loop.time() - last_poll > 1.0:
                        last_poll = loop.time()
                        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                            await sends.poll()
                    p99 = stats.percentile(recent_ack, 99)
                    live.update(
                        len(outcomes),
                        f"err {errors}  ack p99 {p99 * 1000 if p99 is not None else 0:.0f} ms  "
                        f"replies {len(sends.sends)}  in flight {len(tasks)}",
                    )
                    await asyncio.sleep(0.25)

            tick = asyncio.create_task(ticker())
            try:
                i = 0
                while i < len(planned):
                    now = loop.time()
                    while i < len(planned) and t0 + planned[i].at <= now:
                        task = asyncio.create_task(post(planned[i], t0 + planned[i].at))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        i += 1
                    if i < len(planned):
                        await asyncio.sleep(max(0.0, t0 + planned[i].at - loop.time()))
                sent_done = loop.time()
                if tasks:
                    await asyncio.wait(set(tasks), timeout=30)
                acks_done = loop.time()
                # Drain: until every due reply is in, or no new reply came for drain_timeout seconds
                # (a backlog past saturation is still being worked off while replies keep coming),
                # or drain_max seconds in all.
                stall_deadline = loop.time() + self.drain_timeout
                hard_deadline = loop.time() + self.drain_max
                seen = -1
                while loop.time() < min(stall_deadline, hard_deadline):
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                        await sends.poll()
                    if len(sends.sends) != seen:
                        seen = len(sends.sends)
                        stall_deadline = loop.time() + self.drain_timeout
                    v = stats.account(
                        planned,
                        outcomes,
                        sends.sends,
                        scheduled_epoch=scheduled_epoch,
                        llm_seconds=sends.llm,
                        quiet_period=self.target.quiet_period,
                    )
                    if v.lost == 0:
                        break
                    await asyncio.sleep(0.5)
                drained = loop.time()
                await asyncio.sleep(self.settle)
                backlog = await self.backlogs()
                await sends.poll()
            finally:
                tick.cancel()
                sampler_task.cancel()
                for t in (tick, sampler_task):
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
        resources, metrics_after = await sampler.finish()
        verdict = stats.account(
            planned,
            outcomes,
            sends.sends,
            scheduled_epoch=scheduled_epoch,
            llm_seconds=sends.llm,
            quiet_period=self.target.quiet_period,
        )
        figures = verdict.figures()
        history = await self.check_history(planned, outcomes)
        phases = list(dict.fromkeys(p.phase for p in planned))  # in the order they happen
        by_phase: dict[str, Any] = {}
        if len(phases) > 1:
            for phase in phases:
                subset = [p for p in planned if p.phase == phase]
                pv = stats.account(
                    subset,
                    outcomes,
                    sends.sends,
                    scheduled_epoch=scheduled_epoch,
                    llm_seconds=sends.llm,
                    quiet_period=self.target.quiet_period,
                )
                f = pv.figures()
                by_phase[phase] = {
                    k: f[k]
                    for k in ("sent", "errors", "lost", "duplicate_sends", "ack_ms", "e2e_ms", "pipeline_ms")
                }
        replies_at = [s.at for s in sends.sends if s.context_id]
        reply_span = (max(replies_at) - epoch0) if replies_at else 0.0
        result: dict[str, Any] = {
            "step": plan.name,
            "offered_rate": round(plan.offered_rate, 3),
            "offered_per_minute": round(plan.offered_rate * 60, 1),
            "duration_s": step_seconds,
            "messages": len(planned),
            "contacts": len({p.phone for p in planned}),
            "kinds": _count(p.kind.value for p in planned),
            "roles": _count(p.role.value for p in planned),
            "send_seconds": round(sent_done - t0, 3),
            # after the last answer from the gateway, until the last due reply (or giving up)
            "drain_seconds": round(drained - acks_done, 2),
            "ack_rate": round(verdict.accepted / max(acks_done - t0, 1e-6), 2),
            "reply_rate": round(verdict.replies / reply_span, 2) if reply_span > 0 else 0.0,
            **figures,
            "missing_in_history": history,
            "resources": resources,
            "cache": cache_ratios(sampler.metrics_before, metrics_after),
            "phases": by_phase,
            "timeline": stats.timeline(verdict.samples, epoch0, max(10.0, step_seconds / 12)),
            "quiet_period_s": self.target.quiet_period,
            # Other work on the machine skews every figure: the load average says how much there was.
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        result["monitor"] = await self.monitor_snapshot()
        result["backlog_after_drain"] = backlog
        result["waited_for_backlog_s"] = waited
        if self.target.database_url:
            result["stages_ms"] = await stage_times(
                self.target.database_url, epoch0, nats_url=self.target.nats_url, stream=self.target.stream
            )
        result["slo"] = self.judge(result)
        return result

    def judge(self, r: Mapping[str, Any]) -> dict[str, Any]:
        p99 = r["pipeline_ms"]["p99"]
        reasons = []
        if r["error_rate"] > self.slo.error_rate:
            reasons.append(f"error rate {r['error_rate']:.4%} > {self.slo.error_rate:.2%}")
        if p99 is None and r["replies_due"]:
            reasons.append("no replies")
        elif p99 is not None and p99 > self.slo.p99_ms:
            reasons.append(f"pipeline p99 {p99:.0f} ms > {self.slo.p99_ms:.0f} ms")
        for key in ("lost", "duplicate_sends", "unwanted_replies"):
            if r[key]:
                reasons.append(f"{key.replace('_', ' ')}: {r[key]}")
        missing = r.get("missing_in_history") or {}
        if missing.get("missing"):
            reasons.append(f"missing in history: {missing['missing']}")
        return {
            "holds": not reasons,
            "reasons": reasons,
            "p99_ms": self.slo.p99_ms,
            "error_rate": self.slo.error_rate,
        }

    async def check_history(
        self, planned: list[Planned], outcomes: Mapping[int, stats.Outcome]
    ) -> dict[str, Any]:
        """Every accepted inbound message of a sample of contacts is in their history (API)."""
        url = self.target.conversation_url
        if not url or self.history_sample <= 0:
            return {"checked_contacts": 0, "missing": 0}
        expected: dict[str, set[str]] = {}
        for p in planned:
            o = outcomes.get(p.seq)
            if o is not None and o.accepted and p.role is not Role.DUPLICATE:
                expected.setdefault(p.phone, set()).add(p.message_id)
        phones = sorted(expected)
        sample = (
            phones if len(phones) <= self.history_sample else self.rng.sample(phones, self.history_sample)
        )
        missing: list[str] = []
        sem = asyncio.Semaphore(8)

        async def one(phone: str) -> None:
            async with sem:
                for _attempt in range(5):
                    try:
                        r = await self.client.get(
                            f"{url}/api/conversations/{phone}/messages",
                            params={"limit": 100},
                            headers={"X-API-Key": self.target.api_key},
                        )
                    except httpx.HTTPError:
                        await asyncio.sleep(0.5)
                        continue
                    if r.status_code == 429:
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                        continue
                    ids = (
                        {m.get("id") for m in r.json().get("messages", [])} if r.status_code == 200 else set()
                    )
                    missing.extend(sorted(expected[phone] - ids))
                    return
                missing.append(f"{phone}: history not readable")

        await asyncio.gather(*(one(p) for p in sample))
        return {"checked_contacts": len(sample), "missing": len(missing), "examples": missing[:10]}

    async def backlogs(self) -> dict[str, int] | None:
        """:func:`consumer_backlogs` of the target's stream; None when its NATS is not known."""
        if not (self.target.nats_url and self.target.stream):
            return None
        try:
            return await consumer_backlogs(self.target.nats_url, self.target.stream)
        except Exception:  # analysis only, as the monitor's snapshot: never lose a step's figures for it
            return None

    async def monitor_snapshot(self) -> dict[str, Any] | None:
        url = self.target.monitor_url
        if not url:
            return None
        try:
            r = await self.client.get(
                f"{url}/api/metrics", headers={"X-API-Key": self.target.api_key}, timeout=5
            )
            data = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
        keep = ("end_to_end", "stages", "cache", "consumer_lag", "dead_letters", "breakers", "error_ratio")
        return {k: data.get(k) for k in keep if k in data}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
