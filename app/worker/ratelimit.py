"""Per-queue rate limits: at most `rate` job starts per second, per process.

A token bucket holding one token, refilled at `rate` tokens a second: starts are
evenly spaced, 1/rate seconds apart, and an idle queue saves up no burst, so a
provider's per-second limit (an SMS gateway at 14/s, say) holds over any second,
not only on average. Each waiter reserves the next free instant at once, so
waiting costs no lock and no wake-up beyond its own timer.

The limit is per process: N replicas (or WORKERS=N) start up to N x rate jobs a
second between them.
"""

from __future__ import annotations

import asyncio


class RateLimiter:
    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be a positive number of starts per second")
        self.rate = rate
        self._interval = 1.0 / rate
        self._next = 0.0  # event loop time of the next free start

    async def wait(self) -> None:
        """Returns at this caller's start time (a cancelled wait leaves its turn unused)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)
