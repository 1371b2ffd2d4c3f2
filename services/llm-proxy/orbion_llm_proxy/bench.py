"""``orbion bench llm-proxy``: figures for the reply path, printed (no pass/fail).

1. Breaker overhead: ``await breaker.call(f)`` against ``await f()`` (µs per call).
2. Replies through the real ``AsyncOpenAI`` client against the fake OpenAI server at 0 ms and
   300 ms latency: replies/s and the latency we add beyond the fake's own (p50/p99).
3. With a database (``ORBION_DATABASE_URL`` or ``ORBION_TEST_DATABASE_URL``): the whole
   handler (decode, OpenAI, reply row + ``ReplyGenerated`` in one transaction), and the sender
   (stored replies to the local outbox, and to the fake WhatsApp Cloud API), each in a
   throw-away schema with the service's pool.

The fake runs as its own process (``python -m tests.fakes.openai``, from the repository) unless
``--openai-url`` points at one already running. ``--json`` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from orbion_common.breakers import Breaker
from orbion_common.events import ReplyRequested
from orbion_common.events.messaging import ReplyRequestedPayload

from .settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _repo_root() -> Path | None:
    for folder in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        if (folder / "tests" / "fakes" / "openai.py").is_file():
            return folder
    return None


@contextlib.asynccontextmanager
async def fake_process(module: str, ready_path: str, *args: str) -> AsyncIterator[str]:
    """Run ``python -m tests.fakes.<module> --port N *args`` from the repository; its base URL."""
    root = _repo_root()
    if root is None:
        raise SystemExit("tests/fakes not found: run from the repository or pass --openai-url")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"tests.fakes.{module}", "--port", str(port), *args,
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(base + ready_path)).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def fake_openai(latency_ms: float, url: str | None) -> AsyncIterator[str]:
    """Base URL of a fake OpenAI with ``latency_ms``: the given one (knobs set over HTTP) or a new process."""
    if url:
        async with httpx.AsyncClient() as client:
            await client.post(url.removesuffix("/v1") + "/_faults", json={"latency_ms": latency_ms})
        yield url
        return
    async with fake_process("openai", "/v1/models", "--latency-ms", str(latency_ms)) as base:
        yield base + "/v1"


def _request(text: str = "Preciso de um CRM para minha equipe") -> ReplyRequested:
    phone = "55119" + str(uuid.uuid4().int)[:8]
    return ReplyRequested.create(
        phone,
        ReplyRequestedPayload(
            reply_key=uuid.uuid4().hex, phone=phone, inbound_message_ids=["wamid.X"], text=text
        ),
    )


async def _run_concurrent(
    n: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_breaker(calls: int) -> dict[str, float]:
    async def noop() -> int:
        return 1

    breaker = Breaker("bench", call_timeout=None)
    timed = Breaker("bench-timeout", call_timeout=10.0)
    results: dict[str, float] = {}
    for label, fn in (
        ("direct", noop),
        ("breaker", lambda: breaker.call(noop)),
        ("breaker_with_timeout", lambda: timed.call(noop)),
    ):
        started = time.perf_counter()
        for _ in range(calls):
            await fn()
        results[label] = (time.perf_counter() - started) / calls * 1e6
    return {
        "breaker_overhead_us": round(results["breaker"] - results["direct"], 2),
        "breaker_with_timeout_overhead_us": round(results["breaker_with_timeout"] - results["direct"], 2),
    }


async def bench_replies(settings: Settings, n: int, concurrency: int, latency_ms: float) -> dict[str, float]:
    from .openai_client import Responder

    breaker = Breaker("openai-bench", fail_max=10**9, call_timeout=settings.openai_timeout_seconds + 1)
    responder = Responder(settings, breaker)
    reqs = [_request() for _ in range(n)]

    async def one(i: int) -> None:
        generated = await responder.generate(reqs[i].payload)
        if generated.source.value != "llm":
            raise RuntimeError(f"reply {i} came from {generated.source.value}")

    # One untimed wave opens the connections a running service would already hold: otherwise
    # the timed run starts with `concurrency` connects at once, which a service does not see.
    await _run_concurrent(min(n, concurrency), concurrency, one)
    elapsed, lat = await _run_concurrent(n, concurrency, one)
    await responder.aclose()
    return {
        "replies_per_s": round(n / elapsed, 1),
        "added_p50_ms": round(_pct(lat, 0.50) * 1000 - latency_ms, 2),
        "added_p99_ms": round(_pct(lat, 0.99) * 1000 - latency_ms, 2),
    }


@contextlib.asynccontextmanager
async def throwaway_schema(settings: Settings, database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A migrated schema of our own, dropped after, and the service's pool on it (its size, and
    no reset round trip on release, as ``orbion serve llm-proxy`` runs)."""
    from orbion_common.db import create_pool
    from orbion_common.migrations import migrate

    from . import store

    schema = f"llmp_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, schema, store.MIGRATIONS)
        pool = await create_pool(settings.model_copy(update={"database_url": database_url}), service=schema)
        try:
            yield pool, schema
        finally:
            await pool.close()
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def bench_handler(settings: Settings, database_url: str, n: int, concurrency: int) -> dict[str, float]:
    from .bootstrap import build_deps

    async with throwaway_schema(settings, database_url) as (pool, schema):
        deps = build_deps(settings, pool, schema=schema)
        warm = min(n, concurrency)
        reqs = [_request() for _ in range(warm + n)]

        async def one(i: int) -> None:
            await deps.handlers.answer_reply_request(reqs[i])

        async def timed(i: int) -> None:
            await one(warm + i)

        await _run_concurrent(warm, concurrency, one)  # opens the connections, as in bench_replies
        cpu = time.process_time()
        elapsed, lat = await _run_concurrent(n, concurrency, timed)
        cpu = time.process_time() - cpu
        await deps.responder.aclose()
    return {
        "handler_replies_per_s": round(n / elapsed, 1),
        "handler_p50_ms": round(_pct(lat, 0.5) * 1000, 2),
        "handler_p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        "handler_cpu_us_per_reply": round(cpu / n * 1e6, 1),
    }


async def bench_sender(settings: Settings, database_url: str, n: int) -> dict[str, float]:
    """Stored replies of ``n`` contacts sent by ``Sender.drain`` (the sender's loop without its
    poll pauses): replies/s and the sender's CPU per reply. Unpaced (``whatsapp_rate_per_second``
    0): the figure is the sender's own cost, not WhatsApp's 80/s cap."""
    from . import store
    from .bootstrap import build_deps

    async with throwaway_schema(settings, database_url) as (pool, schema):
        deps = build_deps(settings, pool, schema=schema)
        async with pool.acquire() as conn:
            for _ in range(n):
                req = _request().payload
                await store.insert_reply(
                    conn, reply_key=req.reply_key, phone=req.phone, kind="reply", text=req.text,
                    parts=[req.text], reply_to_message_id="wamid.X", source="llm",
                    correlation_id=req.reply_key, causation_id=req.reply_key,
                )  # fmt: skip
        cpu, started = time.process_time(), time.perf_counter()
        counts: dict[str, int] = {}
        for _ in range(100):
            await deps.sender.drain()
            async with pool.acquire() as conn:
                counts = await store.reply_counts(conn)
            if not counts.get("pending") and not counts.get("sending"):
                break
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        if deps.sender.provider is not None:
            await deps.sender.provider.aclose()
    if counts.get("sent", 0) != n:
        raise RuntimeError(f"sender left replies unsent: {counts}")
    return {"sender_replies_per_s": round(n / elapsed, 1), "sender_cpu_us_per_reply": round(cpu / n * 1e6, 1)}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    # Other processes compete for the same cores: the load average says how much.
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    print(f"{figures['cpus']} cores, load average {figures['load_avg_1m_at_start']} at start", flush=True)
    figures["breaker"] = await bench_breaker(args.breaker_calls)
    database_url = os.environ.get("ORBION_DATABASE_URL") or os.environ.get("ORBION_TEST_DATABASE_URL", "")
    for i, latency in enumerate(args.latency_ms):
        concurrency = args.concurrency[min(i, len(args.concurrency) - 1)]
        async with fake_openai(latency, args.openai_url) as base_url:
            settings = Settings(
                openai_api_key="sk-bench", openai_base_url=base_url, openai_timeout_seconds=30.0,
                openai_retries=0, redis_url="", response_cache_ttl_seconds=0,
            )  # fmt: skip
            result: dict[str, float] = {"concurrency": concurrency}
            result.update(await bench_replies(settings, args.requests, concurrency, latency))
            if database_url and not args.no_db:
                result.update(await bench_handler(settings, database_url, args.requests, concurrency))
            figures[f"openai_{int(latency)}ms"] = result
            print(f"fake OpenAI at {latency:g} ms: {result}", flush=True)
    if database_url and not args.no_db:
        outbox = Settings(whatsapp_provider="outbox")
        figures["sender_outbox"] = await bench_sender(outbox, database_url, args.requests)
        print(f"sender, local outbox: {figures['sender_outbox']}", flush=True)
        async with fake_process("whatsapp", "/_sent", "--token", "bench-token") as whatsapp_url:
            cloud = Settings(
                whatsapp_provider="cloud_api", whatsapp_api_base_url=whatsapp_url,
                whatsapp_token="bench-token", whatsapp_phone_number_id="100", whatsapp_rate_per_second=0,
            )  # fmt: skip
            figures["sender_cloud_api"] = await bench_sender(cloud, database_url, args.requests)
        print(f"sender, fake Cloud API: {figures['sender_cloud_api']}", flush=True)
    print(f"breaker: {figures['breaker']}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench llm-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="replies per run")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[256, 512],
        help="replies in flight, one per --latency-ms (the last repeats); at 300 ms, 256 in flight "
        "would cap replies/s at 256 / 0.3 s whatever the cost per call",
    )  # fmt: skip
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 300.0], help="fake latencies")
    parser.add_argument("--breaker-calls", type=int, default=100_000)
    parser.add_argument(
        "--openai-url", default=None, help="a running fake OpenAI (…/v1) instead of a new one"
    )
    parser.add_argument("--no-db", action="store_true", help="skip the handler benchmark")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = parser.parse_args(argv)
    from orbion_common.service import run

    figures = run(_main(args))  # uvloop, as the services run
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
