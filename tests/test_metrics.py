"""Job metrics counted in the runner and handed to prometheus_client in bulk.

The runner counts a job's metrics in plain numbers and flushes them before every
scrape of /metrics (and every second): what a scraper sees must be exactly what
updating prometheus_client for every job would have shown.
"""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app import metrics
from tests.conftest import Service
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.scrape import sample
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, enqueue, queue_rows

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 1.0)
# Every bound itself (a value equal to a bound belongs to that bucket), values just
# beside bounds, below the first, above the last, zero and a negative one.
VALUES = [*BUCKETS, *(b * 0.999 for b in BUCKETS), *(b * 1.001 for b in BUCKETS)]
VALUES += [0.0, -0.5, 1e-9, 7.5, 1e6, math.inf]


def exposition(feed: str) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["queue"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("q")
    if feed == "observe":
        for value in VALUES:
            child.observe(value)
    else:
        batched = metrics.BatchedHistogram(child)
        for value in VALUES[:10]:
            batched.observe(value)
        batched.flush()
        for value in VALUES[10:]:
            batched.observe(value)
        batched.flush()
        batched.flush()  # nothing counted since: adds nothing
    return "\n".join(
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    )


def test_a_batched_histogram_shows_what_observing_each_value_shows() -> None:
    batched = exposition("batched")
    assert batched == exposition("observe")
    assert f'h_seconds_count{{queue="q"}} {float(len(VALUES))}' in batched


def test_a_scrape_right_after_the_jobs_counts_every_one(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    url = service.url

    def value(name: str, **labels: str) -> float:
        return sample(url, name, queue="email_queue", **labels)

    before = {
        "succeeded": value("queue_worker_jobs_total", outcome="succeeded"),
        "archived": value("queue_worker_jobs_total", outcome="archived"),
        "durations": value("queue_worker_job_duration_seconds_count"),
        "latencies": value("queue_worker_job_latency_seconds_count"),
    }
    started = time.time()
    for n in range(3):
        enqueue(db, {"to": f"m{n}@example.com", "subject": f"Counted {n}", "text": "x"})
    enqueue(db, {"to": "x@example.com", "text": "no subject: archived"})
    smtp.wait_for(3)
    wait_until(lambda: not queue_rows(db) and len(archived_rows(db)) == 1, what="all settled")

    # No wait for the once-a-second flush: the scrape itself flushes.
    assert value("queue_worker_jobs_total", outcome="succeeded") == before["succeeded"] + 3
    assert value("queue_worker_jobs_total", outcome="archived") == before["archived"] + 1
    assert value("queue_worker_job_duration_seconds_count") == before["durations"] + 4
    assert value("queue_worker_job_latency_seconds_count") == before["latencies"] + 4
    assert value("queue_worker_jobs_in_progress") == 0
    assert value("queue_worker_last_success_timestamp_seconds") >= started - 1
