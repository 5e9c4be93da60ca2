"""Claim/ack batching (app/queue/coalesce.py) against the real database.

Every call goes through the RPC client, over HTTP, to the PostgREST-compatible
gateway and PostgreSQL with pgmq; the gateway's call counters show how many RPCs
(database transactions) the callers' requests became, and the queue tables show
what happened to the messages. No timing is asserted: batches are closed by size,
by `close()`, or by a flush interval far longer than the test's steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from app.queue.coalesce import CoalescingQueue
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError, RpcQueue, SupabaseRpc
from app.worker import RetryPolicy, Runner, RunnerConfig, Sweeper
from app.worker.settle import Settler
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.rpc_gateway import RpcGateway
from tests.test_e2e import archived_rows, queue_rows

pytestmark = pytest.mark.anyio

QUEUE = "email_queue"
# Long enough that no batch in these tests leaves by its timer while the test is
# still adding to it; batches leave when full or at close().
NEVER = 3600.0


@pytest.fixture
async def inner(db: Database, gateway: RpcGateway) -> AsyncIterator[RpcQueue]:
    """The RPC backend, as the service builds it; gateway counters and faults reset."""
    key = gateway.service_role_key
    client = SupabaseRpc.create_client(
        gateway.url, {"apikey": key, "Authorization": f"Bearer {key}"}, timeout=10
    )
    gateway.fail_functions()
    gateway.set_down(False)
    async with client:
        yield RpcQueue(SupabaseRpc(client, schema="queue_worker"))
    gateway.fail_functions()
    gateway.set_down(False)


def enqueue(db: Database, count: int) -> list[int]:
    with db.connect(role=OWNER_ROLE) as conn:
        rows = conn.execute(
            "select pgmq.send('email_queue', jsonb_build_object('n', i)) "
            "from generate_series(1, %s) i",
            [count],
        ).fetchall()
    return [int(row[0]) for row in rows]


def calls(gateway: RpcGateway, fn: str) -> int:
    return gateway.call_count(fn, "queue_worker")


async def eventually(probe: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_concurrent_claims_and_acks_become_one_rpc_each(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 50)
    queue = CoalescingQueue(inner, max_batch=50, flush_interval=NEVER)
    gateway.reset_counters()

    claimed = await asyncio.gather(*(queue.claim(QUEUE, [i], 30) for i in ids))

    # Each caller got its own message, and only its own.
    assert [[m.msg_id for m in mine] for mine in claimed] == [[i] for i in ids]
    assert calls(gateway, "claim") == 1
    assert queue_rows(db) == [(i, 1, True) for i in ids]  # claimed: read once, invisible

    acked = await asyncio.gather(*(queue.ack(QUEUE, [i]) for i in ids))

    assert acked == [[i] for i in ids]
    assert calls(gateway, "ack") == 1
    assert queue_rows(db) == []
    await queue.close()


async def test_a_batch_leaves_after_its_flush_interval_at_low_load(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    [msg_id] = enqueue(db, 1)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    gateway.reset_counters()

    # A lone caller is not kept waiting for the batch to fill.
    [message] = await queue.claim(QUEUE, [msg_id], 30)
    assert await queue.ack(QUEUE, [message.msg_id]) == [msg_id]

    assert (calls(gateway, "claim"), calls(gateway, "ack")) == (1, 1)
    assert queue_rows(db) == []
    await queue.close()


async def test_ids_claimed_elsewhere_are_left_out_and_repeats_go_to_one_caller(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 10)
    taken = ids[:4]
    # Another replica (or the sweeper) got there first.
    assert [m.msg_id for m in await inner.claim(QUEUE, taken, 30)] == taken
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=NEVER)
    gateway.reset_counters()

    callers = [asyncio.ensure_future(queue.claim(QUEUE, [i], 30)) for i in ids]
    # A repeated webhook for the same message, in the same batch.
    callers.append(asyncio.ensure_future(queue.claim(QUEUE, [ids[-1]], 30)))
    await asyncio.sleep(0)
    await queue.close()  # sends the batch
    results = await asyncio.gather(*callers)

    got = [[m.msg_id for m in mine] for mine in results]
    assert got[:4] == [[], [], [], []]
    assert got[4:10] == [[i] for i in ids[4:]]
    assert got[10] == []  # the first caller has it; a job never starts twice
    assert calls(gateway, "claim") == 1
    # Everything was claimed exactly once.
    assert queue_rows(db) == [(i, 1, True) for i in ids]


async def test_a_failed_ack_batch_fails_every_caller_and_the_settler_retries_in_one_rpc(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 20)
    assert len(await inner.claim(QUEUE, ids, 30)) == 20
    queue = CoalescingQueue(inner, max_batch=20, flush_interval=NEVER)
    settler = Settler(queue)
    gateway.fail_functions("ack")
    gateway.reset_counters()

    outcomes = await asyncio.gather(*(settler.ack(QUEUE, i) for i in ids))

    # One RPC failed, and all twenty callers saw it: their acks are kept for retry.
    assert outcomes == [False] * 20
    assert calls(gateway, "ack") == 1
    assert settler.pending == 20 and all(settler.owes(QUEUE, i) for i in ids)
    assert [row[0] for row in queue_rows(db)] == ids  # nothing deleted, nothing lost

    # Still failing: the retry is one call for all twenty, and it fails again.
    assert not await settler.flush()
    assert calls(gateway, "ack") == 2

    gateway.fail_functions()
    assert await settler.flush()

    assert calls(gateway, "ack") == 3
    assert settler.pending == 0
    assert queue_rows(db) == []
    await queue.close()


async def test_every_caller_of_a_failed_call_gets_the_error(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 5)
    queue = CoalescingQueue(inner, max_batch=5, flush_interval=NEVER)
    gateway.fail_functions("claim")

    results = await asyncio.gather(
        *(queue.claim(QUEUE, [i], 30) for i in ids), return_exceptions=True
    )

    assert all(isinstance(r, RpcError) and r.status == 503 for r in results)
    assert queue_rows(db) == [(i, 0, False) for i in ids]  # untouched, visible
    gateway.fail_functions()
    claimed = await asyncio.gather(*(queue.claim(QUEUE, [i], 30) for i in ids))
    assert [[m.msg_id for m in mine] for mine in claimed] == [[i] for i in ids]
    await queue.close()


@pytest.mark.parametrize("bad_id", [2**63, 2**64 + 5, -(2**63) - 1, 0, True])
async def test_an_id_no_message_can_have_never_fails_or_delays_the_others(
    db: Database, gateway: RpcGateway, inner: RpcQueue, bad_id: Any
) -> None:
    ids = enqueue(db, 8)
    # The batch leaves when its eight good ids are in (the bad one is no part of
    # it) or after a flush interval far longer than the test's patience.
    queue = CoalescingQueue(inner, max_batch=8, flush_interval=NEVER)
    gateway.reset_counters()

    async def claim(i: Any) -> list[QueueMessage]:
        return await queue.claim(QUEUE, [i], 30)

    results = await asyncio.wait_for(
        asyncio.gather(*(claim(i) for i in [*ids[:4], bad_id, *ids[4:]]), return_exceptions=True),
        timeout=5,
    )

    assert results[4] == []  # no such message: absent, as one that is gone would be
    assert [[m.msg_id for m in r] for r in [*results[:4], *results[5:]]] == [[i] for i in ids]
    assert calls(gateway, "claim") == 1
    released = await asyncio.wait_for(
        asyncio.gather(
            queue.set_vt(QUEUE, [bad_id], 0), *(queue.set_vt(QUEUE, [i], 0) for i in ids)
        ),
        timeout=5,
    )
    assert released == [[], *([i] for i in ids)]
    acked = await asyncio.wait_for(
        asyncio.gather(queue.ack(QUEUE, [bad_id]), *(queue.ack(QUEUE, [i]) for i in ids)),
        timeout=5,
    )
    assert acked == [[], *([i] for i in ids)]
    assert (calls(gateway, "set_vt"), calls(gateway, "ack")) == (1, 1)
    await queue.close()


async def test_an_archive_the_database_refuses_fails_only_the_caller_at_fault(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 5)
    await inner.claim(QUEUE, ids, 30)
    queue = CoalescingQueue(inner, max_batch=5, flush_interval=NEVER)
    gateway.reset_counters()
    errors = {i: {"type": "PermanentError", "message": f"failed {i}"} for i in ids}
    # jsonb refuses U+0000 (SQLSTATE 22P05, HTTP 400): one bad record in the batch.
    errors[ids[2]] = {"type": "PermanentError", "message": "an SMTP reply with \u0000"}

    results = await asyncio.gather(
        *(queue.archive(QUEUE, [i], {i: errors[i]}) for i in ids), return_exceptions=True
    )

    bad = results.pop(2)
    assert isinstance(bad, RpcError) and bad.status == 400
    assert results == [[i] for i in ids if i != ids[2]]
    assert [row[0] for row in archived_rows(db)] == [i for i in ids if i != ids[2]]
    assert [row[0] for row in queue_rows(db)] == [ids[2]]
    # The shared call, then each caller's part alone.
    assert calls(gateway, "archive") == 1 + len(ids)
    await queue.close()


async def test_archives_merge_their_errors_and_retries_merge_by_delay(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 6)
    await inner.claim(QUEUE, ids, 30)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=NEVER)
    gateway.reset_counters()
    dead, later, sooner = ids[:3], ids[3:5], ids[5:]

    pending: list[Any] = [
        queue.archive(QUEUE, [i], {i: {"type": "PermanentError", "message": f"bad {i}"}})
        for i in dead
    ]
    pending += [queue.set_vt(QUEUE, [i], 60) for i in later]
    pending += [queue.set_vt(QUEUE, [i], 0) for i in sooner]
    running = [asyncio.ensure_future(call) for call in pending]
    await asyncio.sleep(0)  # every call is waiting in its batch now
    await queue.close()  # sends the three batches

    results = await asyncio.gather(*running)

    assert results == [[i] for i in ids]
    assert (calls(gateway, "archive"), calls(gateway, "set_vt")) == (1, 2)
    # Each archived message carries its own error.
    assert [(row[0], row[2]["message"]) for row in archived_rows(db)] == [
        (i, f"bad {i}") for i in dead
    ]
    assert queue_rows(db) == [(i, 1, True) for i in later] + [(i, 1, False) for i in sooner]


async def test_shutdown_sends_what_is_pending(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 10)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=NEVER)
    gateway.reset_counters()
    waiting = [asyncio.ensure_future(queue.claim(QUEUE, [i], 30)) for i in ids]
    await asyncio.sleep(0)
    assert queue.pending == 10 and calls(gateway, "claim") == 0

    await queue.close()

    assert [[m.msg_id for m in await w] for w in waiting] == [[i] for i in ids]
    assert calls(gateway, "claim") == 1
    # After close, calls go straight through (a late ack is not lost either).
    assert await queue.ack(QUEUE, ids) == ids
    assert queue_rows(db) == []


async def test_shutdown_with_the_database_unreachable_fails_cleanly_and_loses_nothing(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 10)
    await inner.claim(QUEUE, ids, 30)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=NEVER)
    waiting = [asyncio.ensure_future(queue.ack(QUEUE, [i])) for i in ids]
    await asyncio.sleep(0)
    gateway.set_down(True)

    await queue.close()

    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RpcError) for r in results)
    # Not acked, so still queued: processed again once the lease runs out.
    assert [row[0] for row in queue_rows(db)] == ids


async def test_a_cancelled_caller_takes_its_ids_out_of_the_batch(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    keep, drop = enqueue(db, 2)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=NEVER)
    kept = asyncio.ensure_future(queue.claim(QUEUE, [keep], 30))
    dropped = asyncio.ensure_future(queue.claim(QUEUE, [drop], 30))
    await asyncio.sleep(0)

    dropped.cancel()
    await asyncio.gather(dropped, return_exceptions=True)
    await queue.close()

    assert [m.msg_id for m in await kept] == [keep]
    # The cancelled caller's message was not claimed: still visible, never read.
    assert queue_rows(db) == [(keep, 1, True), (drop, 0, False)]


async def test_max_batch_one_turns_coalescing_off(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 5)
    queue = CoalescingQueue(inner, max_batch=1, flush_interval=NEVER)
    gateway.reset_counters()

    claimed = await asyncio.gather(*(queue.claim(QUEUE, [i], 30) for i in ids))

    assert [[m.msg_id for m in mine] for mine in claimed] == [[i] for i in ids]
    assert calls(gateway, "claim") == 5


class Recorder:
    """A processor that only notes what it was given."""

    model = BaseModel

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, message: QueueMessage) -> None:
        self.seen.append(message.msg_id)


class ReadSizes(RpcQueue):
    """The RPC backend, noting the size of each read it is asked for."""

    def __init__(self, inner: RpcQueue) -> None:
        self.__dict__.update(inner.__dict__)
        self.sizes: list[int] = []

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        self.sizes.append(qty)
        return await super().read(queue, vt, qty)


async def test_the_sweeper_drains_a_backlog_in_growing_batches_and_acks_in_batches(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    ids = enqueue(db, 400)
    backend = ReadSizes(inner)
    queue = CoalescingQueue(backend, max_batch=100, flush_interval=0.002)
    recorder = Recorder()
    config = RunnerConfig(
        visibility_timeout=30,
        job_timeout=10,
        max_concurrency=200,
        retry=RetryPolicy(max_attempts=3, base_delay=1, max_delay=2),
    )
    runner = Runner(queue, {QUEUE: recorder}, config)
    sweeper = Sweeper(runner, interval=0.05, batch_size=100)
    gateway.reset_counters()
    runner.start()
    sweeper.start()
    try:
        await eventually(lambda: queue_rows(db) == [], timeout=60, what="the backlog")
        drained_after = len(backend.sizes)
        # Reads of an empty queue shrink back to the smallest size.
        await eventually(
            lambda: backend.sizes[-1] == 10 and len(backend.sizes) > drained_after + 4,
            timeout=30,
            what="reads to shrink",
        )
    finally:
        await sweeper.stop()
        await runner.drain(5)
        await runner.close()
        await queue.close()

    assert sorted(recorder.seen) == ids  # every message processed, once
    assert backend.sizes[0] == 10
    assert max(backend.sizes) > 10  # full batches made the reads grow...
    assert max(backend.sizes) <= 100  # ...up to SWEEP_BATCH_SIZE
    # Far fewer transactions than messages, for reads and for acks.
    assert calls(gateway, "read") < 100
    assert calls(gateway, "ack") < len(ids) // 4


async def test_a_deferred_webhook_is_swept_up_as_soon_as_a_slot_frees(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    recorder = Recorder()
    config = RunnerConfig(
        visibility_timeout=30,
        job_timeout=10,
        max_concurrency=1,
        retry=RetryPolicy(max_attempts=3, base_delay=1, max_delay=2),
    )
    runner = Runner(queue, {QUEUE: recorder}, config)
    # The sweeper's interval is an hour: only the deferral can make it read again.
    sweeper = Sweeper(runner, interval=NEVER, batch_size=10)
    runner.start()
    sweeper.start()
    try:
        await eventually(lambda: sweeper.last_sweep is not None, timeout=30, what="first sweep")
        first, second = enqueue(db, 2)  # after the sweeper's first pass found nothing
        offers = [runner.offer(QUEUE, [first]), runner.offer(QUEUE, [second])]
        await eventually(lambda: queue_rows(db) == [], timeout=30, what="both messages")
    finally:
        await sweeper.stop()
        await runner.drain(5)
        await runner.close()
        await queue.close()

    assert [offer.value for offer in offers] == ["accepted", "deferred"]
    assert sorted(recorder.seen) == [first, second]


class Held:
    """A processor whose jobs wait until `gate` opens."""

    model = BaseModel

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def __call__(self, message: QueueMessage) -> None:
        self.started += 1
        await self.gate.wait()


async def test_the_sweeper_stops_when_a_slot_frees_just_as_it_is_stopped(
    db: Database, gateway: RpcGateway, inner: RpcQueue
) -> None:
    enqueue(db, 4)
    queue = CoalescingQueue(inner, max_batch=100, flush_interval=0.002)
    held = Held()
    config = RunnerConfig(
        visibility_timeout=30,
        job_timeout=10,
        max_concurrency=2,
        retry=RetryPolicy(max_attempts=3, base_delay=1, max_delay=2),
    )
    runner = Runner(queue, {QUEUE: held}, config)
    sweeper = Sweeper(runner, interval=NEVER, batch_size=2)
    runner.start()
    sweeper.start()
    stopping: asyncio.Future[None] | None = None
    try:
        # Both slots taken by waiting jobs: the sweeper waits for capacity.
        await eventually(lambda: held.started == 2, timeout=30, what="two running jobs")
        await asyncio.sleep(0.1)
        # A slot frees in the same moment as the sweeper is stopped (a job ending
        # as the signal comes, under load): the freeing wakes the sweeper's wait
        # just as its cancellation arrives.
        runner._release(QUEUE)  # noqa: SLF001 - what a job's end does, at a chosen moment
        stopping = asyncio.ensure_future(sweeper.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert done, "the sweeper went on after stop()"
    finally:
        held.gate.set()
        if stopping is not None and not stopping.done():
            stopping.cancel()
        await runner.drain(5)
        await runner.close()
        await queue.close()
