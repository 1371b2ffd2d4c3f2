"""The lead service's JetStream consumer: inbound messages, generated replies, sent messages.

One durable consumer receives the three event types in stream order (a contact's
``MessageSent`` always precedes the reply that came back within 2 s, which the bot rules need).
Each handler: claim the event, decide (``domain``), append, project, commit (``recorder``);
the bus acks after it returns. Delivery policy (stated here, not left to a default): up to 5
deliveries with growing delays (0.2 s, 1 s, 5 s, 15 s), then the event goes to
``orbion.dlq.lead-events`` with its error; an undecodable message is dead-lettered at once.
"""

from __future__ import annotations

from orbion_common.bus import ConsumerSpec, Delivery
from orbion_common.events import Event, MessageReceived, MessageSent, ReplyGenerated

from . import domain
from .domain import Policy
from .recorder import LeadRecorder

CONSUMER = "lead-events"
EVENT_TYPES = ("MessageReceived", "ReplyGenerated", "MessageSent")


def consumer_spec(
    *, durable: str = CONSUMER, batch_size: int = 64, max_deliver: int = 5, deliver_new_only: bool = False
) -> ConsumerSpec:
    """``deliver_new_only`` is for tests sharing a stream; the service reads it from the start."""
    return ConsumerSpec(
        durable=durable,
        event_types=EVENT_TYPES,
        max_deliver=max_deliver,
        ack_wait_seconds=10.0,
        nak_delays=(0.2, 1.0, 5.0, 15.0),
        batch_size=batch_size,
        deliver_new_only=deliver_new_only,
    )


class LeadConsumers:
    def __init__(self, recorder: LeadRecorder, policy: Policy, *, consumer: str = CONSUMER) -> None:
        self.recorder = recorder
        self.policy = policy
        self.consumer = consumer

    async def handle(self, event: Event, delivery: Delivery | None = None) -> None:
        """The bus handler: routes by event type; other types are ignored (acked)."""
        if isinstance(event, MessageReceived):
            await self.record_inbound_message(event)
        elif isinstance(event, ReplyGenerated):
            await self.record_reply_facts(event)
        elif isinstance(event, MessageSent):
            await self.record_message_sent(event)

    async def record_inbound_message(self, event: MessageReceived) -> None:
        await self.recorder.record(
            event.stream_id,
            lambda lead: domain.on_message_received(lead, event, self.policy),
            claim=(self.consumer, event.event_id),
        )

    async def record_reply_facts(self, event: ReplyGenerated) -> None:
        await self.recorder.record(
            event.stream_id,
            lambda lead: domain.on_reply_generated(lead, event, self.policy),
            claim=(self.consumer, event.event_id),
        )

    async def record_message_sent(self, event: MessageSent) -> None:
        await self.recorder.record(
            event.stream_id,
            lambda lead: domain.on_message_sent(lead, event),
            claim=(self.consumer, event.event_id),
        )
