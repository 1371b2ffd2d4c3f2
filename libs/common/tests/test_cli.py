"""The `orbion` command line: help everywhere, infra from another terminal, signed webhooks, send."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from orbion_common.cli import main
from orbion_common.cli.services import tool_module
from orbion_common.cli.up import Printer, Supervisor
from orbion_common.cli.webhooks import cloud_text_webhook, message_id_of, sign

HELP_PURPOSES = {
    (): "WhatsApp AI sales agent",
    ("infra",): "NATS (JetStream), PostgreSQL and Redis",
    ("infra", "start"): "wait until each answers",
    ("infra", "stop"): "Stop the local servers",
    ("infra", "status"): "whether it answers",
    ("up",): "all five services",
    ("serve",): "Run one service",
    ("migrate",): "migrations",
    ("send",): "WhatsApp Cloud API text-message webhook",
    ("bench",): "benchmarks",
    ("loadtest",): "load test",
    ("rebuild",): "rebuild",
}


@pytest.mark.parametrize("command", list(HELP_PURPOSES), ids=lambda c: " ".join(c) or "orbion")
def test_every_command_explains_itself(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).lower()  # argparse wraps lines
    assert HELP_PURPOSES[command].lower() in text


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "orbion"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("infra", "up", "serve", "migrate", "send"):
        assert command in result.stdout


def _env_without_urls() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not (k.startswith("ORBION_") and k.endswith("_URL"))}


def _orbion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orbion_common.cli", *args], capture_output=True, text=True, timeout=90,
        env=_env_without_urls(), check=False,
    )


def test_infra_started_in_one_terminal_is_seen_and_stopped_from_another(
    infra_data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ORBION_NATS_URL", "ORBION_DATABASE_URL", "ORBION_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    data = str(infra_data_dir / "data")
    started = _orbion("infra", "start", "--detach", "--data-dir", data)  # the other terminal
    assert started.returncode == 0, started.stdout + started.stderr
    assert "export ORBION_DATABASE_URL=postgresql://" in started.stdout
    try:
        assert main(["infra", "status", "--data-dir", data]) == 0
        assert capsys.readouterr().out.count(" running ") == 3
    finally:
        main(["infra", "stop", "--data-dir", data])
    assert "stopped: nats, postgres, redis" in capsys.readouterr().out
    assert main(["infra", "status", "--data-dir", data]) == 1
    assert capsys.readouterr().out.count(" stopped") == 3


def test_webhook_signature_verifies_only_for_the_exact_body() -> None:
    secret = "app-secret"
    body = orjson.dumps(cloud_text_webhook("+55 11 99999-0000", "Olá, quanto custa?", profile_name="Ana"))
    header = sign(body, secret)

    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(header, expected)
    tampered = body.replace(b"quanto", b"QUANTO")
    assert not hmac.compare_digest(sign(tampered, secret), header)
    assert not hmac.compare_digest(sign(body, "other-secret"), header)


def test_webhook_has_the_cloud_api_shape() -> None:
    body = cloud_text_webhook("5511999990000", "oi", profile_name="Ana", timestamp=1700000000)
    value = body["entry"][0]["changes"][0]["value"]
    assert body["object"] == "whatsapp_business_account"
    assert value["metadata"]["phone_number_id"]
    assert value["contacts"] == [{"profile": {"name": "Ana"}, "wa_id": "5511999990000"}]
    message = value["messages"][0]
    assert message["from"] == "5511999990000" and message["type"] == "text"
    assert message["text"] == {"body": "oi"} and message["timestamp"] == "1700000000"
    assert message_id_of(body).startswith("wamid.")
    assert message_id_of(cloud_text_webhook("1", "x")) != message_id_of(cloud_text_webhook("1", "x"))


class _FakeSystem(BaseHTTPRequestHandler):
    """Gateway + conversation API in one: checks the signature, answers after the inbound."""

    secret = "s3cret"
    received: ClassVar[list[dict[str, Any]]] = []
    history: ClassVar[list[dict[str, Any]]] = [
        {"id": "old-out", "direction": "outbound", "text": "an earlier reply", "created_at": "2024-01-01"}
    ]

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _json(self, status: int, payload: object) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        signature = self.headers.get("X-Hub-Signature-256")
        if self.path != "/webhooks/whatsapp" or signature != sign(raw, self.secret):
            self._json(401, {"error": "bad signature"})
            return
        message = json.loads(raw)["entry"][0]["changes"][0]["value"]["messages"][0]
        type(self).received.append(message)
        type(self).history = [
            *self.history,
            {"id": message["id"], "direction": "inbound", "text": message["text"]["body"]},
            {"id": "new-out", "direction": "outbound", "text": "Custa R$ 10."},
        ]
        self._json(200, {"status": "accepted"})

    def do_GET(self) -> None:
        if self.path.startswith("/api/conversations/5511999990000/messages"):
            self._json(200, {"messages": self.history})
        else:
            self._json(404, {"error": "not found"})


@pytest.fixture
def fake_system() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSystem)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_send_posts_a_signed_webhook_and_prints_the_new_reply(
    fake_system: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORBION_WHATSAPP_APP_SECRET", _FakeSystem.secret)
    code = main(["send", "--phone", "5511999990000", "Olá, quanto custa?", "--gateway", fake_system,
                 "--conversation", fake_system, "--timeout", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reply: Custa R$ 10." in out
    assert "an earlier reply" not in out
    assert _FakeSystem.received[-1]["text"]["body"] == "Olá, quanto custa?"


def test_send_fails_clearly_when_the_gateway_is_down(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["send", "oi", "--gateway", "http://127.0.0.1:9", "--conversation", "http://127.0.0.1:9",
                 "--timeout", "1"])
    assert code == 1
    assert "not reachable" in capsys.readouterr().out


_DIES_AT_ONCE = "import sys; print('booting', flush=True); sys.exit(3)"
_DRAINS_ON_SIGTERM = """
import signal, sys, time
def drain(*_):
    print('draining in-flight work', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
print('serving', flush=True)
while True:
    time.sleep(0.05)
"""


def _script(code: str) -> Callable[[str], list[str]]:
    return lambda service: [sys.executable, "-c", code]


async def _wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)


async def test_up_restarts_a_dying_service_once_then_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = Supervisor(["lead"], dict(os.environ), Printer(), command=_script(_DIES_AT_ONCE))
    await supervisor.start_all()
    await _wait_for(lambda: "lead" in supervisor.failed)
    await supervisor.stop_all(grace=5)

    out = capsys.readouterr().out
    assert supervisor.failed == {"lead"}
    assert out.count("lead         | booting") == 2  # prefixed, and run exactly twice
    assert "restarting lead once" in out
    assert "lead died again; not restarting it" in out


async def test_up_stops_services_with_sigterm_so_they_drain(capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = Supervisor(
        ["gateway", "monitor"], dict(os.environ), Printer(), command=_script(_DRAINS_ON_SIGTERM)
    )
    seen = ""

    def both_serving() -> bool:  # each prints "serving" once its SIGTERM handler is installed
        nonlocal seen
        seen += capsys.readouterr().out
        return seen.count("| serving") == 2

    await supervisor.start_all()
    await _wait_for(both_serving)
    await supervisor.stop_all(grace=10)

    out = seen + capsys.readouterr().out
    assert not supervisor.failed
    assert "gateway      | draining in-flight work" in out
    assert "gateway stopped (exit code 0)" in out and "monitor stopped (exit code 0)" in out
    assert out.index("gateway stopped") < out.index("monitor stopped")  # inflow first, monitor last


@pytest.mark.parametrize(
    ("argv", "module", "rest"),
    [
        (["bench", "llm-proxy", "--json"], "orbion_llm_proxy.bench", ["--json"]),
        (["bench", "events", "--rounds", "1"], "orbion_common.events.bench", ["--rounds", "1"]),
        (["bench", "bus", "--rates", "50"], "orbion_common.busbench", ["--rates", "50"]),
        (["bench", "--json"], "orbion_loadtest.bench", ["--json"]),
        (["loadtest", "soak", "--rate", "5"], "orbion_loadtest.cli", ["soak", "--rate", "5"]),
        (["rebuild", "lead"], "orbion_lead.rebuild", []),
    ],
)
def test_tool_commands_reach_the_module_that_owns_them(argv: list[str], module: str, rest: list[str]) -> None:
    assert tool_module(argv[0], argv[1:]) == (module, rest)


def test_rebuild_without_a_service_says_which_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rebuild"]) == 2
    assert "needs a target: gateway, conversation, lead" in capsys.readouterr().out
