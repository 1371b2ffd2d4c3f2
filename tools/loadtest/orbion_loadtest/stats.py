"""The figures of a step: percentiles, and the accounting of replies against what was due.

Owns the judgement of a step from three sources, without any I/O:

- the planned messages (scenarios.py) with the role each one has;
- what the gateway answered for each webhook (status, ``throttled``, duplicate);
- what the WhatsApp fake received (recipient, reply-to context id, receipt time, text) and,
  when replies carry the instrumented fake OpenAI's ``[llm:N]`` marker, that call's duration.

Rules (the reasons are in docs/performance.md):

- A message's effective role: its planned role, made ``optional`` when the gateway flagged it
  ``throttled`` or when its contact was asked the human-verification question (a suspected
  bot gets no answers until it proves itself), and dropped when its webhook was not accepted
  (then it is an error, not a loss).
- Lost: a ``due`` message with no reply to it nor to a later turn of the same contact (a slow
  system may fold consecutive turns into one burst, answered once, after the last message).
- Duplicate: a second send with the same reply-to context id (our replies are far below
  WhatsApp's 4,096-character limit, so one reply is one send).
- Unwanted: a reply to a ``forbidden`` message (a stop word, or after it).
- End-to-end latency: from the replied-to message's scheduled send time to the fake's
  receipt of the first reply to it. Pipeline share: that minus the fake LLM's duration for
  the call whose marker the reply carries (when the reply came from the LLM, not the response
  cache) minus the configured quiet period.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .scenarios import Planned, Role

LLM_MARKER = re.compile(r"^\[llm:(\d+)\]")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks.

    Same definition as numpy's default (``linear``): rank ``(n - 1) * q / 100`` of the sorted
    values, interpolated. None for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: Sequence[float], *, scale: float = 1.0, digits: int = 2) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p95, p99, p99.9, max of ``values`` (times ``scale``)."""
    vals = [v * scale for v in values]

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "count": len(vals),
        "mean": r(sum(vals) / len(vals)) if vals else None,
        "min": r(min(vals)) if vals else None,
        "p50": r(percentile(vals, 50)),
        "p90": r(percentile(vals, 90)),
        "p95": r(percentile(vals, 95)),
        "p99": r(percentile(vals, 99)),
        "p999": r(percentile(vals, 99.9)),
        "max": r(max(vals)) if vals else None,
    }


def timeline(samples: Sequence[tuple[float, float]], start: float, bucket: float) -> list[dict[str, Any]]:
    """Pipeline latency per ``bucket`` seconds of scheduled time from ``start``: is a soak stable?"""
    buckets: dict[int, list[float]] = defaultdict(list)
    for at, value in samples:
        buckets[int((at - start) // bucket)].append(value)
    return [
        {
            "from_s": round(i * bucket, 1),
            "replies": len(vals),
            **{k: summary(vals, scale=1000)[k] for k in ("p50", "p99")},
        }
        for i, vals in sorted(buckets.items())
    ]


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median and interquartile range (p25-p75): how bench figures are printed."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


@dataclass(frozen=True)
class Outcome:
    """What the gateway answered for one planned webhook."""

    status: int | None  # None: no HTTP answer (connection error, timeout)
    ack_latency: float  # seconds from the scheduled time to the answer
    send_lag: float = 0.0  # seconds the generator itself was late sending it
    throttled: bool = False
    duplicate: bool = False
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Send:
    """One message the WhatsApp fake accepted."""

    to: str
    context_id: str
    text: str
    at: float  # epoch seconds at the fake


@dataclass
class Verdict:
    sent: int = 0
    accepted: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    duplicates_acked: int = 0
    due: int = 0
    covered: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    duplicate_sends: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    unwanted_replies: int = 0
    replies: int = 0
    replies_foreign: int = 0
    verification_questions: int = 0
    verified_contacts_normal: int = 0
    turns_merged: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    e2e: list[float] = field(default_factory=list)
    pipeline: list[float] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (scheduled epoch, pipeline s)
    llm: list[float] = field(default_factory=list)
    ack: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.sent if self.sent else 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "error_kinds": self.error_kinds,
            "throttled": self.throttled,
            "duplicate_webhooks_acked": self.duplicates_acked,
            "replies_due": self.due,
            "replies_covered": self.covered,
            "lost": self.lost,
            "lost_examples": self.lost_examples[:10],
            "duplicate_sends": self.duplicate_sends,
            "duplicate_examples": self.duplicate_examples[:10],
            "unwanted_replies": self.unwanted_replies,
            "replies": self.replies,
            "replies_from_earlier_steps": self.replies_foreign,
            "verification_questions": self.verification_questions,
            "normal_contacts_asked_to_verify": self.verified_contacts_normal,
            "turns_folded_into_a_later_reply": self.turns_merged,
            "reply_sources": self.sources,
            "ack_ms": summary(self.ack, scale=1000),
            "send_lag_ms": summary(self.lag, scale=1000),
            "e2e_ms": summary(self.e2e, scale=1000),
            "llm_ms": summary(self.llm, scale=1000),
            "pipeline_ms": summary(self.pipeline, scale=1000),
        }


def account(
    planned: Sequence[Planned],
    outcomes: Mapping[int, Outcome],
    sends: Iterable[Send],
    *,
    scheduled_epoch: Mapping[int, float],
    llm_seconds: Mapping[int, float] | None = None,
    quiet_period: float = 0.0,
) -> Verdict:
    """Judge one step. ``outcomes`` and ``scheduled_epoch`` are keyed by ``Planned.seq``;
    ``llm_seconds`` maps the fake OpenAI's call number to its duration."""
    llm_seconds = llm_seconds or {}
    v = Verdict()
    by_id: dict[str, Planned] = {}
    for p in planned:
        if p.role is not Role.DUPLICATE:
            by_id.setdefault(p.message_id, p)
    phones = {p.phone for p in planned}

    replies: dict[str, list[Send]] = defaultdict(list)
    verified: set[str] = set()
    for s in sorted(sends, key=lambda s: s.at):
        if not s.context_id:
            if s.to in phones:
                v.verification_questions += 1
                verified.add(s.to)
            continue
        if s.context_id not in by_id:
            v.replies_foreign += 1
            continue
        replies[s.context_id].append(s)

    # What the gateway said, and each message's effective role.
    role: dict[int, Role] = {}
    for p in planned:
        v.sent += 1
        out = outcomes.get(p.seq)
        if out is None or not out.accepted:
            v.errors += 1
            kind = "not sent" if out is None else (out.error or f"http {out.status}")
            v.error_kinds[kind] = v.error_kinds.get(kind, 0) + 1
            continue
        v.accepted += 1
        v.ack.append(out.ack_latency)
        v.lag.append(out.send_lag)
        if out.throttled:
            v.throttled += 1
        if out.duplicate:
            v.duplicates_acked += 1
        r = p.role
        if r is Role.DUE and (out.throttled or p.phone in verified):
            r = Role.OPTIONAL
        role[p.seq] = r
    v.verified_contacts_normal = len(
        {p.phone for p in planned if p.phone in verified and p.kind.value != "bot"}
    )

    # Latest replied turn per contact covers everything due up to it.
    replied_turns: dict[str, set[int]] = defaultdict(set)
    for ctx in replies:
        p = by_id[ctx]
        replied_turns[p.phone].add(p.turn)
    turns_due: dict[tuple[str, int], bool] = {}
    for p in planned:
        if role.get(p.seq) is Role.DUE:
            v.due += 1
            turns = replied_turns.get(p.phone, set())
            if turns and max(turns) >= p.turn:
                v.covered += 1
                turns_due[(p.phone, p.turn)] = True
            else:
                v.lost += 1
                v.lost_examples.append(f"{p.message_id} ({p.kind.value}, turn {p.turn}): {p.text!r}")
    v.turns_merged = sum(1 for (phone, turn) in turns_due if turn not in replied_turns.get(phone, set()))

    # Replies: duplicates, unwanted ones, latency and where the text came from.
    seen_calls: set[int] = set()
    for ctx, sends_ in sorted(replies.items(), key=lambda kv: kv[1][0].at):
        p = by_id[ctx]
        v.replies += len(sends_)
        if len(sends_) > 1:
            v.duplicate_sends += len(sends_) - 1
            v.duplicate_examples.append(f"{ctx}: {len(sends_)} sends")
        if role.get(p.seq) is Role.FORBIDDEN or p.role is Role.FORBIDDEN:
            v.unwanted_replies += 1
        first = sends_[0]
        start = scheduled_epoch.get(p.seq)
        if start is None:
            continue
        e2e = first.at - start
        v.e2e.append(e2e)
        marker = LLM_MARKER.match(first.text)
        llm = 0.0
        if marker is None:
            source = "other"  # fallback responder, or an LLM without our marker
        else:
            call = int(marker.group(1))
            if call in seen_calls or call not in llm_seconds:
                source = "cache"  # that call answered an earlier reply (of this step or before)
            else:
                seen_calls.add(call)
                source = "llm"
                llm = llm_seconds[call]
                v.llm.append(llm)
        v.sources[source] = v.sources.get(source, 0) + 1
        v.pipeline.append(max(0.0, e2e - llm - quiet_period))
        v.samples.append((start, v.pipeline[-1]))
    return v
