"""The service's metrics as Prometheus itself sees them.

A real Prometheus (Debian's package) scrapes the running service on loopback;
after jobs ran, the job counter is read back through Prometheus's HTTP API and
must equal what the service exposes. `promtool check metrics` lints the
exposition the way Prometheus's own tooling would.

Without `prometheus` and `promtool` on PATH both tests are skipped with one line
saying what to install, before any service starts; under CI (`CI=true`, set by
.ci/run) they fail instead (tests/support/tools.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Service
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.prometheus import (
    JOB_NAME,
    promtool_check_metrics,
    require_binary,
    running_prometheus,
    sample_value,
)
from tests.support.scrape import sample
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue

JOBS = 3
SUCCEEDED = 'queue_worker_jobs_total{queue="email_queue",outcome="succeeded"}'


@pytest.fixture(autouse=True)
def prometheus_installed() -> None:
    """Skips (or fails, under CI) before the service and its jobs, not after them."""
    require_binary("prometheus")
    require_binary("promtool")


def own_succeeded(service: Service) -> float:
    """The service's own `queue_worker_jobs_total` for succeeded email jobs (0 if none yet)."""
    return sample(service.url, "queue_worker_jobs_total", queue="email_queue", outcome="succeeded")


def run_jobs(db: Database, smtp: SmtpServer, count: int) -> None:
    for n in range(count):
        enqueue(db, {"to": f"metrics{n}@example.com", "subject": f"Metrics {n}", "text": "x"})
    smtp.wait_for(count)


def test_prometheus_scrapes_the_job_counter(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # The counter is process-global: other tests' jobs count too.
    before = own_succeeded(service)
    run_jobs(db, smtp, JOBS)
    # The mail arrives before the job's outcome is recorded; wait for the count.
    wait_until(
        lambda: own_succeeded(service) == before + JOBS, what="the service to count the jobs"
    )
    expected = own_succeeded(service)
    assert expected >= JOBS

    target = urlsplit(service.url).netloc
    with running_prometheus([target], scrape_interval="1s") as prometheus:
        [sample] = prometheus.wait_for(
            SUCCEEDED,
            lambda result: len(result) == 1 and sample_value(result[0]) == expected,
        )
        # Nothing ran meanwhile: Prometheus's value is still the service's own.
        assert sample_value(sample) == own_succeeded(service) == expected
        assert sample["metric"] == {
            "__name__": "queue_worker_jobs_total",
            "job": JOB_NAME,
            "instance": target,
            "queue": "email_queue",
            "outcome": "succeeded",
        }
        [up] = prometheus.query(f'up{{job="{JOB_NAME}"}}')
        assert sample_value(up) == 1

        [active] = prometheus.targets()
        assert active["scrapeUrl"] == f"{service.url}/metrics"
        assert active["health"] == "up", active
        assert active["lastError"] == ""


def test_metrics_pass_promtool_check(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # Jobs first, so the labelled job series exist and are linted too.
    run_jobs(db, smtp, 1)
    wait_until(lambda: own_succeeded(service) >= 1, what="the service to count the job")
    response = httpx.get(f"{service.url}/metrics").raise_for_status()
    assert "queue_worker_jobs_total{" in response.text

    result = promtool_check_metrics(response.text)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (
        f"promtool check metrics exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
