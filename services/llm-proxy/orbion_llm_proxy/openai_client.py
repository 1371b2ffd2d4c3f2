"""The responder: turns a ``ReplyRequested`` into reply text and lead facts.

Tries, in order: the response cache (generic questions only, see ``domain.generic_topic``),
OpenAI chat completions with structured output (one call gives the reply and the facts),
and the fallback templates. OpenAI runs behind its breaker with an explicit timeout; the
SDK's own retries are off (``max_retries=0``): ours are explicit, spaced and counted. No API
key: the fallback responder answers everything (said at start and in ``/readyz``).
Each chat-completions call is one CLIENT span ``chat <model>`` with ``orbion.stage = "llm"``
(the monitor's LLM stage) and the GenAI attributes (model, token usage).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import orjson
from openai import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    BadRequestError,
    DefaultAioHttpClient,
    RateLimitError,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from orbion_common.breakers import Breaker, BreakerOpen, CallTimeout
from orbion_common.events.messaging import LeadFacts, ReplyRequestedPayload, ReplySource, TokenUsage
from orbion_common.telemetry import tracer

from .domain import (
    BadCompletion,
    cache_key,
    fallback_reply,
    generic_topic,
    language_of,
    parse_completion,
    read_chat_completion,
    reply_schema,
)
from .settings import Settings

log = logging.getLogger(__name__)

REPLIES = Counter("orbion_llm_proxy_replies_total", "Replies generated, by source", ["source"])
FALLBACKS = Counter("orbion_llm_proxy_fallbacks_total", "Fallback replies, by reason", ["reason"])
OPENAI_RETRIES = Counter("orbion_llm_proxy_openai_retries_total", "Our retries of OpenAI calls")
OPENAI_ERRORS = Counter("orbion_llm_proxy_openai_errors_total", "Failed OpenAI calls, by kind", ["kind"])
CACHE_LOOKUPS = Counter("orbion_llm_proxy_response_cache_total", "Response cache lookups", ["result"])
OPENAI_SECONDS = Histogram(
    "orbion_llm_proxy_openai_duration_seconds",
    "Duration of one chat-completions call",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "sdr-v1.md"

_tracer = tracer("orbion.llm_proxy.openai")


@dataclass(frozen=True)
class Prompt:
    version: str
    text: str

    @classmethod
    def load(cls, settings: Settings) -> Prompt:
        path = settings.prompt_file or DEFAULT_PROMPT
        text = path.read_text(encoding="utf-8")
        text = text.replace("{business_name}", settings.business_name)
        text = text.replace("{business_facts}", settings.business_facts or "(nenhum fato adicional)")
        return cls(version=path.stem, text=text)


@dataclass(frozen=True)
class Generated:
    text: str
    facts: LeadFacts = field(default_factory=LeadFacts)
    model: str = ""
    usage: TokenUsage = field(default_factory=TokenUsage)
    latency_ms: float = 0.0
    source: ReplySource = ReplySource.LLM
    prompt_version: str = ""


class ResponseCache:
    """Redis string cache of generic replies (``redis.asyncio`` client); errors are misses."""

    def __init__(self, redis: Any, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds

    async def get(self, key: str) -> Generated | None:
        try:
            raw = await self.redis.get(key)
        except Exception as exc:  # the cache is an optimisation: never fail a reply for it
            log.warning("response cache read failed: %r", exc)
            return None
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Generated(
            text=data["text"],
            facts=LeadFacts(),
            model=data.get("model", ""),
            source=ReplySource.CACHE,
            prompt_version=data.get("prompt_version", ""),
        )

    async def put(self, key: str, generated: Generated) -> None:
        payload = {
            "text": generated.text,
            "model": generated.model,
            "prompt_version": generated.prompt_version,
        }
        try:
            await self.redis.set(key, orjson.dumps(payload), ex=self.ttl)
        except Exception as exc:
            log.warning("response cache write failed: %r", exc)


class Responder:
    def __init__(
        self,
        settings: Settings,
        breaker: Breaker,
        *,
        cache: ResponseCache | None = None,
        client: AsyncOpenAI | None = None,
    ) -> None:
        self.settings = settings
        self.breaker = breaker
        self.cache = cache
        self.prompt = Prompt.load(settings)
        self._response_format = reply_schema()  # read-only here: one copy serves every call
        self.client = client
        if self.client is None and settings.openai_enabled:
            # The SDK's aiohttp transport: the default httpx transport cost about twice the CPU
            # per call (its connection pool is scanned on every request), which capped replies/s
            # in `orbion bench llm-proxy`. Same SDK surface: auth, timeouts, errors, typed results.
            # Up to the SDK's 1000 connections, so hundreds of slow calls can be in flight at once.
            self.client = AsyncOpenAI(
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                timeout=settings.openai_timeout_seconds,
                max_retries=0,
                http_client=DefaultAioHttpClient(),
            )
        self.last_success_at: float | None = None
        self.last_error = ""
        self._last_probe = 0.0

    @property
    def mode(self) -> str:
        return "openai" if self.client is not None else "fallback"

    def info(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "model": self.settings.openai_model if self.client else "",
            "prompt_version": self.prompt.version,
            "openai_last_success_s_ago": None
            if self.last_success_at is None
            else round(time.monotonic() - self.last_success_at, 1),
            "openai_last_error": self.last_error,
            "response_cache": self.cache is not None,
        }

    async def probe(self) -> None:
        """Cheap reachability check (list models), at most once per ``connectivity_probe_seconds``."""
        if self.client is None:
            return
        now = time.monotonic()
        recent = (
            self.last_success_at is not None
            and now - self.last_success_at < self.settings.connectivity_probe_seconds
        )
        if recent or now - self._last_probe < self.settings.connectivity_probe_seconds:
            return
        self._last_probe = now
        try:
            await self.client.models.list(timeout=5.0)
            self.last_success_at = time.monotonic()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}"[:200]

    async def generate(
        self, req: ReplyRequestedPayload, *, heartbeat: Callable[[], Awaitable[None]] | None = None
    ) -> Generated:
        language = language_of(req.text, req.language, self.settings.default_language)
        if self.client is None:
            return self._fallback(req, language, "no_api_key")
        key = None
        if self.cache is not None and generic_topic(req.text):
            key = cache_key(req.text, req.lead_stage, self.prompt.version, self.settings.redis_key_prefix)
            hit = await self.cache.get(key)
            CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()
            if hit is not None:
                REPLIES.labels("cache").inc()
                return hit
        try:
            generated = await self._ask_with_retries(req, heartbeat)
        except BreakerOpen:
            return self._fallback(req, language, "breaker_open")
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("openai failed, fallback reply: %r", exc)
            return self._fallback(req, language, "openai_error")
        REPLIES.labels("llm").inc()
        if key is not None and self.cache is not None:
            await self.cache.put(key, generated)
        return generated

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _fallback(self, req: ReplyRequestedPayload, language: str, reason: str) -> Generated:
        FALLBACKS.labels(reason).inc()
        REPLIES.labels("fallback").inc()
        return Generated(
            text=fallback_reply(language, req.lead_stage, req.profile_name),
            facts=LeadFacts(language=language),
            source=ReplySource.FALLBACK,
            prompt_version=self.prompt.version,
        )

    async def _ask_with_retries(
        self, req: ReplyRequestedPayload, heartbeat: Callable[[], Awaitable[None]] | None
    ) -> Generated:
        attempts = 1 + max(self.settings.openai_retries, 0)
        for attempt in range(1, attempts + 1):
            try:
                return await self.breaker.call(self._ask, req)
            except BreakerOpen:
                raise
            except (APIConnectionError, APITimeoutError, RateLimitError, CallTimeout, BadCompletion) as exc:
                kind = type(exc).__name__
            except APIStatusError as exc:
                if exc.status_code < 500:
                    OPENAI_ERRORS.labels(type(exc).__name__).inc()
                    raise  # 4xx other than 429: retrying the same request cannot help
                kind = type(exc).__name__
            OPENAI_ERRORS.labels(kind).inc()
            if attempt == attempts:
                raise RuntimeError(f"OpenAI failed after {attempts} attempts (last: {kind})")
            OPENAI_RETRIES.inc()
            if heartbeat is not None:
                await heartbeat()
            await asyncio.sleep(self.settings.openai_retry_backoff_seconds * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def messages(self, req: ReplyRequestedPayload) -> list[dict[str, str]]:
        context = (
            f"Contato: {req.profile_name or 'desconhecido'}. Estágio do lead: {req.lead_stage or 'novo'}. "
            f"Idioma informado: {req.language or 'desconhecido'}."
        )
        msgs = [{"role": "system", "content": self.prompt.text}, {"role": "system", "content": context}]
        for line in req.history[-self.settings.history_messages :]:
            msgs.append({"role": "user" if line.direction == "in" else "assistant", "content": line.text})
        msgs.append({"role": "user", "content": req.text})
        return msgs

    async def _ask(self, req: ReplyRequestedPayload) -> Generated:
        assert self.client is not None
        started = time.perf_counter()
        body = {
            "model": self.settings.openai_model,
            "messages": self.messages(req),
            "response_format": self._response_format,
            "max_tokens": self.settings.openai_max_tokens,
            "temperature": self.settings.openai_temperature,
        }
        # POST /chat/completions through the SDK's own client (auth, timeout, errors) without
        # chat.completions.create's param transform (a walk over typed dicts, ~3 ms of CPU per
        # call in `orbion bench llm-proxy`): our body is plain JSON of the same shape, encoded
        # by orjson, and the answer is read as plain JSON (domain.read_chat_completion).
        model = self.settings.openai_model
        with _tracer.start_as_current_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={
                "orbion.stage": "llm",
                "gen_ai.system": "openai",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": model,
            },
        ) as span:
            try:
                response = await self.client.post(
                    "/chat/completions", cast_to=httpx2.Response, content=orjson.dumps(body)
                )
            except asyncio.CancelledError:
                # The breaker's call timeout cancels us; OpenTelemetry records only Exception
                # subclasses, so without this the span of a timed-out call would look fine.
                span.set_status(Status(StatusCode.ERROR, "cancelled (call timeout or shutdown)"))
                raise
            answer = read_chat_completion(orjson.loads(response.content))
            span.set_attribute("gen_ai.response.model", answer.model or model)
            span.set_attribute("gen_ai.usage.input_tokens", answer.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", answer.completion_tokens)
        elapsed = time.perf_counter() - started
        OPENAI_SECONDS.observe(elapsed)
        text, facts = parse_completion(answer.content)
        self.last_success_at = time.monotonic()
        return Generated(
            text=text,
            facts=facts,
            model=answer.model or model,
            usage=TokenUsage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens),
            latency_ms=round(elapsed * 1000, 2),
            source=ReplySource.LLM,
            prompt_version=self.prompt.version,
        )


def openai_breaker_excludes() -> tuple[type[BaseException], ...]:
    """Errors that are our request's fault, not OpenAI's health: they do not open the breaker."""
    return (BadRequestError, BadCompletion)
