"""Open-loop arrival schedules: when each message of a step is due, computed before it starts.

The load generator never waits for an answer before sending the next message: every message
has a scheduled time fixed in advance, and latency is measured from that time, not from when
the request actually left. A slow system therefore cannot slow the generator down and hide
its own latency (no coordinated omission): a message delayed by a backlog in the generator
counts that delay too.

A schedule is a list of offsets in seconds from the start of the step, sorted, built from
segments of constant rate (a plain step, a soak, or the base / spike / base of a spike test).
Arrivals are evenly spaced by default (a fixed rate), or Poisson (exponential gaps) to model
independent contacts. Leaves what is sent at each arrival to scenarios.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """``rate`` messages per second for ``seconds``, labelled ``phase`` in reports."""

    rate: float
    seconds: float
    phase: str = "steady"


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the step
    phase: str


def arrivals(segments: list[Segment], *, poisson: bool = False, seed: int = 0) -> list[Arrival]:
    """The arrival offsets of consecutive ``segments``, sorted.

    Even spacing puts arrival ``i`` of a segment at ``start + i / rate``, so a segment of
    ``rate * seconds`` messages fills exactly its time; a fractional remainder is carried to
    the next segment rather than rounded away, so long schedules keep their average rate.
    Poisson spacing draws exponential gaps of mean ``1 / rate`` with a seeded generator.
    """
    rng = random.Random(seed)
    out: list[Arrival] = []
    start = 0.0
    for seg in segments:
        if seg.rate < 0 or seg.seconds < 0:
            raise ValueError(f"negative rate or duration in {seg}")
        end = start + seg.seconds
        if seg.rate > 0:
            if poisson:
                t = start + rng.expovariate(seg.rate)
                while t < end:
                    out.append(Arrival(t, seg.phase))
                    t += rng.expovariate(seg.rate)
            else:
                gap = 1.0 / seg.rate
                # first arrival at the segment start; the last strictly before its end
                count = math.ceil(seg.seconds * seg.rate - 1e-9)
                out.extend(Arrival(start + i * gap, seg.phase) for i in range(count))
        start = end
    return out


def constant(rate: float, seconds: float, *, phase: str = "steady") -> list[Segment]:
    """One step (or a soak): ``rate`` msg/s for ``seconds``."""
    return [Segment(rate, seconds, phase)]


def spike(
    base_rate: float,
    *,
    factor: float = 10.0,
    before: float = 30.0,
    spike_seconds: float = 30.0,
    after: float = 30.0,
) -> list[Segment]:
    """Base load, then ``factor`` times the base for ``spike_seconds``, then base load again."""
    return [
        Segment(base_rate, before, "before"),
        Segment(base_rate * factor, spike_seconds, "spike"),
        Segment(base_rate, after, "after"),
    ]


def duration(segments: list[Segment]) -> float:
    return sum(s.seconds for s in segments)


def ladder_rates(per_minute: list[float], per_second: list[float]) -> list[float]:
    """The ladder in msg/s: the plan's per-minute steps first, then the per-second steps, ascending."""
    rates = [r / 60.0 for r in per_minute] + list(per_second)
    return sorted(set(rates))
