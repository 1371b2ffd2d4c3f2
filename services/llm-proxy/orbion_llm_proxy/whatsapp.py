"""WhatsApp send providers: the Cloud API (Graph) and the Evolution API, over aiohttp.

A provider sends one text and returns the provider's message id, or raises :class:`SendError`
with the HTTP status and the provider's error code, classified by ``domain.classify_send_error``.
The local outbox is not here: it is a table written in the sender's transaction (store.py),
so it needs no HTTP call and has no crash window. Ordering, pacing, retries, the breaker and
the ``whatsapp send`` span are the sender's job (sender.py); a provider only adds the HTTP
status to that span. aiohttp rather than httpx: about a third of the CPU per call, and the
sender makes one call per reply part (``orbion bench llm-proxy``, sender figures).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from opentelemetry import trace
from yarl import URL

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


class _JsonPoster:
    """POSTs JSON through one aiohttp session, opened on first use (in the running loop).

    Timeouts as httpx applied them: ``timeout`` to get a connection and for each read; the
    breaker's call timeout bounds the whole call. Idle connections are dropped after 5 s, as
    httpx did, before a server is likely to close them under us.

    Proxy settings come from the environment once per URL, as httpx read them once per client:
    aiohttp's ``trust_env`` looks them (and ``~/.netrc``) up on every request, in a worker thread,
    which cost two thread hand-offs per send (``orbion bench llm-proxy``, sender figures).
    """

    def __init__(self, timeout: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(connect=timeout, sock_connect=timeout, sock_read=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, tuple[URL | None, aiohttp.BasicAuth | None]] = {}

    async def post(self, url: str, body: dict[str, Any], auth: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The answer's status and JSON object (``{}`` if not one); no answer: :class:`SendError`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=5.0),
                timeout=self._timeout,
            )
        proxy = self._proxies.get(url)
        if proxy is None:
            try:
                proxy = self._proxies[url] = get_env_proxy_for_url(URL(url))
            except LookupError:  # none configured, or this host bypasses it (NO_PROXY)
                proxy = self._proxies[url] = (None, None)
        try:
            headers = {**auth, "Content-Type": "application/json"}
            async with self._session.post(
                url, data=orjson.dumps(body), headers=headers, proxy=proxy[0], proxy_auth=proxy[1]
            ) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No HTTP answer: connect errors never reached WhatsApp; a read timeout may have (see docs).
            raise SendError(f"{type(exc).__name__}: {exc}", status=None, code=None) from exc
        trace.get_current_span().set_attribute("http.response.status_code", status)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return status, {}
        return status, data if isinstance(data, dict) else {}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class CloudApi:
    """``POST {base}/{version}/{phone_number_id}/messages`` with a bearer token."""

    via = "cloud_api"

    def __init__(self, settings: Settings) -> None:
        self.url = (
            f"{settings.whatsapp_api_base_url.rstrip('/')}/{settings.whatsapp_api_version}"
            f"/{settings.whatsapp_phone_number_id}/messages"
        )
        self._http = _JsonPoster(settings.whatsapp_send_timeout_seconds, max_connections=200)
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
        status, data = await self._http.post(self.url, body, self._headers)
        if status >= 300:
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            assert isinstance(error, dict)
            code = error.get("code")
            raise SendError(
                f"cloud api {status}: {str(error.get('message', ''))[:200]}",
                status=status,
                code=int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
            )
        try:
            return str(data["messages"][0]["id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise SendError("cloud api answered without a message id", status=502, code=None) from exc

    async def aclose(self) -> None:
        await self._http.aclose()


class Evolution:
    """``POST {base}/message/sendText/{instance}`` with the ``apikey`` header."""

    via = "evolution"

    def __init__(self, settings: Settings) -> None:
        self.url = f"{settings.evolution_base_url.rstrip('/')}/message/sendText/{settings.evolution_instance}"
        self._http = _JsonPoster(settings.whatsapp_send_timeout_seconds, max_connections=100)
        self._headers = {"apikey": settings.evolution_api_key.get_secret_value()}

    async def send_text(self, phone: str, text: str, reply_to_message_id: str = "") -> str:
        body: dict[str, Any] = {"number": phone, "text": text}
        if reply_to_message_id:
            body["quoted"] = {"key": {"id": reply_to_message_id}}
        status, data = await self._http.post(self.url, body, self._headers)
        if status >= 300:
            raise SendError(f"evolution {status}", status=status, code=None)
        try:
            return str(data["key"]["id"])
        except (KeyError, TypeError) as exc:
            raise SendError("evolution answered without a message id", status=502, code=None) from exc

    async def aclose(self) -> None:
        await self._http.aclose()


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
