"""The gateway's settings: webhook secrets, body limit and rate-limit tiers (prefix ``ORBION_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from orbion_common.settings import CommonSettings


class Settings(CommonSettings):
    """Gateway settings. In production mode the WhatsApp app secret is required."""

    whatsapp_app_secret: SecretStr | None = Field(
        None,
        description="Meta app secret: webhooks must carry `X-Hub-Signature-256` signed with it. "
        "Required in production; empty in development disables the check (shown in `/readyz`).",
    )
    whatsapp_verify_token: SecretStr | None = Field(
        None, description="Token Meta echoes in the `GET /webhooks/whatsapp` verification handshake."
    )
    evolution_api_key: SecretStr | None = Field(
        None,
        description="Key Evolution API sends in the `apikey` header of its webhooks. Required in "
        "production for `/webhooks/evolution`; empty in development accepts unauthenticated webhooks.",
    )
    evolution_api_key_header: str = Field("apikey", description="Header that carries the Evolution API key.")
    max_body_bytes: int = Field(3 * 1024 * 1024, description="Largest webhook body accepted (413 above).")
    rate_limit_phone_per_minute: int = Field(
        20, description="Inbound messages per phone per minute; more are published flagged `throttled`."
    )
    publish_timeout_seconds: float = Field(
        5.0, description="Longest wait for JetStream's ack before the webhook is answered 503."
    )
    trust_forwarded_for: bool = Field(
        False, description="Take the client IP from `X-Forwarded-For` (only behind a trusted proxy)."
    )

    @property
    def signature_required(self) -> bool:
        return _has(self.whatsapp_app_secret)


def _has(secret: SecretStr | None) -> bool:
    return secret is not None and secret.get_secret_value() != ""
