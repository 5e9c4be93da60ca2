"""Job timeouts: one timer for all the jobs of a runner.

`asyncio.timeout()` arms a timer of its own at every use, about 5 us on uvloop: a
sixth of a no-op job's whole cost on the pull path (bench/README.md, "Pull path").
Every job of a runner has the same timeout, so deadlines come due in the order the
jobs started: `Deadlines` keeps them in one insertion-ordered dict, with a single
timer armed for the oldest. A job that finishes in time just leaves the dict; when
the timer fires it cancels the jobs that are overdue and re-arms for the next one.

A job that overstays leaves its `async with deadlines():` with `TimeoutError`,
exactly as with `asyncio.timeout()`, by the same rule: a cancellation that came
from elsewhere (shutdown) stays a cancellation.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # Jobs under way, oldest first, with their deadline (event loop time).
        self._running: dict[Deadline, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> Deadline:
        """`async with deadlines():` bounds its body to `timeout` seconds."""
        return Deadline(self)

    @property
    def running(self) -> int:
        return len(self._running)

    def _start(self, deadline: Deadline) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.timeout
        self._running[deadline] = due
        if self._timer is None:
            self._timer = loop.call_at(due, self._expire)

    def _finish(self, deadline: Deadline) -> None:
        # The timer stays armed: it finds the next oldest job when it fires.
        self._running.pop(deadline, None)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._running:
            deadline, due = next(iter(self._running.items()))
            if due > now:
                self._timer = loop.call_at(due, self._expire)
                return
            del self._running[deadline]
            deadline.expire()


class Deadline:
    """One use of `Deadlines`, as `asyncio.Timeout` is one of `asyncio.timeout()`."""

    __slots__ = ("_cancelling", "_deadlines", "_task", "expired")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self.expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines._start(self)
        return self

    def expire(self) -> None:
        assert self._task is not None
        self.expired = True
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._deadlines._finish(self)
        if self.expired:
            assert self._task is not None
            # Ours was the only cancellation: it becomes the timeout.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
