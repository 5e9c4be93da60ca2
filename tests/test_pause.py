"""Pause and resume: the flag is in the database, so no replica claims from a paused queue.

Through both backends (the claim and read functions refuse), then the running
service: webhooks answered as deferred, the sweeper skipping the queue, the
gauge, the manual API and the CLI; and a second replica that has not yet heard of
the pause still claims nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, ServiceFactory
from tests.support.cli import run_cli
from tests.support.postgres import Database
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_api import metric
from tests.test_backends import Backend, backend  # noqa: F401 - the fixture
from tests.test_e2e import enqueue, queue_rows, webhook_body

QUEUE = "email_queue"
JOB = {"to": "ops@example.com", "subject": "Paused", "text": "waits"}


@pytest.mark.anyio
async def test_a_paused_queue_claims_and_reads_nothing_until_resumed(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    queue = backend.queue
    msg_id = await queue.send(QUEUE, {"n": 1})
    assert await queue.set_paused(QUEUE, True) is True
    assert await queue.set_paused(QUEUE, True) is False  # already
    assert list(await queue.paused()) == [QUEUE]
    assert await queue.claim(QUEUE, [msg_id], 30) == []
    assert await queue.read(QUEUE, 30, 10) == []
    # Other queues are not affected.
    other = await queue.send("reports_queue", {"n": 2})
    assert [m.msg_id for m in await queue.claim("reports_queue", [other], 30)] == [other]

    assert await queue.set_paused(QUEUE, False) is True
    assert await queue.paused() == {}
    assert [m.msg_id for m in await queue.claim(QUEUE, [msg_id], 30)] == [msg_id]


@pytest.fixture
def api(start_service: ServiceFactory) -> tuple[Service, dict[str, str]]:
    token = secrets.token_urlsafe(24)
    service = start_service(
        register=False, api_token=token, metrics_cache_seconds=0, sweep_interval_seconds=0.2
    )
    return service, {"Authorization": f"Bearer {token}"}


def test_paused_queue_defers_webhooks_and_is_not_swept_then_resume_runs_it(
    db: Database, api: tuple[Service, dict[str, str]], smtp: SmtpServer
) -> None:
    service, auth = api
    paused = httpx.post(f"{service.url}/queues/{QUEUE}/pause", headers=auth)
    assert paused.json() == {"queue": QUEUE, "paused": True, "changed": True}
    assert metric(service, "queue_worker_queue_paused", queue=QUEUE) == 1
    assert metric(service, "queue_worker_queue_paused", queue="reports_queue") == 0
    listing = httpx.get(f"{service.url}/queues", headers=auth).json()["queues"]
    assert {row["queue"]: row["paused"] for row in listing} == {
        "email_queue": True,
        "payments_queue": False,
        "reports_queue": False,
    }

    msg_id = enqueue(db, JOB)
    webhook = httpx.post(
        f"{service.url}/webhooks/{QUEUE}", json=webhook_body(msg_id), headers=service.auth()
    )
    assert webhook.status_code == 202
    assert webhook.json() == {"status": "deferred", "msg_id": msg_id}
    sweeper = service.services.sweeper
    passes = sweeper.passes[QUEUE]
    wait_until(lambda: sweeper.passes[QUEUE] >= passes + 3, what="three sweeps")
    assert queue_rows(db) == [(msg_id, 0, False)]  # never claimed
    assert smtp.messages == []

    resumed = httpx.post(f"{service.url}/queues/{QUEUE}/resume", headers=auth)
    assert resumed.json() == {"queue": QUEUE, "paused": False, "changed": True}
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Paused"
    wait_until(lambda: queue_rows(db) == [], what="the job to be acked")
    assert metric(service, "queue_worker_queue_paused", queue=QUEUE) == 0
    assert httpx.post(f"{service.url}/queues/nope/pause", headers=auth).status_code == 404
    assert httpx.post(f"{service.url}/queues/{QUEUE}/pause").status_code == 401


def test_a_replica_that_has_not_heard_of_the_pause_still_claims_nothing(
    db: Database, start_service: ServiceFactory, tmp_path: Path
) -> None:
    replica = start_service(register=False)
    pauses = replica.services.pauses
    # This replica is deaf to the flag for now, as one is between two polls.
    pauses.apply = lambda queue, paused: None  # type: ignore[method-assign]
    # Paused by another door (the CLI, as another replica's console would).
    ran = run_cli("pause", QUEUE, settings=replica.settings, cwd=tmp_path)
    assert ran.code == 0, ran.err
    assert ran.out.strip() == f"{QUEUE} is paused"

    msg_id = enqueue(db, JOB)
    webhook = httpx.post(
        f"{replica.url}/webhooks/{QUEUE}", json=webhook_body(msg_id), headers=replica.auth()
    )
    assert webhook.json() == {"status": "accepted", "msg_id": msg_id}
    wait_until(lambda: replica.services.runner.in_flight(QUEUE) == 0, what="the claim")
    assert queue_rows(db) == [(msg_id, 0, False)]  # the claim refused: read_ct still 0

    del pauses.apply  # hears again: within its poll interval it knows
    wait_until(lambda: QUEUE in replica.services.runner.paused, timeout=10, what="the poll")
    deferred = httpx.post(
        f"{replica.url}/webhooks/{QUEUE}", json=webhook_body(msg_id), headers=replica.auth()
    )
    assert deferred.json() == {"status": "deferred", "msg_id": msg_id}

    again = run_cli("pause", QUEUE, "--json", settings=replica.settings, cwd=tmp_path)
    assert again.json() == {"queue": QUEUE, "paused": True, "changed": False}
    ran = run_cli("resume", QUEUE, settings=replica.settings, cwd=tmp_path)
    assert ran.out.strip() == f"{QUEUE} is running"
    wait_until(lambda: QUEUE not in replica.services.runner.paused, timeout=10, what="the poll")
