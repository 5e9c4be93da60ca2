"""The email job end to end: recipients, display names, attachments, refusals."""

from __future__ import annotations

import base64
import secrets

from app.processors.email import MAX_ATTACHMENT_BYTES
from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.smtp import SmtpServer, running_smtp
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, enqueue, queue_rows


def test_several_recipients_with_names_cc_and_hidden_bcc(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    enqueue(
        db,
        {
            "to": ["a@example.com", "Анна Петрова <anna@example.com>"],
            "cc": ["c@example.com"],
            "bcc": ["hidden@example.com"],
            "reply_to": ["Поддержка <support@example.com>"],
            "subject": "Отчёт готов",
            "text": "Здравствуйте, Анна!",
        },
    )
    smtp.wait_for(1)
    [received] = smtp.received
    mail = received.message
    assert sorted(received.rcpt_tos) == sorted(
        ["a@example.com", "anna@example.com", "c@example.com", "hidden@example.com"]
    )
    assert mail["To"] == "a@example.com, Анна Петрова <anna@example.com>"
    assert mail["Cc"] == "c@example.com"
    assert mail["Reply-To"] == "Поддержка <support@example.com>"
    assert mail["Bcc"] is None  # delivered, but never shown to the other recipients
    assert mail["Subject"] == "Отчёт готов"
    body = mail.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Здравствуйте, Анна!"
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")


def test_attachment_arrives_intact(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    data = "дата;сумма\n2026-11-27;100.00\n".encode() + bytes(range(256))
    enqueue(
        db,
        {
            "to": "a@example.com",
            "subject": "Files",
            "html": "<p>see attached</p>",
            "attachments": [
                {
                    "filename": "отчёт.csv",
                    "content_type": "text/csv",
                    "content": base64.b64encode(data).decode(),
                }
            ],
        },
    )
    [mail] = smtp.wait_for(1)
    [part] = list(mail.iter_attachments())
    assert part.get_filename() == "отчёт.csv"
    assert part.get_content_type() == "text/csv"
    assert part.get_payload(decode=True) == data


def test_header_injection_and_bad_jobs_are_archived_not_sent(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    too_big = base64.b64encode(b"x" * (MAX_ATTACHMENT_BYTES + 1)).decode()
    jobs = {
        "subject": {"to": "a@example.com", "subject": "Hi\r\nBcc: victim@example.com", "text": "x"},
        "name": {
            "to": "Eve\r\nBcc: victim@example.com <e@example.com>",
            "subject": "x",
            "text": "x",
        },
        "unknown": {"to": "a@example.com", "subject": "x", "text": "x", "priority": "high"},
        "too_big": {
            "to": "a@example.com",
            "subject": "x",
            "text": "x",
            "attachments": [{"filename": "big.bin", "content": too_big}],
        },
    }
    ids = {name: enqueue(db, job) for name, job in jobs.items()}
    wait_until(lambda: len(archived_rows(db)) == len(jobs), what="every bad job archived")
    errors = {msg_id: error["message"] for msg_id, _, error in archived_rows(db)}
    assert "subject: Value error, must not contain line breaks" in errors[ids["subject"]]
    assert "to.0: Value error, must not contain line breaks" in errors[ids["name"]]
    assert "priority: Extra inputs are not permitted" in errors[ids["unknown"]]
    assert "attachments.0.content" in errors[ids["too_big"]]
    assert smtp.messages == []
    assert queue_rows(db) == []


def test_implicit_tls_on_its_own_port_delivers(
    db: Database, start_service: ServiceFactory, sender: PgNetSender
) -> None:
    # The port-465 shape: TLS from the first byte, no STARTTLS.
    with running_smtp(mode="tls", username="tls-user", password=secrets.token_urlsafe(16)) as tls:
        start_service(
            smtp_port=tls.port,
            smtp_user=tls.username,
            smtp_password=tls.password,
            smtp_ca_file=tls.ca_file,
            smtp_starttls=False,
            smtp_ssl_tls=True,
        )
        enqueue(db, {"to": "a@example.com", "subject": "Over TLS", "text": "x"})
        [mail] = tls.wait_for(1)
        assert mail["Subject"] == "Over TLS"
        assert tls.received[0].login == "tls-user"
        wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
