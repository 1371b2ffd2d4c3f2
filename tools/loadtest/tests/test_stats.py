"""Percentile math and the accounting of a step: lost, duplicate and unwanted replies, latency."""

from __future__ import annotations

import random

import pytest

from orbion_loadtest.scenarios import Kind, Planned, Role
from orbion_loadtest.stats import Outcome, Send, account, percentile, spread, summary


def test_percentiles_interpolate_between_ranks_like_numpys_default():
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_percentiles_do_not_depend_on_input_order():
    values = [random.Random(1).random() for _ in range(1001)]
    shuffled = values[:]
    random.Random(2).shuffle(shuffled)
    assert percentile(values, 99) == percentile(shuffled, 99)
    assert percentile(values, 50) == sorted(values)[500]


def test_summary_and_spread_scale_and_count():
    s = summary([0.001, 0.002, 0.003], scale=1000)
    assert s["count"] == 3 and s["p50"] == 2.0 and s["max"] == 3.0 and s["mean"] == 2.0
    assert summary([])["p99"] is None
    sp = spread([1, 2, 3, 4, 5])
    assert (sp["median"], sp["p25"], sp["p75"]) == (3, 2, 4)


# -- accounting ------------------------------------------------------------------------------


def msg(seq, phone="5511900000001", turn=0, role=Role.DUE, kind=Kind.CONVERSATION, dup_of=None, mid=None):
    return Planned(
        seq=seq,
        at=float(seq),
        phase="steady",
        phone=phone,
        contact=0,
        kind=kind,
        turn=turn,
        message_id=mid or f"wamid.{seq}",
        text=f"text {seq}",
        role=role,
        profile_name="Ana",
        duplicate_of=dup_of,
    )


OK = Outcome(200, 0.01)


def judge(planned, sends, outcomes=None, **kw):
    outcomes = outcomes if outcomes is not None else {p.seq: OK for p in planned}
    return account(planned, outcomes, sends, scheduled_epoch={p.seq: 1000.0 + p.at for p in planned}, **kw)


def test_every_due_message_answered_is_neither_lost_nor_duplicated():
    planned = [msg(1, turn=0), msg(2, turn=1)]
    v = judge(
        planned,
        [Send(planned[0].phone, "wamid.1", "hi", 1001.5), Send(planned[1].phone, "wamid.2", "x", 1002.4)],
    )
    assert (v.due, v.covered, v.lost, v.duplicate_sends) == (2, 2, 0, 0)
    assert v.e2e == pytest.approx([0.5, 0.4])


def test_a_due_message_without_any_reply_is_lost():
    planned = [msg(1, turn=0), msg(2, phone="5511900000002", turn=0)]
    v = judge(planned, [Send(planned[0].phone, "wamid.1", "hi", 1001.5)])
    assert v.lost == 1
    assert "wamid.2" in v.lost_examples[0]


def test_a_burst_answered_once_after_its_last_message_covers_the_whole_burst():
    planned = [msg(1, turn=0), msg(2, turn=0), msg(3, turn=0)]
    v = judge(planned, [Send(planned[0].phone, "wamid.3", "one reply", 1005.0)])
    assert (v.due, v.covered, v.lost, v.replies) == (3, 3, 0, 1)


def test_a_later_turns_reply_covers_an_earlier_turn_folded_into_it():
    planned = [msg(1, turn=0), msg(2, turn=1)]
    v = judge(planned, [Send(planned[0].phone, "wamid.2", "late", 1010.0)])
    assert v.lost == 0
    assert v.turns_merged == 1


def test_a_reply_to_an_earlier_turn_does_not_cover_a_later_one():
    planned = [msg(1, turn=0), msg(2, turn=1)]
    v = judge(planned, [Send(planned[0].phone, "wamid.1", "r", 1001.2)])
    assert v.lost == 1


def test_two_sends_answering_the_same_message_are_a_duplicate():
    planned = [msg(1)]
    sends = [Send(planned[0].phone, "wamid.1", "r", 1001.2), Send(planned[0].phone, "wamid.1", "r", 1003.0)]
    v = judge(planned, sends)
    assert v.duplicate_sends == 1
    assert v.lost == 0
    assert v.e2e == pytest.approx([0.2])  # latency of the first one


def test_a_duplicate_webhook_needs_no_reply_of_its_own():
    planned = [msg(1), msg(2, role=Role.DUPLICATE, dup_of=1, mid="wamid.1")]
    outcomes = {1: OK, 2: Outcome(200, 0.01, duplicate=True)}
    v = judge(planned, [Send(planned[0].phone, "wamid.1", "r", 1001.2)], outcomes)
    assert (v.due, v.lost, v.duplicate_sends, v.duplicates_acked) == (1, 0, 0, 1)


def test_a_reply_after_a_stop_word_is_unwanted_and_none_is_not_lost():
    planned = [
        msg(1, role=Role.OPTIONAL, kind=Kind.OPT_OUT),
        msg(2, turn=1, role=Role.FORBIDDEN, kind=Kind.OPT_OUT),
    ]
    assert judge(planned, []).lost == 0
    v = judge(planned, [Send(planned[0].phone, "wamid.2", "oops", 1003.0)])
    assert v.unwanted_replies == 1


def test_throttled_and_refused_messages_are_not_due_and_refusals_are_errors():
    planned = [msg(1), msg(2, phone="5511900000002"), msg(3, phone="5511900000003")]
    outcomes = {
        1: Outcome(200, 0.01, throttled=True),
        2: Outcome(503, 0.2),
        3: Outcome(None, 5.0, error="ReadTimeout"),
    }
    v = judge(planned, [], outcomes)
    assert (v.due, v.lost, v.throttled, v.errors) == (0, 0, 1, 2)
    assert v.error_rate == pytest.approx(2 / 3)
    assert v.error_kinds == {"http 503": 1, "ReadTimeout": 1}


def test_a_contact_asked_to_prove_it_is_human_owes_no_reply():
    planned = [msg(1)]
    v = judge(planned, [Send(planned[0].phone, "", "Você é uma pessoa? Responda SIM", 1001.0)])
    assert (v.due, v.lost, v.verification_questions, v.verified_contacts_normal) == (0, 0, 1, 1)


def test_pipeline_share_removes_the_llm_call_and_the_quiet_period_but_not_for_cached_replies():
    planned = [msg(1), msg(2, phone="5511900000002")]
    sends = [
        Send(planned[0].phone, "wamid.1", "[llm:7] Obrigado", 1001.0 + 1.5 + 0.3 + 0.05),
        Send(planned[1].phone, "wamid.2", "[llm:7] Obrigado", 1002.0 + 1.5 + 0.02),  # same call: cache hit
    ]
    v = judge(planned, sends, llm_seconds={7: 0.3}, quiet_period=1.5)
    assert v.sources == {"llm": 1, "cache": 1}
    assert v.llm == pytest.approx([0.3])
    assert v.pipeline == pytest.approx([0.05, 0.02])


def test_replies_to_messages_of_other_steps_are_counted_apart():
    v = judge(
        [msg(1)],
        [Send("5511900000001", "wamid.1", "r", 1001.1), Send("5511999999999", "wamid.zzz", "r", 1001.0)],
    )
    assert v.replies_foreign == 1 and v.replies == 1


def test_the_timeline_buckets_replies_by_when_their_message_was_scheduled():
    from orbion_loadtest.stats import timeline

    samples = [(1000.0 + t, 0.1) for t in range(0, 10)] + [(1020.0 + t, 2.0) for t in range(0, 10)]
    buckets = timeline(samples, 1000.0, 10.0)
    assert [b["from_s"] for b in buckets] == [0.0, 20.0]
    assert [b["replies"] for b in buckets] == [10, 10]
    assert buckets[0]["p99"] == pytest.approx(100.0) and buckets[1]["p50"] == pytest.approx(2000.0)


def test_stage_times_join_each_reply_to_its_inbound_message_and_skip_incomplete_ones() -> None:
    from orbion_loadtest.runner import join_stages

    rows = join_stages(
        inbound=[("wamid.1", 100.0, 100.01), ("wamid.2", 100.5, 100.52), ("wamid.3", 100.0, 103.0)],
        requested=[
            ("rk1", "wamid.1", 1.5, 101.53),
            ("rk2", "wamid.2", 1.5, 102.1),
            ("rk3", "wamid.3", 1.5, 104.5),
        ],
        generated=[("rk1", 101.6, 101.58), ("rk3", 104.6, 104.55)],
        sent=[("rk1", 101.7), ("rk3", 104.7)],
    )
    assert len(rows) == 2  # rk2 was never generated nor sent: no stages for it
    row, late = rows
    assert row["rk"] == "rk1"
    assert abs(row["stored"] - 0.01) < 1e-9
    # The quiet period starts at the gateway's receipt: 101.53 - 100.0 - 1.5.
    assert abs(row["scheduled"] - 0.03) < 1e-9
    # ... or 0.1 s before a late message was stored: 104.5 - (103.0 - 0.1) - 1.5.
    assert abs(late["scheduled"] - 0.1) < 1e-9
    assert abs(row["generated"] - 0.07) < 1e-9
    assert abs(row["sent"] - 0.1) < 1e-9
