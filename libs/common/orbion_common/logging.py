"""Structured logging for every ORBION process: JSON lines on stderr, phones masked, secrets redacted.

Owns the log format (see docs/observability.md) and the privacy filter that every record passes
through before it is written. Trace ids come from the current OpenTelemetry span (telemetry.py
owns the tracer provider). Services only call :func:`configure_logging` once in ``bootstrap``
and then use ``logging.getLogger(__name__)`` with ``extra={...}`` for structured fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import orjson
from opentelemetry import trace
from pydantic import SecretBytes, SecretStr

from orbion_common.settings import CommonSettings

__all__ = ["MaskingFilter", "configure_logging", "mask_phone", "mask_text"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn adds an ANSI-coloured duplicate of the message
    "trace_id",
    "span_id",
    "_orbion_masked",
    "_orbion_extras",
}

REDACTED = "***"

# Key names whose values are secrets. "token" must not be followed by a letter so that
# LLM usage counters (prompt_tokens, total_tokens) stay readable.
_SECRET_KEY = r"secret|token(?![a-z])|password|passwd|api[_-]?key|authorization|cookie"
_SECRET_KEY_RE = re.compile(_SECRET_KEY, re.IGNORECASE)
# Keys whose value is a phone number even when it is not a 10–15 digit string (an int, a list).
_PHONE_KEY_RE = re.compile(r"phone|wa_id|msisdn", re.IGNORECASE)

# One pass over the text finds all three things we hide; the callback runs only on matches.
# It runs only when _HINT_RE (below) says the text may hold one of them.
_TEXT_RE = re.compile(
    # a phone: 10–15 digits, optional '+', not glued to letters/digits (hex ids stay intact)
    r"(?P<phone>(?<![0-9A-Za-z+])\+?[0-9]{10,15}(?![0-9A-Za-z]))"
    # credentials in a URL: scheme://user:password@host
    r"|(?P<userinfo>://[^/\s:@]*:)[^/\s@]+@"
    # key=value / key: value / "key": "value" for secret-looking keys
    r"|(?P<key>(?i:" + _SECRET_KEY + r")[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<value>(?i:(?:bearer|basic)\s+)?[^\s\"',;&}]+)"
)


# Cheap pre-check on the lower-cased text: the full expression above runs only when the text
# holds a 10-digit run, a secret-looking word or a URL. Most log lines hold none of them.
_HINT_RE = re.compile(r"[0-9]{10}|secret|token|passw|api.?key|authoriz|cookie|://")


def _mask_digits(digits: str) -> str:
    if len(digits) <= 8:
        return "*" * len(digits)
    return digits[:6] + "*" * (len(digits) - 8) + digits[-2:]


def mask_phone(phone: str) -> str:
    """Mask a phone number for logs, keeping the first 6 and last 2 digits.

    ``"5511999990000"`` -> ``"551199*****00"``; a leading ``+`` is kept. Anything that is not a
    bare number is masked with :func:`mask_text` rules instead.
    """
    plus = phone.startswith("+")
    digits = phone[1:] if plus else phone
    if digits.isdigit():
        return ("+" if plus else "") + _mask_digits(digits)
    return mask_text(phone)


def _replace(match: re.Match[str]) -> str:
    phone = match.group("phone")
    if phone is not None:
        return mask_phone(phone)
    userinfo = match.group("userinfo")
    if userinfo is not None:
        return userinfo + REDACTED + "@"
    return match.group("key") + REDACTED


def mask_text(text: str) -> str:
    """Hide phone numbers, URL passwords and ``secret=value`` pairs in free text."""
    if _HINT_RE.search(text.lower()) is None:
        return text
    return _TEXT_RE.sub(_replace, text)


_SECRET, _PHONE, _PLAIN = 1, 2, 0
_key_kinds: dict[str, int] = {}  # extra keys are a small fixed vocabulary: classify each once


def _key_kind(key: str) -> int:
    kind = _key_kinds.get(key)
    if kind is None:
        kind = _SECRET if _SECRET_KEY_RE.search(key) else _PHONE if _PHONE_KEY_RE.search(key) else _PLAIN
        if len(_key_kinds) < 4096:
            _key_kinds[key] = kind
    return kind


def _mask_value(key: str, value: Any, depth: int = 0) -> Any:
    kind = _key_kind(key)
    if kind == _SECRET:
        return REDACTED
    if isinstance(value, str):
        return mask_phone(value) if kind == _PHONE else mask_text(value)
    if isinstance(value, SecretStr | SecretBytes | bool | float | None):
        return value
    if isinstance(value, int):
        return mask_phone(str(value)) if kind == _PHONE else value
    if depth >= 4:
        return mask_text(str(value))
    if isinstance(value, Mapping):
        return {str(k): _mask_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(key, v, depth + 1) for v in value]
    return value  # other objects are stringified by the formatter, then masked there


class MaskingFilter(logging.Filter):
    """Masks phones and secrets in the message and the extras, and stamps the trace context.

    The message is formatted here once (``record.msg`` becomes the final text, ``args`` is
    dropped), so handlers and formatters downstream do not format it again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_orbion_masked", False):  # already done by another handler
            return True
        record._orbion_masked = True
        record.msg = mask_text(record.getMessage())
        record.args = None
        attrs = record.__dict__
        extra_keys = [key for key in attrs if key not in _RESERVED]
        for key in extra_keys:
            attrs[key] = _mask_value(key, attrs[key])
        record._orbion_extras = extra_keys  # the formatter reuses this list
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = None
            record.span_id = None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    attrs = record.__dict__
    keys = attrs.get("_orbion_extras")
    if keys is None:  # record did not pass through MaskingFilter
        keys = [k for k in attrs if k not in _RESERVED]
    return {k: attrs[k] for k in keys}


_last_second: list[Any] = [None, ""]  # (second, "YYYY-MM-DDTHH:MM:SS"): strftime once per second


def _timestamp(created: float) -> str:
    second = int(created)
    if _last_second[0] != second:
        _last_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_last_second[1]}.{int((created - second) * 1000):03d}Z"


def _json_default(obj: Any) -> str:
    return mask_text(str(obj))  # SecretStr prints "**********"; other objects may carry phones


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, msg, trace_id, span_id, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            out["trace_id"] = trace_id
            out["span_id"] = getattr(record, "span_id", None)
        for key, value in _extras(record).items():
            out[key if key not in out else f"x_{key}"] = value
        if record.exc_info:
            out["exc"] = mask_text(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = mask_text(self.formatStack(record.stack_info))
        try:
            return orjson.dumps(out, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits: never lose the line
            return json.dumps(out, default=_json_default, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable single line (``log_json=false``), same fields as the JSON format."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} {self.service} "
            f"{record.name}: {record.getMessage()}"
        )
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line += f" trace_id={trace_id}"
        if record.exc_info:
            line += "\n" + mask_text(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + mask_text(self.formatStack(record.stack_info))
        return line


class _OrbionHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marker subclass so that a second configure_logging() replaces, not duplicates, it."""


def configure_logging(service: str, settings: CommonSettings, *, stream: IO[str] | None = None) -> None:
    """Send every log record of this process to ``stream`` (stderr) in the ORBION format.

    Idempotent: calling it again replaces the handler it installed before. ``service`` is the
    short name ("gateway", "llm-proxy", ...). Uvicorn's access log stays off (request metrics
    and traces cover it); its error log goes through the same handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _OrbionHandler):
            root.removeHandler(handler)
    handler = _OrbionHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter(service) if settings.log_json else TextFormatter(service))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request at INFO: the monitor's polling would drown everything else.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
