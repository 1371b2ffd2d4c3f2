"""``orbion bench`` (no service): the plan's before/after table, reproduced in one run.

Each row is measured here, now, on real servers, against its own baseline from the same run:

1. history query on ``--rows`` messages (default 1,000,000): the ``(phone, created_at DESC)``
   index vs none: the conversation service's own read benchmark (``orbion_conversation.bench.
   bench_reads``), in a throw-away schema;
2. history lookup: the Redis cache vs Postgres (indexed), from the same run;
3. lead lookup: the cache vs Postgres, the lead service's benchmark (``orbion bench lead --json``);
4. an LLM answer: the llm-proxy's response cache vs the fake OpenAI at ``--llm-latency-ms``
   (300), through the llm-proxy's own ``Responder``;
5. the whole system's sustainable rate: the load ladder (ladder.py: ``--step-seconds`` steps,
   a breaking step run twice, then ``--refine`` steps between the last rate that held and the
   first that broke) on a system this command starts, with the fake OpenAI at 0 ms; its
   baseline is the plan's target (100 msg/min).

Each figure is a median with its spread (p25-p75 where we hold the samples, else p99) and a
ratio against its baseline. ``--json``: the same as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import ladder, report
from .runner import Runner, Slo, StepPlan
from .scenarios import Scenario
from .schedule import constant
from .stats import spread

PLAN_TARGET_PER_SECOND = 100 / 60  # "Load tested (100+ msg/min)"


def _resolve() -> tuple[str, str, str, Any]:
    from orbion_common.infra import resolve_urls
    from orbion_common.settings import CommonSettings

    env = os.environ
    db = env.get("ORBION_DATABASE_URL") or env.get("ORBION_TEST_DATABASE_URL", "")
    rd = env.get("ORBION_REDIS_URL") or env.get("ORBION_TEST_REDIS_URL", "")
    nats = env.get("ORBION_NATS_URL") or env.get("ORBION_TEST_NATS_URL", "")
    if db and rd and nats:
        return nats, db, rd, None
    urls, started = resolve_urls(
        CommonSettings(nats_url=nats, database_url=db, redis_url=rd), start=True, durable=False
    )
    return urls.nats_url, urls.database_url, urls.redis_url, started


def _row(
    name: str,
    baseline_label: str,
    base: dict[str, Any],
    label: str,
    fig: dict[str, Any],
    unit: str = "ms",
    higher_is_better: bool = False,
) -> dict[str, Any]:
    b, f = base.get("median"), fig.get("median")
    ratio = None
    if b and f:
        ratio = round(f / b, 2) if higher_is_better else round(b / f, 2)
    return {
        "figure": name,
        "unit": unit,
        "baseline_label": baseline_label,
        "baseline": base,
        "label": label,
        "value": fig,
        "ratio": ratio,
    }


def _from_p50_p99(d: dict[str, Any]) -> dict[str, Any]:
    return {"median": d.get("p50_ms"), "p99": d.get("p99_ms"), "n": d.get("samples")}


async def history_rows(db: str, rd: str, rows: int) -> list[dict[str, Any]]:
    import asyncpg
    from redis.asyncio import Redis

    from orbion_common.migrations import migrate
    from orbion_conversation.bench import bench_reads
    from orbion_conversation.bootstrap import MIGRATIONS

    schema = f"conversation_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(db)
    redis = Redis.from_url(rd, socket_timeout=1.0)
    pool = None
    try:
        await migrate(conn, schema, MIGRATIONS)
        pool = await asyncpg.create_pool(db, min_size=2, max_size=8, server_settings={"search_path": schema})
        assert pool is not None
        r = await bench_reads(pool, schema, redis, rows)
    finally:
        if pool is not None:
            await pool.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        async for key in redis.scan_iter(match=f"bench:{schema}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
    unindexed, indexed = _from_p50_p99(r["postgres_without_index"]), _from_p50_p99(r["postgres_indexed"])
    rows_out = [
        _row(
            f"history query, {r['rows']:,} messages (newest 20 of a contact)",
            "no index",
            unindexed,
            "(phone, created_at DESC) index",
            indexed,
        ),
    ]
    if "p50_ms" in r["cache"]:
        rows_out.append(
            _row("history lookup", "Postgres (indexed)", indexed, "Redis cache", _from_p50_p99(r["cache"]))
        )
    return rows_out


async def lead_rows(lookups: int) -> list[dict[str, Any]]:
    # Through its command line (the figures are its --json last line), so that the lead
    # service's benchmark stays free to change its internals.
    code = "import sys; from orbion_lead.bench import main; sys.exit(main(sys.argv[1:]))"
    argv = ["--events", "600", "--contacts", "300", "--lookups", str(lookups), "--json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"orbion bench lead exited {proc.returncode}: {err.decode()[-300:]}")
    f = orjson.loads(out.decode().strip().splitlines()[-1])
    return [
        _row(
            "lead lookup",
            "Postgres",
            {"median": f["postgres_p50_ms"], "p99": f["postgres_p99_ms"], "n": lookups},
            "Redis cache",
            {"median": f["cached_p50_ms"], "p99": f["cached_p99_ms"], "n": lookups},
        ),
    ]


async def llm_rows(rd: str, latency_ms: float, calls: int, workdir: Path) -> list[dict[str, Any]]:
    from redis.asyncio import Redis

    from orbion_common.breakers import Breaker
    from orbion_common.events.messaging import ReplyRequestedPayload
    from orbion_llm_proxy.domain import cache_key
    from orbion_llm_proxy.openai_client import Responder, ResponseCache
    from orbion_llm_proxy.settings import Settings

    from .fakes import repo_root
    from .stack import spawn_fake

    proc, url = spawn_fake("openai", repo_root(), latency_ms, workdir)
    redis = Redis.from_url(rd, socket_timeout=1.0)
    # A question of this run only: the response cache's keys carry no prefix, and a shared Redis
    # must not keep our reply for somebody's real "Quanto custa?".
    text = f"Quanto custa? ({uuid.uuid4().hex[:6]})"
    try:
        settings = Settings(
            openai_api_key="sk-bench",
            openai_base_url=f"{url}/v1",
            openai_retries=0,
            redis_url=rd,
            response_cache_ttl_seconds=120,
        )
        breaker = Breaker("openai-bench", fail_max=10**9, call_timeout=30.0)
        plain = Responder(settings, breaker)
        cached = Responder(settings, breaker, cache=ResponseCache(redis, 120))

        def req(i: int) -> ReplyRequestedPayload:
            return ReplyRequestedPayload(
                reply_key=f"bench-{i}", phone="5511900000000", inbound_message_ids=[f"wamid.b{i}"], text=text
            )

        async def timed(responder: Responder, i: int) -> tuple[float, str]:
            t0 = time.perf_counter()
            g = await responder.generate(req(i))
            return (time.perf_counter() - t0) * 1000, g.source.value

        await timed(plain, -1)  # warm the HTTP connection
        base = [await timed(plain, i) for i in range(max(5, calls // 10))]
        await timed(cached, -2)  # the miss that fills the cache
        hits = [await timed(cached, i) for i in range(calls)]
        await redis.delete(cache_key(text, "", cached.prompt.version))
        for r in (plain, cached):
            close = getattr(r, "aclose", None)
            if close is not None:
                await close()
    finally:
        await redis.aclose()
        proc.terminate()
        proc.wait(5)
    sources = {s for _, s in hits}
    return [
        _row(
            f"LLM answer to a generic question (fake OpenAI at {latency_ms:g} ms)",
            "OpenAI call",
            spread([t for t, _ in base]),
            f"response cache ({', '.join(sorted(sources))})",
            spread([t for t, _ in hits]),
        ),
    ]


async def system_row(
    step_seconds: float, rates: list[float], refine: int, workdir: Path, progress: bool
) -> dict[str, Any]:
    from .stack import Stack

    def show(step: dict[str, Any]) -> None:
        print(
            f"  ladder {step['offered_rate']:g} msg/s: pipeline p50/p99 {step['pipeline_ms']['p50']}/"
            f"{step['pipeline_ms']['p99']} ms, errors {step['error_rate']:.2%}, lost {step['lost']}, "
            f"dup {step['duplicate_sends']}: {'holds' if step['slo']['holds'] else 'breaks'}",
            file=sys.stderr,
            flush=True,
        )

    stack = Stack(workdir, openai_latency_ms=0.0)
    async with (
        stack as target,
        Runner(
            target, Scenario(seed=11, run_tag=int(time.time()) % 10_000), slo=Slo(), progress=progress
        ) as runner,
    ):
        steps = await ladder.climb(
            lambda rate, seed: runner.run_step(
                StepPlan(f"{rate:g}/s", constant(rate, step_seconds)), seed=seed
            ),
            rates,
            refine=refine,
            on_step=show,
        )
    best = report.sustainable(steps)
    value: dict[str, Any] = {"median": best["offered_rate"] if best else 0.0}
    if best:
        value |= {
            "pipeline_p50_ms": best["pipeline_ms"]["p50"],
            "pipeline_p99_ms": best["pipeline_ms"]["p99"],
        }
    return _row(
        "whole system, sustainable rate (fake OpenAI at 0 ms)",
        "plan target 100 msg/min",
        {"median": round(PLAN_TARGET_PER_SECOND, 3)},
        "measured ladder",
        value,
        unit="msg/s",
        higher_is_better=True,
    )


def _fmt(d: dict[str, Any], unit: str) -> str:
    m = d.get("median")
    if m is None:
        return "–"
    text = f"{m:.3g} {unit}" if unit == "msg/s" else f"{m:.3f} ms"
    if d.get("p25") is not None and d.get("p75") is not None:
        text += f" (p25–p75 {d['p25']:.3f}–{d['p75']:.3f})"
    elif d.get("p99") is not None:
        text += f" (p99 {d['p99']:.3f})"
    elif d.get("pipeline_p99_ms") is not None:
        text += f" (pipeline p50/p99 {d['pipeline_p50_ms']}/{d['pipeline_p99_ms']} ms)"
    return text


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| figure | baseline | median (spread) | optimised | median (spread) | ratio |",
        "|---|---|---|---|---|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:g}×" if r.get("ratio") else "–"
        lines.append(
            f"| {r['figure']} | {r['baseline_label']} | {_fmt(r['baseline'], r['unit'])} | {r['label']} "
            f"| {_fmt(r['value'], r['unit'])} | {ratio} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nats, db, rd, started = _resolve()
    # The services' benchmarks read their servers from the environment: this process is the entry point.
    os.environ.update(ORBION_NATS_URL=nats, ORBION_DATABASE_URL=db, ORBION_REDIS_URL=rd)
    workdir = Path(tempfile.mkdtemp(prefix="orbion-bench-"))
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    sections: list[tuple[str, Callable[[], Awaitable[list[dict[str, Any]]]]]] = [
        ("history", lambda: history_rows(db, rd, args.rows)),
        ("lead", lambda: lead_rows(args.lookups)),
        ("llm", lambda: llm_rows(rd, args.llm_latency_ms, args.llm_calls, workdir)),
    ]
    try:
        for name, section in sections:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                rows.extend(await section())
            except Exception as exc:  # a broken service benchmark skips its row, not the table
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  {name} skipped: {errors[name]}", file=sys.stderr, flush=True)
        if not args.skip_system:
            print("bench: whole-system ladder ...", file=sys.stderr, flush=True)
            rates = [float(x) for x in args.system_rates.split(",") if x.strip()]
            rows.append(
                await system_row(
                    args.step_seconds, rates, args.refine, workdir / "system", not args.no_progress
                )
            )
    finally:
        if started is not None:
            started.stop()
    return {"machine": report.machine(), "rows": rows, "skipped": errors}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="messages in the history table")
    parser.add_argument("--lookups", type=int, default=2000, help="lead lookups per source")
    parser.add_argument("--llm-latency-ms", type=float, default=300.0)
    parser.add_argument(
        "--llm-calls", type=int, default=200, help="cached answers timed (a tenth as LLM calls)"
    )
    parser.add_argument("--system-rates", default="2,10,25,50,100,250,500,1000", help="ladder steps, msg/s")
    # As long as the ladder's own steps: past the limit a queue builds, and a 15 s step ends
    # before its p99 shows it (440 msg/s "held" in 15 s steps where 30 s steps held 320).
    parser.add_argument(
        "--step-seconds", type=float, default=30.0, help="duration of each ladder step (default 30)"
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=2,
        metavar="N",
        help="ladder steps after the first break, halving the gap to the last rate that held (default 2)",
    )
    parser.add_argument("--skip-system", action="store_true", help="no whole-system ladder")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    figures = asyncio.run(run(args))
    m = figures["machine"]
    print(f"\nORBION before/after on {m['cpu']} ({m['cores']} cores), {m['at']}\n")
    print(table(figures["rows"]))
    for name, why in figures["skipped"].items():
        print(f"(skipped {name}: {why})")
    if args.json:
        print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
