"""The monitor's HTTP API: OTLP receiver, health roll-up, metrics JSON, traces, alerts, dashboard.

Routes parse, call and return; the state lives in state.py. ``/livez``, ``/readyz`` and
``/metrics`` come from ``create_service_app`` (``/metrics`` includes the monitor's collector).
``/v1/traces`` and ``/health`` need no API key (exporters and probes cannot send one easily;
keep the monitor's port inside the cluster); ``/api/*`` take ``X-API-Key`` like every service.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from orbion_common.auth import require_api_key
from orbion_common.service import create_service_app

from . import otlp
from .metrics import install
from .settings import Settings
from .state import Monitor

log = logging.getLogger(__name__)

SERVICE = "monitor"
STATIC = Path(__file__).parent / "static"
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def _json(body: Any, status: int = 200) -> Response:
    # orjson: the snapshot holds floats and nested dicts; NaN never appears (None instead).
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def build_app(settings: Settings, monitor: Monitor) -> FastAPI:
    async def refresher() -> object:
        if monitor.started() and not monitor.running():
            raise RuntimeError("refresh loop stopped")
        return {"polls": monitor.poller.polls_total, "refresh_errors": monitor.refresh_errors_total}

    def info() -> dict[str, object]:
        return {"spans": monitor.aggregator.stats()}

    app = create_service_app(
        SERVICE, settings, checks={"refresh": refresher}, info=info, title="orbion-monitor"
    )
    install(monitor.collector)
    app.state.monitor = monitor
    api = [Depends(require_api_key)]
    max_bytes = settings.monitor_max_body_bytes

    @app.post("/v1/traces", tags=["otlp"])
    async def receive_traces(request: Request) -> Response:
        """OTLP/HTTP trace export (protobuf or JSON, optionally gzip)."""
        content_type = request.headers.get("content-type", "")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            _refuse(413, "payload_too_large", f"body over {max_bytes} bytes")
        body = await request.body()
        try:
            if len(body) > max_bytes:
                raise otlp.BodyTooLarge(f"body over {max_bytes} bytes")
            raw = otlp.decompress(body, request.headers.get("content-encoding", ""), max_bytes)
            decoded = otlp.decode(raw, content_type)
        except otlp.UnsupportedMediaType as exc:
            _refuse(415, "unsupported_media_type", f"{exc}: send application/x-protobuf or application/json")
        except otlp.BodyTooLarge as exc:
            _refuse(413, "payload_too_large", str(exc))
        except otlp.OtlpDecodeError as exc:
            _refuse(400, "malformed_otlp", str(exc))
        monitor.aggregator.add(decoded.spans, decoded.rejected)
        message = "; ".join(decoded.reasons)
        if decoded.rejected:
            log.info("spans rejected", extra={"rejected": decoded.rejected, "reasons": decoded.reasons})
        if content_type.split(";")[0].strip().lower() == "application/json":
            return _json(otlp.json_response(decoded.rejected, message))
        return Response(
            otlp.protobuf_response(decoded.rejected, message), media_type="application/x-protobuf"
        )

    def _refuse(status: int, kind: str, detail: str) -> NoReturn:
        monitor.aggregator.reject_payload()
        raise HTTPException(status, detail={"type": kind, "detail": detail})

    @app.get("/health", tags=["health"])
    async def health(fresh: bool = False) -> Response:
        """Roll-up of every service, dependency, breaker and the host: ok / degraded / down."""
        report = await monitor.poller.current(max_age=0.0 if fresh else 1.0)
        return _json(report, 503 if report["status"] == "down" else 200)

    @app.get("/api/metrics", dependencies=api, tags=["metrics"])
    async def api_metrics() -> Response:
        return _json(monitor.snapshot())

    @app.get("/api/traces/recent", dependencies=api, tags=["traces"])
    async def recent_traces(slowest: Annotated[int, Query(ge=1, le=200)] = 20) -> Response:
        return _json({"traces": monitor.aggregator.slowest(slowest)})

    @app.get("/api/traces/{trace_id}", dependencies=api, tags=["traces"])
    async def trace(trace_id: str) -> Response:
        trace_id = trace_id.lower()
        if not _TRACE_ID.match(trace_id):
            raise HTTPException(400, detail={"type": "bad_trace_id", "detail": "expected 32 hex characters"})
        found = monitor.aggregator.trace(trace_id)
        if found is None:
            raise HTTPException(404, detail={"type": "trace_not_found", "trace_id": trace_id})
        return _json(found)

    @app.get("/api/alerts", dependencies=api, tags=["alerts"])
    async def alerts() -> Response:
        return _json(monitor.alerts.listing())

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
