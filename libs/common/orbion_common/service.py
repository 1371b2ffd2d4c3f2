"""The HTTP shell every ORBION service shares: probes, metrics, JSON errors, and the server.

Owns ``create_service_app`` (``/livez``, ``/readyz``, ``/metrics``, request metrics, tracing and
error handlers) and ``serve`` (uvicorn with graceful shutdown). Services add their own routes
to the app it returns; what each readiness check probes is the service's choice (health.py
has the probes), and how errors are logged is logging.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http
import importlib.util
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orbion_common.health import ReadinessCheck, run_checks
from orbion_common.settings import CommonSettings

__all__ = [
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "ServiceApp",
    "ServiceServer",
    "create_service_app",
    "run",
    "serve",
]

log = logging.getLogger(__name__)

PROBE_PATHS = ("/livez", "/readyz", "/metrics")
READINESS_TIMEOUT_SECONDS = 1.0
_MAX_VALIDATION_ERRORS = 20

HTTP_REQUESTS = Counter(
    "orbion_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ("route", "method", "status"),
)
HTTP_REQUEST_DURATION = Histogram(
    "orbion_http_request_duration_seconds",
    "Time from request start to the end of the response body, by route template, method and status.",
    ("route", "method", "status"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Label children cached per (route, method, status): .labels() takes a lock and builds a tuple
# on every call, which is measurable at gateway request rates. Bounded: routes are templates.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

_INTERNAL_ERROR_BODY = orjson.dumps({"error": {"type": "internal_error"}})
_UNMATCHED = "<unmatched>"  # one label for every unknown path, so scanners cannot blow up cardinality


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        return _UNMATCHED
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else _UNMATCHED


class ObservedMiddleware:
    """Pure ASGI middleware: request metrics, and the last line of defence for unhandled errors.

    It sits just inside Starlette's ServerErrorMiddleware, outside every middleware a service
    adds, so a 429 from a rate limiter is counted too. An exception that escapes the app is
    logged with its stack trace, recorded on the current span, and answered with a 500 JSON
    body that reveals nothing; it is not re-raised (the server would log it a second time).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            status = 500
            span = trace.get_current_span()
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            log.exception(
                "unhandled error in %s %s",
                scope["method"],
                _route_label(scope),
                extra={"path": scope.get("path")},
            )
            if not response_started:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_INTERNAL_ERROR_BODY)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _INTERNAL_ERROR_BODY})
        finally:
            key = (_route_label(scope), scope["method"], status)
            children = _children.get(key)
            if children is None:
                labels = (key[0], key[1], str(status))
                children = _children.setdefault(
                    key, (HTTP_REQUESTS.labels(*labels), HTTP_REQUEST_DURATION.labels(*labels))
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)


class ServiceApp(FastAPI):
    """FastAPI whose middleware stack always has :class:`ObservedMiddleware` outermost.

    Starlette builds ``ServerErrorMiddleware -> [user middleware] -> ExceptionMiddleware ->
    router`` lazily; we slide ours in right after ServerErrorMiddleware, whatever a service
    adds later with ``add_middleware``. OpenTelemetry's FastAPI instrumentation wraps this
    method, so spans still enclose everything.
    """

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if isinstance(stack, ServerErrorMiddleware):
            return ServerErrorMiddleware(
                app=ObservedMiddleware(stack.app), handler=stack.handler, debug=stack.debug
            )
        return ObservedMiddleware(stack)


def _error(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers) if headers else None)


def _error_type(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    body: dict[str, Any] = {"type": _error_type(exc.status_code)}
    if isinstance(exc.detail, Mapping):
        body.update(exc.detail)  # a service may pass {"type": "...", ...} as the detail
    elif exc.detail is not None:
        body["detail"] = exc.detail
    # Nested under "error": a detail key such as "message" must not collide with LogRecord's own.
    if exc.status_code >= 500:
        log.error(
            "http %d on %s %s", exc.status_code, request.method, request.url.path, extra={"error": body}
        )
    elif exc.status_code != 404:  # 404 from scanners is noise
        log.info("http %d on %s %s", exc.status_code, request.method, request.url.path, extra={"error": body})
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return _error(exc.status_code, body, exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # Only where and why: pydantic's "input" would echo the (possibly huge or private) body back.
    detail = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in errors[:_MAX_VALIDATION_ERRORS]
    ]
    log.info(
        "invalid request on %s %s",
        request.method,
        request.url.path,
        extra={"errors": len(errors), "first_error": detail[0] if detail else None},
    )
    return _error(422, {"type": "validation_error", "detail": detail})


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Reached only for errors raised outside ObservedMiddleware (should not happen).
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(_INTERNAL_ERROR_BODY, status_code=500, media_type="application/json")


def create_service_app(
    name: str,
    settings: CommonSettings,
    *,
    checks: Mapping[str, ReadinessCheck] | None = None,
    info: Callable[[], Mapping[str, object] | Awaitable[Mapping[str, object]]] | None = None,
    readiness_timeout: float = READINESS_TIMEOUT_SECONDS,
    untraced_paths: Sequence[str] = (),
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with ORBION's probes, metrics, tracing and JSON error handlers.

    - ``GET /livez``: 200 ``{"status": "alive"}`` while the event loop answers; touches nothing.
    - ``GET /readyz``: runs ``checks`` concurrently (each bounded by ``readiness_timeout``);
      200 ``{"status": "ready", ...}`` or 503 ``{"status": "unready", ...}`` with every check's
      ``{"ok", "detail", "latency_ms"}`` and ``info()`` (sync or async; e.g. breaker states, lag).
    - ``GET /metrics``: Prometheus text of the default registry (process metrics included).
    - Every response is counted in ``orbion_http_requests_total`` and timed in
      ``orbion_http_request_duration_seconds`` (labels: route template, method, status).
    - Errors are ``{"error": {"type": ..., ...}}``; an unhandled exception gives 500
      ``{"error": {"type": "internal_error"}}`` and its stack trace goes to the log only.

    ``untraced_paths`` are left out of tracing besides the probes: the monitor passes its OTLP
    receiver (``/v1/traces``) so that exporting spans does not create spans to export.
    ``app.state.settings`` and ``app.state.service`` are set (auth.py reads the settings there).
    ``fastapi_kwargs`` go to FastAPI (``lifespan``, ``title``, ...).
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    fastapi_kwargs.setdefault("title", f"orbion-{name}")
    app = ServiceApp(**fastapi_kwargs)
    app.state.settings = settings
    app.state.service = name
    readiness = dict(checks or {})

    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)

    @app.get("/livez", include_in_schema=False)
    async def livez() -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok, results = await run_checks(readiness, timeout=readiness_timeout)
        body: dict[str, Any] = {"status": "ready" if ok else "unready", "service": name, "checks": results}
        try:
            extra = info() if info is not None else {}
            if inspect.isawaitable(extra):
                extra = await extra
            body["info"] = dict(extra)
        except Exception as exc:  # info is decoration; it must not make a ready service unready
            log.warning("readiness info failed", exc_info=exc)
            body["info"] = {"error": type(exc).__name__}
        if not ok:
            failing = sorted(n for n, r in results.items() if not r["ok"])
            log.warning("not ready", extra={"failing": failing})
        return Response(
            orjson.dumps(body, default=str, option=orjson.OPT_NON_STR_KEYS),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # One server span per request: the per-message "http send/receive" child spans would triple
    # the span rate the monitor ingests and cost ~100 µs per request, and tell nobody anything.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls=",".join((*PROBE_PATHS, *untraced_paths)), exclude_spans=["receive", "send"]
    )
    return app


# --------------------------------------------------------------------------- serving


def _http_impl() -> str:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


class ServiceServer(uvicorn.Server):
    """uvicorn server that returns from :meth:`serve` after a graceful stop.

    SIGINT/SIGTERM (or ``stop()`` / ``should_exit = True``) stop accepting connections, let
    in-flight requests finish (up to ``graceful_seconds``), run the app's lifespan shutdown and
    return, so that bootstrap can then drain consumers and close pools. Unlike plain uvicorn
    it does not re-raise the signal afterwards (that would kill the process before the drain).
    A second SIGINT forces the exit. ``port=0`` binds a free port; read it from :attr:`port`.
    """

    def __init__(self, app: ASGIApp, settings: CommonSettings, port: int, *, graceful_seconds: float = 10.0):
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=port,
            http=_http_impl(),
            lifespan="auto",
            access_log=False,
            log_config=None,  # keep configure_logging()'s handlers
            server_header=False,
            timeout_graceful_shutdown=int(graceful_seconds),
        )
        super().__init__(config)
        self.stop_signal: int | None = None
        self.start_failed = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); only valid once :attr:`started`."""
        for server in self.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("server not started")

    def stop(self) -> None:
        """Ask for a graceful stop; :meth:`serve` returns when it is done."""
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit as exc:
            self.start_failed = True
            # uvicorn calls sys.exit() when the port is taken or lifespan startup fails;
            # a clear exception is kinder to a caller running other tasks in the same loop.
            raise RuntimeError(
                f"HTTP server could not start on {self.config.host}:{self.config.port}"
            ) from exc

    async def wait_started(self) -> None:
        """Wait until the socket is bound (bound it with ``asyncio.timeout`` in the caller)."""
        while not self.started:
            if self.start_failed:
                raise RuntimeError(f"HTTP server could not start on {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.01)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stop_signal = sig
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


async def serve(app: ASGIApp, settings: CommonSettings, port: int) -> None:
    """Serve ``app`` on ``settings.host:port`` until SIGINT/SIGTERM, then stop gracefully.

    Returns once in-flight requests finished and the lifespan shutdown ran. For a handle that
    can be stopped programmatically, use ``server = ServiceServer(app, settings, port)`` and
    ``await server.serve()`` / ``server.stop()``.
    """
    tune_garbage_collector()
    await ServiceServer(app, settings, port).serve()


# Net new container objects between two young collections (CPython's default: 700). A batch of
# messages in flight holds thousands; collected every 700, they survive into the older
# generations and set off full collections over every cached object: 10-15% of the lead's CPU at
# 200 msg/s, against none at 20,000 (for at most a few MB of garbage cycles waiting longer).
YOUNG_COLLECTION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Call once a service started, before it serves. Two things:

    - Freeze what exists then (modules, the app, clients, pools): it lives as long as the
      process, and frozen it is no longer scanned by every full collection, which cost the
      gateway ~4% of its CPU at saturation (the per-message objects are what the collector is
      for). Collected first: frozen garbage is never freed.
    - Collect the young generation every ``YOUNG_COLLECTION_THRESHOLD`` new objects."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 20, 20)


T = TypeVar("T")


def run(main: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a service's async main on uvloop when installed (asyncio otherwise).

    ``bootstrap.main()`` calls ``run(_main())``; uvicorn's ``loop`` option only applies when
    uvicorn owns the loop, which it does not when we ``await server.serve()``.
    """
    coro = main() if callable(main) else main
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)
