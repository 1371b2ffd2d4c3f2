"""``orbion bench llm-proxy``: figures for the reply path, printed (no pass/fail).

1. Breaker overhead: ``await breaker.call(f)`` against ``await f()`` (µs per call).
2. Replies through the real ``AsyncOpenAI`` client against the fake OpenAI server at 0 ms and
   300 ms latency: replies/s and the latency we add beyond the fake's own (p50/p99).
3. With a database (``ORBION_DATABASE_URL`` or ``ORBION_TEST_DATABASE_URL``): the whole
   handler (decode, OpenAI, reply row + ``ReplyGenerated`` in one transaction), in a
   throw-away schema.

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
async def fake_openai(latency_ms: float, url: str | None) -> AsyncIterator[str]:
    """Base URL of a fake OpenAI with ``latency_ms``: the given one (knobs set over HTTP) or a new process."""
    if url:
        async with httpx.AsyncClient() as client:
            await client.post(url.removesuffix("/v1") + "/_faults", json={"latency_ms": latency_ms})
        yield url
        return
    root = _repo_root()
    if root is None:
        raise SystemExit("tests/fakes not found: run from the repository or pass --openai-url")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.openai", "--port", str(port), "--latency-ms", str(latency_ms),
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(base + "/models")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        await proc.wait()


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
    await responder.generate(reqs[0].payload)  # warm the connection pool

    async def one(i: int) -> None:
        generated = await responder.generate(reqs[i].payload)
        if generated.source.value != "llm":
            raise RuntimeError(f"reply {i} came from {generated.source.value}")

    elapsed, lat = await _run_concurrent(n, concurrency, one)
    await responder.aclose()
    return {
        "replies_per_s": round(n / elapsed, 1),
        "added_p50_ms": round(_pct(lat, 0.50) * 1000 - latency_ms, 2),
        "added_p99_ms": round(_pct(lat, 0.99) * 1000 - latency_ms, 2),
    }


async def bench_handler(settings: Settings, database_url: str, n: int, concurrency: int) -> dict[str, float]:
    import asyncpg

    from orbion_common.migrations import migrate

    from . import store
    from .bootstrap import build_deps

    schema = f"llmp_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await migrate(conn, schema, store.MIGRATIONS)
    pool = await asyncpg.create_pool(
        database_url, min_size=4, max_size=20, server_settings={"search_path": f"{schema},public"}
    )
    assert pool is not None
    try:
        deps = build_deps(settings, pool, schema=schema)
        reqs = [_request() for _ in range(n)]

        async def one(i: int) -> None:
            await deps.handlers.answer_reply_request(reqs[i])

        elapsed, lat = await _run_concurrent(n, concurrency, one)
        await deps.responder.aclose()
        return {
            "handler_replies_per_s": round(n / elapsed, 1),
            "handler_p50_ms": round(_pct(lat, 0.5) * 1000, 2),
            "handler_p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        }
    finally:
        await pool.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    # Other processes compete for the same cores: the load average says how much.
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    figures["breaker"] = await bench_breaker(args.breaker_calls)
    database_url = os.environ.get("ORBION_DATABASE_URL") or os.environ.get("ORBION_TEST_DATABASE_URL", "")
    for latency in args.latency_ms:
        async with fake_openai(latency, args.openai_url) as base_url:
            settings = Settings(
                openai_api_key="sk-bench", openai_base_url=base_url, openai_timeout_seconds=30.0,
                openai_retries=0, redis_url="", response_cache_ttl_seconds=0,
            )  # fmt: skip
            result = await bench_replies(settings, args.requests, args.concurrency, latency)
            if database_url and not args.no_db:
                result.update(await bench_handler(settings, database_url, args.requests, args.concurrency))
            figures[f"openai_{int(latency)}ms"] = result
            print(f"fake OpenAI at {latency:g} ms: {result}", flush=True)
    print(f"breaker: {figures['breaker']}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench llm-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="replies per run")
    parser.add_argument("--concurrency", type=int, default=256, help="replies in flight")
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
