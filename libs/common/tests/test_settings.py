"""Settings read from ORBION_* variables: Redis key prefixes follow ORBION_REDIS_KEY_PREFIX."""

from __future__ import annotations

import pytest

from orbion_common.settings import CommonSettings


def test_the_rate_limiter_keys_live_under_the_redis_key_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORBION_RATE_LIMIT_PREFIX", raising=False)
    monkeypatch.delenv("ORBION_REDIS_KEY_PREFIX", raising=False)
    assert CommonSettings().rate_limit_prefix == "orbion:rl"
    # Two systems on one Redis, told apart by their key prefix, share no rate-limit bucket.
    monkeypatch.setenv("ORBION_REDIS_KEY_PREFIX", "staging:")
    assert CommonSettings().rate_limit_prefix == "staging:rl"
    assert CommonSettings(redis_key_prefix="test:").rate_limit_prefix == "test:rl"
    assert CommonSettings(redis_key_prefix="").rate_limit_prefix == "rl"  # no prefix at all: none here


def test_a_rate_limit_prefix_that_is_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORBION_REDIS_KEY_PREFIX", "staging:")
    monkeypatch.setenv("ORBION_RATE_LIMIT_PREFIX", "limits")
    assert CommonSettings().rate_limit_prefix == "limits"
