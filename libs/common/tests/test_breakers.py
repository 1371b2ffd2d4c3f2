"""Breaker behaviour: opening, fast-failing, one half-open trial, slow calls, exclusions."""

from __future__ import annotations

import asyncio

import pytest

from orbion_common.breakers import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerOpen, CallTimeout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    pass


class ClientMistake(Exception):
    pass


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("down")


def make(clock: Clock, **kw: object) -> tuple[Breaker, list[tuple[str, str, str]]]:
    changes: list[tuple[str, str, str]] = []
    b = Breaker(
        "test",
        fail_max=3,
        reset_timeout=30.0,
        call_timeout=0.2,
        clock=clock,
        on_change=lambda name, frm, to, reason: changes.append((name, frm, to)),
        **kw,  # type: ignore[arg-type]
    )
    return b, changes


async def test_opens_after_consecutive_failures_and_fast_fails_without_calling() -> None:
    clock = Clock()
    b, changes = make(clock)
    for _ in range(3):
        with pytest.raises(Boom):
            await b.call(fail)
    assert b.state == OPEN
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with pytest.raises(BreakerOpen) as err:
        await b.call(counted)
    assert calls == 0
    assert err.value.retry_after == pytest.approx(30.0)
    assert b.fast_fails == 1
    assert changes == [("test", CLOSED, OPEN)]


async def test_success_resets_consecutive_count() -> None:
    b, _ = make(Clock(), min_calls=100)
    for _ in range(5):
        with pytest.raises(Boom):
            await b.call(fail)
        if b.consecutive_failures == 2:
            assert await b.call(ok) == "ok"
    assert b.state == CLOSED


async def test_opens_on_failure_ratio_even_without_consecutive_run() -> None:
    b, _ = make(Clock(), window=10, min_calls=10, failure_ratio=0.5)
    for _ in range(5):
        await b.call(ok)
        with pytest.raises(Boom):
            await b.call(fail)
    assert b.state == OPEN


async def test_half_open_admits_one_trial_and_fast_fails_the_rest() -> None:
    clock = Clock()
    b, changes = make(clock)
    b.force_open()
    clock.now += 31
    gate = asyncio.Event()

    async def slow_ok() -> str:
        await gate.wait()
        return "ok"

    trial = asyncio.create_task(b.call(slow_ok))
    await asyncio.sleep(0)
    assert b.state == HALF_OPEN
    with pytest.raises(BreakerOpen):
        await b.call(ok)
    gate.set()
    assert await trial == "ok"
    assert b.state == CLOSED
    assert [c[1:] for c in changes] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


async def test_failed_trial_reopens_for_a_full_timeout() -> None:
    clock = Clock()
    b, _ = make(clock)
    b.force_open()
    clock.now += 31
    with pytest.raises(Boom):
        await b.call(fail)
    assert b.state == OPEN
    assert b.retry_after() == pytest.approx(30.0)


async def test_slow_call_is_cancelled_and_counts_as_failure() -> None:
    b, _ = make(Clock(), min_calls=100)

    async def hang() -> str:
        await asyncio.sleep(10)
        return "late"

    with pytest.raises(CallTimeout):
        await b.call(hang)
    assert b.consecutive_failures == 1
    assert "CallTimeout" in str(b.info()["last_error"])


async def test_excluded_errors_do_not_open_the_breaker() -> None:
    b, _ = make(Clock(), exclude=[ClientMistake])

    async def bad_request() -> str:
        raise ClientMistake("400")

    for _ in range(5):
        with pytest.raises(ClientMistake):
            await b.call(bad_request)
    assert b.state == CLOSED


async def test_info_is_json_friendly_state() -> None:
    b, _ = make(Clock())
    await b.call(ok)
    info = b.info()
    assert info["state"] == CLOSED
    assert info["last_success_s_ago"] == 0.0
