"""Settings shared by every service, read from ``ORBION_*`` environment variables.

Each service declares one ``Settings`` class that inherits :class:`CommonSettings` and adds
its own fields; ``docs/configuration.md`` documents every variable. Nothing here reads the
environment at import time: ``bootstrap`` code calls ``Settings()`` once and passes it down.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ORBION_"


class Mode(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class CommonSettings(BaseSettings):
    """Variables every service understands (prefix ``ORBION_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)
    # Key prefixes that, left empty, are ORBION_REDIS_KEY_PREFIX plus this suffix: two systems
    # sharing one Redis (staging and tests, a load test beside a running system) then share no
    # rate-limit bucket and no cached entry.
    PREFIXES_UNDER_REDIS_KEY_PREFIX: ClassVar[dict[str, str]] = {"rate_limit_prefix": "rl"}

    mode: Mode = Field(Mode.DEVELOPMENT, description="`production` refuses to start without secrets.")
    nats_url: str = Field("", description="NATS server URL; empty: `orbion up` starts a local one.")
    database_url: str = Field("", description="PostgreSQL DSN; empty: `orbion up` starts a local one.")
    redis_url: str = Field("", description="Redis URL; empty: `orbion up` starts a local one.")
    data_dir: Path = Field(Path(".orbion"), description="Folder for local servers' data and the outbox.")
    host: str = Field("127.0.0.1", description="Interface the HTTP servers bind to.")
    gateway_port: int = Field(8080, description="Gateway HTTP port.")
    conversation_port: int = Field(8081, description="Conversation service HTTP port.")
    lead_port: int = Field(8082, description="Lead service HTTP port.")
    llm_proxy_port: int = Field(8083, description="llm-proxy HTTP port.")
    monitor_port: int = Field(8084, description="Monitor HTTP port.")
    db_pool_min: int = Field(1, description="asyncpg pool minimum size per service.")
    db_pool_max: int = Field(10, description="asyncpg pool maximum size per service.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys accepted in `X-API-Key` on `/api` routes (JSON list)."
    )
    rate_limit_ip_per_minute: int = Field(
        100, ge=1, description="Requests per client IP per minute (`/api`, unverified webhooks)."
    )
    rate_limit_api_key_per_minute: int = Field(
        1000, ge=1, description="Requests per API key per minute on the `/api` routes of every service."
    )
    rate_limit_prefix: str = Field(
        "",
        description="Redis key prefix of the shared rate limiter; empty: `ORBION_REDIS_KEY_PREFIX` + `rl`.",
    )
    redis_key_prefix: str = Field("orbion:", description="Prefix of every Redis key ORBION writes.")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="Structured JSON logs; false for plain text.")
    otlp_endpoint: str = Field("", description="OTLP/HTTP traces endpoint, e.g. the monitor's /v1/traces.")
    trace_sample_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of messages whose traces are recorded (decided at the gateway); "
        "`orbion up` and the compose file record every one.",
    )
    stream_name: str = Field("ORBION", description="JetStream stream that carries the events.")
    stream_replicas: int = Field(
        1, description="JetStream replicas of the ORBION streams (3 on a 3-node cluster)."
    )
    stream_max_age_days: int = Field(7, description="How long JetStream keeps events.")
    duplicate_window_seconds: int = Field(
        120, description="JetStream dedupe window for `Nats-Msg-Id` (the event stores dedupe for ever)."
    )
    max_deliver: int = Field(5, description="Deliveries of a failing event before it is dead-lettered.")

    @model_validator(mode="before")
    @classmethod
    def _prefixes_under_the_redis_key_prefix(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        root = data.get("redis_key_prefix", cls.model_fields["redis_key_prefix"].default)
        for name, suffix in cls.PREFIXES_UNDER_REDIS_KEY_PREFIX.items():
            if not data.get(name):
                data = {**data, name: f"{root}{suffix}"}
        return data

    def service_port(self, service: str) -> int:
        """The configured HTTP port of ``service`` (``gateway``, ``llm-proxy``, ...)."""
        port: int = getattr(self, f"{service.replace('-', '_')}_port")
        return port

    def service_url(self, service: str) -> str:
        return f"http://{self.host}:{self.service_port(service)}"


SERVICES = ("gateway", "conversation", "lead", "llm-proxy", "monitor")
