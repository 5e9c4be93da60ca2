"""Job timeouts sharing one timer (app/worker/deadlines.py) behave as asyncio.timeout()."""

from __future__ import annotations

import asyncio

import pytest

from app.worker.deadlines import Deadlines

pytestmark = pytest.mark.anyio


async def job(deadlines: Deadlines, seconds: float) -> str:
    """Sleeps `seconds` within a deadline; says how it ended."""
    try:
        async with deadlines():
            await asyncio.sleep(seconds)
    except TimeoutError:
        # The task is not left cancelled: it goes on, as the runner does to retry.
        await asyncio.sleep(0)
        return "timed out"
    return "done"


async def test_only_the_jobs_that_overstay_time_out() -> None:
    deadlines = Deadlines(0.2)
    lengths = [0.0, 0.05, 1.0, 0.1, 2.0, 0.0, 1.0]
    outcomes = await asyncio.gather(*(job(deadlines, s) for s in lengths))
    assert outcomes == ["timed out" if s >= 1 else "done" for s in lengths]
    assert deadlines.running == 0


async def test_each_job_gets_its_own_deadline_not_the_oldest_ones() -> None:
    # Started 0.15 s apart with a 0.3 s timeout: the first job ends early, and the
    # second must still get its full 0.3 s (the timer re-arms for it).
    deadlines = Deadlines(0.3)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(job(deadlines, 0.05))
    await asyncio.sleep(0.15)
    started = loop.time()
    second = await job(deadlines, 5.0)
    waited = loop.time() - started
    assert await first == "done"
    assert second == "timed out"
    assert waited >= 0.3  # never before its own deadline


async def test_jobs_keep_timing_out_after_the_timer_went_idle() -> None:
    deadlines = Deadlines(0.05)
    assert await job(deadlines, 1.0) == "timed out"
    await asyncio.sleep(0.2)  # nothing running: the timer has stopped
    assert await job(deadlines, 1.0) == "timed out"
    assert await job(deadlines, 0.0) == "done"


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines(10.0)
    task = asyncio.create_task(job(deadlines, 5.0))
    await asyncio.sleep(0.05)
    task.cancel()  # shutdown, not the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.running == 0


async def test_shutdown_during_an_expiry_is_not_swallowed() -> None:
    # The deadline passes and shutdown cancels the job in the same moment: the job
    # must see the cancellation (as with asyncio.timeout), not a retryable timeout.
    deadlines = Deadlines(10.0)

    async def overstay() -> None:
        async with deadlines():
            await asyncio.sleep(5)

    task = asyncio.create_task(overstay())
    await asyncio.sleep(0)  # inside its deadline
    (deadline,) = deadlines._running  # what the timer does when it fires, at once:
    deadline.expire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadline.expired
