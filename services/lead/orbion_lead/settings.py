"""Settings of the lead service (``ORBION_*``); every field documented for docs/configuration.md."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from orbion_common.optout import OptInRule
from orbion_common.settings import CommonSettings

from .domain import VERIFICATION_QUESTION, Policy
from .recorder import COMMIT_INTERVAL_SECONDS


class Settings(CommonSettings):
    PREFIXES_UNDER_REDIS_KEY_PREFIX: ClassVar[dict[str, str]] = {
        **CommonSettings.PREFIXES_UNDER_REDIS_KEY_PREFIX,
        "lead_cache_prefix": "lead",
    }

    lead_qualify_threshold: int = Field(
        70,
        ge=0,
        le=100,
        description="A lead whose score (0-100) reaches this is qualified (`LeadQualified`).",
    )
    opt_in_rule: OptInRule = Field(
        OptInRule.KEYWORD,
        description="How an opted-out contact opts back in: `keyword` (a start word) or `any_message` "
        "(shared with the conversation service).",
    )
    bot_score_threshold: int = Field(
        60, ge=1, le=100, description="Bot score (0-100) at which a contact is asked to prove it is a person."
    )
    bot_quick_reply_seconds: float = Field(
        2.0,
        gt=0,
        description="An inbound reply within this many seconds of our own message counts as quick; "
        "repeated quick replies raise the bot score.",
    )
    human_verification_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A contact that has not passed the verification question after this long is blocked.",
    )
    human_verification_max_failures: int = Field(
        2, ge=1, description="Wrong answers to the verification question before the contact is blocked."
    )
    human_verification_question: str = Field(
        VERIFICATION_QUESTION,
        description="The verification question sent to a suspected bot (answer SIM/YES).",
    )
    lead_cache_ttl_seconds: float = Field(
        600.0,
        gt=0,
        description="Safety-net TTL of a cached lead: write-through keeps active leads fresh; this "
        "bounds how long a lead whose cache write failed can be served stale.",
    )
    lead_cache_prefix: str = Field(
        "", description="Redis key prefix of the lead cache; empty: `ORBION_REDIS_KEY_PREFIX` + `lead`."
    )
    lead_timer_poll_seconds: float = Field(
        0.5,
        gt=0,
        description="How often the lead service looks for verification questions past their deadline.",
    )
    rate_limit_ip_per_minute: int = Field(
        100, description="Requests per client IP per minute on public routes and unverified webhooks."
    )
    rate_limit_api_key_per_minute: int = Field(1000, description="Requests per API key per minute on `/api`.")
    lead_consumer_batch: int = Field(
        256,
        ge=1,
        description="Most events handled as one batch by the lead consumer (recorded in one transaction).",
    )
    lead_commit_interval_seconds: float = Field(
        COMMIT_INTERVAL_SECONDS,
        ge=0,
        description="Under load, the lead records what arrived in one transaction at most this often "
        "(after a quiet spell, at once): longer means fewer transactions and a lead view that lags "
        "by up to this much. Replies do not wait for it.",
    )

    def policy(self) -> Policy:
        """The domain rules' configurable part."""
        return Policy(
            qualify_threshold=self.lead_qualify_threshold,
            bot_threshold=self.bot_score_threshold,
            quick_reply_seconds=self.bot_quick_reply_seconds,
            verification_timeout_seconds=self.human_verification_timeout_seconds,
            verification_max_failures=self.human_verification_max_failures,
            verification_question=self.human_verification_question,
            opt_in_rule=self.opt_in_rule,
        )
