"""Runs jobs: claim -> process -> ack, retry or archive.

Webhooks are doorbells: the runner claims the message from the database with a
conditional update (visible now, not locked), so a repeated webhook, the sweeper
or another replica never runs a job twice at the same time, and the job is the
claimed row, never the webhook body. While a job runs its lease is renewed (the
heartbeat). The runner alone decides the message's fate:

- success: ack (delete); a failed ack is retried in-process, never the job;
- retryable failure (RetryableError, a timeout, any unexpected exception): visible
  again after an exponential, jittered backoff, until the last attempt;
- permanent failure, or the last attempt: archived with its error;
- a message whose JSON the worker cannot parse: archived at once, not run.

Each queue runs at most its `max_concurrency` jobs (so a slow queue cannot take
the slots of another), and holds at most `prefetch` more claimed messages waiting
for a slot (leased like running jobs), so that claims and reads can be larger than
the slots that happen to be free; work offered beyond that stays in the queue for
the sweeper, so memory does not grow with a burst. Once a webhook has been
deferred (or a sweep came back full), later ones are deferred too until a sweep
finds the queue short: the sweeper reads the backlog in batches instead of one
claim per doorbell. A job's slot is freed when its processor returns: its ack is
the Settler's (app/worker/settle.py), which may send it a little later with
others. A queue with `rate_per_second` starts its jobs no faster than that
(app/worker/ratelimit.py); a job waiting for its turn holds its slot and its lease.
Every limit is per queue (the registry's QueueSpec, looked up once here at start);
`RunnerConfig` is the default. A job runs in a worker task of its queue, which takes
the next waiting message when its job ends; workers are hired as the waiting messages
need them (see `_hire`), so jobs that never wait share a task. Job metrics are counted
here and handed to prometheus_client in bulk (`flush_metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app import metrics
from app.errors import PermanentError, RetryableError
from app.processors import Registry
from app.queue.backend import QueueBackend
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError
from app.tracing import OFF, AttributeValue, Tracing, messaging
from app.worker.deadlines import Deadlines
from app.worker.doorbell import Doorbell
from app.worker.leases import Leases
from app.worker.policy import RetryPolicy
from app.worker.ratelimit import RateLimiter
from app.worker.rates import JobRates
from app.worker.settle import Settler

log = logging.getLogger(__name__)

# How long a drain waits for cancelled jobs to end before it gives their messages back.
CANCELLED_JOB_SECONDS = 2.0
# Ids of messages finished here (acked or archived) remembered per queue, so that a
# webhook arriving after the sweeper took its message costs no claim. pgmq never
# reuses a msg_id, so a finished id stays finished.
FINISHED_MEMORY = 8192
# How often job metrics counted in the runner reach prometheus_client (and, with
# PROMETHEUS_MULTIPROC_DIR, its files) besides before every scrape of /metrics.
METRICS_FLUSH_SECONDS = 1.0


class Offer(enum.Enum):
    """What became of work offered to the runner."""

    ACCEPTED = "accepted"
    DEFERRED = "deferred"  # at capacity: left in the queue for the sweeper
    DRAINING = "draining"  # shutting down: not taking new work


@dataclass(frozen=True)
class RunnerConfig:
    visibility_timeout: int
    job_timeout: float
    max_concurrency: int
    retry: RetryPolicy
    rate_per_second: float | None = None


class Runner:
    """Owns the jobs of one process.

    `config` holds the limits of every queue that `queues` does not name.
    """

    def __init__(
        self,
        backend: QueueBackend,
        processors: Registry,
        config: RunnerConfig,
        queues: Mapping[str, RunnerConfig] | None = None,
        *,
        doorbell: Doorbell | None = None,
        tracing: Tracing = OFF,
        prefetch: int = 0,
        ack_delay: float = 0.0,
        ack_batch: int = 100,
    ) -> None:
        self._backend = backend
        # Which webhooks rang, so the sweeper's finds tell missed ones (None: no webhooks).
        self.doorbell = doorbell
        self.tracing = tracing
        self._processors = processors
        self._configs = {q: (queues or {}).get(q, config) for q in processors}
        # Messages a queue may hold: its slots, and claimed messages waiting for one.
        self._limits = {q: c.max_concurrency + max(0, prefetch) for q, c in self._configs.items()}
        self.leases = Leases(
            backend,
            vt=config.visibility_timeout,
            per_queue={q: c.visibility_timeout for q, c in self._configs.items()},
        )
        self.settler = Settler(
            backend,
            ack_delay=ack_delay,
            ack_batch=ack_batch,
            # Finished but unacked jobs per queue: at most a batch, or the slots.
            max_unacked={q: max(c.max_concurrency, ack_batch) for q, c in self._configs.items()},
            default_max_unacked=max(config.max_concurrency, ack_batch),
        )
        self._deadlines = {q: Deadlines(c.job_timeout) for q, c in self._configs.items()}
        self._limiters = {
            q: RateLimiter(c.rate_per_second) if c.rate_per_second else None
            for q, c in self._configs.items()
        }
        self._tasks: set[asyncio.Task[None]] = set()
        # Messages taken per queue: running jobs, claimed messages waiting for a slot,
        # and claims/reads under way.
        self._busy: defaultdict[str, int] = defaultdict(int)
        self._running: defaultdict[str, int] = defaultdict(int)
        self._waiting: dict[str, deque[QueueMessage]] = {q: deque() for q in processors}
        self._finished: dict[str, OrderedDict[int, None]] = {q: OrderedDict() for q in processors}
        # Set when a webhook was deferred or a sweep came back full, cleared when one
        # comes back short: while it is set, webhooks are deferred to the sweeper, which
        # reads them in batches, and acks wait to leave together.
        self._backlog: dict[str, bool] = dict.fromkeys(processors, False)
        self._freed: dict[str, asyncio.Event] = {q: asyncio.Event() for q in processors}
        # Set when a webhook was deferred: work is waiting in the queue, and the
        # sweeper takes it as soon as slots free up instead of at its next interval.
        self.deferred: dict[str, asyncio.Event] = {q: asyncio.Event() for q in processors}
        self._background: list[asyncio.Task[None]] = []
        # Jobs per second and failures of the last minutes (the console shows them).
        self.rates = JobRates()
        self._metrics = {q: _JobMetrics(q, self) for q in processors}
        self.draining = False
        # Queues paused in the database (app/worker/pauses.py keeps this current):
        # offered work is deferred and sweeps read nothing. The claim itself refuses
        # a paused queue too, so a stale set here never runs a job.
        self.paused: set[str] = set()
        self._hurry = asyncio.Event()  # set by hurry(): the drain stops waiting for jobs
        self._job_names = {q: f"job:{q}" for q in processors}
        # Workers per queue inside a job now, and queues with a `_hire` scheduled.
        self._in_job: defaultdict[str, int] = defaultdict(int)
        self._hiring: set[str] = set()

    @property
    def queues(self) -> frozenset[str]:
        return frozenset(self._processors)

    def in_flight(self, queue: str | None = None) -> int:
        """Messages taken: running jobs, claimed ones waiting for a slot, claims under way."""
        if queue is None:
            return sum(self._busy.values())
        return self._busy[queue]

    def running(self, queue: str) -> int:
        """Jobs of `queue` running now (at most its max_concurrency)."""
        return self._running[queue]

    def free(self, queue: str) -> int:
        """How many more messages `queue` may take (free slots and prefetch room)."""
        return max(0, self._limits[queue] - self._busy[queue])

    def capacity(self, queue: str) -> int:
        """The slots of `queue` (its max_concurrency)."""
        return self._configs[queue].max_concurrency

    def limit(self, queue: str) -> int:
        """The messages `queue` may hold: its slots plus the prefetch."""
        return self._limits[queue]

    async def wait_for_capacity(self, queue: str, slots: int = 1) -> None:
        """Returns once `queue` may take at least `slots` more messages."""
        while self.free(queue) < min(slots, self._limits[queue]):
            event = self._freed[queue]
            event.clear()
            await event.wait()

    def start(self) -> None:
        """Starts the heartbeat and the in-process retry of acks and archives."""
        self._background = [
            asyncio.create_task(self.leases.run(), name="leases"),
            asyncio.create_task(self.settler.run(), name="settler"),
            asyncio.create_task(self._flush_metrics_every_second(), name="job metrics"),
        ]
        if self.doorbell is not None:
            self.doorbell.open()

    def flush_metrics(self) -> None:
        """Hands the job metrics counted since the last flush to prometheus_client."""
        for recorded in self._metrics.values():
            recorded.flush()

    async def _flush_metrics_every_second(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self.flush_metrics()

    # -- taking work -------------------------------------------------------

    def offer(self, queue: str, msg_ids: Sequence[int]) -> Offer:
        """Webhook path: claims and runs `msg_ids` in the background, if there is room."""
        if queue not in self._processors:
            raise KeyError(queue)
        if self.doorbell is not None:
            self.doorbell.rang(queue, msg_ids)
        if self.draining:
            return Offer.DRAINING
        if queue in self.paused:
            return Offer.DEFERRED  # stays queued until the queue is resumed
        held, finished = self.leases.holds(queue), self._finished[queue]
        if all(i in held or i in finished for i in msg_ids):
            return Offer.ACCEPTED  # running, waiting or done here already: nothing to claim
        if self._backlog[queue] or self.free(queue) < len(msg_ids):
            self._backlog[queue] = True
            self.deferred[queue].set()
            return Offer.DEFERRED
        self._busy[queue] += len(msg_ids)
        self._spawn(self._claim_and_run(queue, msg_ids), f"claim:{queue}")
        return Offer.ACCEPTED

    async def sweep(self, queue: str, batch_size: int) -> tuple[int, int]:
        """Pull path: reads up to `batch_size` visible messages, as room allows, and runs them.

        Returns (asked, got); got == asked suggests more are waiting.
        """
        asked = min(batch_size, self.free(queue))
        if asked == 0 or self.draining or queue in self.paused:
            return 0, 0
        self._busy[queue] += asked
        started = time.time_ns()
        try:
            messages = await self._backend.read(
                queue, self._configs[queue].visibility_timeout, asked
            )
        except BaseException:
            self._release(queue, asked)
            raise
        self._release(queue, asked - len(messages))
        # A full read: more is probably waiting. A short one: the queue is caught up,
        # webhooks may claim again and acks need not wait for company.
        self._backlog[queue] = len(messages) == asked
        if self.doorbell is not None:
            self.doorbell.swept(queue, messages)
        if messages and self.tracing.enabled:
            # A span only for a read that found work (an idle sweep is no trace), made
            # now with the read's start: its jobs' spans are its children.
            with self.tracing.span(
                f"read {queue}",
                kind="consumer",
                attributes={
                    **messaging(queue, "receive"),
                    "messaging.batch.message_count": len(messages),
                },
                start_time=started,
            ):
                for message in messages:
                    self._start_job(queue, message)
        else:
            for message in messages:
                self._start_job(queue, message)
        return asked, len(messages)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, queue: str, slots: int = 1) -> None:
        if slots:
            self._busy[queue] -= slots
            self._freed[queue].set()

    async def _claim_traced(self, queue: str, msg_ids: Sequence[int]) -> list[QueueMessage]:
        with self.tracing.span(f"claim {queue}", attributes=messaging(queue, "receive")) as span:
            claimed = await self._backend.claim(
                queue, msg_ids, self._configs[queue].visibility_timeout
            )
            span.set_attribute("messaging.batch.message_count", len(claimed))
            return claimed

    async def _claim_and_run(self, queue: str, msg_ids: Sequence[int]) -> None:
        try:
            if self.tracing.enabled:
                claimed = await self._claim_traced(queue, msg_ids)
            else:
                claimed = await self._backend.claim(
                    queue, msg_ids, self._configs[queue].visibility_timeout
                )
        except RpcError as error:
            log.warning(
                "claim failed; the message stays queued for the sweeper",
                extra={"queue": queue, "error": str(error)},
            )
            claimed = []
        except BaseException:
            self._release(queue, len(msg_ids))
            raise
        self._release(queue, len(msg_ids) - len(claimed))
        if not claimed:
            return
        if self.tracing.enabled:
            for message in claimed:
                self._start_job(queue, message)
            return
        for message in claimed:
            self.leases.hold(queue, message.msg_id)
        self._waiting[queue].extend(claimed)
        if self._running[queue] < self._configs[queue].max_concurrency:
            # This task is a worker of the queue now (a webhook's job runs in the task
            # of its claim: one task less per job).
            self._running[queue] += 1
            await self._work(queue)

    def _start_job(self, queue: str, message: QueueMessage) -> None:
        """A claimed message (its place reserved by offer() or sweep()) waits, leased,
        for a worker of its queue; the job frees the place."""
        self.leases.hold(queue, message.msg_id)
        if self.tracing.enabled:
            # A task per job, started in the context of the read or claim that got it
            # (the parent of its span when its headers carry no trace).
            if self._running[queue] < self._configs[queue].max_concurrency:
                self._running[queue] += 1
                self._spawn(self._work(queue, message), self._job_names[queue])
            else:
                self._waiting[queue].append(message)
            return
        self._waiting[queue].append(message)
        self._want_workers(queue)

    # Workers: a job runs in a worker task of its queue, which takes the oldest waiting
    # message, runs it, and takes the next while any wait; a worker holds one slot
    # (`_running`). A task costs about 6 us to make and run on uvloop, a fifth of a
    # no-op job, so workers are hired when the messages waiting need them: one when
    # none is at work, and one for every waiting message (as slots allow) once the
    # workers' jobs have given the event loop control, that is, are waiting for
    # something. Jobs that never wait (a no-op, a cache hit) then run one after the
    # other in one task; jobs that wait for I/O run concurrently, as many as slots,
    # started within two passes of the event loop.

    def _want_workers(self, queue: str) -> None:
        """Messages of `queue` wait: `_hire` runs when the event loop next has control."""
        if queue not in self._hiring:
            self._hiring.add(queue)
            asyncio.get_running_loop().call_soon(self._hire, queue)

    def _hire(self, queue: str) -> None:
        self._hiring.discard(queue)
        waiting = self._waiting[queue]
        if not waiting or self.draining:
            return
        free = self._configs[queue].max_concurrency - self._running[queue]
        # Workers inside a job now have yielded to the loop: their jobs wait for
        # something, so every waiting message gets a worker of its own. With none at
        # work (a batch just arrived), one worker starts and hires more if it waits.
        # Jobs that only wait for room to owe their acks need no company: more jobs
        # would wait the same way, and theirs resume as soon as an ack call lands.
        in_job = self._in_job[queue]
        if not in_job:
            wanted = 1
        elif in_job > self.settler.held(queue):
            wanted = len(waiting)
        else:
            return
        for _ in range(min(free, wanted)):
            self._running[queue] += 1
            self._spawn(self._work(queue), self._job_names[queue])

    async def _work(self, queue: str, first: QueueMessage | None = None) -> None:
        """A worker of `queue`, in the slot taken for it: runs `first` (if given), then
        the waiting messages, oldest first, until none is left."""
        waiting = self._waiting[queue]
        in_job = self._in_job
        try:
            if first is not None:
                in_job[queue] += 1
                try:
                    await self._run(queue, first)
                finally:
                    in_job[queue] -= 1
            while waiting and not self.draining:
                message = waiting.popleft()
                if waiting:
                    self._want_workers(queue)  # hires only if this job makes us wait
                in_job[queue] += 1
                try:
                    await self._run(queue, message)
                finally:
                    in_job[queue] -= 1
        finally:
            self._running[queue] -= 1
            if not self._busy[queue]:
                # The queue is idle: its metrics are complete now, not within a second.
                self._metrics[queue].flush()

    def _remember(self, queue: str, msg_id: int) -> None:
        finished = self._finished[queue]
        finished[msg_id] = None
        if len(finished) > FINISHED_MEMORY:
            # An OrderedDict: a dict's first key after many deletions at its front is
            # found by skipping them, which grew to most of a job's cost.
            finished.popitem(last=False)

    # -- running a job -----------------------------------------------------

    async def _run(self, queue: str, message: QueueMessage) -> None:
        started = time.perf_counter()
        # Overwritten on every normal path; "error" would mean a bug in the runner
        # itself, and "cancelled" a job stopped at shutdown.
        outcome = "error"
        try:
            if self.tracing.enabled:
                outcome = await self._decide_traced(queue, message)
            else:
                outcome = await self._decide(queue, message)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            msg_id = message.msg_id
            self.leases.release(queue, msg_id)
            if outcome == "succeeded" or outcome == "archived" or outcome == "duplicate":
                self._remember(queue, msg_id)
            self._release(queue)
            if not self._busy[queue]:
                self.settler.idle(queue)  # no job left to share an ack call with
            duration = time.perf_counter() - started
            self._metrics[queue].finished(outcome, duration, message.enqueued_at)
            if log.isEnabledFor(logging.DEBUG):  # every job: not worth a line at info
                log.debug(
                    "job finished",
                    extra={
                        **_context(queue, message),
                        "outcome": outcome,
                        "duration_ms": round(duration * 1000, 1),
                    },
                )

    async def _decide_traced(self, queue: str, message: QueueMessage) -> str:
        """`_decide` in a span: the child of the enqueue that put the job's trace context
        in its headers (linked to the webhook or read that claimed it), else of those."""
        attributes: dict[str, AttributeValue] = {
            **messaging(queue, "process"),
            "messaging.message.id": str(message.msg_id),
            "messaging.message.delivery_count": message.read_ct,
        }
        with self.tracing.span(
            f"process {queue}", kind="consumer", attributes=attributes, parent=message.headers
        ) as span:
            outcome = await self._decide(queue, message)
            span.set_attribute("queue_worker.outcome", outcome)
            if outcome in ("retried", "archived"):
                span.set_error(f"the job was {outcome}")
            return outcome

    async def _ack_traced(self, queue: str, msg_id: int, now: bool) -> None:
        # With acks deferred, the span covers the hand-over, not the call that lands it.
        with self.tracing.span(f"ack {queue}", attributes=messaging(queue, "settle")):
            await self.settler.ack(queue, msg_id, now=now)

    async def _decide(self, queue: str, message: QueueMessage) -> str:
        msg_id = message.msg_id
        if self.settler.owes(queue, msg_id):
            # Finished here before; only its ack or archive is outstanding.
            self.settler.poke()
            return "duplicate"
        if message.unreadable is not None:
            # Its JSON cannot be parsed (app/queue/rows.py): it never will be.
            error = _error_record("UnreadableMessage", message.unreadable, message.read_ct)
            log.warning(
                "unreadable message; archiving",
                extra={**_context(queue, message), "error": error["message"]},
            )
            await self.settler.archive(queue, msg_id, error)
            return "archived"
        config = self._configs[queue]
        retry = config.retry
        if message.read_ct > retry.max_attempts:
            # Claimed more often than allowed without an outcome being recorded (a
            # crash mid-job, or an archive that never landed): give up without running it.
            error = _error_record(
                "AttemptsExhausted",
                f"claimed {message.read_ct} times; MAX_ATTEMPTS is {retry.max_attempts}",
                message.read_ct,
            )
            await self.settler.archive(queue, msg_id, error)
            return "archived"
        limiter = self._limiters[queue]
        if limiter is not None:
            await limiter.wait()  # its slot and lease held meanwhile
        try:
            async with self._deadlines[queue]():
                await self._processors[queue](message)
        except PermanentError as error:
            return await self._archive(queue, message, error)
        except TimeoutError:
            timeout = RetryableError(f"job timed out after {config.job_timeout:g}s")
            return await self._retry(queue, message, timeout)
        except Exception as error:  # noqa: BLE001 - any failure is retried, never lost
            return await self._retry(queue, message, error)
        # With a backlog (or messages waiting for a slot) other jobs finish soon and
        # their acks share a call; without one the ack leaves at once.
        now = not (self._backlog[queue] or self._waiting[queue])
        if self.tracing.enabled:
            await self._ack_traced(queue, msg_id, now)
        else:
            await self.settler.ack(queue, msg_id, now=now)
        return "succeeded"

    async def _retry(self, queue: str, message: QueueMessage, error: Exception) -> str:
        context = _context(queue, message)
        retry = self._configs[queue].retry
        if retry.exhausted(message.read_ct):
            return await self._archive(queue, message, error)
        delay = retry.delay(
            message.read_ct, error.after if isinstance(error, RetryableError) else None
        )
        log.warning(
            "job failed; will retry",
            extra={**context, "error": _describe(error), "retry_in_s": delay},
        )
        self.leases.release(queue, message.msg_id)
        try:
            await self._backend.set_vt(queue, [message.msg_id], delay)
        except RpcError as rpc_error:
            # The lease expires on its own; the retry just comes sooner or later.
            log.warning("retry delay not set", extra={**context, "error": str(rpc_error)})
        return "retried"

    async def _archive(self, queue: str, message: QueueMessage, error: Exception) -> str:
        log.warning(
            "job failed; archiving",
            extra={**_context(queue, message), "error": _describe(error)},
        )
        record = _error_record(type(error).__name__, _describe(error), message.read_ct)
        await self.settler.archive(queue, message.msg_id, record)
        return "archived"

    # -- stopping ----------------------------------------------------------

    def hurry(self) -> None:
        """Cuts a drain short: running jobs are cancelled and given back at once."""
        self._hurry.set()

    async def drain(self, grace: float) -> None:
        """Stops taking work, lets running jobs finish within `grace` seconds (or
        until `hurry()`), gives the unfinished ones back to the queue and settles
        what is owed."""
        self.draining = True
        await self._give_back_waiting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            # Claims under way start jobs of their own: wait until no task is left.
            while self._tasks and not hurried.done() and (remaining := deadline - loop.time()) > 0:
                await asyncio.wait(
                    {*self._tasks, hurried}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hurried.cancel()
        await self._give_back_waiting()  # claimed by calls that ended meanwhile
        pending = set(self._tasks)
        if pending:
            # No renewal may land after the release below and hide a message again.
            await self.leases.stop()
            unfinished = {q: self.leases.held(q) for q in self._processors}
            for task in pending:
                task.cancel()
            # A job's own clean-up (a polite SMTP QUIT to a stuck server, say) must
            # not hold its message hidden: it gets a moment, then the release goes on.
            await asyncio.wait(pending, timeout=CANCELLED_JOB_SECONDS)
            log.warning("shutdown cancelled unfinished jobs", extra={"count": len(pending)})
            for queue, ids in unfinished.items():
                if ids:
                    # Visible again now, for another replica or the next start.
                    with contextlib.suppress(RpcError):  # else when the lease runs out
                        await self._backend.set_vt(queue, sorted(ids), 0)
        settle = 1.0 if self._hurry.is_set() else min(max(grace, 1.0), 10.0)
        await self.settler.close(timeout=settle)

    async def _give_back_waiting(self) -> None:
        """Claimed messages still waiting for a slot go back to the queue (draining)."""
        for queue, waiting in self._waiting.items():
            ids = sorted(message.msg_id for message in waiting)
            waiting.clear()
            if not ids:
                continue
            for msg_id in ids:
                self.leases.release(queue, msg_id)
            self._release(queue, len(ids))
            await self.leases.quiet()
            with contextlib.suppress(RpcError):  # else when the lease runs out
                await self._backend.set_vt(queue, ids, 0)

    async def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.flush_metrics()


class _JobMetrics:
    """The job metrics of one queue, counted here and handed to prometheus_client by
    `flush()` (the runner's, before every scrape of /metrics and every
    `METRICS_FLUSH_SECONDS`).

    prometheus_client takes a lock for every value it updates, and a job updated
    seven (a gauge up and down, a counter, two histograms, a gauge): a fifth of the
    service's CPU per no-op job on the pull path (bench/README.md). Here a job adds
    to plain numbers on the event loop's one thread, and a flush adds them up.
    """

    def __init__(self, queue: str, runner: Runner) -> None:
        self._queue = queue
        self._runner = runner
        self._in_progress = metrics.JOBS_IN_PROGRESS.labels(queue)
        self._duration = metrics.BatchedHistogram(metrics.JOB_DURATION.labels(queue))
        self._latency = metrics.BatchedHistogram(metrics.JOB_LATENCY.labels(queue))
        self._last_success_gauge = metrics.LAST_SUCCESS.labels(queue)
        self._last_success: float | None = None
        self._counted: dict[str, int] = {}
        self._outcomes: dict[str, Any] = {}

    def finished(self, outcome: str, duration: float, enqueued_at: datetime) -> None:
        counted = self._counted
        counted[outcome] = counted.get(outcome, 0) + 1
        self._runner.rates.record(self._queue, outcome)
        self._duration.observe(duration)
        if outcome == "succeeded" or outcome == "archived":
            finished = time.time()
            self._latency.observe(finished - enqueued_at.timestamp())
            if outcome == "succeeded":
                self._last_success = finished

    def flush(self) -> None:
        for outcome, count in self._counted.items():
            if count:
                counter = self._outcomes.get(outcome)
                if counter is None:
                    counter = self._outcomes[outcome] = metrics.JOBS.labels(self._queue, outcome)
                counter.inc(count)
        self._counted.clear()
        self._duration.flush()
        self._latency.flush()
        if self._last_success is not None:
            self._last_success_gauge.set(self._last_success)
            self._last_success = None
        self._in_progress.set(self._runner.running(self._queue))


def _context(queue: str, message: QueueMessage) -> dict[str, Any]:
    """What a job's log lines say about it (made only for a line that is written)."""
    return {"queue": queue, "msg_id": message.msg_id, "attempt": message.read_ct}


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text[:1000]


def _error_record(kind: str, message: str, attempt: int) -> dict[str, Any]:
    return {
        "type": kind,
        "message": message,
        "attempt": attempt,
        "failed_at": datetime.now(UTC).isoformat(),
    }
