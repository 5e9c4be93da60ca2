"""Which queues are paused: the database's flag, mirrored into the runner.

The flag lives in queue_worker.queues (supabase/migrations/
20261202005000_pause_and_dead_letter_batches.sql) so that every replica obeys it:
claim() and read() refuse a paused queue whoever calls them. Each process also
keeps the set (`Runner.paused`), read every `interval` seconds and changed at
once by a pause or resume made here, so that it answers webhooks of a paused
queue as deferred and its sweeper does not ask. A resumed queue is swept at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app import metrics
from app.queue.backend import QueueBackend
from app.queue.rpc import RpcError
from app.worker.runner import Runner
from app.worker.sweeper import Sweeper

log = logging.getLogger(__name__)

# How often each process reads the flags: a pause made by another replica reaches
# this one's webhook answers and sweeper within this (its claims at once).
PAUSE_POLL_SECONDS = 5.0


class PauseWatch:
    def __init__(
        self, backend: QueueBackend, runner: Runner, sweeper: Sweeper, *, interval: float
    ) -> None:
        self._backend = backend
        self._runner = runner
        self._sweeper = sweeper
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # the last read failed: said once, not every poll

    def apply(self, queue: str, paused: bool) -> None:
        """Mirrors one queue's state into this process (and its gauge)."""
        if queue not in self._runner.queues:
            return
        was = queue in self._runner.paused
        if paused:
            self._runner.paused.add(queue)
        else:
            self._runner.paused.discard(queue)
            if was:
                self._sweeper.wake(queue)  # what waited runs now
        metrics.QUEUE_PAUSED.labels(queue).set(1 if paused else 0)

    async def refresh(self) -> None:
        paused = await self._backend.paused()
        for queue in self._runner.queues:
            self.apply(queue, queue in paused)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
                self._failing = False
            except RpcError as error:
                if not self._failing:
                    # A database without migration 20261202005000 answers 404 here;
                    # claims still work, and `queue-worker check` names the migration.
                    log.warning("paused queues not read", extra={"error": str(error)})
                self._failing = True
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pauses")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
