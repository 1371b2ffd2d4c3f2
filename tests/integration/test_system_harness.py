"""The process harness itself: it must not take another process's answer for a service's."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.system import System, free_ports


class _LeadReady(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ready", "service": "lead"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lead_on_a_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LeadReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_free_ports_are_all_different() -> None:
    ports = free_ports(50)
    assert len(set(ports)) == 50


async def test_a_service_is_not_ready_because_another_one_answers_on_its_port(
    lead_on_a_port: int, tmp_path: Path
) -> None:
    ports = {"lead": lead_on_a_port, "llm-proxy": lead_on_a_port}  # as when two drew one port
    system = System("nats://unused", "postgresql://unused", "redis://unused", tmp_path, ports=ports)
    await system.wait_ready(["lead"], timeout=5)
    with pytest.raises(AssertionError, match="not ready after"):
        await system.wait_ready(["llm-proxy"], timeout=0.5)
