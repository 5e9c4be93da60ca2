"""The sweeper: processes what no webhook announced.

pg_net delivers at most once, so the queue, not the webhook, is the truth. For each
queue the sweeper reads visible messages in batches and runs them exactly as the
webhook path does: messages whose webhook was lost, retries whose delay has passed,
and messages enqueued while the service was down. While a backlog lasts it keeps
every slot busy; when the queue is empty it waits `interval` seconds, a wake-up, or
a webhook the runner deferred for lack of slots (then it reads as slots free up).

Each read is one transaction, so reads are as large as the backlog and the free
slots allow: the batch size doubles while full batches come back and halves when
one comes back short, between `MIN_BATCH` and `batch_size`. While a backlog lasts,
reads follow each other at once, `READERS` at a time (the jobs of one batch run
while the next is read); with every slot taken, or woken by a deferred webhook, the
sweeper waits until half a batch has room, not one slot, so a busy queue is not
read one message at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from app.queue.rpc import RpcError
from app.worker.runner import Runner

log = logging.getLogger(__name__)

# The smallest read once a backlog is gone; a read costs one transaction whatever
# its size, so there is no point in asking for fewer.
MIN_BATCH = 10
# Reads under way at once per queue while a backlog lasts: while one waits for the
# database, the other's jobs run, so a backlog is drained at the pace of the
# processor rather than of one read's round trip. Each read reserves its slots
# first, so they never overbook. Without a backlog only one reader runs.
READERS = 2


class Sweeper:
    def __init__(self, runner: Runner, *, interval: float, batch_size: int) -> None:
        self._runner = runner
        self.max_batch = batch_size
        # Per queue: how many messages the next read asks for.
        self.batch_size: dict[str, int] = {}
        # Per queue: set while reads come back full, so that more readers join in.
        self._backlog: dict[str, asyncio.Event] = {}
        self._wake: dict[str, asyncio.Event] = {q: asyncio.Event() for q in runner.queues}
        self._tasks: list[asyncio.Task[None]] = []
        self.last_sweep: float | None = None  # monotonic time of the last pass
        # Per queue: passes completed (the first one runs at start).
        self.passes: dict[str, int] = dict.fromkeys(runner.queues, 0)
        self.interval = interval
        self._stopping = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sweep_queue(queue, reader), name=f"sweep:{queue}:{reader}")
            for queue in sorted(self._runner.queues)
            for reader in range(READERS)
        ]

    def wake(self, queue: str | None = None) -> None:
        """Sweeps `queue` (every queue when None) now instead of at the next interval."""
        for name, event in self._wake.items():
            if queue is None or name == queue:
                event.set()

    def _adapt(self, queue: str, asked: int, got: int) -> int:
        size = self.batch_size[queue]
        if asked and got == asked:
            size = min(size * 2, self.max_batch)  # a backlog: read more at once
        elif asked:
            size = max(size // 2, min(MIN_BATCH, self.max_batch))
        self.batch_size[queue] = size
        return size

    async def _sweep_queue(self, queue: str, reader: int) -> None:
        self.batch_size.setdefault(queue, min(MIN_BATCH, self.max_batch))
        backlog = self._backlog.setdefault(queue, asyncio.Event())
        deferred = self._runner.deferred[queue]
        while not (self._stopping or self._runner.draining):
            if reader:
                await backlog.wait()  # the other readers help only while a backlog lasts
            else:
                if deferred.is_set():
                    # Woken by a deferred webhook: read once half a batch has room, not
                    # one message per slot that frees.
                    await self._refill(queue, self.batch_size[queue])
                deferred.clear()  # this read takes what was deferred so far
            try:
                asked, got = await self._runner.sweep(queue, self.batch_size[queue])
            except RpcError as error:
                log.warning("sweep failed", extra={"queue": queue, "error": str(error)})
                backlog.clear()  # helpers stop; the first reader retries at its interval
                asked, got = 0, 0
            self.last_sweep = time.monotonic()
            if not reader:
                self.passes[queue] += 1
            size = self._adapt(queue, asked, got)
            full = bool(asked) and got == asked
            if full:
                backlog.set()
            elif asked:
                backlog.clear()
            if full or self._runner.free(queue) == 0:
                # A full batch (more is probably waiting) or no free slot: continue
                # once half a batch of slots is free, but at least every interval so
                # that readiness sees the sweeper alive while long jobs hold every slot.
                await self._refill(queue, size)
                continue
            if reader:
                continue
            wake = self._wake[queue]
            if not deferred.is_set():
                await _first(wake, deferred, timeout=self.interval)
            wake.clear()

    async def _refill(self, queue: str, size: int) -> None:
        """Until half a batch of `size` has room, or at most an interval."""
        refill = max(1, min(size, self._runner.limit(queue)) // 2)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
        # cancellation that comes as the wait ends (a slot freed), and stop()
        # then waited for a sweeper that went on reading.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval):
                await self._runner.wait_for_capacity(queue, refill)

    async def stop(self) -> None:
        """Stops every reader. A read under way is not lost: the queue layer makes what
        it claimed visible again when it returns (app/queue/coalesce.py)."""
        self._stopping = True  # should a cancellation be swallowed, the loop still ends
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Returns when one of `events` is set, or after `timeout` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
