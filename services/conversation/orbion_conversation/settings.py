"""Settings of the conversation service (``ORBION_*``); every field documented for docs/configuration.md."""

from __future__ import annotations

from pydantic import Field

from orbion_common.settings import CommonSettings


class Settings(CommonSettings):
    reply_quiet_period_seconds: float = Field(
        1.5,
        ge=0,
        description="Wait this long for more messages from a contact before requesting one reply "
        "for the whole burst; 0 requests a reply for each message at once.",
    )
    opt_in_rule: str = Field(
        "keyword",
        description="How an opted-out contact opts back in: `keyword` (a start word) or `any_message` "
        "(shared with the lead service).",
    )
    conversation_history_size: int = Field(
        20, ge=1, le=200, description="Messages per contact kept in the Redis history cache."
    )
    conversation_cache_ttl_seconds: float = Field(
        3600.0, gt=0, description="Safety-net TTL of a cached history (write-through keeps it fresh)."
    )
    conversation_cache_timeout_seconds: float = Field(
        0.25, gt=0, description="Redis socket timeout for the history cache; past it, Postgres answers."
    )
    conversation_scheduler_poll_seconds: float = Field(
        0.25, gt=0, description="How often the reply scheduler looks for due replies of other replicas."
    )
    conversation_commit_interval_seconds: float = Field(
        0.05,
        ge=0,
        description="Under load, the consumer records what arrived in one transaction at most this "
        "often (after a quiet spell, at once), and never more than a tenth of the quiet period: "
        "longer means fewer transactions and a history that lags by up to this much. Replies do not "
        "wait for it: an inbound message's wait ends inside its quiet period.",
    )
    conversation_consumer_batch: int = Field(
        256,
        ge=1,
        description="Most events handled as one batch by the conversation consumer; a batch's events are "
        "recorded a few transactions at a time (group commit), so a larger batch costs less per event.",
    )
