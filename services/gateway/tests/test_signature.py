"""X-Hub-Signature-256 and the Evolution API key: good, bad, missing, tampered."""

from __future__ import annotations

from orbion_gateway.signature import SignatureProblem, check_api_key, check_signature, sign

SECRET = b"app-secret"
BODY = b'{"object":"whatsapp_business_account","entry":[]}'


def test_a_good_signature_passes() -> None:
    assert check_signature(SECRET, BODY, sign(SECRET, BODY)) is None


def test_hex_case_does_not_matter() -> None:
    header = sign(SECRET, BODY)
    assert check_signature(SECRET, BODY, "sha256=" + header[7:].upper()) is None


def test_a_missing_signature_is_refused() -> None:
    assert check_signature(SECRET, BODY, None) is SignatureProblem.MISSING
    assert check_signature(SECRET, BODY, "") is SignatureProblem.MISSING


def test_a_signature_with_another_secret_is_refused() -> None:
    assert check_signature(SECRET, BODY, sign(b"other", BODY)) is SignatureProblem.MISMATCH


def test_a_tampered_body_is_refused() -> None:
    header = sign(SECRET, BODY)
    assert check_signature(SECRET, BODY.replace(b"[]", b"[{}]"), header) is SignatureProblem.MISMATCH


def test_malformed_headers_are_refused() -> None:
    good = sign(SECRET, BODY)
    for header in ("sha1=" + good[7:47], good[7:], "sha256=xyz", good + "00", "sha256=" + "é" * 64):
        assert check_signature(SECRET, BODY, header) is not None


def test_api_keys_compare_exactly() -> None:
    assert check_api_key("k-123", "k-123")
    assert not check_api_key("k-123", "k-124")
    assert not check_api_key("k-123", None)
    assert not check_api_key("k-123", "")
    assert not check_api_key("k-123", "k-123é")
