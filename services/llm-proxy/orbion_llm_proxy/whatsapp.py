"""WhatsApp send providers: the Cloud API (Graph) and the Evolution API, over httpx.

A provider sends one text and returns the provider's message id, or raises :class:`SendError`
with the HTTP status and the provider's error code, classified by ``domain.classify_send_error``.
The local outbox is not here: it is a table written in the sender's transaction (store.py),
so it needs no HTTP call and has no crash window. Ordering, pacing, retries, the breaker and
the ``whatsapp send`` span are the sender's job (sender.py); a provider only adds the HTTP
status to that span.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import httpx
from opentelemetry import trace

from .domain import SendVerdict, classify_send_error
from .settings import Settings

log = logging.getLogger(__name__)


class SendError(Exception):
    """A send that WhatsApp did not accept (or whose answer never came)."""

    def __init__(self, detail: str, *, status: int | None, code: int | None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.verdict = classify_send_error(status, code)

    @property
    def counts_against_dependency(self) -> bool:
        """Only outages open the breaker; a rate limit or a refused request says the API is up."""
        return self.verdict is SendVerdict.RETRY


class Provider(Protocol):
    via: str

    async def send_text(self, phone: str, text: str, reply_to_message_id: str = "") -> str: ...

    async def aclose(self) -> None: ...


def _transport_error(exc: httpx.HTTPError) -> SendError:
    # No HTTP answer: connect errors never reached WhatsApp; a read timeout may have (see docs).
    return SendError(f"{type(exc).__name__}: {exc}", status=None, code=None)


class CloudApi:
    """``POST {base}/{version}/{phone_number_id}/messages`` with a bearer token."""

    via = "cloud_api"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.url = (
            f"{settings.whatsapp_api_base_url.rstrip('/')}/{settings.whatsapp_api_version}"
            f"/{settings.whatsapp_phone_number_id}/messages"
        )
        self._client = client or httpx.AsyncClient(
            timeout=settings.whatsapp_send_timeout_seconds,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )
        self._headers = {"Authorization": f"Bearer {settings.whatsapp_token.get_secret_value()}"}

    async def send_text(self, phone: str, text: str, reply_to_message_id: str = "") -> str:
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": phone,
            "type": "text",
            "text": {"preview_url": False, "body": text},
        }
        if reply_to_message_id:
            body["context"] = {"message_id": reply_to_message_id}
        try:
            response = _traced(await self._client.post(self.url, json=body, headers=self._headers))
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        data = _json(response)
        if response.status_code >= 300:
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            assert isinstance(error, dict)
            code = error.get("code")
            raise SendError(
                f"cloud api {response.status_code}: {str(error.get('message', ''))[:200]}",
                status=response.status_code,
                code=int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
            )
        try:
            return str(data["messages"][0]["id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise SendError("cloud api answered without a message id", status=502, code=None) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class Evolution:
    """``POST {base}/message/sendText/{instance}`` with the ``apikey`` header."""

    via = "evolution"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.url = f"{settings.evolution_base_url.rstrip('/')}/message/sendText/{settings.evolution_instance}"
        self._client = client or httpx.AsyncClient(timeout=settings.whatsapp_send_timeout_seconds)
        self._headers = {"apikey": settings.evolution_api_key.get_secret_value()}

    async def send_text(self, phone: str, text: str, reply_to_message_id: str = "") -> str:
        body: dict[str, Any] = {"number": phone, "text": text}
        if reply_to_message_id:
            body["quoted"] = {"key": {"id": reply_to_message_id}}
        try:
            response = _traced(await self._client.post(self.url, json=body, headers=self._headers))
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        data = _json(response)
        if response.status_code >= 300:
            raise SendError(f"evolution {response.status_code}", status=response.status_code, code=None)
        try:
            return str(data["key"]["id"])
        except (KeyError, TypeError) as exc:
            raise SendError("evolution answered without a message id", status=502, code=None) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _traced(response: httpx.Response) -> httpx.Response:
    trace.get_current_span().set_attribute("http.response.status_code", response.status_code)
    return response


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def make_provider(settings: Settings) -> Provider | None:
    """The configured provider, or None for the local outbox."""
    kind = settings.send_provider
    if kind == "cloud_api":
        return CloudApi(settings)
    if kind == "evolution":
        return Evolution(settings)
    if kind != "outbox":
        raise ValueError(f"unknown ORBION_WHATSAPP_PROVIDER {kind!r} (cloud_api, evolution, outbox)")
    return None
