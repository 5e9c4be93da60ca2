"""The user story end to end, through real sockets and real components.

An app enqueues with `pgmq.send`; the migration's trigger calls pg_net; the sender
POSTs the Database Webhook to the running service; the service claims the message
through the RPC gateway, sends the mail over SMTP with STARTTLS and AUTH, and
deletes the message through RPC.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
from psycopg import sql

from tests.conftest import MAIL_FROM, Service
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until


def enqueue(db: Database, job: dict[str, Any], *, role: str = "qw_postgres") -> int:
    with db.connect(role=role) as conn:
        row = conn.execute(
            "select * from pgmq.send('email_queue', %s::jsonb)", [json.dumps(job)]
        ).fetchone()
    assert row is not None
    return int(row[0])


def queue_rows(db: Database, queue: str = "email_queue") -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            sql.SQL("select msg_id, read_ct, vt > now() from pgmq.{} order by msg_id").format(
                sql.Identifier(f"q_{queue}")
            )
        ).fetchall()


def webhook_body(msg_id: int, queue: str = "email_queue") -> dict[str, Any]:
    return {
        "type": "INSERT",
        "table": f"q_{queue}",
        "schema": "pgmq",
        "record": {"msg_id": msg_id, "read_ct": 0, "message": {"ignored": "the row is read"}},
        "old_record": None,
    }


def test_enqueued_email_is_delivered_and_deleted(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Hi", "text": "Hello"})

    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Hi"
    assert mail["To"] == "a@example.com"
    assert MAIL_FROM in mail["From"]
    body = mail.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Hello"
    assert smtp.received[0].mail_from == MAIL_FROM
    assert list(smtp.received[0].rcpt_tos) == ["a@example.com"]

    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
    with db.connect() as conn:
        responses = conn.execute("select status_code from net._http_response").fetchall()
        archived = conn.execute("select count(*) from pgmq.a_email_queue").fetchone()
    assert responses == [(202,)]
    assert archived == (0,)
    assert msg_id > 0


def test_job_enqueued_by_authenticated_user_is_delivered(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # What an app grants so signed-in users may enqueue (the dashboard's
    # "Expose Queues via PostgREST" does the same for pgmq_public). The webhook
    # trigger still reads Vault: it runs as its owner, not as `authenticated`.
    with db.connect(role="qw_postgres") as conn:
        conn.execute("grant usage on schema pgmq to authenticated")
        conn.execute("grant select, insert on pgmq.q_email_queue to authenticated")
    try:
        enqueue(
            db,
            {"to": "user@example.com", "subject": "Привет, мир", "html": "<p>Здравствуйте</p>"},
            role="authenticated",
        )
        [mail] = smtp.wait_for(1)
        assert mail["Subject"] == "Привет, мир"
        body = mail.get_body(("html", "plain"))
        assert body is not None and body.get_content_type() == "text/html"
        assert "<p>Здравствуйте</p>" in body.get_content()
        wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
    finally:
        with db.connect(role="qw_postgres") as conn:
            conn.execute("revoke select, insert on pgmq.q_email_queue from authenticated")
            conn.execute("revoke usage on schema pgmq from authenticated")


def test_text_and_html_arrive_as_alternatives(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    enqueue(db, {"to": "b@example.com", "subject": "Both", "text": "plain", "html": "<b>rich</b>"})
    [mail] = smtp.wait_for(1)
    alternative = next(p for p in mail.walk() if p.get_content_type() == "multipart/alternative")
    parts = [(p.get_content_type(), p.get_content().strip()) for p in alternative.iter_parts()]
    # The preferred (last) alternative is the HTML one.
    assert parts == [("text/plain", "plain"), ("text/html", "<b>rich</b>")]


def test_repeated_webhooks_send_one_mail(db: Database, service: Service, smtp: SmtpServer) -> None:
    # No sender here: the webhooks are posted by hand, eight at once, as a
    # retrying proxy or a replayed delivery would.
    msg_id = enqueue(db, {"to": "once@example.com", "subject": "Once", "text": "x"})
    statuses: list[int] = []

    def post() -> None:
        response = httpx.post(
            f"{service.url}/webhooks/email_queue",
            json=webhook_body(msg_id),
            headers=service.auth(),
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [202] * 8

    smtp.wait_for(1)
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
    # A second claim would have sent its mail concurrently with the first; give
    # any such duplicate time to arrive before counting.
    threading.Event().wait(0.3)
    assert len(smtp.messages) == 1


def test_job_is_read_from_the_queue_not_from_the_webhook_body(
    db: Database, service: Service, smtp: SmtpServer
) -> None:
    msg_id = enqueue(db, {"to": "real@example.com", "subject": "From the row", "text": "x"})
    body = webhook_body(msg_id)
    body["record"]["message"] = {"to": "attacker@example.com", "subject": "Forged", "text": "y"}
    response = httpx.post(f"{service.url}/webhooks/email_queue", json=body, headers=service.auth())
    assert response.status_code == 202
    [mail] = smtp.wait_for(1)
    assert (mail["To"], mail["Subject"]) == ("real@example.com", "From the row")


def archived_rows(db: Database, queue: str = "email_queue") -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            sql.SQL(
                "select msg_id, read_ct, headers -> 'queue_worker_error' from pgmq.{} "
                "order by msg_id"
            ).format(sql.Identifier(f"a_{queue}"))
        ).fetchall()


def test_permanent_failures_are_archived_with_their_error(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    smtp.reject_recipients(["bounce@example.com"])
    bounced = enqueue(db, {"to": "bounce@example.com", "subject": "No", "text": "x"})
    invalid = enqueue(db, {"to": "c@example.com", "text": "no subject"})

    rows = wait_until(lambda: len(archived_rows(db)) == 2 and archived_rows(db), what="archive")
    assert queue_rows(db) == []
    assert smtp.messages == []
    by_id = {msg_id: (read_ct, error) for msg_id, read_ct, error in rows}
    # Never retried: archived after the first attempt.
    assert by_id[bounced][0] == 1 and by_id[invalid][0] == 1
    assert by_id[bounced][1]["type"] == "PermanentError"
    assert "550 5.1.1 Mailbox unavailable" in by_id[bounced][1]["message"]
    assert by_id[invalid][1]["message"] == (
        "invalid EmailJob message: subject: Value error, is required without a template"
    )
    assert by_id[invalid][1]["attempt"] == 1
    assert "failed_at" in by_id[invalid][1]


def test_message_that_is_not_visible_is_not_processed(
    db: Database, service: Service, smtp: SmtpServer
) -> None:
    msg_id = enqueue(db, {"to": "d@example.com", "subject": "Later", "text": "x"})
    with db.connect() as conn:
        # Another reader holds it, as pgmq.read would.
        conn.execute("select * from pgmq.read('email_queue', 60, 1)")
    response = httpx.post(
        f"{service.url}/webhooks/email_queue", json=webhook_body(msg_id), headers=service.auth()
    )
    assert response.status_code == 202
    # Give the background task ample time to (wrongly) process it.
    threading.Event().wait(0.5)
    assert smtp.messages == []
    assert queue_rows(db) == [(msg_id, 1, True)]


def test_insert_without_worker_url_sends_no_webhook(db: Database) -> None:
    enqueue(db, {"to": "e@example.com", "subject": "Quiet", "text": "x"})
    with db.connect() as conn:
        assert conn.execute("select count(*) from net.http_request_queue").fetchone() == (0,)
    assert len(queue_rows(db)) == 1
