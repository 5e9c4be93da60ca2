"""Every Prometheus metric of the service, in one place.

Names follow Prometheus conventions (one `queue_worker_` prefix, `_total`, `_seconds`);
labels are low-cardinality only (queue, outcome, result, function): never message ids
or addresses. The worker records job metrics, the RPC client records RPC metrics, the
mailer records email metrics, the payments processor records payment event results
(only its RPC's answer knows them), the API records webhook metrics, and queue depths
are read from the database when /metrics is scraped (cached, see QueueStats).

With PROMETHEUS_MULTIPROC_DIR set (several uvicorn workers), values are shared
through files in that directory; `multiprocess_mode` says how gauges of several
processes combine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:  # the queue layer records RPC metrics: no import cycle at run time
    from app.queue.backend import QueueBackend

log = logging.getLogger(__name__)

WEBHOOKS = Counter(
    "queue_worker_webhooks_total",
    "Webhook requests received, by queue and result "
    "(accepted, deferred, ignored, duplicate, unauthorized, invalid, unknown_queue, "
    "draining).",
    ["queue", "result"],
)
JOBS = Counter(
    "queue_worker_jobs_total",
    "Jobs finished, by queue and outcome (succeeded, retried, archived, duplicate, cancelled).",
    ["queue", "outcome"],
)
JOB_DURATION = Histogram(
    "queue_worker_job_duration_seconds",
    "Time from claim to outcome of one job.",
    ["queue"],
)
JOB_LATENCY = Histogram(
    "queue_worker_job_latency_seconds",
    "Time from enqueue to the outcome of a job's last attempt.",
    ["queue"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
JOBS_IN_PROGRESS = Gauge(
    "queue_worker_jobs_in_progress",
    "Jobs running now.",
    ["queue"],
    multiprocess_mode="livesum",
)
LAST_SUCCESS = Gauge(
    "queue_worker_last_success_timestamp_seconds",
    "Unix time of the last successful job.",
    ["queue"],
    multiprocess_mode="max",
)
RPC_CALLS = Counter(
    "queue_worker_rpc_calls_total",
    "Supabase RPC calls, by function and result (ok, error).",
    ["function", "result"],
)
RPC_DURATION = Histogram(
    "queue_worker_rpc_duration_seconds",
    "Latency of Supabase RPC calls.",
    ["function"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PAYMENT_EVENTS = Counter(
    "queue_worker_payment_events_total",
    "Payment events handled by the payments_queue processor, by result "
    "(applied, duplicate: seen before and ignored, stale: older than the payment's status).",
    ["result"],
)
EMAILS = Counter(
    "queue_worker_emails_total",
    "Emails handed to the SMTP server, by result (sent, failed).",
    ["result"],
)
SMTP_CONNECTIONS = Counter(
    "queue_worker_smtp_connections_total",
    "SMTP sessions opened for sending (fewer than emails sent when sessions are reused).",
)
MISSED_WEBHOOKS = Counter(
    "queue_worker_missed_webhooks_total",
    "Messages the sweeper found before any webhook rang for them: the doorbell failed "
    "(pg_net lost the request, or it never reached the route). See app/worker/doorbell.py.",
    ["queue"],
)
QUEUE_LENGTH = Gauge(
    "queue_worker_queue_length",
    "Messages in the queue, visible or not.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_VISIBLE = Gauge(
    "queue_worker_queue_visible_length",
    "Messages in the queue that a reader could take now.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "queue_worker_queue_oldest_message_age_seconds",
    "Age of the oldest message in the queue (0 when empty).",
    ["queue"],
    multiprocess_mode="mostrecent",
)

QUEUE_DEAD_LETTERS = Gauge(
    "queue_worker_queue_dead_letters",
    "Archived (dead) messages of the queue.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_PAUSED = Gauge(
    "queue_worker_queue_paused",
    "1 while the queue is paused (no replica claims from it), else 0.",
    ["queue"],
    multiprocess_mode="mostrecent",
)


class BatchedHistogram:
    """One histogram child's observations, counted here and added to it in bulk.

    `Histogram.observe` takes two locks (the sum and a bucket) and costs about
    1.4 us; a job observes two histograms. The runner observes into this instead
    (its event loop is one thread: no lock) and `flush()` hands the counts over, so
    a no-op job pays a bisect and two additions. What /metrics shows is exactly what
    `observe` would have made of the same values once flushed (tests/test_metrics.py
    pins that against prometheus_client's own buckets).
    """

    __slots__ = ("_child", "_bounds", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        # The child's bucket bounds, +Inf last; observe() puts a value into the first
        # bucket whose bound is >= it, as bisect_left finds it.
        self._bounds = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        counts = self._counts
        for index, count in enumerate(counts):
            if count:
                self._child._buckets[index].inc(count)
                counts[index] = 0
        if self._sum:
            self._child._sum.inc(self._sum)
            self._sum = 0.0


class QueueStats:
    """Queue depths from the database, refreshed at most every `max_age` seconds.

    Scrapes (several Prometheus servers, Fly's scraper, a curl) never cost more
    than one RPC per `max_age`.
    """

    def __init__(self, backend: QueueBackend, *, max_age: float) -> None:
        self._backend = backend
        self._max_age = max_age
        self._fetched = float("-inf")
        self._lock = asyncio.Lock()
        # Archived messages per queue, as of the last refresh (the console shows them).
        self.dead_letters: dict[str, int] = {}

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched < self._max_age:
                return
            self._fetched = time.monotonic()
            try:
                rows = await self._backend.metrics()
            except Exception as error:  # noqa: BLE001 - a scrape must still answer
                log.warning("queue metrics unavailable", extra={"error": str(error)})
                return
            for row in rows:
                QUEUE_LENGTH.labels(row.queue_name).set(row.queue_length)
                QUEUE_VISIBLE.labels(row.queue_name).set(row.visible_length)
                QUEUE_OLDEST_AGE.labels(row.queue_name).set(row.oldest_msg_age_sec or 0)
            try:
                dead = await self._backend.dead_letter_counts()
                paused = await self._backend.paused()
            except Exception as error:  # noqa: BLE001 - a scrape must still answer
                log.warning("dead letter counts unavailable", extra={"error": str(error)})
                return
            self.dead_letters = dead
            for row in rows:
                QUEUE_DEAD_LETTERS.labels(row.queue_name).set(dead.get(row.queue_name, 0))
                QUEUE_PAUSED.labels(row.queue_name).set(1 if row.queue_name in paused else 0)
