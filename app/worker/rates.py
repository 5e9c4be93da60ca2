"""Jobs per second and failure rate of the last minutes, per queue, in this process.

What the console shows next to each queue. Prometheus has the same counts
(queue_worker_jobs_total) for dashboards; this is the short memory a page needs
without a Prometheus server: ten-second buckets over `WINDOW_SECONDS`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

WINDOW_SECONDS: Final = 300
BUCKET_SECONDS: Final = 10
_BUCKETS: Final = WINDOW_SECONDS // BUCKET_SECONDS
# Outcomes that are a failed attempt (a retry to come, or a dead letter).
FAILURES: Final = frozenset({"retried", "archived"})


@dataclass(frozen=True)
class Rate:
    jobs_per_second: float
    failure_ratio: float | None  # None when no job finished in the window


class JobRates:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # queue -> bucket slot -> [bucket number, finished, failed]
        self._buckets: defaultdict[str, list[list[int]]] = defaultdict(
            lambda: [[-1, 0, 0] for _ in range(_BUCKETS)]
        )
        self._started = self._clock()

    def record(self, queue: str, outcome: str) -> None:
        number = int(self._clock() // BUCKET_SECONDS)
        bucket = self._buckets[queue][number % _BUCKETS]
        if bucket[0] != number:
            bucket[:] = [number, 0, 0]
        bucket[1] += 1
        if outcome in FAILURES:
            bucket[2] += 1

    def rate(self, queue: str) -> Rate:
        now = self._clock()
        newest = int(now // BUCKET_SECONDS)
        finished = failed = 0
        for number, done, bad in self._buckets.get(queue, ()):
            if newest - number < _BUCKETS:
                finished += done
                failed += bad
        # A process younger than the window divides by its own age.
        span = max(1.0, min(float(WINDOW_SECONDS), now - self._started))
        return Rate(finished / span, failed / finished if finished else None)
