"""The runner's wait, before a step, for the services to work off what earlier steps left."""

from __future__ import annotations

from orbion_loadtest.runner import wait_for_backlogs


class Backlogs:
    def __init__(self, *reads: dict[str, int] | None) -> None:
        self.reads = list(reads)
        self.count = 0

    async def __call__(self) -> dict[str, int] | None:
        self.count += 1
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


async def test_a_step_waits_until_every_consumer_has_worked_off_its_backlog():
    read = Backlogs({"conversation": 0, "lead-events": 900}, {"conversation": 0, "lead-events": 12},
                    {"conversation": 0, "lead-events": 0})  # fmt: skip
    waited = await wait_for_backlogs(read, limit=10, interval=0.01)
    assert read.count == 3
    assert 0.02 <= waited < 1


async def test_no_backlog_or_an_unknown_one_starts_the_step_at_once():
    for backlog in ({"conversation": 0}, {}, None):
        read = Backlogs(backlog)
        assert await wait_for_backlogs(read, limit=10, interval=0.01) < 0.01
        assert read.count == 1


async def test_a_backlog_that_keeps_shrinking_is_waited_for_at_most_the_limit():
    read = Backlogs(*({"lead-events": n} for n in range(1000, 0, -1)))
    waited = await wait_for_backlogs(read, limit=0.05, stall=1, interval=0.01)
    assert 0.05 <= waited < 0.5


async def test_a_backlog_that_stops_shrinking_is_not_waited_for_longer_than_the_stall():
    # A durable consumer that no running service reads: its backlog never moves.
    read = Backlogs({"lead-events": 0, "forgotten": 7})
    waited = await wait_for_backlogs(read, limit=10, stall=0.05, interval=0.01)
    assert 0.05 <= waited < 0.5
