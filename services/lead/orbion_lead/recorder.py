"""Records lead decisions: the one transaction every change goes through, then cache and relay.

``record`` = claim the input (if any) + lock and load the lead + decide (``domain``) + append
the events after the lead's version + update the projection and the verification timer, all
in one transaction; after the commit: write the lead through to the cache, then hand the new
events to the relay (which publishes them: handlers never publish), so that whoever gets one
and reads the lead finds it. A crash before the commit leaves nothing; a crash after it is a
redelivery that the claim absorbs. ``record`` returns only after the commit, so the bus acks
only then.

Group commit: the bus hands over up to a batch of events at once, different contacts
concurrently. Concurrent ``record`` calls are gathered (one per contact at a time, in
arrival order) into one transaction of a few statements, whatever the batch size, instead of
a few per event. If a batch fails (a lost race on a new lead, a decision that raised, a
Postgres error), each of its items is retried alone, so one bad event only fails itself.

Flush policy: a transaction starts at once when the recorder was idle for ``commit_interval``,
else ``commit_interval`` after the previous one started (at once, too, with ``max_batch``
waiting). Each transaction, its relay round and its cache write cost about as much as
handling a dozen events, and a busy consumer would otherwise commit a handful of events at a
time; waiting makes the groups (and the bus's next fetch) larger, so the transactions per
second stay at most 1/``commit_interval`` whatever the rate. A lone event after a quiet
spell waits for nothing.

Each input keeps its trace: its events are stored with the trace context of its own ``record``
call (its consumer span), so the relay publishes them in that trace. The group's shared
statements run in the context of the group's first input (traced, or not, with that input).

Also owns the verification timers: due timers are claimed with ``FOR UPDATE SKIP LOCKED`` so
each fires once across replicas, and survive restarts (a row, not a sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from opentelemetry import context as otel_context
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis

from orbion_common.cache import VersionedCache
from orbion_common.events import Envelope
from orbion_common.eventstore import ConcurrencyError, trace_context
from orbion_common.logging import mask_phone
from orbion_common.telemetry import background_task

from . import domain
from .domain import Lead
from .store import Change, LeadStore

log = logging.getLogger(__name__)

LEAD_EVENTS = Counter("orbion_lead_events_total", "Lead events appended, by type", ["type"])
TIMERS_FIRED = Counter(
    "orbion_lead_verification_timeouts_total", "Verification deadlines that blocked a contact"
)
BATCH_SIZE = Histogram(
    "orbion_lead_commit_batch_size",
    "Inputs recorded per transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_RETRIES = Counter("orbion_lead_batch_retries_total", "Batches retried item by item after a failure")

Decide = Callable[[Lead], list[Envelope]]
# Called after each commit with the events it stored, in order, and each one's trace context.
OnCommit = Callable[[Sequence[Envelope], Sequence[str | None]], None]

# A lost race on a new lead (two writers creating version 1) is decided again; more than a
# few losses in a row means something else is wrong, and the error surfaces.
MAX_ATTEMPTS = 3
# At most 10 transactions a second: the lead's events are not on the reply's path, so 100 ms
# more on them under load is worth several times fewer transactions (see the module docstring;
# at 150 msg/s the lead used 15% less CPU than with 20 ms, and the replies were as fast).
COMMIT_INTERVAL_SECONDS = 0.1


@dataclass(frozen=True)
class Recorded:
    lead: Lead
    events: Sequence[Envelope] = ()
    state: bytes = b""  # the lead's JSON when events were appended
    trace: str | None = None  # the trace context its events were stored with


@dataclass(eq=False)
class _HandOver:
    """A commit's new events, for the relay once their leads are in the cache."""

    events: list[Envelope]
    traces: list[str | None]
    cached: bool = False


@dataclass(eq=False)
class _Work:
    phone: str
    decide: Decide
    claim: tuple[str, str] | None
    done: asyncio.Future[Recorded | None] = field(repr=False)
    # The caller's trace context: the flusher task runs in whichever caller's context started it.
    context: otel_context.Context = field(default_factory=otel_context.get_current, repr=False)


def lead_cache(redis: Redis | None, *, prefix: str, ttl_seconds: float) -> VersionedCache[bytes]:
    """The write-through lead cache (``redis=None``: off, every read goes to Postgres).

    It holds the lead's JSON as the projection stores it: serialised once per change, and a
    cold read copies the Postgres row to Redis without parsing it.
    """
    return VersionedCache(redis, "lead", prefix=prefix, dumps=_same, loads=_same, ttl_seconds=ttl_seconds)


def _same(data: bytes) -> bytes:
    return data


class LeadRecorder:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: LeadStore,
        cache: VersionedCache[bytes] | None = None,
        *,
        on_commit: OnCommit | None = None,
        max_batch: int = 256,
        commit_interval: float = COMMIT_INTERVAL_SECONDS,
        # About 3.6 kB a lead: 4,000 hold the contacts active in the last half minute at 250
        # msg/s in 15 MB (10,000 took the service past 150 MB of RSS under load).
        parsed_cache_size: int = 4_000,
    ) -> None:
        self.pool = pool
        self.store = store
        self.cache = cache
        self.on_commit = on_commit  # hands the events to the relay
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self._last_start = -commit_interval  # idle so far: the first record starts at once
        self._pending: list[_Work] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._writes: set[asyncio.Task[None]] = set()
        self._hand_overs: deque[_HandOver] = deque()  # committed, not handed over yet, in commit order
        # Leads parsed lately, by phone: reused when the locked row is still at their version
        # (checked in the transaction), which saves shipping and parsing the state each time.
        self._parsed: OrderedDict[str, Lead] = OrderedDict()
        self._parsed_max = parsed_cache_size

    async def record(
        self, phone: str, decide: Decide, *, claim: tuple[str, str] | None = None
    ) -> Recorded | None:
        """Decide and store in one transaction; None when ``claim`` (consumer, event id) was seen before."""
        work = _Work(phone, decide, claim, asyncio.get_running_loop().create_future())
        self._pending.append(work)
        if self._flusher is None or self._flusher.done():
            self._flusher = background_task(self._flush_forever(), name="lead-recorder")
        self._wake.set()
        return await work.done

    async def close(self) -> None:
        """Finish what is pending, then stop the flusher (callers stopped submitting first)."""
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other handlers of the same bus batch join
            while self._pending:
                await self._pace()
                batch = self._take_batch()
                try:
                    await self._run(batch)
                except Exception as exc:  # a bug here must not leave callers waiting for ever
                    log.exception("lead recorder failed on a batch of %d", len(batch))
                    for work in batch:
                        if not work.done.done():
                            work.done.set_exception(exc)
            if self._closing:
                return

    async def _pace(self) -> None:
        """Wait until ``commit_interval`` after the previous transaction started (see the docstring)."""
        loop = asyncio.get_running_loop()
        wait = self._last_start + self.commit_interval - loop.time()
        if wait > 0 and len(self._pending) < self.max_batch and not self._closing:
            await asyncio.sleep(wait)
        self._last_start = loop.time()

    def _take_batch(self) -> list[_Work]:
        """Oldest first, one item per contact (a contact's inputs stay in order), at most max_batch."""
        batch: list[_Work] = []
        rest: list[_Work] = []
        phones: set[str] = set()
        for work in self._pending:
            if work.phone in phones or len(batch) >= self.max_batch:
                rest.append(work)
            else:
                phones.add(work.phone)
                batch.append(work)
        self._pending = rest
        return batch

    async def _run(self, batch: list[_Work]) -> None:
        BATCH_SIZE.observe(len(batch))
        try:
            results, hand_over = await self._transact(batch)
        except Exception as exc:
            if len(batch) > 1 or isinstance(exc, ConcurrencyError):
                if len(batch) > 1:
                    BATCH_RETRIES.inc()
                    log.info("lead batch of %d failed (%r); recording each alone", len(batch), exc)
                for work in batch:
                    await self._run_alone(work)
            elif not batch[0].done.done():
                batch[0].done.set_exception(exc)
            return
        self._resolve_after_cache(batch, results, hand_over)

    async def _run_alone(self, work: _Work) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                results, hand_over = await self._transact([work])
            except ConcurrencyError as exc:
                if attempt < MAX_ATTEMPTS:
                    log.info("lead %s moved on while deciding; deciding again", mask_phone(work.phone))
                    continue
                error: Exception = exc
            except Exception as exc:
                error = exc
            else:
                self._resolve_after_cache([work], results, hand_over)
                return
            if not work.done.done():
                work.done.set_exception(error)
            return

    async def _transact(self, batch: list[_Work]) -> tuple[list[Recorded | None], _HandOver]:
        token = otel_context.attach(batch[0].context)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                results = await self._apply(conn, batch)
        finally:
            otel_context.detach(token)
        return results, self._committed([r for r in results if r is not None])

    def _resolve_after_cache(
        self, batch: list[_Work], results: list[Recorded | None], hand_over: _HandOver
    ) -> None:
        """Write the new leads to the cache, hand their events to the relay, then answer the
        callers; the flusher moves on meanwhile.

        Callers (and so the bus's ack) still wait for their lead to be cached, so a read after
        ``record`` returns sees it; the versioned cache keeps out-of-order writes harmless.
        """

        async def write_then_resolve() -> None:
            try:
                await self._cache_then_hand_over([r for r in results if r is not None], hand_over)
            finally:
                for work, result in zip(batch, results, strict=True):
                    if not work.done.done():
                        work.done.set_result(result)

        task = asyncio.create_task(write_then_resolve())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _apply(
        self, conn: asyncpg.Connection, batch: Sequence[_Work], *, only_existing_unlocked: bool = False
    ) -> list[Recorded | None]:
        """Inside the caller's transaction: claim, lock, decide, append, project, timers.

        ``only_existing_unlocked``: decide only for leads that exist and that no other
        transaction holds (the others get None): for the timers, which can wait a round.
        """
        fresh = await self.store.claim_many(conn, [w.claim for w in batch if w.claim is not None])
        todo = [w for w in batch if w.claim is None or w.claim in fresh]
        befores = await self.store.lock_leads(
            conn, [w.phone for w in todo], self._parsed, skip_locked=only_existing_unlocked
        )
        if only_existing_unlocked:
            todo = [w for w in todo if w.phone in befores]
        results: dict[int, Recorded] = {}
        changes: list[Change] = []
        timers: list[tuple[Lead, Lead]] = []
        for work in todo:
            before = befores.get(work.phone) or Lead(phone=work.phone)
            events = work.decide(before)
            after = getattr(events, "lead", None)  # domain.Decision carries it: no second fold
            if after is None:
                after = before
                for event in events:
                    after = domain.evolve(after, event)
            if events:
                state = after.model_dump_json().encode()
                trace = trace_context(work.context)
                changes.append(Change(after, state, events, trace))
                timers.append((before, after))
                results[id(work)] = Recorded(after, events, state, trace)
            else:
                results[id(work)] = Recorded(after)
        await self.store.append_and_project(conn, changes)
        for before, after in timers:
            await self._update_timer(conn, before, after)
        return [results.get(id(w)) for w in batch]

    def _remember(self, lead: Lead) -> None:
        self._parsed[lead.phone] = lead
        self._parsed.move_to_end(lead.phone)
        if len(self._parsed) > self._parsed_max:
            self._parsed.popitem(last=False)

    async def _update_timer(self, conn: asyncpg.Connection, before: Lead, after: Lead) -> None:
        v = after.verification
        if v.pending and v.expires_at is not None and v != before.verification:
            await self.store.set_timer(conn, after.phone, v.expires_at)
        elif before.verification.pending and not v.pending:
            await self.store.clear_timer(conn, after.phone)

    def _committed(self, results: Sequence[Recorded]) -> _HandOver:
        """Right after a commit: its leads may be trusted now, and its events queue for the relay."""
        changed = [r for r in results if r.events]
        for result in changed:
            self._remember(result.lead)  # committed: only now may a later transaction trust it
            for event in result.events:
                LEAD_EVENTS.labels(event.type).inc()
        hand_over = _HandOver(
            [e for r in changed for e in r.events], [r.trace for r in changed for _ in r.events]
        )
        self._hand_overs.append(hand_over)
        return hand_over

    async def _cache_then_hand_over(self, results: Sequence[Recorded], hand_over: _HandOver) -> None:
        """The leads to the cache first, then their events to the relay: whoever gets an event
        and reads the lead (the API reads the cache) finds the version the event came from, or
        a newer one. The cache writes of successive commits overlap; the hand-overs keep the
        commit order, a contact's stream order, each waiting for those committed before it. A
        failed cache write still hands over: the relay's read would publish them anyway."""
        try:
            await self._write_through(results)
        finally:
            hand_over.cached = True
            while self._hand_overs and self._hand_overs[0].cached:
                ready = self._hand_overs.popleft()
                if ready.events and self.on_commit is not None:
                    self.on_commit(ready.events, ready.traces)

    async def _write_through(self, results: Sequence[Recorded]) -> None:
        cache = self.cache
        changed = [r for r in results if r.events]
        if cache is None or not changed:
            return
        await cache.put_many([(r.lead.phone, r.lead.version, r.state) for r in changed])

    # --- reads ----------------------------------------------------------------------------

    async def get(self, phone: str) -> Lead | None:
        """The lead from the cache, else from Postgres (and cached); None when it does not exist."""

        async def load() -> tuple[int, bytes] | None:
            async with self.pool.acquire() as conn:
                return await self.store.load_lead_json(conn, phone)

        if self.cache is None:
            loaded = await load()
            state = loaded[1] if loaded else None
        else:
            state = await self.cache.get(phone, load)
        return Lead.model_validate_json(state) if state is not None else None

    # --- verification timers --------------------------------------------------------------

    async def fire_due_timers(self, now: datetime | None = None, *, limit: int = 100) -> int:
        """Block the contacts whose verification deadline passed; returns how many timers it handled."""
        now = now or datetime.now(UTC)
        loop = asyncio.get_running_loop()
        async with self.pool.acquire() as conn, conn.transaction():
            phones = await self.store.claim_due_timers(conn, now, limit)
            work = [
                _Work(p, lambda lead: domain.on_verification_timeout(lead, now), None, loop.create_future())
                for p in phones
            ]
            results = await self._apply(conn, work, only_existing_unlocked=True)
            for phone, result in zip(phones, results, strict=True):
                if result is not None:
                    # Whatever the lead says (passed meanwhile, already blocked), this timer is done.
                    await self.store.clear_timer(conn, phone)
        done = [r for r in results if r is not None]
        await self._cache_then_hand_over(done, self._committed(done))
        TIMERS_FIRED.inc(sum(1 for r in done if r.events))
        return len(done)

    async def run_timers(self, stop: asyncio.Event, *, poll_seconds: float) -> None:
        """Fire due timers until ``stop`` is set; a Postgres outage pauses, never ends, the loop."""
        while not stop.is_set():
            try:
                fired = await self.fire_due_timers()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ConcurrencyError) as exc:
                log.warning("verification timers paused: %r", exc)
                fired = 0
            if fired:
                continue  # there may be more due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_seconds)
