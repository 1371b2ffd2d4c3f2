"""API keys and production secrets (orbion_common.auth)."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import SecretStr

from orbion_common.auth import ApiKey, MissingSecretsError, key_id, require_production_secrets
from orbion_common.service import create_service_app
from orbion_common.settings import CommonSettings, Mode

KEYS = [SecretStr("first-key-123"), SecretStr("second-key-456")]


def build_app(settings: CommonSettings) -> FastAPI:
    app = create_service_app("testsvc", settings)

    @app.get("/api/whoami")
    async def whoami(key: ApiKey, request: Request) -> dict[str, str]:
        return {"key": key, "auth": request.state.auth}

    return app


async def call(settings: CommonSettings, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=build_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.get("/api/whoami", headers=headers or {})


async def test_missing_key_is_401_json() -> None:
    response = await call(CommonSettings(api_keys=KEYS))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"


async def test_wrong_key_is_401(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        response = await call(CommonSettings(api_keys=KEYS), {"X-API-Key": "first-key-12"})
    assert response.status_code == 401
    assert "first-key-12" not in caplog.text  # the offered key is never logged


async def test_any_configured_key_is_accepted() -> None:
    for key in KEYS:
        response = await call(CommonSettings(api_keys=KEYS), {"X-API-Key": key.get_secret_value()})
        assert response.status_code == 200
        assert response.json() == {"key": key_id(key.get_secret_value()), "auth": "api_key"}
    assert key_id("first-key-123") != key_id("second-key-456")


async def test_development_without_keys_is_open_and_marked() -> None:
    response = await call(CommonSettings(mode=Mode.DEVELOPMENT, api_keys=[]))
    assert response.status_code == 200
    assert response.json() == {"key": "anonymous", "auth": "disabled"}


async def test_development_with_keys_still_checks_them() -> None:
    response = await call(CommonSettings(mode=Mode.DEVELOPMENT, api_keys=KEYS), {"X-API-Key": "nope"})
    assert response.status_code == 401


async def test_production_without_keys_refuses_everyone() -> None:
    settings = CommonSettings(mode=Mode.PRODUCTION, api_keys=[])
    assert (await call(settings)).status_code == 401
    assert (await call(settings, {"X-API-Key": ""})).status_code == 401


def test_production_start_is_refused_when_secrets_are_empty() -> None:
    settings = CommonSettings(mode=Mode.PRODUCTION, api_keys=[])
    with pytest.raises(MissingSecretsError, match="ORBION_API_KEYS"):
        require_production_secrets(settings, ["api_keys"])
    with pytest.raises(MissingSecretsError, match="ORBION_API_KEYS"):
        require_production_secrets(
            CommonSettings(mode=Mode.PRODUCTION, api_keys=[SecretStr("changeme")]), ["api_keys"]
        )


def test_production_start_is_allowed_with_secrets_and_development_needs_none() -> None:
    require_production_secrets(CommonSettings(mode=Mode.PRODUCTION, api_keys=KEYS), ["api_keys"])
    require_production_secrets(CommonSettings(mode=Mode.DEVELOPMENT, api_keys=[]), ["api_keys"])
