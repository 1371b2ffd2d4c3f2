"""The send providers against the fake Cloud API: the message id of an accepted send, Graph error
codes, and no answer at all (refused connection, timeout) as a retryable SendError."""

from __future__ import annotations

import socket

import pytest

from orbion_llm_proxy.domain import SendVerdict
from orbion_llm_proxy.settings import Settings
from orbion_llm_proxy.whatsapp import CloudApi, SendError
from tests.fakes.whatsapp import FakeWhatsApp


def _cloud(base_url: str, timeout: float = 5.0) -> CloudApi:
    settings = Settings(
        whatsapp_token="test-token", whatsapp_api_base_url=base_url, whatsapp_phone_number_id="123",
        whatsapp_send_timeout_seconds=timeout,
    )  # fmt: skip
    return CloudApi(settings)


async def test_accepted_send_returns_the_message_id_and_carries_the_context() -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        provider = _cloud(base_url)
        try:
            message_id = await provider.send_text("5511999990000", "Olá, Ana!", "wamid.IN")
        finally:
            await provider.aclose()
    [sent] = fake.sent
    assert message_id == sent["id"] and message_id.startswith("wamid.")
    assert (sent["to"], sent["text"]) == ("5511999990000", "Olá, Ana!")
    assert sent["context_message_id"] == "wamid.IN"


async def test_graph_error_code_reaches_the_verdict() -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        fake.script_errors(131056)
        provider = _cloud(base_url)
        try:
            with pytest.raises(SendError) as raised:
                await provider.send_text("5511999990000", "oi")
        finally:
            await provider.aclose()
    assert (raised.value.status, raised.value.code) == (400, 131056)
    assert raised.value.verdict is SendVerdict.RATE_LIMITED


async def test_refused_connection_is_a_retryable_send_error_without_status() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = _cloud(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(SendError) as raised:
            await provider.send_text("5511999990000", "oi")
    finally:
        await provider.aclose()
    assert raised.value.status is None and raised.value.verdict is SendVerdict.RETRY


async def test_read_timeout_is_a_retryable_send_error_without_status() -> None:
    fake = FakeWhatsApp(timeout_rate=1.0)
    async with fake as base_url:
        provider = _cloud(base_url, timeout=0.2)
        try:
            with pytest.raises(SendError) as raised:
                await provider.send_text("5511999990000", "oi")
        finally:
            await provider.aclose()
    assert raised.value.status is None and raised.value.verdict is SendVerdict.RETRY
