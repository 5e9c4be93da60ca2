"""Claim and ack batching: many concurrent callers, one database call.

Every RPC is one transaction on the server, and on a small database commits, not
Python, are the bottleneck: one claim and one ack per message cap a worker at a
few hundred jobs a second, while the same calls with arrays of ids go a hundred
times faster. `CoalescingQueue` wraps any `QueueBackend` and merges concurrent
`claim`, `ack`, `set_vt` and `archive` calls of one queue (and, for claims and
`set_vt`, one visibility timeout) into a single call of the wrapped backend:

- a batch is due when `max_batch` ids are pending, or `flush_interval` seconds
  after its first id arrived, whichever comes first: at low load one caller waits
  at most the interval;
- at most `max_in_flight` calls per queue and operation are under way at once; a
  batch that is due meanwhile keeps taking ids and leaves as soon as one returns,
  so under load batches grow with the database's latency (group commit) instead
  of piling up as concurrent calls;
- each caller gets its own part of the answer: the messages whose ids it asked
  for (a message asked for twice goes to the first caller only, so a repeated
  webhook can never start a job twice), or the ids it asked for that came back;
  archive errors are merged per id;
- no id a caller passes can fail a shared call: an id outside pgmq's msg_id range
  (1 to 2^63-1; it could not name a message) is left out of the batch and absent
  from that caller's answer, as a message that is gone would be;
- when the call fails for a reason that may pass (no answer, 5xx), every caller
  of the batch sees the error, exactly as if it had made the call alone (the
  runner and the Settler already handle that); when the database refused it
  (4xx) or it failed in the client, each caller's part is sent again on its own,
  so a caller whose input was refused fails alone and the others go on;
- a caller cancelled before the call takes its ids out of the batch; messages
  claimed for a caller that was cancelled meanwhile are made visible again.

`read` and everything else pass straight through, but claims of any kind (reads,
and claims when batching is off) outlive a caller cancelled meanwhile, and what
they claimed for nobody is made visible again. `close()` (at shutdown, after the
runner has drained) sends what is pending and waits for calls under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from app.queue.backend import (
    ArchivedMessage,
    DeadAction,
    DeadBatch,
    DeadFilter,
    QueueBackend,
    QueueMetrics,
)
from app.queue.models import MAX_MSG_ID, QueueMessage
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)

Operation = Literal["claim", "ack", "set_vt", "archive"]
# (operation, queue, vt): only calls that agree on all three can share one call.
Key = tuple[Operation, str, int | None]


@dataclass(eq=False)
class _Waiter:
    ids: Sequence[int]
    future: asyncio.Future[Any]


@dataclass(eq=False)
class _Batch:
    # Ids in arrival order (a dict keeps the order and drops repeats).
    ids: dict[int, None] = field(default_factory=dict)
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)
    due: bool = False  # its flush interval is over: send as soon as a call may start


@dataclass(eq=False)
class _Lane:
    """The calls of one (operation, queue, vt)."""

    key: Key
    open: _Batch | None = None  # taking ids until it is sent
    timer: asyncio.TimerHandle | None = None  # makes `open` due
    in_flight: int = 0

    def idle(self) -> bool:
        return self.open is None and self.in_flight == 0


class CoalescingQueue:
    """A `QueueBackend` that batches the calls of concurrent callers.

    `max_batch` <= 1 turns batching off: every call goes straight to `inner`.
    At most `max_in_flight` calls per lane (operation, queue, vt) are under way at
    once. A batch that is due (full, or its interval over) while they are keeps
    taking ids and leaves as soon as one of them returns: under load, batches grow
    with the database's latency instead of piling up as concurrent calls (group
    commit); at low load nothing is in flight and a batch leaves when it is due.
    Two calls rather than one, so that one slow call does not hold up the rest.
    The ids come from jobs holding slots (or owed by the Settler), so a batch stays
    within MAX_CONCURRENCY plus what the Settler owes.
    """

    def __init__(
        self,
        inner: QueueBackend,
        *,
        max_batch: int,
        flush_interval: float,
        max_in_flight: int = 2,
    ) -> None:
        self.inner = inner
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_in_flight = max_in_flight
        self._lanes: dict[Key, _Lane] = {}
        self._sending: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1 and not self._closed

    @property
    def pending(self) -> int:
        """Ids waiting for their batch to be sent."""
        return sum(len(lane.open.ids) for lane in self._lanes.values() if lane.open)

    # -- the batched operations ------------------------------------------------

    async def claim(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[QueueMessage]:
        if not self.enabled or not msg_ids:
            ids = [i for i in msg_ids if is_msg_id(i)]
            return await self._claiming(queue, self.inner.claim(queue, ids, vt))
        result: list[QueueMessage] = await self._submit(("claim", queue, vt), msg_ids)
        return result

    async def ack(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        if not self.enabled or not msg_ids:
            return await self.inner.ack(queue, [i for i in msg_ids if is_msg_id(i)])
        result: list[int] = await self._submit(("ack", queue, None), msg_ids)
        return result

    async def set_vt(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[int]:
        if not self.enabled or not msg_ids:
            return await self.inner.set_vt(queue, [i for i in msg_ids if is_msg_id(i)], vt)
        result: list[int] = await self._submit(("set_vt", queue, vt), msg_ids)
        return result

    async def archive(
        self, queue: str, msg_ids: Sequence[int], errors: Mapping[int, dict[str, Any]]
    ) -> list[int]:
        if not self.enabled or not msg_ids:
            return await self.inner.archive(queue, [i for i in msg_ids if is_msg_id(i)], errors)
        result: list[int] = await self._submit(("archive", queue, None), msg_ids, errors)
        return result

    # -- passed through ----------------------------------------------------------

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        return await self._claiming(queue, self.inner.read(queue, vt, qty))

    async def send(
        self,
        queue: str,
        message: dict[str, Any],
        delay_seconds: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> int:
        return await self.inner.send(queue, message, delay_seconds, headers)

    async def metrics(self) -> list[QueueMetrics]:
        return await self.inner.metrics()

    async def archived(
        self, queue: str, limit: int, before_id: int | None = None
    ) -> list[ArchivedMessage]:
        return await self.inner.archived(queue, limit, before_id)

    async def replay(self, queue: str, msg_id: int) -> int | None:
        return await self.inner.replay(queue, msg_id)

    async def set_paused(self, queue: str, paused: bool) -> bool:
        return await self.inner.set_paused(queue, paused)

    async def paused(self) -> dict[str, datetime]:
        return await self.inner.paused()

    async def dead_letter_counts(self) -> dict[str, int]:
        return await self.inner.dead_letter_counts()

    async def dead_batch(
        self,
        action: DeadAction,
        queue: str,
        after_id: int,
        max_rows: int,
        where: DeadFilter,
        up_to_id: int | None = None,
    ) -> DeadBatch:
        return await self.inner.dead_batch(action, queue, after_id, max_rows, where, up_to_id)

    async def expire_dead(self, queue: str, older_than: datetime, max_rows: int) -> int:
        return await self.inner.expire_dead(queue, older_than, max_rows)

    async def _claiming(
        self, queue: str, call: Coroutine[Any, Any, list[QueueMessage]]
    ) -> list[QueueMessage]:
        """A claim (or read) whose caller may be cancelled while the database claims.

        Cancelling the caller does not cancel the call: its request may already be
        with the database, which claims the rows whatever becomes of the answer. The
        call runs on, and the messages it claimed for nobody are made visible again
        when it returns; `close()` waits for both.
        """
        task: asyncio.Task[list[QueueMessage]] = asyncio.ensure_future(call)
        self._track(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._orphaned(queue, done))
            raise

    def _orphaned(self, queue: str, task: asyncio.Task[list[QueueMessage]]) -> None:
        if task.cancelled() or task.exception() is not None or not task.result():
            return
        self._track(asyncio.ensure_future(self._release(queue, task.result())))

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # -- batching ------------------------------------------------------------------

    async def _submit(
        self, key: Key, msg_ids: Sequence[int], errors: Mapping[int, dict[str, Any]] | None = None
    ) -> Any:
        msg_ids = [i for i in msg_ids if is_msg_id(i)]
        if not msg_ids:
            return []
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        batch = lane.open
        if batch is None:
            batch = lane.open = _Batch()
            lane.timer = loop.call_later(self.flush_interval, self._due, lane)
        waiter = _Waiter(msg_ids, loop.create_future())
        batch.waiters.append(waiter)
        for msg_id in msg_ids:
            batch.ids[msg_id] = None
        if errors:
            batch.errors.update({i: errors[i] for i in msg_ids if i in errors})
        if len(batch.ids) >= self.max_batch and not batch.due:
            batch.due = True
            self._dispatch(lane)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._withdraw(lane, batch, waiter)
            raise

    def _close_open(self, lane: _Lane) -> None:
        lane.open = None
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None

    def _due(self, lane: _Lane) -> None:
        lane.timer = None
        if lane.open is not None:
            lane.open.due = True
            self._dispatch(lane)

    def _dispatch(self, lane: _Lane) -> None:
        """Sends the lane's batch if it is due and a call may start."""
        batch = lane.open
        if batch is None:
            self._forget_if_idle(lane)
            return
        if not (self._closed or (batch.due and lane.in_flight < self.max_in_flight)):
            return
        self._close_open(lane)
        lane.in_flight += 1
        self._track(asyncio.get_running_loop().create_task(self._send(lane, batch)))

    def _forget_if_idle(self, lane: _Lane) -> None:
        if lane.idle() and self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    def _withdraw(self, lane: _Lane, batch: _Batch, waiter: _Waiter) -> None:
        """Takes a cancelled caller's ids out of a batch that has not been sent yet."""
        if batch is not lane.open:
            return  # already sent; _send deals with it
        batch.waiters.remove(waiter)
        wanted = {i for w in batch.waiters for i in w.ids}
        for msg_id in waiter.ids:
            if msg_id not in wanted:
                batch.ids.pop(msg_id, None)
                batch.errors.pop(msg_id, None)
        if batch.waiters:
            return
        self._close_open(lane)
        self._forget_if_idle(lane)

    async def _call(self, key: Key, ids: list[int], errors: Mapping[int, dict[str, Any]]) -> Any:
        operation, queue, vt = key
        if operation == "claim":
            assert vt is not None
            return await self.inner.claim(queue, ids, vt)
        if operation == "ack":
            return await self.inner.ack(queue, ids)
        if operation == "set_vt":
            assert vt is not None
            return await self.inner.set_vt(queue, ids, vt)
        return await self.inner.archive(queue, ids, errors)

    async def _send(self, lane: _Lane, batch: _Batch) -> None:
        operation, queue, _ = lane.key
        refused = False
        try:
            result: Any = await self._call(lane.key, list(batch.ids), batch.errors)
        except asyncio.CancelledError:
            _fail(batch, RpcError(operation, None, "cancelled: the worker is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - handed to the callers
            if len(batch.waiters) < 2 or (isinstance(error, RpcError) and error.transient):
                _fail(batch, error)  # every caller sees it, as if it had called alone
                return
            # Refused by the database (4xx) or failed in the client: see below.
            refused = True
        finally:
            lane.in_flight -= 1
            self._dispatch(lane)
        try:
            if refused:
                # A refused call changed nothing (its transaction rolled back), so
                # each caller's part can be sent alone: a caller whose input was at
                # fault fails alone, as if it had called alone, and the others go on.
                await self._one_by_one(lane.key, batch)
            elif operation == "claim":
                orphans = _deliver_messages(batch, result)
                if orphans:
                    await self._release(queue, orphans)
            else:
                _deliver_ids(batch, result)
        except asyncio.CancelledError:
            _fail(batch, RpcError(operation, None, "cancelled: the worker is shutting down"))
            raise

    async def _one_by_one(self, key: Key, batch: _Batch) -> None:
        operation, queue, _ = key
        log.warning(
            "a batched queue call was refused; sending each caller's part alone",
            extra={"queue": queue, "operation": operation, "count": len(batch.waiters)},
        )
        taken: set[int] = set()
        for waiter in batch.waiters:
            if waiter.future.done():
                continue  # cancelled meanwhile: nothing to do for it
            # An id asked for twice goes to the first caller only, as in a batch.
            ids = [i for i in dict.fromkeys(waiter.ids) if i not in taken]
            taken.update(ids)
            alone = _Batch(waiters=[waiter])
            try:
                # Only this caller's errors: another's may be what was refused.
                errors = {i: batch.errors[i] for i in ids if i in batch.errors}
                result = await self._call(key, ids, errors) if ids else []
            except Exception as error:  # noqa: BLE001 - this caller's own failure
                _fail(alone, error)
                continue
            if operation == "claim":
                orphans = _deliver_messages(alone, result)
                if orphans:
                    await self._release(queue, orphans)
            else:
                _deliver_ids(alone, result)

    async def _release(self, queue: str, messages: list[QueueMessage]) -> None:
        # Claimed for callers that were cancelled meanwhile: visible again now
        # rather than when the claim's visibility timeout runs out.
        with contextlib.suppress(RpcError):
            await self.inner.set_vt(queue, [m.msg_id for m in messages], 0)

    # -- shutting down -----------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Sends every pending batch at once, waits up to `timeout` seconds for the
        calls under way, and passes later calls straight through.

        A call still unanswered at the deadline is cancelled and its callers get an
        `RpcError`; their messages stay in the queue (a claim or an ack that never
        happened is repeated later, by this process or another).
        """
        self._closed = True
        for lane in list(self._lanes.values()):
            self._dispatch(lane)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A call that ends may start another (a release of what it claimed for nobody).
        while self._sending and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._sending), timeout=remaining)
        late = set(self._sending)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning("queue calls cut short at shutdown", extra={"count": len(late)})


def is_msg_id(value: object) -> bool:
    """Whether `value` can be a pgmq msg_id: an int (not a bool) from 1 to 2^63-1."""
    return type(value) is int and 1 <= value <= MAX_MSG_ID


def _fail(batch: _Batch, error: BaseException) -> None:
    for waiter in batch.waiters:
        if not waiter.future.done():
            waiter.future.set_exception(error)


def _deliver_messages(batch: _Batch, messages: list[QueueMessage]) -> list[QueueMessage]:
    """Gives each caller the messages it asked for, each message to one caller only.

    Returns the messages claimed for callers that are gone.
    """
    by_id = {message.msg_id: message for message in messages}
    orphans: list[QueueMessage] = []
    for waiter in batch.waiters:
        mine = [m for i in waiter.ids if (m := by_id.pop(i, None)) is not None]
        if waiter.future.done():  # cancelled while the call was under way
            orphans.extend(mine)
        else:
            waiter.future.set_result(mine)
    return orphans


def _deliver_ids(batch: _Batch, ids: list[int]) -> None:
    done = set(ids)
    for waiter in batch.waiters:
        if not waiter.future.done():
            waiter.future.set_result([i for i in waiter.ids if i in done])
