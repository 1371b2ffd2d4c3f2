"""JSON log lines, trace ids, phone masking and secret redaction (orbion_common.logging)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from orbion_common.logging import configure_logging, mask_phone, mask_text
from orbion_common.settings import CommonSettings
from orbion_common.telemetry import setup_telemetry, tracer

PHONE = "5511999990000"
MASKED = "551199*****00"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging() into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("testsvc", CommonSettings(log_json=True, log_level="DEBUG"), stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_mask_phone_keeps_first_six_and_last_two_digits() -> None:
    assert mask_phone(PHONE) == MASKED
    assert mask_phone("+" + PHONE) == "+" + MASKED
    assert mask_phone("1234") == "****"


def test_json_line_has_the_documented_fields(log_stream: io.StringIO) -> None:
    logging.getLogger("orbion.test").info("hello %s", "world", extra={"event_id": "e1", "n": 3})
    (line,) = lines(log_stream)
    assert line["msg"] == "hello world"
    assert line["service"] == "testsvc"
    assert line["level"] == "INFO"
    assert line["logger"] == "orbion.test"
    assert str(line["ts"]).endswith("Z") and str(line["ts"])[:2] == "20"
    assert line["event_id"] == "e1" and line["n"] == 3
    assert "trace_id" not in line  # no span active


def test_json_line_inside_a_span_carries_its_trace_id(log_stream: io.StringIO) -> None:
    setup_telemetry("test", CommonSettings())
    with tracer("test").start_as_current_span("work") as span:
        logging.getLogger("orbion.test").warning("inside")
        ctx = span.get_span_context()
    (line,) = lines(log_stream)
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


def test_phone_numbers_are_masked_in_message_and_extras(log_stream: io.StringIO) -> None:
    logging.getLogger("orbion.test").info(
        "message from %s to +%s",
        PHONE,
        PHONE,
        extra={"stream_id": PHONE, "phone": int(PHONE), "payload": {"from": PHONE, "to": [f"+{PHONE}"]}},
    )
    (line,) = lines(log_stream)
    raw = log_stream.getvalue()
    assert PHONE not in raw
    assert line["msg"] == f"message from {MASKED} to +{MASKED}"
    assert line["stream_id"] == MASKED
    assert line["phone"] == MASKED
    assert line["payload"] == {"from": MASKED, "to": [f"+{MASKED}"]}


def test_ids_made_of_hex_and_short_numbers_are_not_masked(log_stream: io.StringIO) -> None:
    event_id = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    logging.getLogger("orbion.test").info("event %s at position 123456 v%d", event_id, 7)
    (line,) = lines(log_stream)
    assert line["msg"] == f"event {event_id} at position 123456 v7"


def test_secrets_are_redacted_in_extras_and_text(log_stream: io.StringIO) -> None:
    logging.getLogger("orbion.test").info(
        "calling with token=abc123 and Authorization: Bearer s3cr3t via redis://user:pw9@host:6379/0",
        extra={
            "api_key": "k-123",
            "headers": {"Authorization": "Bearer s3cr3t", "Accept": "json"},
            "app_secret": SecretStr("shh"),
            "prompt_tokens": 12,
        },
    )
    raw = log_stream.getvalue()
    for secret in ("abc123", "s3cr3t", "pw9", "k-123", "shh"):
        assert secret not in raw
    (line,) = lines(log_stream)
    assert line["api_key"] == "***"
    assert line["headers"] == {"Authorization": "***", "Accept": "json"}
    assert line["prompt_tokens"] == 12  # token counters are not secrets
    assert "redis://user:***@host:6379/0" in str(line["msg"])


def test_exception_trace_is_logged_and_masked(log_stream: io.StringIO) -> None:
    try:
        raise ValueError(f"bad contact {PHONE}")
    except ValueError:
        logging.getLogger("orbion.test").exception("failed")
    (line,) = lines(log_stream)
    assert "Traceback" in str(line["exc"]) and "ValueError" in str(line["exc"])
    assert PHONE not in log_stream.getvalue()


def test_plain_text_mode_masks_too() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_logging("testsvc", CommonSettings(log_json=False), stream=stream)
        logging.getLogger("orbion.test").warning("from %s", PHONE, extra={"password": "pw"})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    text = stream.getvalue()
    assert f"WARNING testsvc orbion.test: from {MASKED}" in text
    assert "password=***" in text
    assert not text.lstrip().startswith("{")


def test_configure_twice_does_not_duplicate_lines(log_stream: io.StringIO) -> None:
    configure_logging("testsvc", CommonSettings(), stream=log_stream)
    logging.getLogger("orbion.test").info("once")
    assert len(lines(log_stream)) == 1


def test_values_json_cannot_encode_still_give_a_line(log_stream: io.StringIO) -> None:
    logging.getLogger("orbion.test").info("odd", extra={"big": 2**70, "obj": object()})
    (line,) = lines(log_stream)
    assert line["big"] == 2**70 and str(line["obj"]).startswith("<object object")


def test_mask_text_leaves_plain_text_alone() -> None:
    assert mask_text("nothing to hide here") == "nothing to hide here"
