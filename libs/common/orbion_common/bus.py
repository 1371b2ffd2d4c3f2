"""The event bus: NATS JetStream publishing and durable pull consumers.

Owns the delivery policy every service shares, stated here once:

- ``publish`` waits for JetStream's ack; ``Nats-Msg-Id`` (the event id unless told otherwise)
  lets JetStream drop duplicates inside its window; W3C trace context rides in the headers.
  Subjects: ``<root>.events.<Type>.<partition>`` and ``<root>.dlq.<durable>``, where ``root`` is
  the stream name lowercased (``orbion`` by default).
- A consumer acks a message only after its handler returned. ``ack_wait`` is short, so that a
  crashed consumer's messages are redelivered within seconds; while a batch is in hand the bus
  sends "in progress" so that slow handlers are not redelivered under their own feet.
  A handler that raises gets the message nakked with a growing delay (``ConsumerSpec.nak_delays``);
  on the last allowed delivery the message is republished to ``<root>.dlq.<durable>`` with the
  error, then termed. An outage (a dependency unreachable: :func:`is_outage`) never counts: the
  message waits, nakked, for as long as the outage lasts.
  Bytes that are not an event are dead-lettered at once: retrying cannot fix them.
- A consumer keeps pull requests open on the server (:class:`~orbion_common.pull.ContinuousPull`)
  and takes the messages that arrived as a batch, never more than twice ``batch_size`` in hand.
- Within a batch, events of one ``stream_id`` run one after the other, in order; other
  streams run concurrently. If one fails, the later events of its stream in that batch (and in
  the next batch, if in hand) are nakked too, with at least its delay, so that it comes back
  first and order is kept on redelivery.
- After a NATS restart (or a stream/consumer lost with it) the consumer re-provisions the
  stream and its durable and binds again: nats-py resubscribes the inbox on reconnect, but
  pull requests to a consumer that no longer exists go unanswered for ever.

Handlers own idempotency (see ``eventstore.EventStore.claim``); the bus only promises
at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .events import EncodedEvent, Envelope, Event, UndecodableEvent, decode, encode
from .pull import ContinuousPull
from .settings import CommonSettings

log = logging.getLogger(__name__)
tracer = trace.get_tracer("orbion.bus")

PARTITIONS = 16

PUBLISHED = Counter("orbion_bus_published_total", "Events published to JetStream", ["type"])
DUPLICATES = Counter("orbion_bus_duplicates_total", "Publishes JetStream dropped as duplicates", ["type"])
HANDLED = Counter(
    "orbion_bus_handled_total", "Messages handled by consumers, by outcome", ["consumer", "outcome"]
)
DEAD_LETTERS = Counter(
    "orbion_bus_dead_letters_total", "Messages sent to a dead-letter subject", ["consumer"]
)
HANDLER_SECONDS = Histogram(
    "orbion_bus_handler_duration_seconds",
    "Time spent in a consumer's handler",
    ["consumer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PUBLISH_SECONDS = Histogram(
    "orbion_bus_publish_duration_seconds",
    "Time from publish to JetStream ack",
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


class BusUnavailable(RuntimeError):
    """NATS or JetStream did not acknowledge in time; nothing can be promised about the publish."""


_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, ...
    TimeoutError,
    BusUnavailable,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # "cannot switch to state ...": the session was killed under it
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    RedisConnectionError,
    RedisTimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says a dependency is unreachable rather than that the message is bad.

    An outage is waited out (nakked with the longest delay, for as long as it lasts): dead-lettering
    a good message because Postgres restarted would lose it. Only other errors count towards
    ``max_deliver``.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _OUTAGES):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def partition_of(stream_id: str) -> int:
    return zlib.crc32(stream_id.encode()) % PARTITIONS


def subject_root(stream_name: str) -> str:
    """Subjects are rooted at the stream's name, lowercased (``ORBION`` -> ``orbion``), so that
    two systems (a test's, a benchmark's) can share one NATS server without overlapping."""
    return stream_name.lower()


def subject_for(event: Envelope | EncodedEvent, root: str = "orbion") -> str:
    """``<root>.events.<Type>.<partition>``: the partition token lets consumers split by contact."""
    return f"{root}.events.{event.type}.{partition_of(event.stream_id)}"


def dlq_subject(durable: str, root: str = "orbion") -> str:
    return f"{root}.dlq.{durable}"


@functools.cache
def _published(event_type: str, fresh: bool) -> Any:  # labels() per publish costs a lock and a dict
    return (PUBLISHED if fresh else DUPLICATES).labels(event_type)


def _producer_span(event: Envelope | EncodedEvent, context: otel_context.Context | None) -> Span | None:
    """The PRODUCER span of a publish, or None when its parent's trace is not sampled.

    The parent-based sampler (``telemetry.setup_telemetry``) would make a non-recording span
    there anyway, after running itself and drawing ids (a few µs per event, for nothing): the
    parent's context, injected as it is, carries the same trace id and "not sampled" decision
    to the consumers. A root publish (no valid parent) always asks the sampler.
    """
    return _span_if_sampled(
        f"publish {event.type}", context, SpanKind.PRODUCER, {"messaging.system": "nats"}, event
    )


def _not_sampled(carrier: dict[str, str]) -> bool:
    """Whether a stored trace context names a valid parent whose trace is not sampled: W3C
    ``traceparent`` is ``00-<trace id>-<span id>-<flags>``, and bit 0 of the flags is "sampled"."""
    parts = carrier.get("traceparent", "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return False
    try:
        return int(parts[1], 16) != 0 and int(parts[2], 16) != 0 and not int(parts[3], 16) & 1
    except ValueError:
        return False


def _span_if_sampled(
    name: str,
    context: otel_context.Context | None,
    kind: SpanKind,
    attributes: dict[str, str],
    event: Envelope | EncodedEvent,
) -> Span | None:
    parent = trace.get_current_span(context).get_span_context()
    if parent.is_valid and not parent.trace_flags.sampled:
        return None
    attributes.update({"orbion.event_type": event.type, "orbion.correlation_id": event.correlation_id})
    return tracer.start_span(name, context=context, kind=kind, attributes=attributes)


@functools.cache
def _handled(consumer: str, outcome: str) -> Any:
    return HANDLED.labels(consumer, outcome)


@functools.cache
def _handler_seconds(consumer: str) -> Any:
    return HANDLER_SECONDS.labels(consumer)


def _consumer_span(spec: ConsumerSpec, event: Event, parent: otel_context.Context) -> Span | None:
    """The CONSUMER span of a delivery, or None when the publisher's trace is not sampled
    (the parent-based sampler would only make a non-recording span there; see _producer_span)."""
    return _span_if_sampled(
        f"process {event.type}", parent, SpanKind.CONSUMER, {"messaging.consumer": spec.durable}, event
    )


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and its delivery policy."""

    durable: str
    event_types: tuple[str, ...]
    max_deliver: int = 5
    ack_wait_seconds: float = 10.0
    nak_delays: tuple[float, ...] = (0.2, 1.0, 5.0, 15.0)
    batch_size: int = 64
    deliver_new_only: bool = False
    pull_expires_seconds: float = 5.0

    @property
    def max_in_flight(self) -> int:
        """Messages in hand and asked for at once: two batches, one arriving while one is handled."""
        return 2 * self.batch_size

    def nak_delay(self, num_delivered: int) -> float:
        index = min(num_delivered - 1, len(self.nak_delays) - 1)
        return self.nak_delays[max(index, 0)]

    def consumer_config(self, root: str = "orbion", *, multi_filter: bool = True) -> ConsumerConfig:
        """The durable's config; without ``multi_filter`` (NATS before 2.10) it takes every event
        type of the stream, and the bus drops the foreign ones before the handler sees them."""
        subjects = [f"{root}.events.{t}.*" for t in self.event_types]
        if len(subjects) == 1:
            filters: dict[str, Any] = {"filter_subject": subjects[0]}
        elif multi_filter:
            filters = {"filter_subjects": subjects}
        else:
            filters = {"filter_subject": f"{root}.events.>"}
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW if self.deliver_new_only else DeliverPolicy.ALL,
            # Unlimited on the server: our own rule decides dead-lettering (see is_outage), so a
            # message is never left undelivered and unacked because a database was down.
            max_deliver=-1,
            ack_wait=self.ack_wait_seconds,
            max_ack_pending=max(self.batch_size * 4, 256),
            **filters,
        )


@dataclass
class Delivery:
    """What a handler may know about the message it handles, beyond the event."""

    num_delivered: int
    subject: str
    headers: dict[str, str]
    _msg: Msg = field(repr=False)

    async def in_progress(self) -> None:
        """Tell JetStream the handler is still working, resetting the ack deadline."""
        await self._msg.in_progress()


Handler = Callable[[Event, Delivery], Awaitable[None]]


# What a stream's handling task returns: None when every event was acked, else for how long
# the first event that failed is away (its nak delay), which its later events wait out too.
Away = float | None


async def _away(task: asyncio.Task[Away], spec: ConsumerSpec) -> Away:
    """Wait for ``task`` (not cancelling it if the waiter is) and return what it returned."""
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None:
        return spec.ack_wait_seconds  # neither acked nor nakked: back after ack_wait
    return task.result()


class _InHand:
    """The messages a consumer has taken and not yet acked or nakked.

    At most ``limit`` at once, so that pulling never runs ahead of the handlers by more than
    that; and, per stream, the task handling its latest events (``chain``), which the stream's
    next events wait for. While they are in hand, :meth:`keep_in_progress` tells the server so.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._tails: dict[str, asyncio.Task[Away]] = {}
        self._held: dict[asyncio.Task[Away], tuple[float, list[Msg]]] = {}  # with when taken
        self._freed = asyncio.Event()

    async def room(self) -> int:
        """How many more messages may be taken, once there is room for at least one."""
        while self.count >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        return self.limit - self.count

    def chain(
        self,
        stream_id: str,
        msgs: list[Msg],
        handle: Callable[[asyncio.Task[Away] | None], Coroutine[Any, Any, Away]],
    ) -> None:
        """Run ``handle(after)`` for ``msgs`` of ``stream_id``, where ``after`` is the task of the
        stream's events taken before, if it still runs."""
        task = asyncio.create_task(handle(self._tails.get(stream_id)))
        self._tails[stream_id] = task
        self._held[task] = (asyncio.get_running_loop().time(), msgs)
        self.count += len(msgs)

        def done(finished: asyncio.Task[Away]) -> None:
            del self._held[finished]
            self.count -= len(msgs)
            if self._tails.get(stream_id) is finished:
                del self._tails[stream_id]
            self._freed.set()
            if not finished.cancelled() and finished.exception() is not None:
                # Its messages are neither acked nor nakked: JetStream redelivers them after ack_wait.
                log.warning("consumer task for %s failed: %r", stream_id, finished.exception())

        task.add_done_callback(done)

    async def keep_in_progress(self, every: float) -> None:
        """Every ``every`` seconds, "in progress" for each message in hand for longer than that.

        A short ack_wait makes a crashed consumer's messages come back soon; while this process
        is alive and busy with them, it tells the server they are still in hand. One task per
        consumer, not one per batch: at low rates a batch is a message or two."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            since = loop.time() - every
            for taken_at, msgs in list(self._held.values()):
                if taken_at <= since:
                    for msg in msgs:
                        if not msg.is_acked:
                            with contextlib.suppress(Exception):
                                await msg.in_progress()

    async def finish(self) -> None:
        while self._held:
            await asyncio.gather(*self._held, return_exceptions=True)

    def cancel(self) -> None:
        for task in self._held:
            task.cancel()


class Bus:
    """A connection to NATS with the ORBION streams provisioned."""

    def __init__(self, nc: NatsClient, settings: CommonSettings, name: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5.0)
        self.settings = settings
        self.name = name
        self.root = subject_root(settings.stream_name)
        self.publish_timeout = 5.0
        self._consumers: list[asyncio.Task[None]] = []
        self._pulls: set[ContinuousPull] = set()
        self._stopping = asyncio.Event()

    @classmethod
    async def connect(cls, settings: CommonSettings, *, name: str) -> Bus:
        """Connect (reconnecting for ever after a loss) and provision the streams."""

        bus: Bus | None = None

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", exc)

        async def on_disconnect() -> None:
            if bus is not None and bus._stopping.is_set():
                log.info("nats connection closed")  # our own drain on stop, not an outage
            else:
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected")
            if bus is not None:
                for pull in bus._pulls:
                    pull.reconnected()

        nc = await nats.connect(
            settings.nats_url,
            name=f"orbion-{name}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        bus = cls(nc, settings, name)
        await bus.provision()
        return bus

    async def provision(self) -> None:
        """Create or update the event stream and the dead-letter stream (idempotent)."""
        s = self.settings
        await self._ensure_stream(
            StreamConfig(
                name=s.stream_name,
                subjects=[f"{self.root}.events.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                max_age=s.stream_max_age_days * 86400.0,
                duplicate_window=float(s.duplicate_window_seconds),
                num_replicas=s.stream_replicas,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=f"{s.stream_name}_DLQ",
                subjects=[f"{self.root}.dlq.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * 86400.0,
                num_replicas=s.stream_replicas,
            )
        )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.js.add_stream(config)
                return
        await self.js.update_stream(config)

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        event: Envelope | EncodedEvent,
        *,
        msg_id: str | None = None,
        parent: dict[str, str] | None = None,
        ack_timeout: float | None = None,
    ) -> bool:
        """Publish and wait for JetStream's ack; False when it was a duplicate.

        ``parent`` is a trace context to publish in (the relay passes the one stored with the
        event); by default the current span is the parent. Raises :class:`BusUnavailable` when
        NATS is unreachable or does not ack within ``ack_timeout`` (default ``publish_timeout``).
        """
        if not self.nc.is_connected:
            raise BusUnavailable("not connected to NATS")
        headers = {"Nats-Msg-Id": msg_id or event.event_id, "Orbion-Type": event.type}
        span: Span | None = None
        if parent and _not_sampled(parent):
            # What extract + inject would write (no span under an unsampled parent), for less.
            headers.update(parent)
        else:
            context = propagate.extract(parent) if parent else None
            span = _producer_span(event, context)
            # The span is only injected, never made current: nothing runs inside it but the
            # publish, and attaching a context costs as much as the headers it fills.
            propagate.inject(headers, context=trace.set_span_in_context(span, context) if span else context)
        started = time.perf_counter()
        try:
            ack = await self.js.publish(
                subject_for(event, self.root),
                event.data if isinstance(event, EncodedEvent) else encode(event),
                timeout=self.publish_timeout if ack_timeout is None else ack_timeout,
                headers=headers,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            error = BusUnavailable(f"publish of {event.type} not acknowledged: {exc!r}")
            if span is not None:
                span.record_exception(error)
                span.set_status(StatusCode.ERROR, f"BusUnavailable: {error}")
            raise error from exc
        finally:
            PUBLISH_SECONDS.observe(time.perf_counter() - started)
            if span is not None:
                span.end()
        if ack.duplicate:
            _published(event.type, False).inc()
            return False
        _published(event.type, True).inc()
        return True

    async def publish_all(
        self,
        events: Sequence[Envelope | EncodedEvent],
        msg_ids: Sequence[str] | None = None,
        parents: Sequence[dict[str, str] | None] | None = None,
    ) -> list[bool]:
        """Publish concurrently; returns when every event is acked (raises if any is not)."""
        ids: Sequence[str | None] = msg_ids if msg_ids is not None else [None] * len(events)
        ctxs: Sequence[dict[str, str] | None] = parents if parents is not None else [None] * len(events)
        return list(
            await asyncio.gather(
                *(self.publish(e, msg_id=i, parent=p) for e, i, p in zip(events, ids, ctxs, strict=True))
            )
        )

    async def publish_dead_letter(self, durable: str, data: bytes, error: str, **extra: str) -> None:
        """Keep bytes nobody could handle, with the reason, for an operator to inspect."""
        headers = {
            "Orbion-Error": error[:1000],
            # The same bytes dead-lettered again (a webhook retried after a 503) are kept once.
            "Nats-Msg-Id": f"{durable}:{hashlib.sha256(data).hexdigest()}",
            **{f"Orbion-{k}": v for k, v in extra.items()},
        }
        await self.js.publish(
            dlq_subject(durable, self.root), data, timeout=self.publish_timeout, headers=headers
        )
        DEAD_LETTERS.labels(durable).inc()

    # -- consuming --------------------------------------------------------------------------

    def consume(self, spec: ConsumerSpec, handler: Handler) -> None:
        """Start a background task that feeds ``handler`` from the durable consumer ``spec``."""
        task = asyncio.create_task(self._consume_forever(spec, handler), name=f"consumer:{spec.durable}")
        self._consumers.append(task)

    async def _bind(self, spec: ConsumerSpec) -> ContinuousPull:
        await self.provision()
        version = self.nc.connected_server_version
        multi_filter = (version.major, version.minor) >= (2, 10)
        await self.js.add_consumer(
            self.settings.stream_name, spec.consumer_config(self.root, multi_filter=multi_filter)
        )
        pull = ContinuousPull(
            self.nc,
            self.js,
            self.settings.stream_name,
            spec.durable,
            batch=spec.batch_size,
            expires=spec.pull_expires_seconds,
        )
        await pull.start()
        return pull

    async def _consume_forever(self, spec: ConsumerSpec, handler: Handler) -> None:
        pull: ContinuousPull | None = None
        in_hand = _InHand(spec.max_in_flight)
        heartbeat = asyncio.create_task(in_hand.keep_in_progress(spec.ack_wait_seconds / 3))
        try:
            while not self._stopping.is_set():
                try:
                    if pull is None:
                        pull = await self._bind(spec)
                        self._pulls.add(pull)
                        if self._stopping.is_set():  # stop_consuming came while binding
                            pull.wake()
                    msgs = await pull.take(await in_hand.room())
                    await self._start_batch(spec, handler, msgs, in_hand)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("consumer %s lost its subscription (%r); binding again", spec.durable, exc)
                    if pull is not None:
                        self._pulls.discard(pull)
                        with contextlib.suppress(Exception):
                            await pull.stop()
                    pull = None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), timeout=0.5)
            await in_hand.finish()  # the batches in hand end, their acks sent, before the drain
        except asyncio.CancelledError:
            in_hand.cancel()
            raise
        finally:
            heartbeat.cancel()
            if pull is not None:
                self._pulls.discard(pull)
                with contextlib.suppress(Exception):
                    await pull.stop()

    async def _start_batch(
        self, spec: ConsumerSpec, handler: Handler, msgs: list[Msg], in_hand: _InHand
    ) -> None:
        """Start handling a batch and return: the next one is taken while it is handled.

        A contact's events run in order, after its events of earlier batches still in hand;
        other contacts' events do not wait for them.
        """
        by_stream: dict[str, list[tuple[Event, Msg]]] = {}
        for msg in msgs:
            try:
                event = decode(msg.data)
            except UndecodableEvent as exc:
                await self._dead_letter(spec, msg, f"undecodable: {exc}")
                continue
            if event.type not in spec.event_types:  # only on servers that cannot filter by several subjects
                await msg.ack()
                continue
            by_stream.setdefault(event.stream_id, []).append((event, msg))
        if not by_stream:
            return
        for stream_id, items in by_stream.items():
            in_hand.chain(
                stream_id,
                [msg for _, msg in items],
                functools.partial(self._handle_in_order, spec, handler, items),
            )

    async def _handle_in_order(
        self,
        spec: ConsumerSpec,
        handler: Handler,
        items: list[tuple[Event, Msg]],
        after: asyncio.Task[Away] | None,
    ) -> Away:
        """Handle one stream's events of a batch in order, once ``after`` (the same stream's
        events of an earlier batch) succeeded. When one fails, the later ones are nakked for at
        least as long as it is away, so that the order holds on redelivery."""
        if after is not None and (away := await _away(after, spec)) is not None:
            await self._nak_all(spec, items, away)
            return away
        for index, (event, msg) in enumerate(items):
            if (away := await self._handle_one(spec, handler, event, msg)) is not None:
                await self._nak_all(spec, items[index + 1 :], away)
                return away
        return None

    async def _nak_all(self, spec: ConsumerSpec, items: list[tuple[Event, Msg]], away: float) -> None:
        for _, msg in items:
            await msg.nak(delay=max(away, spec.nak_delay(1)))
            _handled(spec.durable, "nak").inc()

    async def _handle_one(self, spec: ConsumerSpec, handler: Handler, event: Event, msg: Msg) -> Away:
        headers = dict(msg.headers or {})
        num_delivered = msg.metadata.num_delivered
        delivery = Delivery(num_delivered=num_delivered, subject=msg.subject, headers=headers, _msg=msg)
        parent = propagate.extract(headers)
        span = _consumer_span(spec, event, parent)
        # The handler runs in the message's trace: in its CONSUMER span, or, when the trace is
        # not sampled, directly in the publisher's context (ids for logs and later publishes),
        # where the libraries' instrumentations (asyncpg, redis) are told to make no span: they
        # would build a non-recording one, at tens of µs, for each statement.
        token = otel_context.attach(trace.set_span_in_context(span, parent) if span else parent)
        quiet = suppress_instrumentation() if span is None else contextlib.nullcontext()
        started = time.perf_counter()
        try:
            try:
                with quiet:
                    await handler(event, delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if span is not None:
                    span.record_exception(exc)
                if num_delivered >= spec.max_deliver and not is_outage(exc):
                    log.error(
                        "consumer %s gives up on %s %s after %d deliveries: %r",
                        spec.durable,
                        event.type,
                        event.event_id,
                        num_delivered,
                        exc,
                    )
                    await self._dead_letter(spec, msg, repr(exc))
                    return 0.0
                else:
                    log.warning(
                        "consumer %s failed on %s %s (delivery %d): %r",
                        spec.durable,
                        event.type,
                        event.event_id,
                        num_delivered,
                        exc,
                    )
                    delay = spec.nak_delay(num_delivered)
                    await msg.nak(delay=delay)
                    _handled(spec.durable, "nak").inc()
                    return delay
        finally:
            _handler_seconds(spec.durable).observe(time.perf_counter() - started)
            otel_context.detach(token)
            if span is not None:
                span.end()
        await msg.ack()
        _handled(spec.durable, "ack").inc()
        return None

    async def _dead_letter(self, spec: ConsumerSpec, msg: Msg, error: str) -> None:
        # Publish before term: if the publish fails, the message is redelivered, not lost.
        await self.publish_dead_letter(spec.durable, msg.data, error, Subject=msg.subject)
        await msg.term()
        _handled(spec.durable, "dead").inc()

    # -- lifecycle --------------------------------------------------------------------------

    async def check(self) -> str:
        """Readiness: connected and the event stream exists. Returns the server's address."""
        if not self.nc.is_connected:
            raise BusUnavailable("not connected to NATS")
        info = await self.js.stream_info(self.settings.stream_name)
        return (
            f"{self.nc.connected_url.netloc if self.nc.connected_url else '?'} ({info.state.messages} msgs)"
        )

    async def consumer_lag(self) -> dict[str, Any]:
        """Pending messages per durable consumer of the event stream."""
        infos = await self.js.consumers_info(self.settings.stream_name)
        return {i.name: {"pending": i.num_pending, "ack_pending": i.num_ack_pending} for i in infos}

    async def stop_consuming(self) -> None:
        """Stop pulling and let in-flight batches finish, their acks included. Publishing
        still works: a service stops its consumers, then what publishes (relays, schedulers),
        and closes the bus last."""
        self._stopping.set()
        for pull in self._pulls:
            pull.wake()
        if self._consumers:
            await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()

    async def close(self) -> None:
        """Stop consuming (:meth:`stop_consuming`), then drain the connection."""
        await self.stop_consuming()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
