"""Acks and archives that must reach the database, even when the REST API is down.

A job that succeeded has had its side effect (the mail went out); only its ack
remains. If the ack fails, it is kept here and retried in-process with backoff,
and the message is remembered as finished: should it be claimed again by this
process meanwhile (its lease ran out), it is acked without running the job again.
Archives of failed jobs are kept and retried the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from app.queue.backend import QueueBackend
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)


class Settler:
    def __init__(
        self, backend: QueueBackend, *, retry_interval: float = 1.0, max_interval: float = 30.0
    ) -> None:
        self._backend = backend
        self._retry_interval = retry_interval
        self._max_interval = max_interval
        self._acks: defaultdict[str, set[int]] = defaultdict(set)
        self._archives: defaultdict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        return sum(map(len, self._acks.values())) + sum(map(len, self._archives.values()))

    def owes(self, queue: str, msg_id: int) -> bool:
        """True when this process finished the message and still owes its ack or archive."""
        return msg_id in self._acks[queue] or msg_id in self._archives[queue]

    def poke(self) -> None:
        """Tries the pending work again soon (a message it owes was seen again)."""
        self._wake.set()

    async def ack(self, queue: str, msg_id: int) -> bool:
        """Deletes a processed message; False when the ack was deferred for retry."""
        try:
            await self._backend.ack(queue, [msg_id])
        except RpcError as error:
            log.warning(
                "ack failed; retrying in-process",
                extra={"queue": queue, "msg_id": msg_id, "error": str(error)},
            )
            self._acks[queue].add(msg_id)
            self._wake.set()
            return False
        return True

    async def archive(self, queue: str, msg_id: int, error: dict[str, Any]) -> bool:
        """Archives a dead message with its error; False when deferred for retry."""
        try:
            await self._backend.archive(queue, [msg_id], {msg_id: error})
        except RpcError as rpc_error:
            log.warning(
                "archive failed; retrying in-process",
                extra={"queue": queue, "msg_id": msg_id, "error": str(rpc_error)},
            )
            self._archives[queue][msg_id] = error
            self._wake.set()
            return False
        return True

    async def flush(self) -> bool:
        """Tries every pending ack and archive once, one call per queue; True when none is left."""
        for queue, ids in list(self._acks.items()):
            if ids:
                batch = sorted(ids)
                try:
                    await self._backend.ack(queue, batch)
                except RpcError as error:
                    log.warning(
                        "pending acks still failing",
                        extra={"queue": queue, "count": len(batch), "error": str(error)},
                    )
                else:
                    ids.difference_update(batch)
        for queue, errors in list(self._archives.items()):
            if errors:
                batch_errors = dict(errors)
                try:
                    await self._backend.archive(queue, sorted(batch_errors), batch_errors)
                except RpcError as error:
                    log.warning(
                        "pending archives still failing",
                        extra={"queue": queue, "count": len(batch_errors), "error": str(error)},
                    )
                else:
                    for msg_id in batch_errors:
                        errors.pop(msg_id, None)
        return self.pending == 0

    async def run(self) -> None:
        """Retries pending work with backoff until cancelled."""
        interval = self._retry_interval
        while True:
            if self.pending == 0:
                self._wake.clear()
                await self._wake.wait()
                interval = self._retry_interval
            # Sleep the backoff, but wake early when poked.
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
                # cancellation that comes as the wait ends, and close() would wait.
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            if await self.flush():
                log.info("pending acks and archives completed")
            else:
                interval = min(interval * 2, self._max_interval)

    async def close(self, timeout: float) -> None:
        """Last attempts to settle everything within `timeout` seconds (at shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout
        interval = self._retry_interval
        while not await self.flush():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.error(
                    "shutting down with unsettled messages; they will be processed again",
                    extra={"count": self.pending},
                )
                return
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, self._max_interval)
