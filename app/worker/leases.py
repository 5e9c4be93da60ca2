"""The heartbeat: running jobs keep their messages invisible to other readers.

A claim hides a message for the visibility timeout (the lease). While a job runs,
its lease is renewed every third of that time, so a slow job is never handed to
another reader mid-way. Renewals are batched: one `set_vt` call per queue per beat,
whatever the number of running jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Mapping

from app.queue.backend import QueueBackend
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)


class Leases:
    """`vt` is the lease of every queue that `per_queue` does not name."""

    def __init__(
        self, backend: QueueBackend, *, vt: int, per_queue: Mapping[str, int] | None = None
    ) -> None:
        self._backend = backend
        self.vt = vt
        self._vt = dict(per_queue or {})
        self._held: defaultdict[str, set[int]] = defaultdict(set)
        self._stopped = asyncio.Event()
        self._renewal: asyncio.Future[None] | None = None

    def hold(self, queue: str, msg_id: int) -> None:
        self._held[queue].add(msg_id)

    def release(self, queue: str, msg_id: int) -> None:
        self._held[queue].discard(msg_id)

    def holds(self, queue: str) -> set[int]:
        """The held ids of `queue`, not copied: for membership tests on the hot path."""
        return self._held[queue]

    def held(self, queue: str) -> frozenset[int]:
        return frozenset(self._held[queue])

    async def renew(self) -> None:
        """Extends every held lease to now + its queue's vt."""
        for queue, ids in list(self._held.items()):
            if not ids:
                continue
            try:
                await self._backend.set_vt(queue, sorted(ids), self._vt.get(queue, self.vt))
            except RpcError as error:
                # The lease still runs until its old deadline; the next beat tries again.
                log.warning("lease renewal failed", extra={"queue": queue, "error": str(error)})

    async def run(self) -> None:
        """Renews leases every third of the shortest vt until cancelled or stopped."""
        interval = min([self.vt, *self._vt.values()]) / 3
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # not wait_for: see Sweeper
                    await self._stopped.wait()
            if not self._stopped.is_set():
                # A task of its own: cancelling the heartbeat never cuts a renewal short.
                self._renewal = asyncio.ensure_future(self.renew())
                await asyncio.shield(self._renewal)

    async def quiet(self) -> None:
        """Waits for the renewal under way, if any: called after releasing ids that are
        about to be made visible, so that no renewal started earlier hides them again."""
        if self._renewal is not None and not self._renewal.done():
            await asyncio.gather(asyncio.shield(self._renewal), return_exceptions=True)

    async def stop(self) -> None:
        """Stops renewing, once the renewal under way (if any) has landed.

        Called before messages are released at shutdown: a renewal landing after
        a release would hide the message again for a whole lease.
        """
        self._stopped.set()
        if self._renewal is not None:
            await asyncio.gather(asyncio.shield(self._renewal), return_exceptions=True)
