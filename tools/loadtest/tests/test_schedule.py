"""The open-loop arrival schedule: how many messages, when, in which phase."""

from __future__ import annotations

import pytest

from orbion_loadtest.schedule import Segment, arrivals, constant, duration, ladder_rates, spike


def test_a_constant_rate_spaces_arrivals_evenly_from_the_start():
    times = [a.at for a in arrivals(constant(4.0, 2.0))]
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


def test_a_low_per_minute_rate_still_sends_its_share():
    # 10 msg/min for 30 s: five messages, six seconds apart
    times = [a.at for a in arrivals(constant(10 / 60, 30.0))]
    assert times == pytest.approx([0.0, 6.0, 12.0, 18.0, 24.0])


def test_a_spike_sends_ten_times_the_base_rate_in_its_window_only():
    schedule = arrivals(spike(2.0, factor=10, before=5, spike_seconds=3, after=5))
    by_phase = {p: [a.at for a in schedule if a.phase == p] for p in ("before", "spike", "after")}
    assert len(by_phase["before"]) == 10
    assert len(by_phase["spike"]) == 60
    assert len(by_phase["after"]) == 10
    assert min(by_phase["spike"]) == pytest.approx(5.0)
    assert max(by_phase["spike"]) < 8.0 <= min(by_phase["after"])
    assert [a.at for a in schedule] == sorted(a.at for a in schedule)


def test_poisson_arrivals_keep_the_average_rate_and_are_reproducible():
    first = arrivals(constant(100.0, 60.0), poisson=True, seed=3)
    again = arrivals(constant(100.0, 60.0), poisson=True, seed=3)
    assert [a.at for a in first] == [a.at for a in again]
    assert 5600 < len(first) < 6400  # 6000 expected; a 4-sigma band
    assert all(0 <= a.at < 60.0 for a in first)


def test_negative_rates_are_refused():
    with pytest.raises(ValueError):
        arrivals([Segment(-1.0, 5.0)])


def test_the_ladder_starts_with_the_plans_per_minute_steps():
    rates = ladder_rates([10, 50, 100, 200], [10, 50])
    assert rates == pytest.approx([10 / 60, 50 / 60, 100 / 60, 200 / 60, 10, 50])
    assert duration(spike(1.0)) == 90.0
