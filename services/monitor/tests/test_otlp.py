"""OTLP decoding: what exporters send (protobuf, JSON, gzip) becomes SpanRecords; garbage is refused."""

from __future__ import annotations

import gzip

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from orbion_monitor import otlp
from orbion_monitor.bench import encode_json, encode_protobuf, message_trace, to_request

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def test_protobuf_export_decodes_every_span_with_service_stage_and_ids() -> None:
    spans = message_trace(TRACE, 1_700_000_000_000_000_000)
    decoded = otlp.decode(encode_protobuf(spans), "application/x-protobuf")
    assert decoded.rejected == 0
    assert len(decoded.spans) == len(spans)
    by_name = {(s.service, s.name): s for s in decoded.spans}
    webhook = by_name[("gateway", "POST /webhooks/whatsapp")]
    assert webhook.trace_id == TRACE.hex()
    assert webhook.parent_id == ""
    assert webhook.kind == otlp.KIND_SERVER
    assert webhook.stage == "gateway"
    send = by_name[("llm-proxy", "whatsapp send")]
    assert send.stage == "send"
    assert send.parent_id == by_name[("llm-proxy", "process ReplyRequested")].span_id


def test_json_export_decodes_like_protobuf() -> None:
    spans = message_trace(TRACE, 1_700_000_000_000_000_000, error=True, relayed=True)
    from_json = otlp.decode(encode_json(spans), "application/json; charset=utf-8")
    from_proto = otlp.decode(encode_protobuf(spans), "application/x-protobuf")
    assert sorted(from_json.spans) == sorted(from_proto.spans)
    assert any(s.error for s in from_json.spans)
    assert {s.correlation for s in from_json.spans} == {"", TRACE.hex()}


def test_json_accepts_snake_case_and_enum_names_and_numbers_as_numbers() -> None:
    body = orjson.dumps(
        {
            "resource_spans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"string_value": "billing"}}]
                    },
                    "scope_spans": [
                        {
                            "spans": [
                                {
                                    "trace_id": TRACE.hex(),
                                    "span_id": "00f067aa0ba902b7",
                                    "name": "GET /x",
                                    "kind": "SPAN_KIND_SERVER",
                                    "start_time_unix_nano": 10,
                                    "end_time_unix_nano": 20,
                                    "status": {"code": "STATUS_CODE_ERROR"},
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    )
    (span,) = otlp.decode(body, "application/json").spans
    assert (span.service, span.kind, span.error, span.end_ns - span.start_ns) == ("billing", 2, True, 10)


def test_gzip_body_is_decompressed() -> None:
    body = gzip.compress(encode_protobuf(message_trace(TRACE, 1_000)))
    assert len(otlp.decode(otlp.decompress(body, "gzip"), "application/x-protobuf").spans) == 8


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xff\xff\xff not protobuf", "application/x-protobuf"),
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"resourceSpans": 5}', "application/json"),
    ],
)
def test_malformed_payload_raises_decode_error(body: bytes, content_type: str) -> None:
    with pytest.raises(otlp.OtlpDecodeError):
        otlp.decode(body, content_type)


def test_unknown_media_type_and_bad_gzip_are_refused() -> None:
    with pytest.raises(otlp.UnsupportedMediaType):
        otlp.decode(b"x", "text/plain")
    with pytest.raises(otlp.OtlpDecodeError):
        otlp.decompress(b"not gzip", "gzip")
    with pytest.raises(otlp.OtlpDecodeError):
        otlp.decompress(b"x", "br")


def test_a_span_without_ids_or_with_end_before_start_is_skipped_and_counted() -> None:
    spans = message_trace(TRACE, 1_000_000)
    request = to_request(spans)
    bad = request.resource_spans[0].scope_spans[0].spans
    bad[0].span_id = b"short"
    bad[1].end_time_unix_nano = bad[1].start_time_unix_nano - 1
    decoded = otlp.decode(request.SerializeToString(), "application/x-protobuf")
    assert decoded.rejected == 2
    assert len(decoded.spans) == 6
    assert decoded.reasons


def test_partial_success_response_tells_the_exporter_how_many_were_rejected() -> None:
    response = ExportTraceServiceResponse.FromString(otlp.protobuf_response(3, "bad ids"))
    assert response.partial_success.rejected_spans == 3
    assert otlp.protobuf_response(0) == b""
    assert otlp.json_response(2)["partialSuccess"]["rejectedSpans"] == "2"
