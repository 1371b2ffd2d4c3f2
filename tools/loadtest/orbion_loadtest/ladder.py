"""The ladder's sequence of steps: climb until the SLO breaks, then narrow the limit down.

Shared by ``orbion loadtest ladder`` (cli.py) and ``orbion bench``'s whole-system row
(bench.py). Measuring a step is the caller's (``run``, usually ``Runner.run_step``); this
module only decides which rate comes next:

- the given steps in order, up to the first that breaks (all of them with ``keep_going``); a
  step that breaks is run a second time (a shared machine has hiccups) and breaks only if it
  breaks again;
- then up to ``refine`` more steps, each halving the gap between the highest rate that held
  and the lowest that broke above it (:func:`refine_rate`).
  Without them the published limit is only as fine as the ladder: 250 msg/s where the system
  holds 330 and breaks at 500.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import report

Step = dict[str, Any]
RunStep = Callable[[float, int], Awaitable[Step]]  # (rate, seed) -> the measured step


def refine_rate(held: float, broke: float, *, precision: float = 0.1) -> float | None:
    """The next rate between ``held`` and ``broke``: their midpoint, rounded to two significant
    figures for readable reports, or None once the gap is within ``precision`` of ``held`` (or
    rounding would land on either end)."""
    if held <= 0 or broke <= held or (broke - held) <= precision * held:
        return None
    middle = (held + broke) / 2
    unit = 10.0 ** (math.floor(math.log10(middle)) - 1)
    rate = round(middle / unit) * unit
    rate = float(f"{rate:.12g}")  # 0.1 * 35 is 3.5000000000000004
    return rate if held < rate < broke else None


def _held(step: Step) -> bool:
    return bool(step["slo"]["holds"])


async def _confirmed(run: RunStep, rate: float, seed: int, confirm: bool, retry_pause: float) -> Step:
    step = await run(rate, seed)
    if _held(step) or not confirm:
        return step
    first = step
    await asyncio.sleep(retry_pause)
    step = await run(rate, seed + 100)
    step["first_attempt"] = {"reasons": first["slo"]["reasons"], "pipeline_ms": first["pipeline_ms"]}
    return step


async def climb(
    run: RunStep,
    rates: Sequence[float],
    *,
    confirm: bool = True,
    keep_going: bool = False,
    refine: int = 0,
    seed: int = 0,
    on_step: Callable[[Step], None] = lambda step: None,
    pause: float = 2.0,
    retry_pause: float = 5.0,
) -> list[Step]:
    """Run the ladder's steps (see the module docstring); returns every step kept, in the order run."""
    steps: list[Step] = []

    async def one(rate: float, step_seed: int) -> Step:
        if steps:
            await asyncio.sleep(pause)
        step = await _confirmed(run, rate, step_seed, confirm, retry_pause)
        steps.append(step)
        on_step(step)
        return step

    for index, rate in enumerate(rates):
        if not _held(await one(rate, seed + index)) and not keep_going:
            break
    for extra in range(refine):
        best = report.sustainable(steps)
        if best is None:
            break
        above = [
            s["offered_rate"] for s in steps if not _held(s) and s["offered_rate"] > best["offered_rate"]
        ]
        if not above:
            break
        between = refine_rate(best["offered_rate"], min(above))
        if between is None:
            break
        await one(between, seed + len(rates) + extra)
    return steps
