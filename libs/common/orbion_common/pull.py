"""A durable pull consumer's messages as they arrive, from pull requests kept open.

nats-py's ``fetch`` makes every batch a round of its own: a "no wait" request and, when that
finds nothing (the usual case below saturation), a second, lingering one, then a task, a timer
and a uuid for each message it waits for. This is what nats.go calls ``Consume`` instead:
requests for up to ``batch`` messages stay open on the server, and are topped up as messages
are taken; the server delivers each message into the subscription's inbox as it is published.
With the bus's other per-batch task gone too, a consumer of 150 events/s spent 700 µs of CPU
per event where it had spent 1,033 (``orbion bench bus`` on 2026-12-07, docs/performance.md).

Flow control: a request never asks for more than the room its caller gives (the bus's
messages in hand), so that messages delivered and not yet handled stay within that limit.
A request expires after ``expires`` seconds; the server then says so (status 408, with how
many of its messages it did not deliver) and the next one is sent. A consumer that hears
nothing for longer than that has lost its requests (a reconnect, a server restart): it asks
the server whether its durable still exists (the caller binds again if not) and asks again;
after a reconnect the caller says so (:meth:`ContinuousPull.reconnected`) and it asks at once.
A request the server ends for good (409: the durable deleted, say), or answers with "no
responders" (503: no such durable), raises :class:`LostConsumer`, and the caller binds again too.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, Header

log = logging.getLogger(__name__)

_PENDING_MESSAGES = "Nats-Pending-Messages"
_HEARTBEAT = "100"
_NO_RESPONDERS = "503"
_SILENCE_GRACE_SECONDS = 1.0


class LostConsumer(RuntimeError):
    """The server ended the consumer's requests for good (its durable deleted, say): bind again."""


class ContinuousPull:
    """Messages of one durable pull consumer, from requests kept open (see the module docstring)."""

    def __init__(
        self, nc: NatsClient, js: JetStreamContext, stream: str, durable: str, *, batch: int, expires: float
    ) -> None:
        self.nc = nc
        self.js = js
        self.stream = stream
        self.durable = durable
        self.batch = batch
        self.expires = expires
        self._subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._arrived: collections.deque[Msg] = collections.deque()
        self._woken = asyncio.Event()
        self._requested = 0  # asked for, and neither delivered nor given up by the server
        self._lost = ""
        self._heard_at = 0.0
        self._stopping = False

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_message)
        self._heard_at = asyncio.get_running_loop().time()

    def wake(self) -> None:
        """End a :meth:`take` waiting for messages, with none (the caller is stopping)."""
        self._stopping = True
        self._woken.set()

    def reconnected(self) -> None:
        """The connection came back (the client's reconnect callback): the server dropped the
        open requests with the old connection, so ask again now, not after a silence."""
        self._requested = 0
        self._heard_at = asyncio.get_running_loop().time()
        self._woken.set()

    async def take(self, room: int) -> list[Msg]:
        """What has arrived, at most ``room`` messages; waits for one, unless woken by
        :meth:`wake` (then none). Messages asked for and not yet taken count against ``room``."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if self._lost:
                raise LostConsumer(f"consumer {self.durable}: {self._lost}")
            free = room - len(self._arrived) - self._requested
            if free > 0 and self._requested <= self.batch // 2:
                await self._ask(min(free, self.batch - self._requested))
            if self._arrived:
                return [self._arrived.popleft() for _ in range(min(room, len(self._arrived)))]
            self._woken.clear()
            silent_for = loop.time() - self._heard_at
            try:
                async with asyncio.timeout(self.expires + _SILENCE_GRACE_SECONDS - silent_for):
                    await self._woken.wait()
            except TimeoutError:
                await self._after_silence()
        return []

    async def _ask(self, count: int) -> None:
        request = {"batch": count, "expires": int(self.expires * 1e9)}
        await self.nc.publish(self._subject, orjson.dumps(request), reply=self._inbox)
        self._requested += count

    async def _after_silence(self) -> None:
        # Not even an expiry: the requests are gone. consumer_info raises NotFoundError if the
        # durable went with them, and the caller binds again.
        await self.js.consumer_info(self.stream, self.durable)
        log.info("consumer %s heard nothing for %.1f s; asking again", self.durable, self.expires)
        self._requested = 0
        self._heard_at = asyncio.get_running_loop().time()

    async def _on_message(self, msg: Msg) -> None:
        self._heard_at = asyncio.get_running_loop().time()
        status = JetStreamContext.is_status_msg(msg)
        if status is None:
            self._requested = max(self._requested - 1, 0)
            self._arrived.append(msg)
            self._woken.set()
            return
        if status == _HEARTBEAT:
            return
        # Any other status ends a request: expired (408), or ended by the server (409: consumer
        # deleted, leadership change, ...), saying how many of its messages it did not deliver.
        headers = msg.headers or {}
        pending = headers.get(_PENDING_MESSAGES)
        if pending is not None:
            self._requested = max(self._requested - int(pending), 0)
        else:  # the server ended every request at once
            self._requested = 0
        description = headers.get(Header.DESCRIPTION, "")
        if status == _NO_RESPONDERS:
            # No such consumer (gone with a server that lost its store): asking again would get
            # the same answer at once, for ever.
            self._lost = "no such consumer"
        elif status == "409" and description != "Leadership Change":
            # Consumer deleted, or a limit of its config that asking again would hit at once.
            self._lost = description or "409"
        self._woken.set()

    async def stop(self) -> None:
        """Unsubscribe (the server drops the open requests with their inbox's interest) and give
        back what arrived and was not taken, for at once redelivery."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        while self._arrived:
            await self._arrived.popleft().nak()
