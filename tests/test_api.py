"""The HTTP contract: every answer of the webhook endpoint, health and metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Service
from tests.support.postgres import Database
from tests.support.scrape import sample
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows, webhook_body


def post(
    service: Service, body: Any, *, queue: str = "email_queue", **kwargs: Any
) -> httpx.Response:
    headers = kwargs.pop("headers", service.auth())
    if isinstance(body, (bytes, str)):
        return httpx.post(
            f"{service.url}/webhooks/{queue}", content=body, headers=headers, **kwargs
        )
    return httpx.post(f"{service.url}/webhooks/{queue}", json=body, headers=headers, **kwargs)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-secret-of-enough-length"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "empty", "wrong", "basic"],
)
def test_webhook_without_the_secret_is_refused(
    db: Database, service: Service, headers: dict[str, str]
) -> None:
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Hi", "text": "x"})
    response = post(service, webhook_body(msg_id), headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "error": "unauthorized",
        "message": "missing or invalid bearer token",
    }
    assert response.headers["www-authenticate"] == "Bearer"
    # Refused means untouched: not claimed, still there.
    assert queue_rows(db) == [(msg_id, 0, False)]


def test_secret_with_wrong_case_scheme_still_works(db: Database, service: Service) -> None:
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Hi", "text": "x"})
    response = post(
        service, webhook_body(msg_id), headers={"Authorization": f"bearer {service.webhook_secret}"}
    )
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "msg_id": msg_id}


def test_unknown_queue_is_404_after_authentication(service: Service) -> None:
    response = post(service, webhook_body(1, "other_queue"), queue="other_queue")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_queue"
    assert "other_queue" in response.json()["message"]
    unauthenticated = post(service, webhook_body(1, "other_queue"), queue="other_queue", headers={})
    assert unauthenticated.status_code == 401


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "Invalid JSON"),
        ([1, 2], "body"),
        (
            {"table": "q_email_queue", "schema": "pgmq", "record": {"msg_id": 1}},
            "type: Field required",
        ),
        (
            {**webhook_body(1), "type": "TRUNCATE"},
            "type: Input should be 'INSERT', 'UPDATE' or 'DELETE'",
        ),
        ({**webhook_body(1), "table": "q_reports_queue"}, "expected pgmq.q_email_queue"),
        ({**webhook_body(1), "schema": "public"}, "expected pgmq.q_email_queue"),
        ({**webhook_body(1), "record": None}, "an INSERT event needs the new row"),
        ({**webhook_body(1), "record": {"read_ct": 0}}, "record.msg_id: Field required"),
        (
            {**webhook_body(1), "record": {"msg_id": "seven"}},
            "record.msg_id: Input should be a valid integer",
        ),
        (
            {**webhook_body(1), "record": {"msg_id": 0}},
            "record.msg_id: Input should be greater than 0",
        ),
        (
            {**webhook_body(1), "record": {"msg_id": 2**63}},
            "record.msg_id: Input should be less than or equal to 9223372036854775807",
        ),
        (
            {**webhook_body(1), "record": {"msg_id": -(2**63) - 1}},
            "record.msg_id: Input should be greater than 0",
        ),
    ],
    ids=[
        "not-json",
        "array",
        "no-type",
        "bad-type",
        "other-table",
        "other-schema",
        "no-record",
        "no-msg-id",
        "msg-id-text",
        "msg-id-zero",
        "msg-id-2-pow-63",
        "msg-id-below-bigint",
    ],
)
def test_body_that_is_not_a_queue_row_is_422(service: Service, body: Any, expected: str) -> None:
    response = post(service, body)
    assert response.status_code == 422
    payload = response.json()
    assert payload["error"] == "invalid_payload"
    assert expected in payload["message"]


@pytest.mark.parametrize("event", ["UPDATE", "DELETE"])
def test_update_and_delete_events_are_ignored(db: Database, service: Service, event: str) -> None:
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Hi", "text": "x"})
    body = {**webhook_body(msg_id), "type": event}
    if event == "DELETE":
        body.update(record=None, old_record={"msg_id": msg_id})
    response = post(service, body)
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert queue_rows(db) == [(msg_id, 0, False)]


def test_accepted_webhook_answers_before_the_job_runs(db: Database, service: Service) -> None:
    # A message that is not visible yet: the answer cannot depend on the job.
    with db.connect() as conn:
        row = conn.execute(
            "select * from pgmq.send('email_queue', %s::jsonb, 60)",
            ['{"to": "a@example.com", "subject": "Hi", "text": "x"}'],
        ).fetchone()
    assert row is not None
    response = post(service, webhook_body(row[0]))
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "msg_id": row[0]}


def test_health_is_ok(service: Service) -> None:
    response = httpx.get(f"{service.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def metric(service: Service, name: str, **labels: str) -> float:
    """The current value of one sample of the service's /metrics, 0 when absent."""
    return sample(service.url, name, **labels)


def test_metrics_are_prometheus_text(service: Service) -> None:
    response = httpx.get(f"{service.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"queue_worker_webhooks", "queue_worker_jobs"} <= names


def test_metrics_count_webhooks_by_result(service: Service) -> None:
    name = "queue_worker_webhooks_total"
    before = metric(service, name, queue="email_queue", result="unauthorized")
    post(service, webhook_body(1), headers={})
    assert metric(service, name, queue="email_queue", result="unauthorized") == before + 1


def test_processed_job_is_counted(db: Database, service: Service, smtp: SmtpServer) -> None:
    name = "queue_worker_jobs_total"
    before = metric(service, name, queue="email_queue", outcome="succeeded")
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Hi", "text": "x"})
    post(service, webhook_body(msg_id))
    smtp.wait_for(1)
    wait_until(
        lambda: metric(service, name, queue="email_queue", outcome="succeeded") == before + 1,
        what="the job counter",
    )
