"""API-key authentication for ``/api`` routes, and the start-up refusal of missing secrets.

Owns the ``ApiKey`` dependency (header ``X-API-Key`` checked in constant time against
``settings.api_keys``) and :func:`require_production_secrets`. The settings come from
``app.state.settings`` (set by ``service.create_service_app``), so tests pass their own.
Rate limiting per key is the gateway's ratelimit.py; it can use the key id returned here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from orbion_common.settings import CommonSettings, Mode

__all__ = [
    "API_KEY_HEADER",
    "ApiKey",
    "MissingSecretsError",
    "require_api_key",
    "require_production_secrets",
]

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
ANONYMOUS = "anonymous"

_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="One of ORBION_API_KEYS.")

# Values that mean "someone forgot to set this" (the full-stack template refuses them too).
_PLACEHOLDERS = frozenset({"changeme", "changethis", "change-me", "secret", "xxx"})


def key_id(key: str) -> str:
    """A short, stable, non-reversible id of an API key (for logs and per-key rate limits)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _settings(request: Request) -> CommonSettings:
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, CommonSettings):
        raise RuntimeError("app.state.settings is not set: build the app with create_service_app()")
    return settings


def _unauthorized(request: Request, reason: str) -> HTTPException:
    log.info("api key refused", extra={"reason": reason, "path": request.url.path})
    return HTTPException(401, detail={"type": "unauthorized", "detail": "missing or invalid API key"})


async def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Security(_header)] = None
) -> str:
    """Check ``X-API-Key``; return the caller's key id (``"anonymous"`` when auth is disabled).

    Every configured key is compared (``hmac.compare_digest``) so the time taken does not tell
    which key nearly matched. With no keys configured the API is open in development mode
    (``request.state.auth = "disabled"``) and closed in production.
    """
    settings = _settings(request)
    keys = settings.api_keys
    if not keys:
        if settings.mode is Mode.DEVELOPMENT:
            request.state.auth = "disabled"
            return ANONYMOUS
        raise _unauthorized(request, "no API keys configured in production")
    if not x_api_key:
        raise _unauthorized(request, "missing")
    given = x_api_key.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    if not matched:
        raise _unauthorized(request, "wrong")
    request.state.auth = "api_key"
    request.state.api_key_id = key_id(x_api_key)
    return str(request.state.api_key_id)


ApiKey = Annotated[str, Depends(require_api_key)]
"""Route parameter ``key: ApiKey`` (or ``dependencies=[Depends(require_api_key)]``): the key id."""


class MissingSecretsError(RuntimeError):
    """Production start refused: named secrets are empty or placeholders."""


def _is_missing(value: object) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip() or value.strip().lower() in _PLACEHOLDERS
    if isinstance(value, list | tuple | set | frozenset):
        return not value or all(_is_missing(v) for v in value)
    return False


def require_production_secrets(settings: CommonSettings, names: Iterable[str]) -> None:
    """In production mode, raise :class:`MissingSecretsError` naming every empty secret setting.

    ``names`` are field names (``"whatsapp_app_secret"``, ``"api_keys"``); the error names their
    environment variables. Development mode accepts anything (local runs work without secrets).
    """
    if settings.mode is not Mode.PRODUCTION:
        return
    missing = [name for name in names if _is_missing(getattr(settings, name, None))]
    if missing:
        prefix = settings.model_config.get("env_prefix", "ORBION_")
        env_names = ", ".join(f"{prefix}{name}".upper() for name in missing)
        raise MissingSecretsError(f"production mode needs these secrets set: {env_names}")
