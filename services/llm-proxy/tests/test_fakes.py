"""The fakes as tools: started from the command line, knobs changed over HTTP, sends recorded."""

from __future__ import annotations

import asyncio
import socket
import sys

import httpx

from .conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_whatsapp_fake_runs_from_the_command_line_with_fault_knobs() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.whatsapp", "--port", str(port), "--error-rate", "1.0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        assert f":{port}" in line.decode()
        base = f"http://127.0.0.1:{port}"
        body: dict[str, object] = {
            "messaging_product": "whatsapp", "to": "5511999990000", "type": "text", "text": {"body": "oi"},
        }  # fmt: skip
        headers = {"Authorization": "Bearer test-token"}
        async with httpx.AsyncClient(base_url=base) as client:
            failed = await client.post("/v21.0/123/messages", json=body, headers=headers)
            assert failed.status_code == 500 and failed.json()["error"]["code"] == 131000
            await client.post("/_faults", json={"error_rate": 0})
            body["context"] = {"message_id": "wamid.IN1"}
            ok = await client.post("/v21.0/123/messages", json=body, headers=headers)
            assert ok.status_code == 200 and ok.json()["messages"][0]["id"].startswith("wamid.")
            [sent] = (await client.get("/_sent")).json()["sent"]
        assert sent["to"] == "5511999990000" and sent["context_message_id"] == "wamid.IN1"
    finally:
        proc.terminate()
        await proc.wait()
