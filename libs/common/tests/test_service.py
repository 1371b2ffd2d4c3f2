"""The shared HTTP shell (orbion_common.service): probes, metrics, JSON errors, the real server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from orbion_common.service import ServiceServer, create_service_app, tune_garbage_collector
from orbion_common.settings import CommonSettings

SETTINGS = CommonSettings()


async def passing() -> object:
    return "ok"


async def failing() -> object:
    raise ConnectionError("database is down")


async def hanging() -> object:
    await asyncio.Event().wait()
    return None


class Order(BaseModel):
    quantity: int
    note: str


def build_app(**kwargs: object) -> FastAPI:
    app = create_service_app("testsvc", SETTINGS, **kwargs)  # type: ignore[arg-type]

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/explode")
    async def explode() -> None:
        raise RuntimeError("internal detail: 5511999990000 password=hunter2")

    @app.get("/conflict")
    async def conflict() -> None:
        raise HTTPException(409, detail="already exported", headers={"Retry-After": "3"})

    @app.get("/exported")
    async def exported() -> None:
        raise HTTPException(409, detail={"type": "already_exported", "message": "lead was exported"})

    @app.post("/orders")
    async def create_order(order: Order) -> Order:
        return order

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(checks={"db": passing})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_livez_is_200_even_when_every_check_fails() -> None:
    async with client_for(build_app(checks={"db": failing, "bus": hanging})) as c:
        response = await c.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


async def test_readyz_is_503_naming_the_failing_check() -> None:
    app = build_app(checks={"db": failing, "cache": passing}, info=lambda: {"breakers": {"openai": "closed"}})
    async with client_for(app) as c:
        response = await c.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unready" and body["service"] == "testsvc"
    assert body["checks"]["db"]["ok"] is False
    assert body["checks"]["db"]["detail"] == "ConnectionError: database is down"
    assert body["checks"]["cache"]["ok"] is True
    assert body["info"] == {"breakers": {"openai": "closed"}}


async def test_readyz_is_200_when_all_checks_pass(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["db"]["ok"] is True and body["checks"]["db"]["detail"] == "ok"
    assert body["info"] == {}


async def test_readyz_times_out_a_hanging_check() -> None:
    app = build_app(checks={"bus": hanging, "db": passing}, readiness_timeout=0.05)
    async with client_for(app) as c:
        response = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["bus"]["detail"] == "timeout after 0.05s"


async def test_readyz_survives_a_broken_info_callback() -> None:
    def info() -> dict[str, object]:
        raise KeyError("oops")

    async with client_for(build_app(checks={"db": passing}, info=info)) as c:
        response = await c.get("/readyz")
    assert response.status_code == 200
    assert response.json()["info"] == {"error": "KeyError"}


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    before = metric_value(
        (await client.get("/metrics")).text,
        "orbion_http_requests_total",
        route="/items/{item_id}",
        method="GET",
        status="200",
    )
    assert (await client.get("/items/1")).status_code == 200
    assert (await client.get("/items/2")).status_code == 200
    text = (await client.get("/metrics")).text
    after = metric_value(
        text, "orbion_http_requests_total", route="/items/{item_id}", method="GET", status="200"
    )
    assert after == before + 2
    assert 'route="/items/1"' not in text  # templates, not raw paths
    assert "orbion_http_request_duration_seconds_bucket{" in text
    assert "process_resident_memory_bytes" in text


async def test_unknown_paths_share_one_metric_label(client: httpx.AsyncClient) -> None:
    assert (await client.get("/wp-admin/setup.php")).status_code == 404
    text = (await client.get("/metrics")).text
    assert "wp-admin" not in text
    assert metric_value(text, "orbion_http_requests_total", route="<unmatched>", status="404") >= 1


async def test_unhandled_exception_is_500_json_without_details(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="orbion_common.service"):
        response = await client.get("/explode")
    assert response.status_code == 500
    assert response.json() == {"error": {"type": "internal_error"}}
    assert "hunter2" not in response.text and "Traceback" not in response.text
    (record,) = [r for r in caplog.records if r.exc_info]  # the stack trace goes to the log
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "/explode" in record.getMessage()
    text = (await client.get("/metrics")).text
    assert metric_value(text, "orbion_http_requests_total", route="/explode", status="500") >= 1


async def test_validation_error_shape_does_not_echo_the_input(client: httpx.AsyncClient) -> None:
    huge = "x" * 50_000
    response = await client.post("/orders", json={"quantity": huge, "note": "n"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert error["detail"][0]["loc"] == ["body", "quantity"]
    assert error["detail"][0]["type"] == "int_parsing"
    assert huge not in response.text and len(response.content) < 1000


async def test_http_exception_keeps_status_and_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/conflict")
    assert response.status_code == 409
    assert response.headers["retry-after"] == "3"
    assert response.json() == {"error": {"type": "conflict", "detail": "already exported"}}
    response = await client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


async def test_http_exception_with_a_dict_detail_is_merged_into_the_error(client: httpx.AsyncClient) -> None:
    response = await client.get("/exported")
    assert response.status_code == 409
    assert response.json() == {"error": {"type": "already_exported", "message": "lead was exported"}}


async def test_responses_from_middleware_added_later_are_counted() -> None:
    class Refuse:
        """A stand-in for a rate limiter that answers before the router."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/refused":
                await send({"type": "http.response.start", "status": 429, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await self.app(scope, receive, send)

    app = build_app()
    app.add_middleware(Refuse)
    async with client_for(app) as c:
        before = metric_value(
            (await c.get("/metrics")).text, "orbion_http_requests_total", route="<unmatched>", status="429"
        )
        assert (await c.get("/refused")).status_code == 429
        after = metric_value(
            (await c.get("/metrics")).text, "orbion_http_requests_total", route="<unmatched>", status="429"
        )
    assert after == before + 1


async def test_real_server_serves_and_stops_gracefully() -> None:
    app = build_app(checks={"db": passing})
    server = ServiceServer(app, SETTINGS, 0)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        await server.wait_started()
    async with httpx.AsyncClient(base_url=f"http://{SETTINGS.host}:{server.port}") as c:
        assert (await c.get("/livez")).json() == {"status": "alive"}
        assert (await c.get("/readyz")).status_code == 200
    server.stop()
    async with asyncio.timeout(10):
        await task  # returns (no exception, no re-raised signal) once stopped
    assert task.done() and task.exception() is None


async def test_real_server_reports_a_port_already_in_use() -> None:
    first = ServiceServer(build_app(), SETTINGS, 0)
    first_task = asyncio.create_task(first.serve())
    try:
        async with asyncio.timeout(10):
            await first.wait_started()
        second = ServiceServer(build_app(), SETTINGS, first.port)
        with pytest.raises(RuntimeError, match="could not start"):
            async with asyncio.timeout(10):
                await second.serve()
    finally:
        first.stop()
        await first_task


async def test_readyz_accepts_an_async_info_callback() -> None:
    async def info() -> dict[str, object]:
        return {"consumer_lag": 3}

    async with client_for(build_app(checks={"db": passing}, info=info)) as c:
        response = await c.get("/readyz")
    assert response.json()["info"] == {"consumer_lag": 3}


def test_sigterm_stops_serve_gracefully_and_the_caller_runs_its_shutdown() -> None:
    # A real process: serve() must return on SIGTERM (not die), so bootstrap can drain the bus.
    script = (
        "import asyncio\n"
        "from orbion_common.service import create_service_app, serve, run\n"
        "from orbion_common.settings import CommonSettings\n"
        "s = CommonSettings()\n"
        "async def main():\n"
        "    await serve(create_service_app('t', s), s, int(__import__('sys').argv[1]))\n"
        "    print('shutdown ran', flush=True)\n"
        "run(main())\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for _ in range(200):  # bounded wait for the server to answer
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("server did not start")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "shutdown ran" in out


def test_a_serving_service_collects_its_young_objects_after_thousands_not_hundreds() -> None:
    class Node:
        other: object = None

    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    thresholds = gc.get_threshold()
    try:
        tune_garbage_collector()
        gc.callbacks.append(count)
        in_flight = [[] for _ in range(5_000)]  # a batch's objects, alive while it is handled
        assert collections == []  # CPython's default collects every 700 and promotes them
        garbage = Node()
        garbage.other = garbage
        freed = weakref.ref(garbage)
        del garbage, in_flight
        later = [[] for _ in range(25_000)]
        assert freed() is None and len(later) == 25_000  # garbage cycles are still collected
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_startup_objects_are_frozen_after_their_garbage_is_collected() -> None:
    class Node:
        other: object = None

    garbage = Node()
    garbage.other = garbage  # a cycle: only a collection frees it
    freed = weakref.ref(garbage)
    del garbage
    try:
        tune_garbage_collector()
        assert gc.get_freeze_count() > 0  # what exists now is left out of every collection
        assert freed() is None  # collected first: frozen, it would never be freed
    finally:
        gc.unfreeze()
