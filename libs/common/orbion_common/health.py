"""Readiness checks: run each dependency probe concurrently, with a timeout, into a JSON report.

Owns the readiness model behind ``/readyz`` (service.py serves it) and the ready-made probes
for Postgres, Redis and the JetStream bus. Liveness is not here: ``/livez`` never touches a
dependency (a slow database must not get a healthy pod restarted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import asyncpg

from orbion_common.logging import mask_text

__all__ = [
    "CheckResult",
    "ReadinessCheck",
    "bus_check",
    "postgres_check",
    "redis_check",
    "run_checks",
]

ReadinessCheck = Callable[[], Awaitable[object]]
"""A probe: returns a detail (any JSON-able value) when the dependency is usable, raises if not."""

CheckResult = dict[str, Any]  # {"ok": bool, "detail": ..., "latency_ms": float}

_MAX_ERROR_CHARS = 200


def _describe(exc: BaseException) -> str:
    # Short and safe: the type and message only (no stack trace), URL passwords and phones masked.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return mask_text(text[:_MAX_ERROR_CHARS])


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return mask_text(str(value))


async def _run_one(check: ReadinessCheck, timeout: float) -> CheckResult:  # noqa: ASYNC109
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            detail = await check()
    except TimeoutError:
        ok, detail = False, f"timeout after {timeout:g}s"
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ok, detail = False, _describe(exc)
    else:
        ok, detail = True, _jsonable(detail)
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    return {"ok": ok, "detail": detail, "latency_ms": latency_ms}


async def run_checks(
    checks: Mapping[str, ReadinessCheck],
    timeout: float = 1.0,  # noqa: ASYNC109 -- bounds each check separately, not the whole call
) -> tuple[bool, dict[str, CheckResult]]:
    """Run all ``checks`` concurrently, each bounded by ``timeout`` seconds.

    Returns ``(all_ok, {name: {"ok", "detail", "latency_ms"}})``. A check that raises or times
    out is reported with a short error string as its detail; it never raises here.
    No checks at all means ready.
    """
    names = list(checks)
    results = await asyncio.gather(*(_run_one(checks[name], timeout) for name in names))
    report = dict(zip(names, results, strict=True))
    return all(r["ok"] for r in results), report


class _Pool(Protocol):
    def acquire(self) -> Any: ...
    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    async def expire_connections(self) -> None: ...


class _Redis(Protocol):
    def ping(self) -> Any: ...


class _Bus(Protocol):
    async def check(self) -> str: ...


def postgres_check(pool: _Pool) -> ReadinessCheck:
    """Probe: ``SELECT 1`` on a pooled connection; detail is the pool's size and idle count."""

    async def select_one() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def check() -> object:
        try:
            await select_one()
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            # After a Postgres restart the pool still holds connections to the old server: the
            # probe would meet them one by one and flap. Drop them all and ask once more.
            await pool.expire_connections()
            await select_one()
        return {"pool_size": pool.get_size(), "pool_idle": pool.get_idle_size()}

    return check


def redis_check(client: _Redis) -> ReadinessCheck:
    """Probe: ``PING`` on a ``redis.asyncio`` client."""

    async def check() -> object:
        pong = await client.ping()
        if pong is not True and pong not in (b"PONG", "PONG"):
            raise RuntimeError(f"unexpected PING reply {pong!r}")
        return "PONG"

    return check


def bus_check(bus: _Bus) -> ReadinessCheck:
    """Probe: ``await bus.check()`` (connected to NATS and the JetStream stream exists)."""

    async def check() -> object:
        return await bus.check()

    return check
