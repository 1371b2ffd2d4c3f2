"""``orbion bench gateway`` runs end to end on tiny numbers (figures are printed, not asserted)."""

from __future__ import annotations

import orjson
import pytest

from orbion_gateway import bench


def test_the_benchmark_runs_and_ends_with_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--rate", "100", "--seconds", "0.5", "--saturation-requests", "100", "--rounds", "1"]
    assert bench.main([*argv, "--warmup", "20", "--connections", "4", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = orjson.loads(last)
    for target in ("gateway", "baseline"):
        for phase in ("open_loop", "saturation"):
            assert figures[target][phase]["accepted"] == figures[target][phase]["sent"] > 0
    assert figures["gateway_vs_baseline"] > 0
