"""The sweeper: processes what no webhook announced.

pg_net delivers at most once, so the queue, not the webhook, is the truth. For each
queue the sweeper reads visible messages in batches and runs them exactly as the
webhook path does: messages whose webhook was lost, retries whose delay has passed,
and messages enqueued while the service was down. While a backlog lasts it keeps
every slot busy; when the queue is empty it waits `interval` seconds (or a wake-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from app.queue.rpc import RpcError
from app.worker.runner import Runner

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, runner: Runner, *, interval: float, batch_size: int) -> None:
        self._runner = runner
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_sweep: float | None = None  # monotonic time of the last pass
        self.interval = interval

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sweep_queue(queue), name=f"sweep:{queue}")
            for queue in sorted(self._runner.queues)
        ]

    def wake(self) -> None:
        """Sweeps now instead of at the next interval."""
        self._wake.set()

    async def _sweep_queue(self, queue: str) -> None:
        while not self._runner.draining:
            try:
                asked, got = await self._runner.sweep(queue, self._batch_size)
            except RpcError as error:
                log.warning("sweep failed", extra={"queue": queue, "error": str(error)})
                asked, got = 0, 0
            self.last_sweep = time.monotonic()
            if (asked and got == asked) or self._runner.free(queue) == 0:
                # A full batch (more is probably waiting) or no free slot: continue
                # as slots free up, but at least every interval so that readiness
                # sees the sweeper alive while long jobs hold every slot.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._runner.wait_for_capacity(queue), timeout=self.interval
                    )
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
