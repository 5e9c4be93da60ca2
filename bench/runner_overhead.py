"""CPU per job inside the runner, without a database: where the pull path's Python goes.

The pull-path benches (bench.pull_path, bench.peers) measure the whole machine: the
service, the gateway stand-in and PostgreSQL share two cores, and the figures move
with whatever else runs. This one drives the service's own `Runner` and `Sweeper`
in this process, on uvloop, against an in-memory queue that answers `read` and
`ack` at once, so it counts only the service's CPU per no-op job (process time),
and next to it, in the same process:

- a bare loop that makes a task per message and awaits a no-op in it (what any
  asyncio worker with concurrent jobs pays at least);
- the same bare loop plus prometheus_client's seven updates per job, as the runner
  made them before they were counted in bulk (what those updates cost alone).

    uv run python -m bench.runner_overhead [--messages 100000] [--repeat 5]
        [--max-concurrency 1000] [--batch 500] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.queue.models import QueueMessage
from app.worker.doorbell import Doorbell
from app.worker.policy import RetryPolicy
from app.worker.runner import Runner, RunnerConfig
from app.worker.sweeper import Sweeper
from bench.testbed import middle

QUEUE = "email_queue"


class MemoryQueue:
    """The part of QueueBackend a drain uses, answered from a list in memory."""

    def __init__(self, messages: int) -> None:
        now = datetime.now(UTC)
        self._rows = [
            QueueMessage(msg_id=i, read_ct=1, enqueued_at=now, vt=now, message={"n": i})
            for i in range(1, messages + 1)
        ]
        self._next = 0
        self.acked = 0
        self.drained = asyncio.Event()
        self.total = messages

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        await asyncio.sleep(0)  # a call is at least one trip through the loop
        rows = self._rows[self._next : self._next + qty]
        self._next += len(rows)
        return rows

    async def ack(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        await asyncio.sleep(0)
        self.acked += len(msg_ids)
        if self.acked >= self.total:
            self.drained.set()
        return list(msg_ids)

    async def set_vt(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[int]:
        return list(msg_ids)


class Noop:
    async def __call__(self, message: QueueMessage) -> None:
        return None


async def runner_drain(args: argparse.Namespace, profile: cProfile.Profile | None) -> float:
    backend = MemoryQueue(args.messages)
    config = RunnerConfig(
        visibility_timeout=30,
        job_timeout=60,
        max_concurrency=args.max_concurrency,
        retry=RetryPolicy(max_attempts=5, base_delay=1, max_delay=60),
    )
    runner = Runner(
        backend,  # type: ignore[arg-type]  # the subset a drain calls
        {QUEUE: Noop()},  # type: ignore[dict-item]
        config,
        doorbell=Doorbell([QUEUE], grace=10.0),
        prefetch=50,
        ack_delay=0.5,
        ack_batch=args.batch,
    )
    sweeper = Sweeper(runner, interval=0.05, batch_size=args.batch)
    runner.start()
    sweeper.start()
    started = time.process_time()
    if profile is not None:
        profile.enable()
    await backend.drained.wait()
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - started
    await sweeper.stop()
    await runner.drain(1.0)
    await runner.close()
    return cpu / args.messages * 1e6


async def bare_tasks(args: argparse.Namespace, with_metrics: bool) -> float:
    registry = CollectorRegistry()
    jobs = Counter("j", "j", ["queue", "outcome"], registry=registry).labels(QUEUE, "succeeded")
    running = Gauge("r", "r", ["queue"], registry=registry).labels(QUEUE)
    duration = Histogram("d", "d", ["queue"], registry=registry).labels(QUEUE)
    latency = Histogram("l", "l", ["queue"], registry=registry).labels(QUEUE)
    last = Gauge("s", "s", ["queue"], registry=registry).labels(QUEUE)
    noop = Noop()
    tasks: set[asyncio.Task[None]] = set()

    async def job(message: QueueMessage) -> None:
        if with_metrics:
            running.inc()
        await noop(message)
        if with_metrics:
            running.dec()
            jobs.inc()
            duration.observe(0.0001)
            latency.observe(0.01)
            last.set(time.time())

    now = datetime.now(UTC)
    messages = [
        QueueMessage(msg_id=i, read_ct=1, enqueued_at=now, vt=now, message={"n": i})
        for i in range(1, args.messages + 1)
    ]
    loop = asyncio.get_running_loop()
    started = time.process_time()
    for first in range(0, args.messages, args.batch):
        for message in messages[first : first + args.batch]:
            task = loop.create_task(job(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0)
    while tasks:
        await asyncio.sleep(0)
    return (time.process_time() - started) / args.messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-concurrency", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--profile", type=Path, help="cProfile of the runner's last drain")
    args = parser.parse_args()

    results: dict[str, list[float]] = {"runner": [], "bare": [], "bare+metrics": []}
    for round_ in range(args.repeat):
        last = round_ == args.repeat - 1
        profile = cProfile.Profile(time.process_time) if args.profile and last else None
        results["bare"].append(uvloop.run(bare_tasks(args, with_metrics=False)))
        results["bare+metrics"].append(uvloop.run(bare_tasks(args, with_metrics=True)))
        results["runner"].append(uvloop.run(runner_drain(args, profile)))
        if profile is not None:
            profile.dump_stats(str(args.profile))

    print(  # noqa: T201
        f"{args.messages} no-op jobs in memory, MAX_CONCURRENCY={args.max_concurrency}, "
        f"reads of {args.batch}; CPU us per job, median of {args.repeat} alternating rounds"
    )
    bare = middle(results["bare"])
    for name, label in (
        ("bare", "bare loop: a task per job"),
        ("bare+metrics", "bare loop + 7 prometheus_client updates per job"),
        ("runner", "the service's Runner + Sweeper"),
    ):
        values: Any = results[name]
        value = middle(values)
        print(  # noqa: T201
            f"{label:<50}{value:>7.1f}   {value / bare:.2f}x bare   "
            f"(runs {', '.join(f'{v:.1f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
