"""Runs jobs: claims a message, hands it to its queue's processor, acks on success.

Webhooks are only doorbells: the runner claims the message from the database with
a conditional update (visible now, not locked), so a repeated webhook or a
concurrent reader never runs a job twice, and the job is the claimed row, not the
webhook body. A message is deleted only after its processor returned. When a job
fails the message stays in the queue and becomes visible again when its
visibility timeout ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from app import metrics
from app.errors import PermanentError
from app.processors import Registry
from app.queue.backend import QueueBackend
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)


class Runner:
    """Owns the background job tasks of one process."""

    def __init__(
        self, backend: QueueBackend, processors: Registry, *, visibility_timeout: int
    ) -> None:
        self._backend = backend
        self._processors = processors
        self._vt = visibility_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queues(self) -> frozenset[str]:
        return frozenset(self._processors)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, queue: str, msg_ids: Sequence[int]) -> None:
        """Schedules claim-and-process for `msg_ids` and returns at once."""
        if queue not in self._processors:
            raise KeyError(queue)
        task = asyncio.create_task(self.run(queue, msg_ids), name=f"job:{queue}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, queue: str, msg_ids: Sequence[int]) -> None:
        """Claims the visible ones of `msg_ids` and processes each."""
        try:
            claimed = await self._backend.claim(queue, msg_ids, self._vt)
        except RpcError as error:
            metrics.RPC_ERRORS.labels("claim").inc()
            log.warning(
                "claim failed; the message stays queued",
                extra={"queue": queue, "msg_ids": list(msg_ids), "error": str(error)},
            )
            return
        if not claimed:
            log.debug("nothing to claim", extra={"queue": queue, "msg_ids": list(msg_ids)})
        await asyncio.gather(*(self._process(queue, message) for message in claimed))

    async def _process(self, queue: str, message: QueueMessage) -> None:
        started = time.perf_counter()
        context = {"queue": queue, "msg_id": message.msg_id, "attempt": message.read_ct}
        outcome = "succeeded"
        try:
            await self._processors[queue](message)
        except PermanentError as error:
            outcome = "failed"
            log.warning("job failed permanently", extra={**context, "error": str(error)})
        except Exception as error:
            outcome = "failed"
            log.warning("job failed", extra={**context, "error": str(error) or repr(error)})
        else:
            try:
                await self._backend.ack(queue, [message.msg_id])
            except RpcError as error:
                metrics.RPC_ERRORS.labels("ack").inc()
                outcome = "ack_failed"
                log.error("ack failed after success", extra={**context, "error": str(error)})
        duration = time.perf_counter() - started
        metrics.JOBS.labels(queue, outcome).inc()
        metrics.JOB_DURATION.labels(queue).observe(duration)
        log.info(
            "job finished",
            extra={**context, "outcome": outcome, "duration_ms": round(duration * 1000, 1)},
        )

    async def drain(self, timeout: float) -> None:
        """Waits up to `timeout` seconds for running jobs; cancels what is left.

        A cancelled job's message stays claimed until its visibility timeout ends,
        then it is visible again.
        """
        if not self._tasks:
            return
        done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("shutdown cancelled unfinished jobs", extra={"count": len(pending)})
