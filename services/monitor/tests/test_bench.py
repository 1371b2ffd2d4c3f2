"""`orbion bench monitor` runs end to end and prints its figures as JSON on the last line."""

from __future__ import annotations

import orjson
import pytest

from orbion_monitor import bench


def test_bench_prints_figures_and_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--spans", "6000", "--http-spans", "0", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = orjson.loads(lines[-1])
    assert figures["spans"] >= 5000
    assert figures["spans_per_second"] > 0
    assert figures["messages_aggregated"] == figures["spans"] // 8
    assert "spans/s" in lines[1]
