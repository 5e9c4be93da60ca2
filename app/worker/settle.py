"""Acks and archives that must reach the database, even when the REST API is down.

A job that succeeded has had its side effect (the mail went out); only its ack
remains. If the ack fails, it is kept here and retried in-process with backoff,
and the message is remembered as finished: should it be claimed again by this
process meanwhile (its lease ran out), it is acked without running the job again.
Archives of failed jobs are kept and retried the same way.

Acks may also be deferred (`ack_delay` > 0, `ACK_MAX_DELAY_MS`): nobody waits for an
ack, so a finished job hands its ack over and gives its slot back at once, and the
acks of jobs that finish one by one leave together, one call per queue, when
`ack_batch` are owed or `ack_delay` seconds after the first of them, whichever
comes first. They wait only while the queue has a backlog (the runner says so):
otherwise no other ack is coming soon to share the call with, and an ack leaves at
once (through the claim/ack coalescing), so at low load none is held back. At most
`max_unacked` finished jobs per queue may be owed (waiting or
in a call under way); a job that would owe more waits, its slot held, until a call
has landed, so a process never has more than `max_unacked` deferred acks per queue:
after a crash those, the jobs running at the time and any acks already failing and
kept for retry (as without deferral) are all that can run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from app.queue.backend import QueueBackend
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)


class Settler:
    def __init__(
        self,
        backend: QueueBackend,
        *,
        retry_interval: float = 1.0,
        max_interval: float = 30.0,
        ack_delay: float = 0.0,
        ack_batch: int = 100,
        max_unacked: Mapping[str, int] | None = None,
        default_max_unacked: int = 100,
    ) -> None:
        self._backend = backend
        self._retry_interval = retry_interval
        self._max_interval = max_interval
        self.ack_delay = ack_delay
        self._ack_batch = max(1, ack_batch)
        self._max_unacked = dict(max_unacked or {})
        self._default_max_unacked = max(1, default_max_unacked)
        self._acks: defaultdict[str, set[int]] = defaultdict(set)
        self._archives: defaultdict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self._wake = asyncio.Event()
        # Deferred acks: waiting for their batch, and in a call under way.
        self._outgoing: defaultdict[str, dict[int, None]] = defaultdict(dict)
        self._sending: defaultdict[str, set[int]] = defaultdict(set)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()  # set whenever a deferred ack call ends
        # Jobs per queue waiting for room under `max_unacked` (their slots held).
        self._held: defaultdict[str, int] = defaultdict(int)

    @property
    def pending(self) -> int:
        """Acks and archives owed: failed and kept for retry, or deferred and not yet landed."""
        return (
            sum(map(len, self._acks.values()))
            + sum(map(len, self._archives.values()))
            + self.deferred
        )

    @property
    def deferred(self) -> int:
        """Deferred acks not yet landed (waiting for their batch or in a call under way)."""
        return sum(map(len, self._outgoing.values())) + sum(map(len, self._sending.values()))

    def unacked(self, queue: str) -> int:
        """Deferred acks of `queue` not yet landed (bounded by its `max_unacked`)."""
        return len(self._outgoing[queue]) + len(self._sending[queue])

    def held(self, queue: str) -> int:
        """Jobs of `queue` that finished and wait for room to owe their ack."""
        return self._held[queue]

    def owes(self, queue: str, msg_id: int) -> bool:
        """True when this process finished the message and still owes its ack or archive."""
        return (
            msg_id in self._acks[queue]
            or msg_id in self._archives[queue]
            or msg_id in self._outgoing[queue]
            or msg_id in self._sending[queue]
        )

    def poke(self) -> None:
        """Tries the pending work again soon (a message it owes was seen again)."""
        self._wake.set()

    async def ack(self, queue: str, msg_id: int, *, now: bool = False) -> bool:
        """Deletes a processed message; False when the ack was deferred for retry.

        With `ack_delay`, the ack joins the queue's next batch and this returns at once
        (True; should the batch fail, its acks are kept for retry as above), unless
        `max_unacked` deferred acks of the queue are owed already: then it first waits
        until a call under way has ended. `now`: no other job is about to finish (no
        backlog), so the batch leaves at once, without the caller waiting for it.
        """
        if self.ack_delay > 0:
            return await self._defer_ack(queue, msg_id, now)
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

    async def _defer_ack(self, queue: str, msg_id: int, now: bool) -> bool:
        limit = self._max_unacked.get(queue, self._default_max_unacked)
        outgoing, sending = self._outgoing[queue], self._sending[queue]
        if len(outgoing) + len(sending) >= limit:
            self._held[queue] += 1
            try:
                while len(outgoing) + len(sending) >= limit:
                    # As many owed as allowed: this job keeps its slot until there is room.
                    self._send_acks(queue)
                    self._settled.clear()
                    await self._settled.wait()
            finally:
                self._held[queue] -= 1
        outgoing[msg_id] = None
        if now or len(outgoing) >= min(self._ack_batch, limit):
            self._send_acks(queue)
        elif queue not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[queue] = loop.call_later(self.ack_delay, self._send_acks, queue)
        return True

    def idle(self, queue: str) -> None:
        """`queue` has nothing running or waiting: no other ack is coming soon to share
        a call with, so the waiting ones leave now rather than after `ack_delay`."""
        if self._outgoing[queue]:
            self._send_acks(queue)

    def _send_acks(self, queue: str) -> None:
        """Sends the queue's waiting acks in one call (in a task of its own)."""
        timer = self._timers.pop(queue, None)
        if timer is not None:
            timer.cancel()
        outgoing = self._outgoing[queue]
        if not outgoing:
            return
        ids = list(outgoing)
        outgoing.clear()
        self._sending[queue].update(ids)
        task = asyncio.get_running_loop().create_task(self._ack_call(queue, ids))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _ack_call(self, queue: str, ids: list[int]) -> None:
        try:
            await self._backend.ack(queue, ids)
        except RpcError as error:
            log.warning(
                "ack failed; retrying in-process",
                extra={"queue": queue, "count": len(ids), "error": str(error)},
            )
            self._acks[queue].update(ids)
            self._wake.set()
        except asyncio.CancelledError:
            self._acks[queue].update(ids)  # at shutdown: close() tries them once more
            raise
        finally:
            self._sending[queue].difference_update(ids)
            self._settled.set()

    async def _land_deferred(self) -> None:
        """Sends every waiting deferred ack now and waits for the calls under way."""
        for queue in list(self._outgoing):
            self._send_acks(queue)
        if self._calls:
            await asyncio.gather(*list(self._calls), return_exceptions=True)

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
        await self._land_deferred()
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
        # Deferred acks of jobs that finished meanwhile are not failures to back off for.
        return self.pending - self.deferred == 0

    async def run(self) -> None:
        """Retries pending work with backoff until cancelled."""
        interval = self._retry_interval
        while True:
            if self.pending - self.deferred == 0:
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
