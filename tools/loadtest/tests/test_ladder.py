"""Which step the ladder runs next: the climb, the confirmation of a break, the refinement."""

from __future__ import annotations

from typing import Any

import pytest

from orbion_loadtest import report
from orbion_loadtest.ladder import climb, refine_rate


class System:
    """A system under test that holds the SLO up to ``limit`` msg/s; ``hiccups`` lists the rates
    whose first run breaks anyway (a shared machine's bad second)."""

    def __init__(self, limit: float, hiccups: tuple[float, ...] = ()) -> None:
        self.limit = limit
        self.hiccups = list(hiccups)
        self.runs: list[float] = []

    async def run(self, rate: float, seed: int) -> dict[str, Any]:
        self.runs.append(rate)
        holds = rate <= self.limit
        if rate in self.hiccups:
            self.hiccups.remove(rate)
            holds = False
        return {
            "offered_rate": rate,
            "pipeline_ms": {"p50": 10.0, "p99": 50.0 if holds else 2000.0},
            "slo": {"holds": holds, "reasons": [] if holds else ["pipeline p99 2000 ms > 1000 ms"]},
        }


async def ladder(system: System, rates: list[float], **options: Any) -> list[dict[str, Any]]:
    return await climb(system.run, rates, pause=0, retry_pause=0, **options)


def test_the_refined_rate_is_the_rounded_middle_of_the_gap():
    assert refine_rate(250, 500) == 380  # 375 to two significant figures
    assert refine_rate(250, 380) == 320
    assert refine_rate(10, 50) == 30
    assert refine_rate(1, 2.5) == 1.8
    assert refine_rate(0.5, 1) == 0.75


def test_refinement_stops_once_the_gap_is_within_a_tenth_of_the_rate_that_held():
    assert refine_rate(320, 350) is None
    assert refine_rate(320, 360) == 340
    assert refine_rate(100, 100) is None
    assert refine_rate(0, 10) is None  # nothing held: nothing to refine from


async def test_the_climb_stops_at_the_first_break_and_runs_it_twice():
    system = System(limit=120)
    steps = await ladder(system, [10, 50, 100, 250, 500])
    assert system.runs == [10, 50, 100, 250, 250]
    assert [s["offered_rate"] for s in steps] == [10, 50, 100, 250]
    assert steps[-1]["first_attempt"]["reasons"] == ["pipeline p99 2000 ms > 1000 ms"]
    assert report.sustainable(steps)["offered_rate"] == 100


async def test_a_step_that_breaks_once_and_then_holds_counts_as_holding():
    system = System(limit=300, hiccups=(100,))
    steps = await ladder(system, [50, 100, 250, 500])
    assert system.runs == [50, 100, 100, 250, 500, 500]
    assert report.sustainable(steps)["offered_rate"] == 250


async def test_refinement_narrows_the_limit_between_the_last_hold_and_the_first_break():
    system = System(limit=330)
    steps = await ladder(system, [10, 100, 250, 500, 1000], refine=3)
    # 500 breaks (twice); then 380 breaks (twice), 320 holds, 350 breaks (twice)
    assert system.runs == [10, 100, 250, 500, 500, 380, 380, 320, 350, 350]
    assert report.sustainable(steps)["offered_rate"] == 320
    assert 1000 not in system.runs


async def test_refinement_ends_early_once_the_limit_is_found_to_a_tenth():
    system = System(limit=330)
    steps = await ladder(system, [250, 500], refine=10, confirm=False)
    assert system.runs == [250, 500, 380, 320, 350]  # then 320..350 is within a tenth of 320
    assert report.sustainable(steps)["offered_rate"] == 320


async def test_keep_going_runs_every_step_and_refines_below_the_first_break():
    system = System(limit=330)
    steps = await ladder(system, [250, 500, 1000], keep_going=True, confirm=False, refine=1)
    assert system.runs == [250, 500, 1000, 380]
    assert report.sustainable(steps)["offered_rate"] == 250


async def test_no_refinement_when_no_step_held_or_none_broke():
    nothing_holds = System(limit=1)
    assert [s["offered_rate"] for s in await ladder(nothing_holds, [10, 50], refine=3)] == [10]
    everything_holds = System(limit=10_000)
    await ladder(everything_holds, [10, 50], refine=3)
    assert everything_holds.runs == [10, 50]


@pytest.mark.parametrize("rates", [[10 / 60, 50 / 60], [2.0]])
async def test_the_plans_per_minute_steps_are_run_as_given(rates):
    system = System(limit=100)
    await ladder(system, rates, refine=2)
    assert system.runs == rates
