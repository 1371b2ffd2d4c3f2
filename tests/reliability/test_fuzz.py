"""Fuzzing: the webhook parsers with hypothesis, and every HTTP endpoint from its OpenAPI document.

- Parsers (pure, no server): a real Cloud API or Evolution webhook with any one of its values
  replaced by random JSON, or random JSON altogether, is either refused as a whole
  (``MalformedWebhook``) or split into events that encode and decode again, plus rejected
  items; nothing else is ever raised.
- Endpoints (schemathesis, live processes): every operation of every service's
  ``/openapi.json``, with valid and invalid (negative) inputs, with the API key: no 5xx.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from orbion_common.cli.webhooks import cloud_text_webhook
from orbion_common.events import decode, encode
from tests.reliability.harness import API_KEY, Fakes, FaultSystem, record

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)

EVOLUTION_UPSERT: dict[str, Any] = {
    "event": "messages.upsert",
    "instance": "orbion",
    "data": {
        "key": {"remoteJid": "5511999990000@s.whatsapp.net", "fromMe": False, "id": "3EB0ABC"},
        "pushName": "Maria",
        "message": {"conversation": "Oi, quanto custa?"},
        "messageType": "conversation",
        "messageTimestamp": 1750090702,
        "instanceId": "abc",
    },
    "date_time": "2026-11-28T10:00:00.000Z",
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """``base`` with one value (at any depth, the whole body included) replaced by random JSON."""
    body = copy.deepcopy(base)
    path = draw(st.sampled_from(_paths(body)))
    value = draw(json_values)
    if not path:
        return value
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def check_parser(parse: Any, malformed: type[Exception], to_events: Any, body: Any) -> None:
    try:
        parsed = parse(body)
    except malformed:
        return
    events, msg_ids = to_events(parsed)
    assert len(events) == len(msg_ids)
    for event in events:
        again = decode(encode(event))
        assert again.event_id == event.event_id
        assert event.stream_id.isdigit(), event.stream_id


@pytest.mark.parametrize("provider", ["cloud_api", "evolution"])
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_webhook_parsers_refuse_or_split_anything_and_never_raise_otherwise(
    provider: str, data: st.DataObject
) -> None:
    from orbion_gateway import cloud_api, evolution
    from orbion_gateway.inbound import MalformedWebhook, to_events

    if provider == "cloud_api":
        base = cloud_text_webhook(
            "5511999990000", "Oi, quanto custa?", message_id="wamid.FUZZ", profile_name="Ana"
        )
        body = data.draw(st.one_of(mutated(base), json_values))
        check_parser(cloud_api.parse, MalformedWebhook, to_events, body)
    else:
        body = data.draw(st.one_of(mutated(EVOLUTION_UPSERT), json_values))
        check_parser(evolution.parse, MalformedWebhook, to_events, body)


# --------------------------------------------------------------------------- schemathesis


def rss_mb(system: FaultSystem, name: str) -> float | None:
    """Resident memory of a service process (MB), to show that fuzzing leaves it bounded."""
    import psutil

    proc = system.procs.get(name)
    try:
        return round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1) if proc else None
    except psutil.Error:
        return None


# 5xx found by this test and reported to their owners; the test xfails while only these remain.
# (The lead's after_version over 2**31, found here, is fixed: the route bounds it.)
KNOWN_5XX: tuple[tuple[str, ...], ...] = ()


def fuzz_service(base_url: str, examples: int) -> dict[str, Any]:
    """Run schemathesis over every operation of ``base_url``'s OpenAPI document (blocking)."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    skipped: list[str] = []
    calls = 0
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here, as it should
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(
                max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            @given(case=strategy)
            def run(case: Any) -> None:
                nonlocal calls
                headers = dict(case.headers or {})
                headers.setdefault("X-API-Key", API_KEY)
                case.headers = headers
                response = case.call(base_url=base_url, timeout=10)
                calls += 1
                if response.status_code >= 500:
                    where = f"{case.method} {case.formatted_path}"
                    failures.append(f"{where} -> {response.status_code}: {response.text[:200]}")

            try:
                run()
            except Unsatisfiable:
                skipped.append(f"{operation.method.upper()} {operation.path} ({mode.value}): nothing to vary")
            except Exception as exc:  # a generation problem of one operation must not hide the others
                failures.append(
                    f"{operation.method.upper()} {operation.path}: {type(exc).__name__}: {exc}"[:300]
                )
    return {"operations": operations, "calls": calls, "failures": failures, "skipped": skipped}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_every_endpoint_of_every_service_fuzzed_from_its_openapi_never_gives_5xx(
    fault_system: tuple[FaultSystem, Fakes],
) -> None:
    system, _ = fault_system
    results: dict[str, Any] = {}
    rss_before = {name: rss_mb(system, name) for name in system.services}
    for service in system.services:
        results[service] = await asyncio.to_thread(fuzz_service, system.url(service), 25)
    rss_after = {name: rss_mb(system, name) for name in system.services}
    failures = {s: r["failures"] for s, r in results.items() if r["failures"]}
    calls = sum(r["calls"] for r in results.values())
    operations = sum(r["operations"] for r in results.values())
    record(
        "fuzz", "schemathesis: every operation of the 5 services' OpenAPI, valid and invalid inputs",
        "no 5xx, no crash", f"{operations} operations, {calls} calls, {sum(map(len, failures.values()))} 5xx",
        {"operations": operations, "calls": calls,
         "per_service": {s: {"operations": r["operations"], "calls": r["calls"]} for s, r in results.items()},
         "failures": {s: f[:5] for s, f in failures.items()},
         "rss_mb_before": rss_before, "rss_mb_after": rss_after},
        passed=not failures, known_gap=bool(failures),
    )  # fmt: skip
    unknown = {
        s: [f for f in fs if not any(all(part in f for part in k) for k in KNOWN_5XX)]
        for s, fs in failures.items()
    }
    unknown = {s: fs for s, fs in unknown.items() if fs}
    assert not unknown, orjson.dumps(unknown, option=orjson.OPT_INDENT_2).decode()[:3000]
    if failures:
        pytest.xfail(f"known 5xx found again (see docs/reliability.md): {failures}"[:1000])
