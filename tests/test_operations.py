"""Operating the service: readiness, the manual curl API, metrics worth scraping, logs."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from typing import Any

import httpx
import pytest

from app.api.health import READY_BUDGET_SECONDS, RPC_CHECK_SECONDS, SMTP_CHECK_SECONDS
from app.logs import JsonFormatter
from tests.conftest import Service, ServiceFactory
from tests.support.postgres import Database
from tests.support.process import service_process
from tests.support.rpc_gateway import GatewayHandle
from tests.support.scrape import sample
from tests.support.servers import bound_socket
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_api import metric
from tests.test_e2e import archived_rows, queue_rows

JOB = {"to": "ops@example.com", "subject": "Ops", "text": "hello"}


@pytest.fixture
def api(start_service: ServiceFactory) -> tuple[Service, dict[str, str]]:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, api_token=token, metrics_cache_seconds=0)
    return service, {"Authorization": f"Bearer {token}"}


def test_readiness_is_ok_when_everything_answers(service: Service) -> None:
    response = httpx.get(f"{service.url}/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"rpc": "ok", "smtp": "ok", "sweeper": "ok"},
    }


def test_readiness_names_the_failed_check_without_configuration(
    service: Service, gateway: GatewayHandle, smtp: SmtpServer
) -> None:
    gateway.set_down(True)
    try:
        body = httpx.get(f"{service.url}/health/ready").json()
    finally:
        gateway.set_down(False)
    assert body["status"] == "not ready"
    assert body["checks"]["rpc"] == "failed (HTTP 503)"
    assert body["checks"]["smtp"] == "ok"

    smtp.stop()
    try:
        response = httpx.get(f"{service.url}/health/ready")
    finally:
        smtp.start()
    assert response.status_code == 503
    assert response.json()["checks"]["smtp"].startswith("failed (")
    text = response.text
    for value in (str(smtp.port), smtp.password, service.webhook_secret, "localhost", "127.0.0.1"):
        assert value not in text


def test_readiness_names_the_one_check_that_hangs_an_smtp_tarpit(
    start_service: ServiceFactory,
) -> None:
    # A tarpit: the kernel completes the TCP handshake (listen backlog), nobody
    # ever accepts, the SMTP greeting never comes.
    with contextlib.closing(bound_socket()) as tarpit:
        tarpit.listen(64)
        service = start_service(register=False, smtp_port=tarpit.getsockname()[1])
        started = time.monotonic()
        response = httpx.get(f"{service.url}/health/ready", timeout=30)
        took = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "rpc": "ok",
        "smtp": f"failed (timeout after {SMTP_CHECK_SECONDS:g}s)",
        "sweeper": "ok",
    }
    assert took < READY_BUDGET_SECONDS + 1


def test_readiness_names_the_one_check_that_hangs_a_slow_rpc_api(
    service: Service, gateway: GatewayHandle
) -> None:
    gateway.delay_answers(30, "metrics")
    try:
        started = time.monotonic()
        response = httpx.get(f"{service.url}/health/ready", timeout=30)
        took = time.monotonic() - started
    finally:
        gateway.delay_answers(0)
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "rpc": f"failed (timeout after {RPC_CHECK_SECONDS:g}s)",
        "smtp": "ok",
        "sweeper": "ok",
    }
    assert took < READY_BUDGET_SECONDS + 1


def test_manual_api_is_off_without_a_token(service: Service) -> None:
    response = httpx.get(f"{service.url}/queues", headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 404


def test_manual_api_refuses_a_wrong_token(api: tuple[Service, dict[str, str]]) -> None:
    service, _ = api
    for headers in ({}, {"Authorization": f"Bearer {service.webhook_secret}"}):
        response = httpx.get(f"{service.url}/queues", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"


def test_enqueue_by_curl_then_drain_delivers_the_mail(
    db: Database, api: tuple[Service, dict[str, str]], smtp: SmtpServer
) -> None:
    service, auth = api
    response = httpx.post(f"{service.url}/queues/email_queue/messages", json=JOB, headers=auth)
    assert response.status_code == 201
    msg_id = response.json()["msg_id"]
    assert queue_rows(db) == [(msg_id, 0, False)]

    listing = httpx.get(f"{service.url}/queues", headers=auth).json()
    assert [q["queue"] for q in listing["queues"]] == [
        "email_queue",
        "payments_queue",
        "reports_queue",
    ]
    assert listing["queues"][0] == {
        "queue": "email_queue",
        "length": 1,
        "visible": 1,
        "oldest_age_seconds": listing["queues"][0]["oldest_age_seconds"],
        "paused": False,
        "in_flight": 0,
    }
    # The sweeper of this service waits an hour between passes: drain asks for one now.
    drained = httpx.post(f"{service.url}/queues/email_queue/drain", headers=auth)
    assert drained.status_code == 202
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Ops"
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"to": "ops@example.com", "text": "x"}, "subject: Value error, is required without a"),
        ({**JOB, "to": "not-an-address"}, "to.0: Value error, is not a valid email address"),
        ({**JOB, "colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_enqueue_refuses_an_invalid_job_naming_the_field(
    db: Database, api: tuple[Service, dict[str, str]], body: dict[str, Any], expected: str
) -> None:
    service, auth = api
    response = httpx.post(f"{service.url}/queues/email_queue/messages", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_message"
    assert expected in response.json()["message"]
    assert queue_rows(db) == []


def test_unknown_queue_is_404_on_the_manual_api(api: tuple[Service, dict[str, str]]) -> None:
    service, auth = api
    response = httpx.post(f"{service.url}/queues/nope/messages", json=JOB, headers=auth)
    assert response.status_code == 404


def test_archive_lists_dead_messages_and_replays_one(
    db: Database, api: tuple[Service, dict[str, str]], smtp: SmtpServer
) -> None:
    service, auth = api
    smtp.reject_recipients(["dead@example.com"])
    for i in range(3):
        httpx.post(
            f"{service.url}/queues/email_queue/messages",
            json={"to": "dead@example.com", "subject": f"dead {i}", "text": "x"},
            headers=auth,
        )
    httpx.post(f"{service.url}/queues/email_queue/drain", headers=auth)
    wait_until(lambda: len(archived_rows(db)) == 3, what="three archived messages")

    first = httpx.get(f"{service.url}/queues/email_queue/archive?limit=2", headers=auth).json()
    assert [m["message"]["subject"] for m in first["messages"]] == ["dead 2", "dead 1"]
    assert "550 5.1.1" in first["messages"][0]["error"]["message"]
    rest = httpx.get(
        f"{service.url}/queues/email_queue/archive?limit=2&before={first['next']}", headers=auth
    ).json()
    assert [m["message"]["subject"] for m in rest["messages"]] == ["dead 0"]
    assert rest["next"] is None

    smtp.clear_faults()
    dead_id = first["messages"][0]["msg_id"]
    replayed = httpx.post(
        f"{service.url}/queues/email_queue/archive/{dead_id}/replay", headers=auth
    )
    assert replayed.status_code == 201
    assert replayed.json()["replayed"] == dead_id
    httpx.post(f"{service.url}/queues/email_queue/drain", headers=auth)
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "dead 2"
    again = httpx.post(f"{service.url}/queues/email_queue/archive/{dead_id}/replay", headers=auth)
    assert again.status_code == 404


def test_metrics_show_queue_depth_rpc_calls_and_emails(
    db: Database, api: tuple[Service, dict[str, str]], smtp: SmtpServer
) -> None:
    service, auth = api
    sent_before = metric(service, "queue_worker_emails_total", result="sent")
    for _ in range(2):
        httpx.post(f"{service.url}/queues/email_queue/messages", json=JOB, headers=auth)
    assert metric(service, "queue_worker_queue_length", queue="email_queue") == 2
    assert metric(service, "queue_worker_queue_visible_length", queue="email_queue") == 2
    httpx.post(f"{service.url}/queues/email_queue/drain", headers=auth)
    smtp.wait_for(2)
    wait_until(lambda: queue_rows(db) == [], what="both messages to be deleted")
    assert metric(service, "queue_worker_emails_total", result="sent") == sent_before + 2
    assert metric(service, "queue_worker_rpc_calls_total", function="ack", result="ok") >= 2
    assert metric(service, "queue_worker_last_success_timestamp_seconds", queue="email_queue") > 0
    text = httpx.get(f"{service.url}/metrics").text
    assert "ops@example.com" not in text and "msg_id" not in text


def test_requests_get_an_id_and_logs_are_json_lines() -> None:
    record = logging.LogRecord("app.worker", logging.INFO, __file__, 1, "job finished", None, None)
    record.queue = "email_queue"
    record.msg_id = 42
    record.outcome = "succeeded"
    record.request_id = "abc123"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "job finished"
    assert (entry["queue"], entry["msg_id"], entry["outcome"]) == ("email_queue", 42, "succeeded")
    assert entry["request_id"] == "abc123"
    assert entry["level"] == "info" and entry["time"].endswith("+00:00")


def test_responses_carry_a_request_id(service: Service) -> None:
    generated = httpx.get(f"{service.url}/health")
    assert len(generated.headers["x-request-id"]) == 32
    echoed = httpx.get(f"{service.url}/health", headers={"X-Request-ID": "trace-7"})
    assert echoed.headers["x-request-id"] == "trace-7"


def test_scrapes_share_one_queue_metrics_call_within_the_cache_window(
    start_service: ServiceFactory, gateway: GatewayHandle
) -> None:
    service = start_service(register=False, metrics_cache_seconds=30)
    before = gateway.call_count("metrics", schema="queue_worker")
    for _ in range(5):
        assert httpx.get(f"{service.url}/metrics").status_code == 200
    assert gateway.call_count("metrics", schema="queue_worker") == before + 1


def test_several_workers_report_one_set_of_metrics(
    db: Database, service_settings: Any, smtp: SmtpServer, tmp_path: Any
) -> None:
    settings = service_settings.model_copy(
        update={"workers": 2, "sweep_interval_seconds": 0.3, "log_format": "text"}
    )
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            "select pgmq.send('email_queue', jsonb_build_object('to', 'w' || i || "
            "'@example.com', 'subject', 'w' || i, 'text', 'x')) from generate_series(1, 20) i"
        )
    with service_process(settings, console_script=True) as process:
        smtp.wait_for(20, timeout=30)
        wait_until(lambda: queue_rows(db) == [], what="every message to be deleted")

        def succeeded() -> float:
            return sample(
                process.url, "queue_worker_jobs_total", queue="email_queue", outcome="succeeded"
            )

        # Whichever worker answers the scrape, it reports both workers' jobs.
        assert {succeeded() for _ in range(10)} == {20.0}
