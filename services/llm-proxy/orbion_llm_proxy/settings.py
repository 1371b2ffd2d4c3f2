"""The llm-proxy's settings (``ORBION_*``): OpenAI, WhatsApp sending, Google Sheets, breakers."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from orbion_common.settings import CommonSettings


class Settings(CommonSettings):
    """Variables of the llm-proxy (prefix ``ORBION_``); empty credentials select the local fallbacks."""

    # -- OpenAI ----------------------------------------------------------------------------
    openai_api_key: SecretStr = Field(
        SecretStr(""), description="OpenAI API key; empty: the fallback responder answers every message."
    )
    openai_base_url: str = Field(
        "https://api.openai.com/v1", description="Any OpenAI-compatible chat-completions endpoint."
    )
    openai_model: str = Field("gpt-4o-mini", description="Chat model used for replies.")
    openai_timeout_seconds: float = Field(20.0, description="Timeout of one chat-completions call.")
    openai_retries: int = Field(
        2, description="Extra attempts after a retryable OpenAI error (ours, counted)."
    )
    openai_retry_backoff_seconds: float = Field(0.5, description="First retry delay; doubles each retry.")
    openai_max_tokens: int = Field(600, description="Upper bound of tokens in one reply.")
    openai_temperature: float = Field(0.4, description="Sampling temperature.")
    openai_breaker_fail_max: int = Field(5, description="Consecutive OpenAI failures that open its breaker.")
    openai_breaker_reset_seconds: float = Field(30.0, description="Seconds the OpenAI breaker stays open.")
    prompt_file: Path | None = Field(
        None, description="System prompt file; default: the packaged prompts/sdr-v1.md."
    )
    business_name: str = Field("ORBION", description="Business name inserted in the system prompt.")
    business_facts: str = Field(
        "", description="Business facts (offer, prices, hours) for the system prompt."
    )
    default_language: str = Field("pt", description="Reply language when a contact's is unknown (pt or en).")
    history_messages: int = Field(20, description="Past messages sent to the model with each request.")
    response_cache_ttl_seconds: int = Field(
        3600, description="TTL of cached replies to generic questions; 0 disables the response cache."
    )
    connectivity_probe_seconds: float = Field(
        60.0, description="At most one cheap OpenAI reachability probe per this many seconds."
    )

    # -- WhatsApp sending ------------------------------------------------------------------
    whatsapp_provider: str = Field(
        "", description="`cloud_api`, `evolution` or `outbox`; empty: cloud_api with a token, else outbox."
    )
    whatsapp_token: SecretStr = Field(
        SecretStr(""), description="Cloud API access token (bearer); empty: replies go to the local outbox."
    )
    whatsapp_api_base_url: str = Field("https://graph.facebook.com", description="Graph API base URL.")
    whatsapp_api_version: str = Field("v21.0", description="Graph API version.")
    whatsapp_phone_number_id: str = Field("", description="Cloud API phone-number id that sends replies.")
    evolution_base_url: str = Field("", description="Evolution API base URL.")
    evolution_api_key: SecretStr = Field(
        SecretStr(""), description="Evolution API `apikey` (the same key the gateway checks on its webhooks)."
    )
    evolution_instance: str = Field("", description="Evolution API instance name.")
    whatsapp_send_timeout_seconds: float = Field(10.0, description="Timeout of one send request.")
    whatsapp_max_attempts: int = Field(8, description="Attempts of a retryable send before SendFailed.")
    whatsapp_backoff_base_seconds: float = Field(1.0, description="First retry delay of a send; doubles.")
    whatsapp_backoff_max_seconds: float = Field(60.0, description="Longest retry delay of a send.")
    whatsapp_pair_interval_seconds: float = Field(
        6.0, description="Pacing per contact: one message per this many seconds after a burst."
    )
    whatsapp_pair_burst: int = Field(5, description="Messages one contact may get back to back.")
    whatsapp_rate_per_second: float = Field(80.0, description="Throughput cap of the business number.")
    whatsapp_breaker_fail_max: int = Field(5, description="Consecutive send failures that open the breaker.")
    whatsapp_breaker_reset_seconds: float = Field(
        30.0, description="Seconds the WhatsApp breaker stays open."
    )
    sender_concurrency: int = Field(
        256,
        description="Contacts sent to concurrently; their statements are group-committed, so a send "
        "holds no connection of its own and this does not depend on ORBION_DB_POOL_MAX. A send holds "
        "its slot for the API's whole answer time: the sender sends at most this many replies per "
        "answer time. Also the most replies a crash can leave in doubt (outcome_unknown).",
    )
    sender_commit_retry_seconds: float = Field(
        30.0,
        description="How long the result of a send (sent or failed) is retried through a database "
        "outage before the reply is left in doubt (outcome_unknown).",
    )
    sender_order_hold_seconds: float = Field(
        20.0,
        description="Longest wait of a reply for the contact's previous request (previous_reply_key) "
        "to be stored, so that replies go out in the conversation's order; then it is sent anyway.",
    )
    sender_poll_seconds: float = Field(0.5, description="How often the sender looks for due replies.")

    # -- Google Sheets ---------------------------------------------------------------------
    sheets_spreadsheet_id: str = Field("", description="Spreadsheet id; empty: no export.")
    sheets_worksheet: str = Field("FUNIL-BANT", description="Worksheet the leads are upserted into.")
    sheets_credentials_file: Path | None = Field(None, description="Service-account JSON file for gspread.")
    sheets_base_url: str = Field(
        "https://sheets.googleapis.com", description="Sheets API base URL (tests point it at a fake)."
    )
    sheets_batch_size: int = Field(200, description="Most rows written per batch.")
    sheets_flush_seconds: float = Field(2.0, description="Pause between export batches (Sheets write quota).")
    sheets_breaker_fail_max: int = Field(3, description="Consecutive Sheets failures that open its breaker.")
    sheets_breaker_reset_seconds: float = Field(60.0, description="Seconds the Sheets breaker stays open.")

    @property
    def openai_enabled(self) -> bool:
        return bool(self.openai_api_key.get_secret_value())

    @property
    def send_provider(self) -> str:
        """The provider replies go through: ``cloud_api``, ``evolution`` or ``outbox``."""
        if self.whatsapp_provider:
            return self.whatsapp_provider
        return "cloud_api" if self.whatsapp_token.get_secret_value() else "outbox"

    @property
    def sheets_enabled(self) -> bool:
        return bool(self.sheets_spreadsheet_id and self.sheets_credentials_file)
