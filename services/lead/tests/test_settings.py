"""The lead's settings: its cache keys follow ORBION_REDIS_KEY_PREFIX unless set on their own."""

from __future__ import annotations

import pytest

from orbion_lead.settings import Settings


def test_the_lead_cache_lives_under_the_redis_key_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORBION_LEAD_CACHE_PREFIX", raising=False)
    monkeypatch.delenv("ORBION_REDIS_KEY_PREFIX", raising=False)
    assert Settings().lead_cache_prefix == "orbion:lead"
    # Another system on the same Redis (a load test's run, staging) caches its leads apart:
    # a lead of one never answers a read of the other, nor blocks its newer versions.
    monkeypatch.setenv("ORBION_REDIS_KEY_PREFIX", "loadtest:1a2b:")
    settings = Settings()
    assert settings.lead_cache_prefix == "loadtest:1a2b:lead"
    assert settings.rate_limit_prefix == "loadtest:1a2b:rl"
    monkeypatch.setenv("ORBION_LEAD_CACHE_PREFIX", "leads")
    assert Settings().lead_cache_prefix == "leads"
