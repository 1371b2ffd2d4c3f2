"""The dashboard in a real headless Chromium: it loads without console errors and shows the
traffic sent to the monitor. The screenshot (1280x800) is saved to results/monitor-dashboard.png."""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orbion_common.service import create_service_app
from orbion_monitor.app import build_app
from orbion_monitor.bench import encode_protobuf, message_trace
from orbion_monitor.settings import Settings
from orbion_monitor.state import Monitor

ServeFactory = Callable[..., Any]  # the `serve` fixture of conftest.py
RESULTS = Path(__file__).resolve().parents[3] / "results"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)"
)


async def chromium(url: str, profile: Path, *args: str) -> tuple[str, str]:
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,800",
        # Virtual time lets the page's fetches and first render finish before the dump / screenshot.
        "--virtual-time-budget=5000", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace"), err.decode(errors="replace")


def console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message (errors, failed loads, uncaught exceptions) as CONSOLE.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


async def test_dashboard_loads_without_console_errors_and_shows_traffic(
    tmp_path: Path, make_settings: Callable[..., Settings], serve: ServeFactory
) -> None:
    base = make_settings()
    breakers = {"openai": "closed", "whatsapp": "closed", "sheets": "closed"}
    llm_proxy = create_service_app("llm-proxy", base, info=lambda: {"breakers": breakers})
    async with serve(llm_proxy, base) as llm_url, httpx.AsyncClient(timeout=5) as client:
        settings = make_settings(monitor_targets={"llm-proxy": llm_url})
        monitor = Monitor(settings, client)
        async with serve(build_app(settings, monitor), settings) as url:
            spans = []
            for i in range(1, 41):
                spans += message_trace(i.to_bytes(16, "big"), 10**18, llm_ms=300 + 25 * i)
            sent = await client.post(
                f"{url}/v1/traces",
                content=encode_protobuf(spans),
                headers={"content-type": "application/x-protobuf"},
            )
            assert sent.status_code == 200
            await monitor.refresh()

            dom, stderr = await chromium(f"{url}/", tmp_path / "profile", "--dump-dom")
            RESULTS.mkdir(exist_ok=True)
            shot = RESULTS / "monitor-dashboard.png"
            shot.unlink(missing_ok=True)
            _, shot_err = await chromium(f"{url}/", tmp_path / "profile2", f"--screenshot={shot}")
        await monitor.stop()

    assert console_lines(stderr) == [] and console_lines(shot_err) == []
    assert re.search(r'<div id="js-errors" hidden=""></div>', dom), "the page caught a JavaScript error"
    messages = re.search(r'id="kpi-messages" data-value="([0-9.]+)"', dom)
    assert messages is not None and float(messages.group(1)) > 0
    assert re.search(r'id="kpi-e2e">\d+ ms / [\d.]+ s / [\d.]+ s<', dom)
    assert 'data-status="ok"' in dom
    assert dom.count('class="stagebar"') == 8  # the eight slowest messages with their stages
    assert "llm-proxy" in dom and "openai" in dom  # the service and its breakers
    assert "no active alerts" in dom
    assert shot.exists() and png_size(shot) == (1280, 800)
