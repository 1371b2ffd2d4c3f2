"""The sender: delivers stored replies to WhatsApp (or the local outbox), once each, in order.

Replies are rows of ``replies`` (store.py), written by the consumers in the same transaction as
``ReplyGenerated``. The sender drains them; it never runs inside a JetStream handler, so a
WhatsApp outage keeps replies *pending* in Postgres instead of holding or dead-lettering events.

- Order: only the oldest unsent reply of a contact is eligible; later ones wait behind it.
- Exactly once per part: ``sending`` is committed before the HTTP call and the result right
  after it (``MessageSent`` appended in that transaction). The outbox writes the message and
  ``MessageSent`` in one transaction: no window at all.
- The remaining window: a crash after WhatsApp accepted a part and before we recorded it. The
  Cloud API has no idempotency key, so on recovery a ``sending`` row is *not* resent: it is
  marked failed with ``SendFailed(reason="outcome_unknown")`` for an operator (a duplicate
  message is worse for a sales agent than a rare gap a human can close). See docs/llm-proxy.md.
- Errors: 131056/130429 back off exponentially and retry (up to ``whatsapp_max_attempts``);
  131047 and other 4xx: ``SendFailed``, never retried; 5xx and timeouts retried, counted by the
  breaker. Breaker open: replies stay pending and go out, in order, once it closes.
- Pacing: a token bucket per contact (WhatsApp's pair rate) and one for the business number.
- One sender per schema sends (a Postgres advisory lock); other replicas stand by.
- Tracing: each part is one CLIENT span ``whatsapp send`` (``orbion.stage = "send"``, the
  reply's ``orbion.correlation_id``), started in the trace context stored with the reply, so
  the send closes the message's trace (webhook -> conversation -> llm-proxy -> send). It covers
  the provider's HTTP call (the message's end-to-end latency ends when WhatsApp accepted it),
  or the outbox transaction, which is the send when there is no provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import asyncpg
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Span, SpanKind
from orbion_common.breakers import Breaker, BreakerOpen
from orbion_common.events import MessageSent, SendFailed, stable_event_id
from orbion_common.events.messaging import MessageSentPayload, SendFailedPayload
from orbion_common.eventstore import EventStore
from orbion_common.logging import mask_phone
from orbion_common.telemetry import extract_context, tracer
from prometheus_client import Counter, Gauge, Histogram

from . import store
from .domain import SendVerdict, backoff_seconds
from .settings import Settings
from .whatsapp import Provider, SendError

log = logging.getLogger(__name__)

SENT_PARTS = Counter(
    "orbion_llm_proxy_sent_total", "Message parts accepted by WhatsApp or the outbox", ["via"]
)
SEND_ERRORS = Counter("orbion_llm_proxy_send_errors_total", "Failed send attempts by verdict", ["verdict"])
SEND_FAILED = Counter("orbion_llm_proxy_send_failed_total", "Replies given up (SendFailed)", ["reason"])
SEND_SECONDS = Histogram(
    "orbion_llm_proxy_send_duration_seconds",
    "Time of one send call",
    ["via"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PENDING_REPLIES = Gauge("orbion_llm_proxy_pending_replies", "Replies waiting to be sent (last poll)")

_tracer = tracer("orbion.llm_proxy.sender")

#: Give up on a reply that could not be sent for this long: WhatsApp's 24-hour window is closed.
GIVE_UP_AFTER_SECONDS = 24 * 3600.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Pacer:
    """Token buckets: ``burst`` messages per contact, then one per ``interval``; ``rate``/s overall."""

    interval: float
    burst: int
    rate: float
    clock: Callable[[], float] = time.monotonic
    _contacts: dict[str, _Bucket] = field(default_factory=dict)
    _global: _Bucket | None = None

    def delay(self, phone: str) -> float:
        """Seconds to wait before sending to ``phone``; 0 takes a token now."""
        now = self.clock()
        bucket = self._contacts.get(phone)
        if bucket is None:
            bucket = self._contacts[phone] = _Bucket(float(self.burst), now)
        if self.interval > 0:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) / self.interval)
        else:
            bucket.tokens = float(self.burst)
        bucket.updated = now
        if bucket.tokens < 1:
            return (1 - bucket.tokens) * self.interval
        if self.rate > 0:
            g = self._global or _Bucket(max(self.rate, 1.0), now)
            g.tokens = min(max(self.rate, 1.0), g.tokens + (now - g.updated) * self.rate)
            g.updated = now
            self._global = g
            if g.tokens < 1:
                return (1 - g.tokens) / self.rate
            g.tokens -= 1
        bucket.tokens -= 1
        if len(self._contacts) > 50_000:  # forget idle contacts (their bucket is full again)
            horizon = now - self.interval * self.burst
            self._contacts = {p: b for p, b in self._contacts.items() if b.updated > horizon}
        return 0.0


class Sender:
    def __init__(
        self,
        pool: asyncpg.Pool,
        events: EventStore,
        settings: Settings,
        provider: Provider | None,
        breaker: Breaker,
        *,
        on_appended: Callable[[], None] = lambda: None,
        name: str = "sender",
    ) -> None:
        self.pool = pool
        self.events = events
        self.settings = settings
        self.provider = provider
        self.breaker = breaker
        self.on_appended = on_appended
        self.name = name
        self.via = provider.via if provider is not None else "outbox"
        self.pacer = Pacer(
            settings.whatsapp_pair_interval_seconds,
            settings.whatsapp_pair_burst,
            settings.whatsapp_rate_per_second,
        )
        self._active: dict[str, asyncio.Task[None]] = {}
        self._limit = asyncio.Semaphore(settings.sender_concurrency)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.leader = False

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    # -- leadership and the drain loop ---------------------------------------------------------

    async def run(self) -> None:
        lock_key = f"orbion-sender:{self.events.schema}:{self.name}"
        while not self._stopping.is_set():
            try:
                async with self.pool.acquire() as lock_conn:
                    if not await lock_conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock_key):
                        await self._sleep(1.0)
                        continue
                    self.leader = True
                    try:
                        await self.recover_in_doubt()
                        while not self._stopping.is_set():
                            await self.dispatch_due()
                            await self._sleep(self.settings.sender_poll_seconds)
                    finally:
                        self.leader = False
                        await self._finish_active()
                        await lock_conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("sender paused: %r", exc)
                await self._sleep(0.5)

    async def _finish_active(self) -> None:
        tasks = list(self._active.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def dispatch_due(self) -> int:
        """Start a drain task for each contact with a due reply; returns how many started."""
        async with self.pool.acquire() as conn:
            heads = await store.due_heads(conn, limit=1000)
        PENDING_REPLIES.set(len(heads))
        started = 0
        for head in heads:
            if head.phone in self._active:
                continue
            task = asyncio.create_task(self._drain_contact(head.phone), name=f"send:{head.phone[-4:]}")
            self._active[head.phone] = task
            task.add_done_callback(functools.partial(self._forget, head.phone))
            started += 1
        return started

    def _forget(self, phone: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(phone, None)

    async def drain(self) -> None:
        """Send everything due now and wait for it (tests, benchmarks, shutdown)."""
        await self.dispatch_due()
        await self._finish_active()

    async def _drain_contact(self, phone: str) -> None:
        async with self._limit:
            try:
                while not self._stopping.is_set():
                    async with self.pool.acquire() as conn:
                        head = await store.head_of(conn, phone)
                    if head is None or head.next_attempt_at.timestamp() > time.time() + 0.001:
                        return
                    if head.state == store.SENDING:
                        # Only this task sends to this contact: a "sending" head is an attempt
                        # that died with an unexpected error during the call. Not resent.
                        await self._settle_in_doubt(head)
                        continue
                    if not await self.send_reply(head):
                        return  # rescheduled: the poll loop comes back when it is due
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sending to %s failed unexpectedly", mask_phone(phone))

    # -- one reply -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _send_span(self, reply: store.ReplyRow, part_no: int, via: str) -> Iterator[Span]:
        """The span of one part's send, in the trace the reply was generated in (a new trace
        when the row has none)."""
        with _tracer.start_as_current_span(
            "whatsapp send",
            context=extract_context(reply.trace_context),
            kind=SpanKind.CLIENT,
            attributes={
                "orbion.stage": "send",
                "orbion.correlation_id": reply.correlation_id,
                "orbion.reply_key": reply.reply_key,
                "orbion.send.via": via,
                "orbion.send.part": part_no,
                "orbion.send.parts": len(reply.parts),
            },
        ) as span:
            yield span

    async def send_reply(self, reply: store.ReplyRow) -> bool:
        """Send the remaining parts of ``reply``; True when it is settled (sent or failed)."""
        for index in range(reply.parts_sent, len(reply.parts)):
            part_no = index + 1
            if self.provider is None:
                await self._write_outbox(reply, part_no)
                continue
            wait = self.pacer.delay(reply.phone)
            if wait > 0.5:  # a long pause: give the concurrency slot back and come back when due
                await self._reschedule(reply, wait, "paced", count=False)
                return False
            if wait > 0:
                await asyncio.sleep(wait)
            outcome = await self._send_part(reply, part_no)
            if outcome is not None:
                return outcome
        return True

    async def _write_outbox(self, reply: store.ReplyRow, part_no: int) -> None:
        provider_id = "outbox." + stable_event_id("outbox", reply.reply_key, str(part_no))
        # The write is the send: its statements are not traced one by one, so that the whole
        # span counts as the send stage (the monitor would give a plain llm-proxy SQL span to
        # the llm stage). MessageSent is appended in the span: the relay publishes it in this trace.
        with self._send_span(reply, part_no, "outbox"), suppress_instrumentation():
            async with self.pool.acquire() as conn, conn.transaction():
                await store.insert_outbox(
                    conn,
                    provider_message_id=provider_id,
                    reply_key=reply.reply_key,
                    part=part_no,
                    phone=reply.phone,
                    text=reply.parts[part_no - 1],
                    reply_to_message_id=reply.reply_to_message_id,
                )
                await self._record_sent(conn, reply, part_no, provider_id, "outbox")
        SENT_PARTS.labels("outbox").inc()
        self.on_appended()

    async def _send_part(self, reply: store.ReplyRow, part_no: int) -> bool | None:
        """One HTTP send; None when the part went out (continue), else settled/rescheduled."""
        assert self.provider is not None
        if self.breaker.retry_after() > 0:
            await self._reschedule(reply, self.breaker.retry_after(), "whatsapp breaker open", count=False)
            return False
        # Committed before the call: if we crash during it, recovery sees "sending" and does not resend.
        async with self.pool.acquire() as conn:
            await store.mark_sending(conn, reply.reply_key)
        text = reply.parts[part_no - 1]
        reply_to = reply.reply_to_message_id if part_no == 1 else ""
        started = time.perf_counter()
        try:
            with self._send_span(reply, part_no, self.via) as span:
                provider_id = await self.breaker.call(self.provider.send_text, reply.phone, text, reply_to)
        except BreakerOpen as exc:
            await self._reschedule(reply, max(exc.retry_after, 0.2), "whatsapp breaker open", count=False)
            return False
        except SendError as exc:
            return await self._on_send_error(reply, exc)
        except TimeoutError as exc:  # the breaker's call timeout: no answer, like a read timeout
            return await self._on_send_error(reply, SendError(str(exc), status=None, code=None))
        SEND_SECONDS.labels(self.via).observe(time.perf_counter() - started)
        # Recorded under the ended send span: the end-to-end latency stops when WhatsApp
        # accepted the part, and MessageSent (stored with this context) stays in the trace.
        with trace.use_span(span, end_on_exit=False):
            async with self.pool.acquire() as conn, conn.transaction():
                await self._record_sent(conn, reply, part_no, provider_id, self.via)
        SENT_PARTS.labels(self.via).inc()
        self.on_appended()
        return None

    async def _record_sent(
        self, conn: asyncpg.Connection, reply: store.ReplyRow, part_no: int, provider_id: str, via: str
    ) -> None:
        last = part_no == len(reply.parts)
        await store.record_part_sent(conn, reply.reply_key, provider_id, via, last=last)
        event = MessageSent(
            event_id=stable_event_id("MessageSent", reply.reply_key, str(part_no)),
            type="MessageSent",
            stream_id=reply.phone,
            correlation_id=reply.correlation_id,
            causation_id=reply.causation_id or None,
            payload=MessageSentPayload(
                reply_key=reply.reply_key,
                phone=reply.phone,
                provider_message_id=provider_id,
                text=reply.parts[part_no - 1],
                part=part_no,
                parts=len(reply.parts),
                via=via,
                reply_to_message_id=reply.reply_to_message_id,
            ),
        )
        await self.events.append(conn, reply.phone, [event])

    async def _on_send_error(self, reply: store.ReplyRow, exc: SendError) -> bool:
        SEND_ERRORS.labels(exc.verdict.value).inc()
        attempts = reply.attempts + 1
        age = time.time() - reply.created_at.timestamp()
        if exc.verdict in (SendVerdict.OUTSIDE_WINDOW, SendVerdict.TERMINAL):
            await self.fail(reply, exc.verdict.value, str(exc), code=exc.code, retryable=False)
            return True
        if exc.verdict is SendVerdict.RATE_LIMITED and attempts >= self.settings.whatsapp_max_attempts:
            await self.fail(reply, "rate_limited", str(exc), code=exc.code, retryable=True)
            return True
        if age > GIVE_UP_AFTER_SECONDS:
            await self.fail(reply, "expired", str(exc), code=exc.code, retryable=False)
            return True
        delay = backoff_seconds(
            attempts,
            base=self.settings.whatsapp_backoff_base_seconds,
            cap=self.settings.whatsapp_backoff_max_seconds,
        )
        log.info(
            "send to %s failed (%s), retry in %.1fs",
            mask_phone(reply.phone),
            exc.verdict.value,
            delay,
            extra={"reply_key": reply.reply_key, "code": exc.code, "status": exc.status},
        )
        await self._reschedule(reply, delay, str(exc), count=True)
        return False

    async def _reschedule(self, reply: store.ReplyRow, delay: float, error: str, *, count: bool) -> None:
        async with self.pool.acquire() as conn:
            await store.reschedule(conn, reply.reply_key, delay, error, count_attempt=count)

    async def fail(
        self, reply: store.ReplyRow, reason: str, detail: str, *, code: int | None, retryable: bool
    ) -> None:
        """Give up on ``reply``: state failed and ``SendFailed`` in one transaction."""
        event = SendFailed(
            event_id=stable_event_id("SendFailed", reply.reply_key),
            type="SendFailed",
            stream_id=reply.phone,
            correlation_id=reply.correlation_id,
            causation_id=reply.causation_id or None,
            payload=SendFailedPayload(
                reply_key=reply.reply_key, phone=reply.phone, reason=reason, code=code, retryable=retryable
            ),
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await store.mark_failed(conn, reply.reply_key, f"{reason}: {detail}")
            await self.events.append(conn, reply.phone, [event])
        SEND_FAILED.labels(reason).inc()
        log.warning(
            "gave up sending to %s: %s",
            mask_phone(reply.phone),
            reason,
            extra={"reply_key": reply.reply_key, "code": code},
        )
        self.on_appended()

    async def recover_in_doubt(self) -> int:
        """Replies a stopped process left in ``sending``: settle them without resending."""
        async with self.pool.acquire() as conn:
            rows = await store.in_doubt(conn)
        for row in rows:
            await self._settle_in_doubt(row)
        return len(rows)

    async def _settle_in_doubt(self, row: store.ReplyRow) -> None:
        await self.fail(
            row, "outcome_unknown",
            "stopped during the send call; not resent to avoid a duplicate",
            code=None, retryable=False,
        )  # fmt: skip
