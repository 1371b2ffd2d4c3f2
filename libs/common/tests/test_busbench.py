"""``orbion bench bus`` runs end to end on tiny numbers (figures are printed, not asserted)."""

from __future__ import annotations

import json

import pytest

from orbion_common import busbench


def test_the_bus_benchmark_consumes_every_event_published_and_prints_its_cpu(
    nats_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORBION_NATS_URL", nats_url)
    busbench.main(["--use-configured", "--rates", "100", "--seconds", "1", "--rounds", "1", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("100 events/s: consumer ")
    (figures,) = json.loads(out[-1])["bus"]
    assert figures["events"] == 100
    assert figures["consumer_cpu_us_per_event"] > 0
    assert "nats_cpu_us_per_event" not in figures  # a shared server's CPU is not the bench's
