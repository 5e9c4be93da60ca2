"""Retry backoff: exponential, jittered, capped; attempts bounded."""

from __future__ import annotations

import pytest

from app.errors import RetryableError
from app.worker.policy import RetryPolicy


def test_delays_grow_exponentially_within_their_jitter_band() -> None:
    low = RetryPolicy(max_attempts=10, base_delay=4, max_delay=1000, random=lambda: 0.0)
    high = RetryPolicy(max_attempts=10, base_delay=4, max_delay=1000, random=lambda: 1.0)
    assert [low.delay(n) for n in range(1, 6)] == [2, 4, 8, 16, 32]
    assert [high.delay(n) for n in range(1, 6)] == [4, 8, 16, 32, 64]


def test_delays_are_capped() -> None:
    policy = RetryPolicy(max_attempts=50, base_delay=5, max_delay=60, random=lambda: 1.0)
    assert policy.delay(30) == 60
    assert max(policy.delay(n) for n in range(1, 50)) == 60


def test_jitter_spreads_a_burst() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=100, max_delay=1000)
    delays = {policy.delay(3) for _ in range(200)}
    assert len(delays) > 20
    assert min(delays) >= 200 and max(delays) <= 400


def test_delay_is_at_least_a_second() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=0.1, random=lambda: 0.0)
    assert policy.delay(1) == 1


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=1, max_delay=1)
    assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_a_requested_delay_replaces_the_backoff_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=5, max_delay=600, random=lambda: 1.0)
    assert policy.delay(1, requested=120) == 120
    assert policy.delay(1, requested=0) == 1  # pgmq's vt is whole seconds, at least one
    assert policy.delay(4, requested=86_400 * 30) == 600
    assert policy.delay(4, requested=float("inf")) == 600


def test_a_retryable_error_refuses_a_negative_or_nan_delay() -> None:
    assert RetryableError("busy", after=2.5).after == 2.5
    assert RetryableError("busy").after is None
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="zero or more seconds"):
            RetryableError("busy", after=bad)
