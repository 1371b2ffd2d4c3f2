"""Webhook authentication: Meta's ``X-Hub-Signature-256`` HMAC and Evolution's API key header.

Both compare in constant time and run on the raw body before it is parsed, so a forged
request costs one HMAC and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum

_PREFIX = "sha256="


class SignatureProblem(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    MISMATCH = "mismatch"


def sign(secret: bytes, body: bytes) -> str:
    """The header value Meta would send for ``body`` (used by tests, the CLI and the benchmark)."""
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def check_signature(secret: bytes, body: bytes, header: str | None) -> SignatureProblem | None:
    """``None`` when ``header`` is a valid ``sha256=<hex>`` HMAC of ``body``; else what is wrong."""
    if not header:
        return SignatureProblem.MISSING
    if not header.startswith(_PREFIX) or len(header) != len(_PREFIX) + 64:
        return SignatureProblem.MALFORMED
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    # Bytes, because compare_digest refuses non-ASCII str (headers may carry latin-1);
    # lower() because the case of hex digits carries no meaning.
    if not hmac.compare_digest(expected.encode(), header[len(_PREFIX) :].lower().encode()):
        return SignatureProblem.MISMATCH
    return None


def check_api_key(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of an API key header."""
    if not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
