"""The llm-proxy's dependencies, built once by bootstrap.py and handed to the app and workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from orbion_common.breakers import Breaker
from orbion_common.bus import Bus
from orbion_common.eventstore import EventStore
from orbion_common.relay import Relay

from .consumers import Handlers
from .openai_client import Responder
from .operations import BreakerRecorder
from .sender import Sender
from .settings import Settings


@dataclass
class Deps:
    settings: Settings
    pool: asyncpg.Pool
    events: EventStore
    breakers: dict[str, Breaker]
    responder: Responder
    sender: Sender
    handlers: Handlers
    recorder: BreakerRecorder
    bus: Bus | None = None
    relay: Relay | None = None
    redis: Any = None
    exporter: Any = None  # sheets.Exporter when Google Sheets is configured
    extra: dict[str, Any] = field(default_factory=dict)

    def wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()
