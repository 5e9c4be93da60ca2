"""When to try a failed job again, and when to give up."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, over a bounded number of attempts.

    Attempt n (pgmq's `read_ct`, 1 for the first delivery) that fails is retried
    after a delay drawn from [d/2, d] with d = min(max_delay, base * 2**(n-1)):
    growing, capped, and spread out so that a burst of failures does not come back
    as a burst.
    """

    max_attempts: int
    base_delay: float
    max_delay: float
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def exhausted(self, attempt: int) -> bool:
        """True when `attempt` was the last one allowed."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int, requested: float | None = None) -> int:
        """Seconds before the next attempt (pgmq's visibility timeouts are whole seconds).

        `requested` (a processor's `RetryableError(after=...)`) replaces the backoff,
        capped at `max_delay` so that a hostile Retry-After cannot park a job for days.
        """
        if requested is not None:
            return max(1, round(min(requested, self.max_delay)))
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** max(attempt - 1, 0))
        return max(1, round(ceiling / 2 + self.random() * ceiling / 2))
