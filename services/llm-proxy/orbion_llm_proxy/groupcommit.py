"""Group commit: concurrent per-item calls gathered into one batch of set-based statements.

The bus hands a batch of events to concurrent handlers, and the sender sends to many contacts
at once; each used to make its own round trips (BEGIN, a few statements, COMMIT). A
:class:`GroupCommit` gathers the items submitted while the previous batch ran (and those of the
same event-loop turn) and runs ``work(conn, items)`` once for all of them, in one transaction
(or autocommit, for single statements and reads). ``submit`` returns only after that commit, so
a caller that acks or calls WhatsApp afterwards still does so after its own write committed.

If a batch fails (a lost race on a stream version, a deadlock with another replica, a bug in one
item), each of its items runs again alone, so one bad item only fails itself; an item that
loses a stream-version race alone is tried again (``ConcurrencyError``), as the lead recorder
does. Errors reach the item's caller, which keeps its own retry policy (nak, commit retries).

The batch's statements belong to no single trace: they run in a context of their own, with
the asyncpg instrumentation suppressed (one span per statement would land in whichever trace
submitted first). Writers that store a trace context per item capture it in ``submit``'s caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg
from prometheus_client import Counter, Histogram

from orbion_common.eventstore import ConcurrencyError
from orbion_common.telemetry import background_task

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "orbion_llm_proxy_commit_batch_size",
    "Items per batch of a group commit",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_RETRIES = Counter(
    "orbion_llm_proxy_batch_retries_total", "Batches run again item by item after a failure", ["writer"]
)

#: Tries of an item alone that keeps losing a stream-version race (then its caller decides).
ALONE_ATTEMPTS = 3


class GroupCommit(Generic[T, R]):
    """Runs ``work(conn, items) -> results`` (one result per item, in order) for batches of
    concurrently submitted items; ``transaction=False`` for reads and single statements."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        work: Callable[[asyncpg.Connection, list[T]], Awaitable[Sequence[R]]],
        *,
        name: str,
        transaction: bool = True,
        max_batch: int = 256,
    ) -> None:
        self.pool = pool
        self.work = work
        self.name = name
        self.transaction = transaction
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Run ``item`` in the next batch; returns its result once the batch committed."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._flusher is None or self._flusher.done():
            # Untraced: the flusher must not run inside the first submitter's span.
            self._flusher = background_task(self._flush(), name=f"group-commit:{self.name}")
        return await done

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other handlers of the same bus batch join
        # No await between the last check and returning: a later submit starts a new flusher.
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            await self._run(batch)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        BATCH_SIZE.labels(self.name).observe(len(batch))
        try:
            results = await self._transact([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 and not isinstance(exc, ConcurrencyError):
                _fail(batch[0][1], exc)
                return
            if len(batch) > 1:
                BATCH_RETRIES.labels(self.name).inc()
                log.info("%s: batch of %d failed (%r); running each alone", self.name, len(batch), exc)
            for item, done in batch:
                await self._run_alone(item, done)
            return
        for (_, done), result in zip(batch, results, strict=True):
            _settle(done, result)

    async def _run_alone(self, item: T, done: asyncio.Future[R]) -> None:
        for attempt in range(1, ALONE_ATTEMPTS + 1):
            try:
                (result,) = await self._transact([item])
            except ConcurrencyError as exc:
                if attempt == ALONE_ATTEMPTS:
                    _fail(done, exc)
            except Exception as exc:
                _fail(done, exc)
                return
            else:
                _settle(done, result)
                return

    async def _transact(self, items: list[T]) -> Sequence[R]:
        async with self.pool.acquire() as conn:
            if not self.transaction:
                return await self.work(conn, items)
            async with conn.transaction():
                return await self.work(conn, items)


def _settle(done: asyncio.Future[R], result: R) -> None:
    if not done.done():  # else the caller was cancelled (shutdown): a redelivery absorbs the commit
        done.set_result(result)


def _fail(done: asyncio.Future[R], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)
