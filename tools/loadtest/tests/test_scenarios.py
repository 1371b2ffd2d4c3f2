"""Simulated contacts: a realistic mix, roles that say which reply is due, the per-phone budget."""

from __future__ import annotations

from collections import Counter, defaultdict

from orbion_common import optout
from orbion_loadtest.scenarios import Kind, Mix, Role, Scenario
from orbion_loadtest.schedule import arrivals, constant


def plan(rate: float = 50.0, seconds: float = 60.0, **kw):
    return Scenario(seed=5, run_tag=42, **kw).plan(arrivals(constant(rate, seconds)))


def test_every_arrival_gets_one_message_with_a_unique_id_except_duplicates():
    planned = plan()
    assert len(planned) == 3000
    ids = Counter(p.message_id for p in planned if p.role is not Role.DUPLICATE)
    assert max(ids.values()) == 1
    originals = {p.seq: p for p in planned}
    for p in planned:
        if p.role is Role.DUPLICATE:
            original = originals[p.duplicate_of]
            assert (p.message_id, p.phone, p.text) == (original.message_id, original.phone, original.text)
            assert p.at > original.at


def test_the_mix_has_conversations_pricing_opt_outs_bots_and_both_languages():
    planned = plan()
    kinds = Counter(p.kind for p in planned)
    assert set(kinds) == {Kind.CONVERSATION, Kind.PRICING, Kind.OPT_OUT, Kind.BOT}
    assert kinds[Kind.CONVERSATION] > kinds[Kind.PRICING] > 0
    assert any(p.phone.startswith("55") for p in planned) and any(p.phone.startswith("1555") for p in planned)
    assert 0 < sum(p.role is Role.DUPLICATE for p in planned) < 0.05 * len(planned)


def test_an_opt_out_contact_says_a_stop_word_and_nothing_after_it_may_be_answered():
    planned = plan()
    by_contact = defaultdict(list)
    for p in planned:
        if p.kind is Kind.OPT_OUT and p.role is not Role.DUPLICATE:
            by_contact[p.phone].append(p)
    finished = [msgs for msgs in by_contact.values() if any(optout.is_opt_out(m.text) for m in msgs)]
    assert finished
    for msgs in finished:
        stop = next(i for i, m in enumerate(msgs) if optout.is_opt_out(m.text))
        assert all(m.role is Role.FORBIDDEN for m in msgs[stop:])
        assert all(m.role is Role.OPTIONAL for m in msgs[:stop])


def test_ordinary_contacts_stay_under_the_per_phone_rate_limit():
    planned = plan(rate=200.0, seconds=90.0)
    times = defaultdict(list)
    for p in planned:
        if p.kind is not Kind.BOT:
            times[p.phone].append(p.at)
    for ts in times.values():
        ts.sort()
        for i, t in enumerate(ts):
            in_window = sum(1 for u in ts[i:] if u < t + 60.0)
            assert in_window <= Mix().max_per_minute + 2  # duplicates may add one or two


def test_bots_exceed_the_per_phone_limit_and_expect_no_answer():
    planned = plan(rate=100.0, seconds=60.0, mix=Mix(conversation=0.5, pricing=0.1, opt_out=0.1, bot=0.3))
    bots = Counter(p.phone for p in planned if p.kind is Kind.BOT)
    assert max(bots.values()) > 20
    assert all(p.role in (Role.OPTIONAL, Role.DUPLICATE) for p in planned if p.kind is Kind.BOT)


def test_a_burst_is_sent_in_consecutive_arrivals():
    planned = [p for p in plan(rate=20.0, seconds=30.0) if p.role is not Role.DUPLICATE]
    turns = defaultdict(list)
    for i, p in enumerate(planned):
        turns[(p.phone, p.turn)].append(i)
    multi = [idx for idx in turns.values() if len(idx) > 1]
    assert multi
    assert all(idx == list(range(idx[0], idx[0] + len(idx))) for idx in multi)


def test_two_runs_never_share_a_phone_number():
    a = {p.phone for p in Scenario(seed=1, run_tag=1).plan(arrivals(constant(10, 10)))}
    b = {p.phone for p in Scenario(seed=1, run_tag=2).plan(arrivals(constant(10, 10)))}
    assert not a & b
