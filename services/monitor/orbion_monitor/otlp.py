"""OTLP/HTTP trace decoding: protobuf and JSON request bodies into flat :class:`SpanRecord` tuples.

Owns the wire format only (``opentelemetry-proto`` messages, OTLP/JSON's hex ids and
camelCase or snake_case keys, gzip bodies). What the spans mean is aggregation.py's job.
A body that is not a trace export at all raises :class:`OtlpDecodeError` (the route answers
400); a single span that makes no sense (bad ids, end before start) is skipped and counted
in the result, so one bad span never loses its batch.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

STAGE_ATTRIBUTE = "orbion.stage"
#: The envelope's correlation_id (shared by every event one inbound message causes). Traces break
#: where an event goes through an outbox relay; spans carrying this attribute are stitched back
#: into one message by aggregation.py.
CORRELATION_ATTRIBUTE = "orbion.correlation_id"
SERVICE_ATTRIBUTE = "orbion.service"

# Span kinds and status codes as OTLP numbers them.
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 1, 2, 3, 4, 5
STATUS_ERROR = 2
_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


class OtlpDecodeError(ValueError):
    """The body is not an OTLP trace export (wrong encoding, not protobuf, not JSON)."""


class UnsupportedMediaType(OtlpDecodeError):
    """Neither protobuf nor JSON (the route answers 415)."""


class BodyTooLarge(OtlpDecodeError):
    """The request body (or what it inflates to) is over the configured limit (413)."""


class SpanRecord(NamedTuple):
    trace_id: str  # 32 hex chars
    span_id: str  # 16 hex chars
    parent_id: str  # "" for a root span
    service: str  # "gateway", "llm-proxy", ... (orbion.service, else service.name without "orbion-")
    name: str
    kind: int
    start_ns: int
    end_ns: int
    error: bool
    stage: str  # the span's orbion.stage attribute, "" when not set
    correlation: str = ""  # the span's orbion.correlation_id attribute, "" when not set


@dataclass
class Decoded:
    spans: list[SpanRecord] = field(default_factory=list)
    rejected: int = 0  # spans skipped because they could not be understood
    reasons: list[str] = field(default_factory=list)  # the first few reasons, for the log line

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def decompress(body: bytes, content_encoding: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
    """Undo ``Content-Encoding`` (gzip or deflate, as OTLP exporters may send). A body that would
    inflate past ``max_bytes`` raises :class:`BodyTooLarge` before it is fully inflated."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise OtlpDecodeError(f"unsupported Content-Encoding {content_encoding!r}")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise OtlpDecodeError(f"body is not valid {encoding}: {exc}") from exc
    if len(data) > max_bytes:
        raise BodyTooLarge(f"body inflates past {max_bytes} bytes")
    if not inflater.eof:
        raise OtlpDecodeError(f"body is truncated {encoding}")
    return data


def _service_name(names: dict[str, str]) -> str:
    name = names.get(SERVICE_ATTRIBUTE) or names.get("service.name") or "unknown"
    return name.removeprefix("orbion-")


def decode_protobuf(body: bytes) -> Decoded:
    """Decode an ``application/x-protobuf`` ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OtlpDecodeError(f"not an OTLP protobuf trace export: {exc}") from exc
    out = Decoded()
    spans_out = out.spans
    append = spans_out.append
    for resource_spans in request.resource_spans:
        names = {
            kv.key: kv.value.string_value
            for kv in resource_spans.resource.attributes
            if kv.key in ("service.name", SERVICE_ATTRIBUTE)
        }
        service = _service_name(names)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if len(trace_id) != 16 or len(span_id) != 8 or not any(trace_id):
                    out.reject("bad trace or span id")
                    continue
                if start == 0 or end < start:
                    out.reject("bad start/end time")
                    continue
                stage = correlation = ""
                for kv in span.attributes:
                    key = kv.key
                    if key == STAGE_ATTRIBUTE:
                        stage = kv.value.string_value
                    elif key == CORRELATION_ATTRIBUTE:
                        correlation = kv.value.string_value
                parent = span.parent_span_id
                append(
                    SpanRecord(
                        trace_id.hex(),
                        span_id.hex(),
                        parent.hex() if len(parent) == 8 else "",
                        service,
                        span.name,
                        span.kind,
                        start,
                        end,
                        span.status.code == STATUS_ERROR,
                        stage,
                        correlation,
                    )
                )
    return out


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _id_bytes(value: Any, size: int) -> bytes | None:
    # OTLP/JSON carries ids as hex; protobuf's generic JSON mapping would use base64: accept both.
    if not isinstance(value, str) or not value:
        return None
    if len(value) == size * 2:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _int(value: Any) -> int | None:
    # 64-bit integers may come as JSON strings (OTLP/JSON does so for nanosecond times).
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _string_attributes(attributes: Any, wanted: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    if not isinstance(attributes, list):
        return found
    for kv in attributes:
        if isinstance(kv, dict) and kv.get("key") in wanted:
            value = kv.get("value")
            if isinstance(value, dict):
                text = _get(value, "stringValue", "string_value")
                if isinstance(text, str):
                    found[kv["key"]] = text
    return found


def _json_span(span: Any, service: str, out: Decoded) -> None:
    if not isinstance(span, dict):
        out.reject("span is not an object")
        return
    trace_id = _id_bytes(_get(span, "traceId", "trace_id"), 16)
    span_id = _id_bytes(_get(span, "spanId", "span_id"), 8)
    if trace_id is None or span_id is None or not any(trace_id):
        out.reject("bad trace or span id")
        return
    start = _int(_get(span, "startTimeUnixNano", "start_time_unix_nano"))
    end = _int(_get(span, "endTimeUnixNano", "end_time_unix_nano"))
    if start is None or end is None or start <= 0 or end < start:
        out.reject("bad start/end time")
        return
    parent_raw = _get(span, "parentSpanId", "parent_span_id")
    parent = _id_bytes(parent_raw, 8) if parent_raw else None
    kind = _get(span, "kind", "kind")
    kind = _KIND_NAMES.get(kind, 0) if isinstance(kind, str) else (kind if isinstance(kind, int) else 0)
    status = span.get("status")
    code = status.get("code") if isinstance(status, dict) else 0
    code = _STATUS_NAMES.get(code, 0) if isinstance(code, str) else code
    name = span.get("name")
    attributes = _string_attributes(span.get("attributes"), (STAGE_ATTRIBUTE, CORRELATION_ATTRIBUTE))
    out.spans.append(
        SpanRecord(
            trace_id.hex(),
            span_id.hex(),
            parent.hex() if parent else "",
            service,
            name if isinstance(name, str) else "",
            kind,
            start,
            end,
            code == STATUS_ERROR,
            attributes.get(STAGE_ATTRIBUTE, ""),
            attributes.get(CORRELATION_ATTRIBUTE, ""),
        )
    )


def decode_json(body: bytes) -> Decoded:
    """Decode an ``application/json`` OTLP/JSON ExportTraceServiceRequest."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise OtlpDecodeError("OTLP/JSON body must be an object")
    resource_spans = _get(document, "resourceSpans", "resource_spans")
    if resource_spans is None:
        resource_spans = []
    if not isinstance(resource_spans, list):
        raise OtlpDecodeError("resourceSpans must be a list")
    out = Decoded()
    for rs in resource_spans:
        if not isinstance(rs, dict):
            out.reject("resourceSpans item is not an object")
            continue
        resource = rs.get("resource")
        attributes = resource.get("attributes") if isinstance(resource, dict) else None
        service = _service_name(_string_attributes(attributes, ("service.name", SERVICE_ATTRIBUTE)))
        scopes = _get(rs, "scopeSpans", "scope_spans")
        # Very old exporters said instrumentationLibrarySpans.
        if scopes is None:
            scopes = _get(rs, "instrumentationLibrarySpans", "instrumentation_library_spans")
        for ss in scopes if isinstance(scopes, list) else []:
            spans = ss.get("spans") if isinstance(ss, dict) else None
            if not isinstance(spans, list):
                out.reject("scopeSpans item has no span list")
                continue
            for span in spans:
                _json_span(span, service, out)
    return out


def decode(body: bytes, content_type: str) -> Decoded:
    """Decode by media type: protobuf (``application/x-protobuf``) or JSON (``application/json``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("application/x-protobuf", "application/protobuf", "application/octet-stream", ""):
        return decode_protobuf(body)
    if media == "application/json":
        return decode_json(body)
    raise UnsupportedMediaType(media)


def protobuf_response(rejected: int, message: str = "") -> bytes:
    """An ExportTraceServiceResponse; ``partial_success`` tells the exporter what was dropped."""
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    data: bytes = response.SerializeToString()
    return data


def json_response(rejected: int, message: str = "") -> dict[str, Any]:
    if not rejected:
        return {}
    return {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}}
