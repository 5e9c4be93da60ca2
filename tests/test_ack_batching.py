"""Deferred acks, prefetch and batched sweeps when jobs finish one by one.

Against the real database through the RPC gateway stand-in, whose call counters
show how many RPCs the jobs needed. Jobs finish staggered (each processor call waits
its own few milliseconds, as mails through a few SMTP sessions do), which is what
made every ack leave alone before. No timing is asserted: batches leave by size, by
a delay far longer than the test, or at the drain.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from pydantic import BaseModel

from app.queue.coalesce import CoalescingQueue
from app.queue.models import QueueMessage
from app.queue.rpc import RpcQueue
from app.worker import RetryPolicy, Runner, RunnerConfig, Sweeper
from app.worker.runner import Offer
from tests.support.postgres import Database
from tests.support.rpc_gateway import RpcGateway
from tests.test_coalesce import NEVER, QUEUE, calls, enqueue, eventually, inner
from tests.test_e2e import queue_rows

pytestmark = pytest.mark.anyio

__all__ = ["inner"]  # the fixture, imported for its use here


def config(max_concurrency: int) -> RunnerConfig:
    return RunnerConfig(
        visibility_timeout=30,
        job_timeout=10,
        max_concurrency=max_concurrency,
        retry=RetryPolicy(max_attempts=3, base_delay=1, max_delay=2),
    )


class Staggered:
    """Finishes each job after its own short wait; notes what the Settler owed then."""

    model = BaseModel

    def __init__(self, runner: list[Runner]) -> None:
        self.seen: list[int] = []
        self.unacked: list[int] = []
        self._runner = runner
        self._random = random.Random(15)

    async def __call__(self, message: QueueMessage) -> None:
        self.unacked.append(self._runner[0].settler.unacked(QUEUE))
        await asyncio.sleep(self._random.uniform(0.001, 0.02))
        self.seen.append(message.msg_id)


async def test_staggered_jobs_share_few_ack_and_read_calls(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 200)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    holder: list[Runner] = []
    staggered = Staggered(holder)
    # The defaults' shape: 16 slots, 50 waiting, reads of up to 50, acks of 100.
    runner = Runner(
        queue, {QUEUE: staggered}, config(16), prefetch=50, ack_delay=NEVER, ack_batch=100
    )
    holder.append(runner)
    sweeper = Sweeper(runner, interval=0.05, batch_size=50)
    gateway.reset_counters()
    runner.start()
    sweeper.start()
    try:
        await eventually(lambda: queue_rows(db) == [], timeout=60, what="every ack")
    finally:
        await sweeper.stop()
        await runner.drain(5)
        await runner.close()
        await queue.close()

    assert sorted(staggered.seen) == ids  # every job ran, once
    # 200 acks in batches of 100 while the backlog lasts; once a read comes back short
    # the last ones leave as they finish (a handful of coalesced calls), never one each.
    assert calls(gateway, "ack") <= 200 // 10
    # Reads wait for half a batch of room (slots plus prefetch), not one free slot.
    assert calls(gateway, "read") <= 200 // 25 + 6


class LastHeld:
    """Jobs end at once, except the one for `held_id`, which waits for `gate`."""

    model = BaseModel

    def __init__(self, held_id: int) -> None:
        self.held_id = held_id
        self.gate = asyncio.Event()
        self.seen: list[int] = []

    async def __call__(self, message: QueueMessage) -> None:
        if message.msg_id == self.held_id:
            await self.gate.wait()
        self.seen.append(message.msg_id)


async def test_a_slot_is_free_when_its_job_ends_not_when_its_ack_lands(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 10)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    processor = LastHeld(ids[3])
    runner = Runner(queue, {QUEUE: processor}, config(4), ack_delay=NEVER, ack_batch=100)
    runner.start()
    gateway.reset_counters()
    try:
        # A full read (4 of 10): a backlog, so acks wait for company.
        assert await runner.sweep(QUEUE, 4) == (4, 4)
        await eventually(lambda: len(processor.seen) == 3, timeout=30, what="three jobs")
        await eventually(lambda: runner.free(QUEUE) == 3, timeout=30, what="free slots")
        # Three slots are free again while their acks still wait for a batch (the
        # fourth job still runs, so more acks may come to share the call).
        assert runner.settler.unacked(QUEUE) == 3
        assert calls(gateway, "ack") == 0
        assert [row[0] for row in queue_rows(db)] == ids
        # A message finished here but not yet acked is not run again.
        assert all(runner.settler.owes(QUEUE, i) for i in ids[:3])
        # The last job ends: nothing is left to share the call with, the acks leave now.
        processor.gate.set()
        await eventually(lambda: queue_rows(db)[0][0] == ids[4], timeout=30, what="the acks")
        assert calls(gateway, "ack") == 1
    finally:
        processor.gate.set()
        await runner.drain(5)
        await runner.close()
        await queue.close()
    assert [row[0] for row in queue_rows(db)] == ids[4:]


async def test_deferred_acks_never_exceed_their_bound(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 60)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    holder: list[Runner] = []
    staggered = Staggered(holder)
    # Bound: max(MAX_CONCURRENCY 4, batch 10) = 10 owed acks; the acks are slow to
    # come back, so jobs finish faster than acks land and reach the bound.
    runner = Runner(
        queue, {QUEUE: staggered}, config(4), prefetch=10, ack_delay=NEVER, ack_batch=10
    )
    holder.append(runner)
    sweeper = Sweeper(runner, interval=0.05, batch_size=10)
    gateway.delay_answers(0.2, "ack")
    runner.start()
    sweeper.start()
    try:
        await eventually(lambda: queue_rows(db) == [], timeout=60, what="every ack")
    finally:
        gateway.delay_answers(0)
        await sweeper.stop()
        await runner.drain(5)
        await runner.close()
        await queue.close()
    assert sorted(staggered.seen) == ids
    assert max(staggered.unacked) <= 10


async def test_webhooks_during_a_backlog_leave_it_to_the_sweeper(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    holder: list[Runner] = []
    staggered = Staggered(holder)
    runner = Runner(queue, {QUEUE: staggered}, config(2), prefetch=2, ack_delay=NEVER)
    holder.append(runner)
    # An hour between passes: only deferrals make the sweeper read.
    sweeper = Sweeper(runner, interval=NEVER, batch_size=10)
    runner.start()
    sweeper.start()
    try:
        await eventually(lambda: sweeper.last_sweep is not None, timeout=30, what="first sweep")
        ids = enqueue(db, 40)
        gateway.reset_counters()
        offers = [runner.offer(QUEUE, [i]) for i in ids]
        await eventually(lambda: len(staggered.seen) == 40, timeout=60, what="the backlog")
        claims = calls(gateway, "claim")
        # Doorbells for messages that were processed here cost no claim.
        assert {runner.offer(QUEUE, [i]) for i in ids} == {Offer.ACCEPTED}
        await asyncio.sleep(0.05)
    finally:
        await sweeper.stop()
        await runner.drain(5)
        await runner.close()
        await queue.close()
    assert sorted(staggered.seen) == ids
    first_deferred = [o.value for o in offers].index("deferred")
    assert first_deferred == 4  # room for 2 running and 2 waiting
    # Once one webhook was deferred, the rest were too: the sweeper reads them.
    assert {o.value for o in offers[first_deferred:]} == {"deferred"}
    assert claims == 1  # the four accepted ones, in one coalesced claim
    assert calls(gateway, "claim") == claims


class Gated:
    """Jobs wait until `gate` opens."""

    model = BaseModel

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def __call__(self, message: QueueMessage) -> None:
        self.started += 1
        await self.gate.wait()


async def test_a_drain_gives_prefetched_messages_back_at_once(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 6)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    gated = Gated()
    runner = Runner(queue, {QUEUE: gated}, config(2), prefetch=4, ack_delay=NEVER)
    runner.start()
    try:
        assert runner.offer(QUEUE, ids) is Offer.ACCEPTED  # 2 run, 4 wait for a slot
        await eventually(lambda: gated.started == 2, timeout=30, what="two running jobs")
        await eventually(lambda: runner.in_flight(QUEUE) == 6, timeout=30, what="all claimed")
        assert runner.running(QUEUE) == 2
        draining = asyncio.ensure_future(runner.drain(10))
        # The waiting four are visible again while the running two finish.
        await eventually(
            lambda: sum(1 for row in queue_rows(db) if not row[2]) == 4,
            timeout=30,
            what="the waiting messages back in the queue",
        )
        gated.gate.set()
        await draining
    finally:
        gated.gate.set()
        await runner.close()
        await queue.close()
    assert gated.started == 2
    assert [row[0] for row in queue_rows(db)] == ids[2:]
