"""What a run's report says: the sustainable rate, the tables, the cache ratios from counters."""

from __future__ import annotations

from orbion_loadtest import report
from orbion_loadtest.runner import cache_ratios, parse_process_metrics

SUMMARY = {"count": 1, "mean": 1.0, "min": 1.0, "p50": 1.0, "p90": 1.0, "p95": 1.0, "p99": 1.0, "p999": 1.0,
           "max": 1.0}  # fmt: skip


def step(rate: float, holds: bool, name: str = "") -> dict:
    return {
        "step": name or f"{rate:g}/s", "offered_rate": rate, "offered_per_minute": rate * 60, "sent": 10,
        "ack_rate": rate, "reply_rate": rate, "error_rate": 0.0, "ack_ms": SUMMARY, "e2e_ms": SUMMARY,
        "pipeline_ms": SUMMARY, "llm_ms": SUMMARY, "lost": 0, "duplicate_sends": 0, "unwanted_replies": 0,
        "replies_due": 5, "replies_covered": 5, "throttled": 0, "duplicate_webhooks_acked": 0,
        "verification_questions": 0, "missing_in_history": {"checked_contacts": 3, "missing": 0},
        "reply_sources": {"llm": 5}, "cache": {"conversation_history": {"hit_ratio": 0.9}},
        "resources": {"gateway": {"rss_peak_mb": 80.0, "cpu_percent": 3.0}},
        "slo": {"holds": holds, "reasons": [] if holds else ["pipeline p99 2000 ms > 1000 ms"]},
    }  # fmt: skip


def test_the_sustainable_rate_is_the_last_step_that_held_before_the_first_break():
    steps = [step(1, True), step(10, True), step(50, False), step(100, True)]
    best = report.sustainable(steps)
    assert best is not None and best["offered_rate"] == 10
    assert report.sustainable([step(1, False)]) is None


def test_the_markdown_report_names_the_machine_the_rate_and_every_step(tmp_path):
    meta = {"mode": "ladder", "machine": report.machine(), "slo": {"p99_ms": 1000.0, "error_rate": 0.001},
            "quiet_period_s": 1.5, "settings": {"ORBION_LOG_LEVEL": "WARNING"}}  # fmt: skip
    path = report.write(tmp_path, meta, [step(1, True), step(10, False)])
    text = path.read_text()
    assert "Sustainable rate: 1 msg/s" in text
    assert "| 10/s |" in text and "**breaks**: pipeline p99 2000 ms > 1000 ms" in text
    assert meta["machine"]["cpu"] in text
    assert meta["machine"]["python_mloops_per_s"] > 0
    assert f"One core's speed: {meta['machine']['python_mloops_per_s']} million Python loop steps" in text
    assert (tmp_path / "summary.json").exists()


def test_the_report_names_what_each_consumer_had_left_once_the_replies_were_in(tmp_path):
    meta = {"mode": "ladder", "machine": report.machine(), "slo": {"p99_ms": 1000.0, "error_rate": 0.001},
            "quiet_period_s": 1.5, "settings": {}}  # fmt: skip
    kept_up = step(100, True) | {"backlog_after_drain": {"conversation": 0, "lead-events": 0}}
    behind = step(400, True) | {"backlog_after_drain": {"conversation": 0, "lead-events": 1722}}
    unknown = step(10, True)  # a running system whose NATS the tool was not given
    text = report.write(tmp_path, meta, [behind, kept_up, unknown]).read_text()
    correctness = text.split("## Correctness per step")[1].split("##")[0]
    rows = [line for line in correctness.splitlines() if line.startswith("| ") and "/s |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 10/s", "| 100/s", "| 400/s"]  # by rate
    assert [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows] == ["–", "none", "lead-events 1722"]


def test_process_and_cache_figures_are_read_from_prometheus_text():
    text = (
        "process_resident_memory_bytes 1.048576e+08\n"
        "process_cpu_seconds_total 12.5\n"
        'orbion_cache_requests_total{cache="conversation_history",result="hit"} 90\n'
        'orbion_cache_requests_total{cache="conversation_history",result="miss"} 10\n'
        'orbion_llm_proxy_response_cache_total{result="hit"} 3\n'
    )
    m = parse_process_metrics(text)
    assert m["rss"] == 104857600 and m["cpu"] == 12.5
    before = {
        "conversation": {"cache": {"conversation_history:hit": 40.0, "conversation_history:miss": 10.0}}
    }
    ratios = cache_ratios(before, {"conversation": m})
    assert ratios["conversation_history"] == {"hits": 50.0, "reads": 50.0, "hit_ratio": 1.0}
    assert ratios["llm_response"]["hit_ratio"] == 1.0


async def test_concurrent_polls_of_the_fake_read_each_send_exactly_once():
    import asyncio

    import httpx

    from orbion_loadtest.runner import Sends
    from orbion_loadtest.stack import Target

    sent = [{"to": "55", "ctx": f"wamid.{i}", "text": "r", "at": float(i)} for i in range(50)]
    visible = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal visible
        after = int(request.url.params["after"])
        visible = min(len(sent), visible + 7)  # the fake keeps receiving while we read
        rows = sent[after:visible]
        await asyncio.sleep(0.01)  # the answer takes a while: polls overlap
        return httpx.Response(200, json={"after": after, "total": visible, "sent": rows})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sends = Sends(client, Target(gateway_url="http://gw", whatsapp_fake_url="http://wa"))
        for _ in range(10):
            await asyncio.gather(sends.poll(), sends.poll(), sends.poll())
    assert [s.context_id for s in sends.sends] == [f"wamid.{i}" for i in range(50)]
