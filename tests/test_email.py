"""The email job end to end: recipients, display names, attachments, refusals."""

from __future__ import annotations

import base64
import secrets
from email.message import EmailMessage

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
    # Larger than COMPOSE_IN_THREAD_BYTES: composed off the event loop.
    data = "дата;сумма\n2026-11-27;100.00\n".encode() + bytes(range(256)) * 1200
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


CHECKUP = {
    "patient_name": "Анна Петрова",
    "checkup_date": "27.11.2026",
    "doctor_name": "Иванов И. И.",
    "results_url": "https://example.com/results/1",
}


def _parts(mail: EmailMessage) -> tuple[str, str]:
    text, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def test_templated_mail_in_russian_arrives_intact(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    enqueue(
        db,
        {
            "to": "Анна Петрова <anna@example.com>",
            "template": "checkup_completed",
            "locale": "ru",
            "context": CHECKUP,
        },
    )
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Результаты обследования готовы"
    assert mail["To"] == "Анна Петрова <anna@example.com>"
    text, html = _parts(mail)
    assert "Здравствуйте, Анна Петрова!" in text
    assert "Ваше обследование от 27.11.2026 завершено" in text
    assert "Лечащий врач: Иванов И. И." in text
    assert '<a href="https://example.com/results/1"' in html
    assert '<html lang="ru">' in html
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")


def test_default_locale_and_subject_override(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    start_service(mail_default_locale="ru")
    job = {"to": "a@example.com", "template": "checkup_completed", "context": CHECKUP}
    enqueue(db, job)
    enqueue(db, {**job, "locale": "en", "subject": "Your results (ref 42)"})
    mails = smtp.wait_for(2)
    subjects = sorted(str(mail["Subject"]) for mail in mails)
    assert subjects == ["Your results (ref 42)", "Результаты обследования готовы"]
    english = next(m for m in mails if m["Subject"] == "Your results (ref 42)")
    assert "Hello, Анна Петрова!" in _parts(english)[0]


def test_template_mistakes_are_archived_with_their_name(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    context = {k: v for k, v in CHECKUP.items() if k != "results_url"}
    jobs = {
        "missing": {"to": "a@example.com", "template": "checkup_completed", "context": context},
        "unknown": {"to": "a@example.com", "template": "welcome", "context": {}},
        "locale": {"to": "a@example.com", "template": "checkup_completed", "locale": "de"},
        "both": {"to": "a@example.com", "template": "report_ready", "text": "x"},
        "no_body": {"to": "a@example.com", "subject": "x"},
    }
    ids = {name: enqueue(db, job) for name, job in jobs.items()}
    wait_until(lambda: len(archived_rows(db)) == len(jobs), what="every bad job archived")
    errors = {msg_id: error["message"] for msg_id, _, error in archived_rows(db)}
    assert "template 'checkup_completed' (en): 'results_url' is undefined" in errors[ids["missing"]]
    assert "unknown template 'welcome'" in errors[ids["unknown"]]
    assert "locale: Input should be 'en' or 'ru'" in errors[ids["locale"]]
    assert "either template or text/html" in errors[ids["both"]]
    assert "one of text, html or template is required" in errors[ids["no_body"]]
    assert smtp.messages == []


def test_mails_sent_together_share_one_session(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    start_service(smtp_max_connections=1)
    for n in range(6):
        enqueue(db, {"to": "a@example.com", "subject": f"Batch {n}", "text": "x"})
    smtp.wait_for(6)
    assert len({received.peer for received in smtp.received}) == 1
    wait_until(lambda: queue_rows(db) == [], what="every message to be deleted")


def test_without_keepalive_every_mail_has_its_own_session(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    start_service(smtp_max_connections=1, smtp_keepalive_seconds=0)
    for n in range(3):
        enqueue(db, {"to": "a@example.com", "subject": f"Alone {n}", "text": "x"})
    smtp.wait_for(3)
    assert len({received.peer for received in smtp.received}) == 3


def test_a_reused_session_closed_by_the_server_is_replaced(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    start_service(smtp_max_connections=1, smtp_keepalive_seconds=60)
    enqueue(db, {"to": "a@example.com", "subject": "Before", "text": "x"})
    smtp.wait_for(1)
    smtp.clear()
    smtp.stop()  # drops the parked session, as a server restart would
    smtp.start()
    enqueue(db, {"to": "a@example.com", "subject": "After", "text": "x"})
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "After"
    wait_until(lambda: queue_rows(db) == [], what="both messages to be deleted")
    assert archived_rows(db) == []


def test_sending_is_paced_by_smtp_max_per_second(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    start_service(smtp_max_per_second=4)
    for n in range(5):
        enqueue(db, {"to": "a@example.com", "subject": f"Paced {n}", "text": "x"})
    smtp.wait_for(5)
    times = sorted(received.at for received in smtp.received)
    # Five mails at most four per second: the last a second after the first, none closer
    # than a quarter of a second to the one before. Paced before the session was ready,
    # the first mail's connect and login ate into its quarter: 5 mails in 0.81 s.
    assert times[-1] - times[0] >= 0.95
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.2, gaps
