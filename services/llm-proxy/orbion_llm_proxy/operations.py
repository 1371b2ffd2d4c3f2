"""Operational events of the llm-proxy: breaker transitions recorded as ``BreakerStateChanged``.

A breaker's listener is synchronous and runs inside the guarded call; it only queues the
change. :class:`BreakerRecorder` appends the queued changes to the event store (stream = the
breaker's name) and the relay publishes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from orbion_common.events import BreakerStateChanged
from orbion_common.events.operations import BreakerStateChangedPayload
from orbion_common.eventstore import ConcurrencyError, EventStore

log = logging.getLogger(__name__)


class BreakerRecorder:
    def __init__(self, pool: asyncpg.Pool, events: EventStore, on_appended: Callable[[], None]) -> None:
        self.pool = pool
        self.events = events
        self.on_appended = on_appended
        self._queue: asyncio.Queue[BreakerStateChanged] = asyncio.Queue(maxsize=10_000)
        self._stopping = asyncio.Event()

    def on_change(self, name: str, from_state: str, to_state: str, reason: str) -> None:
        event = BreakerStateChanged.create(
            f"breaker-{name}",
            BreakerStateChangedPayload(
                breaker=name, from_state=from_state, to_state=to_state, reason=reason[:300]
            ),
        )
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("breaker event queue full; %s %s->%s not recorded", name, from_state, to_state)

    async def flush(self) -> int:
        """Append everything queued; returns how many were appended."""
        n = 0
        while not self._queue.empty():
            event = self._queue.get_nowait()
            try:
                for _ in range(5):  # another replica may append to the same breaker stream
                    try:
                        async with self.pool.acquire() as conn, conn.transaction():
                            await self.events.append(conn, event.stream_id, [event])
                        break
                    except ConcurrencyError:
                        continue
            except BaseException:
                self._queue.put_nowait(event)  # keep it for the next flush
                raise
            n += 1
        if n:
            self.on_appended()
        return n

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                break
            self._queue.put_nowait(getter.result())
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("breaker events not recorded yet: %r", exc)
                await asyncio.sleep(1.0)
