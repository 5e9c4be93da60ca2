"""ARCHIVE_RETENTION_DAYS: dead letters older than that are deleted, in batches.

Every `interval` seconds each served queue's archive loses what was archived
before the cut-off, `BATCH` rows per call (one short transaction each, oldest
first, by pgmq's archived_at index), until a call deletes fewer. Replicas may run
it at the same time: the delete skips rows another one holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

from app.queue.backend import QueueBackend
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)

BATCH: Final = 1000
INTERVAL_SECONDS: Final = 3600.0


async def expire(backend: QueueBackend, queue: str, days: int, *, batch: int = BATCH) -> int:
    """Deletes the dead letters of `queue` archived more than `days` ago; how many."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    total = 0
    while True:
        deleted = await backend.expire_dead(queue, cutoff, batch)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)  # let jobs and webhooks in between batches


class Retention:
    def __init__(
        self,
        backend: QueueBackend,
        queues: Iterable[str],
        *,
        days: int,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._backend = backend
        self._queues = sorted(queues)
        self.days = days
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> dict[str, int]:
        deleted = {}
        for queue in self._queues:
            try:
                deleted[queue] = await expire(self._backend, queue, self.days)
            except RpcError as error:
                log.warning("dead letters not expired", extra={"queue": queue, "error": str(error)})
                continue
            if deleted[queue]:
                log.info(
                    "expired dead letters",
                    extra={"queue": queue, "count": deleted[queue], "days": self.days},
                )
        return deleted

    async def _run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
