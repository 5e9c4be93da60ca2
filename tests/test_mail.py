"""Mail as it reaches a real SMTP server: valid MIME, no smuggled header, replies by code.

Every test sends through the service (or its Mailer) to the test bed's aiosmtpd server
over STARTTLS + AUTH on loopback, and parses the bytes the server received with
`email.policy.default`.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import secrets
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.errors import PermanentError, RetryableError
from app.mail import LOCALES, Address, Attachment, Mail, Mailer
from app.outbox import Outbox
from tests.conftest import Service, ServiceFactory
from tests.support.cli import run_cli
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.settings import settings_for
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, enqueue, queue_rows
from tests.test_templates import CONTEXTS

# Every character refused in a header-bound field: C0 (NUL apart: jsonb cannot hold
# it, so it is tried at the API only), DEL, C1 (NEL included), LINE/PARAGRAPH SEPARATOR.
UNSAFE = [chr(c) for c in (*range(0x01, 0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]
INJECTED = "Reply-To : attacker@example.com"
ATTACHMENTS: dict[str, list[dict[str, str]]] = {
    "none": [],
    "ascii": [
        {
            "filename": "report.csv",
            "content_type": "text/csv",
            "content": base64.b64encode(b"a,b\r\n1,2\r\n").decode(),
        }
    ],
    "unicode-two": [
        {
            "filename": "отчёт за ноябрь 2026 года, полная версия.csv",
            "content_type": "text/csv",
            "content": base64.b64encode("сумма\r\n1\r\n".encode()).decode(),
        },
        {"filename": "данные.bin", "content": base64.b64encode(bytes(range(256))).decode()},
    ],
}


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def assert_valid_mime(raw: bytes, *, attachments: int, alternative: bool = True) -> EmailMessage:
    """What every mail of the service must be; returns the parsed message."""
    message = parsed(raw)
    for part in message.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)
        if part.is_multipart():
            assert part["Content-Transfer-Encoding"] is None, part.get_content_type()
        else:
            assert part["Content-Transfer-Encoding"] in (
                "7bit",
                "8bit",
                "base64",
                "quoted-printable",
            )
        if part is not message:
            assert part["MIME-Version"] is None
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version"):
        assert len(message.get_all(name, [])) == 1, name
    body = message
    if attachments:
        assert message.get_content_type() == "multipart/mixed"
        parts = list(message.iter_parts())
        assert len(parts) == attachments + 1
        body = parts[0]
        for part in parts[1:]:
            assert part.get_content_disposition() == "attachment"
            assert part.get_filename()
    if alternative:
        assert body.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert b"UTF8''" not in raw
    return message


def test_every_template_locale_and_attachment_is_valid_mime(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    jobs = {}
    for name, context in CONTEXTS.items():
        for locale in LOCALES:
            for kind, attachments in ATTACHMENTS.items():
                to = f"{name}.{locale}.{kind}@example.com"
                jobs[to] = (kind, attachments)
                enqueue(
                    db,
                    {
                        "to": f"Анна Петрова <{to}>",
                        "template": name,
                        "locale": locale,
                        "context": context,
                        "attachments": attachments,
                    },
                )
    smtp.wait_for(len(jobs), timeout=30)
    for received in smtp.received:
        [to] = received.rcpt_tos
        kind, attachments = jobs[to]
        message = assert_valid_mime(received.raw, attachments=len(attachments))
        assert message["To"] == f"Анна Петрова <{to}>"
        got = [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_attachments()]
        assert got == [(a["filename"], base64.b64decode(a["content"])) for a in attachments]
        if kind == "unicode-two":
            assert b"filename*0*=utf-8''" in received.raw.lower()
    wait_until(lambda: queue_rows(db) == [], what="every message to be deleted")
    assert archived_rows(db) == []


def test_written_out_text_html_and_both_are_valid_mime(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    base = {"to": "a@example.com", "subject": "Тема письма"}
    enqueue(db, {**base, "cc": ["t@example.com"], "text": "Привет\n"})
    enqueue(db, {**base, "cc": ["h@example.com"], "html": "<p>Привет</p>"})
    enqueue(db, {**base, "cc": ["b@example.com"], "text": "x", "html": "<p>x</p>"})
    smtp.wait_for(3)
    types = {}
    for received in smtp.received:
        message = parsed(received.raw)
        for part in message.walk():
            assert part.defects == []
            assert not (part.is_multipart() and part["Content-Transfer-Encoding"])
        types[str(message["Cc"])] = message.get_content_type()
    assert types == {
        "t@example.com": "text/plain",
        "h@example.com": "text/html",
        "b@example.com": "multipart/alternative",
    }


def test_the_outbox_writes_the_same_valid_mime(tmp_path: Path) -> None:
    settings = settings_for(mail_from="")
    outbox = Outbox(settings, tmp_path)

    async def write() -> None:
        for locale in LOCALES:
            rendered = outbox.templates.render("report_ready", locale, CONTEXTS["report_ready"])
            await outbox.send(
                Mail(
                    to=[Address("a@example.com", "Анна")],
                    bcc=[Address("hidden@example.com")],
                    subject=rendered.subject,
                    text=rendered.text,
                    html=rendered.html,
                    attachments=[Attachment("отчёт.csv", "text/csv", "сумма\r\n".encode())],
                )
            )

    asyncio.run(write())
    files = sorted(tmp_path.glob("*.eml"))
    assert len(files) == 2
    for path in files:
        message = assert_valid_mime(path.read_bytes(), attachments=1)
        assert message["Bcc"] is None
        assert "hidden@example.com" in str(message["X-Envelope-To"])


# -- no character becomes a header -------------------------------------------------


def _with(field: str, value: str) -> dict[str, Any]:
    """An email job with `value` in the header-bound `field`."""
    job: dict[str, Any] = {"to": "a@example.com", "subject": "Hello", "text": "x"}
    if field in ("to", "cc", "reply_to"):
        job[field] = [f'"{value}" <{field}@example.com>']
    elif field == "subject":
        job["subject"] = value
    elif field == "attachments.0.filename":
        job["attachments"] = [{"filename": f"{value}.txt", "content": "eA=="}]
    elif field == "context.title":
        job = {
            "to": "a@example.com",
            "template": "report_ready",
            "context": {**CONTEXTS["report_ready"], "title": value},
        }
    return job


HEADER_FIELDS = {
    "to": "to.0",
    "cc": "cc.0",
    "reply_to": "reply_to.0",
    "subject": "subject",
    "attachments.0.filename": "attachments.0.filename",
    "context.title": "context.title",
}


def test_no_control_character_reaches_a_header(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # Each character in each field, with a header after it as an attacker writes it.
    ids = {}
    for field in HEADER_FIELDS:
        for char in UNSAFE:
            ids[enqueue(db, _with(field, f"Hi{char}{INJECTED}"))] = (field, char)
    # The same text without the character is delivered: the control.
    for field in HEADER_FIELDS:
        enqueue(db, _with(field, f"Hi {INJECTED}"))
    smtp.wait_for(len(HEADER_FIELDS), timeout=30)
    wait_until(lambda: len(archived_rows(db)) == len(ids), timeout=60, what="every job archived")
    for msg_id, _, error in archived_rows(db):
        field, char = ids[msg_id]
        assert error["type"] == "PermanentError"
        assert f"{HEADER_FIELDS[field]}: " in error["message"], (field, hex(ord(char)))
        assert "control characters" in error["message"]
    time.sleep(0.5)
    assert len(smtp.received) == len(HEADER_FIELDS)
    for received in smtp.received:
        message = parsed(received.raw)
        for part in message.walk():
            assert part.defects == []
        names = [name.lower() for name in message.keys()]
        assert all(name.strip() == name and " " not in name for name in names), names
        if "reply-to" in names:
            assert names.count("reply-to") == 1
            [address] = message["Reply-To"].addresses
            assert address.addr_spec == "reply_to@example.com"
        assert b"\nReply-To :" not in received.raw.replace(b"\r\n", b"\n")


@pytest.fixture
def api(start_service: ServiceFactory) -> Iterator[tuple[Service, dict[str, str]]]:
    token = secrets.token_urlsafe(24)
    yield start_service(register=False, api_token=token), {"Authorization": f"Bearer {token}"}


def post(api: tuple[Service, dict[str, str]], job: dict[str, Any]) -> httpx.Response:
    service, auth = api
    return httpx.post(f"{service.url}/queues/email_queue/messages", json=job, headers=auth)


def test_control_characters_are_refused_at_enqueue(
    db: Database, api: tuple[Service, dict[str, str]]
) -> None:
    for field, name in HEADER_FIELDS.items():
        for char in ["\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]:
            response = post(api, _with(field, f"Hi{char}{INJECTED}"))
            assert response.status_code == 422, (field, hex(ord(char)), response.text)
            says = "U+0000 (NUL)" if char == "\x00" else f"{name}: "
            assert says in response.json()["message"], response.text
    assert queue_rows(db) == []


def test_the_mailer_refuses_what_bypasses_the_job_model(smtp: SmtpServer) -> None:
    # Mail built by other processors (reports, plugins) meets the same check.
    mailer = Mailer(_settings(smtp))
    fields = {
        "to.0": Mail(to=[Address("a@example.com", "A\x0bB")], subject="s", text="x"),
        "subject": Mail(to=[Address("a@example.com")], subject="s\x1ex", text="x"),
        "attachments.0.filename": Mail(
            to=[Address("a@example.com")],
            subject="s",
            text="x",
            attachments=[Attachment("a\u2028b.txt", "text/plain", b"x")],
        ),
    }

    async def each() -> None:
        for name, mail in fields.items():
            with pytest.raises(PermanentError, match=f"^{name}: must not contain"):
                await mailer.send(mail)
        await mailer.close()

    asyncio.run(each())
    assert smtp.received == []


# -- SMTP replies by code at every stage -------------------------------------------


def _settings(smtp: SmtpServer, **overrides: Any) -> Settings:
    return settings_for(
        smtp_host="localhost",
        smtp_port=smtp.port,
        smtp_user=smtp.username,
        smtp_password=smtp.password,
        smtp_ca_file=smtp.ca_file,
        mail_from="worker@example.com",
        smtp_backoff_seconds=42,
        **overrides,
    )


@pytest.mark.parametrize(
    ("stage", "reply", "kind", "after"),
    [
        ("mail", "552 5.3.4 Message size exceeds fixed limit", PermanentError, None),
        ("mail", "550 5.7.1 Sender rejected by policy", PermanentError, None),
        ("mail", "553 5.1.8 Sender address rejected", PermanentError, None),
        ("mail", "530 5.7.0 Authentication required", RetryableError, None),
        ("mail", "451 4.3.0 Temporary local problem", RetryableError, 42),
        ("mail", "452 4.3.1 Insufficient system storage", RetryableError, None),
        ("mail", "421 4.3.2 Shutting down", RetryableError, 42),
        ("rcpt", "550 5.1.1 Mailbox unavailable", PermanentError, None),
        ("rcpt", "553 5.1.3 Bad recipient address syntax", PermanentError, None),
        ("rcpt", "451 4.3.0 Temporary local problem", RetryableError, 42),
        ("rcpt", "450 4.2.1 Mailbox busy", RetryableError, None),
        ("data", "552 5.3.4 Message too big", PermanentError, None),
        ("data", "554 5.7.1 Message rejected as spam", PermanentError, None),
        ("data", "550 5.7.1 Content rejected", PermanentError, None),
        ("data", "451 4.3.0 Temporary local problem", RetryableError, 42),
        ("data", "421 4.3.2 Closing connection", RetryableError, 42),
        ("connect", "421 4.3.2 Service not available", RetryableError, 42),
    ],
)
def test_smtp_replies_are_classified_by_code_and_stage(
    smtp: SmtpServer, stage: Any, reply: str, kind: type[Exception], after: float | None
) -> None:
    if reply.startswith("5"):
        smtp.refuse(stage, reply)
    else:
        smtp.fail_temporarily(stage, reply=reply)
    mailer = Mailer(_settings(smtp))

    async def send() -> Exception:
        try:
            await mailer.send(Mail(to=[Address("a@example.com")], subject="s", text="x"))
        except (PermanentError, RetryableError) as error:
            return error
        finally:
            await mailer.close()
        raise AssertionError("sent")

    error = asyncio.run(send())
    assert type(error) is kind, error
    assert reply.split()[0] in str(error)
    assert getattr(error, "after", None) == after
    assert smtp.received == []


def test_a_too_large_mail_is_archived_at_the_first_refusal(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # Before: "SMTP refused us", retried until MAX_ATTEMPTS.
    start_service(max_attempts=5, retry_base_seconds=0.2, retry_max_seconds=0.2)
    smtp.refuse("data", "552 5.3.4 Message too big for system")
    before = smtp.permanent_failures_served
    msg_id = enqueue(db, {"to": "a@example.com", "subject": "Big", "text": "x"})
    [(archived_id, read_ct, error)] = wait_until(lambda: archived_rows(db), what="the archive")
    assert (archived_id, read_ct) == (msg_id, 1)
    assert error["type"] == "PermanentError"
    assert "at DATA: 552 5.3.4" in error["message"]
    assert smtp.permanent_failures_served - before == 1


# -- no value costs more than a little CPU -------------------------------------------


def test_huge_numbers_are_refused_fast_and_named(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    receipt = {"to": "a@example.com", "template": "payment_receipt"}
    bad = {
        "amount": "1E+30000000",
        "paid_at": "9" * 10_000,
    }
    ids = {}
    started = time.monotonic()
    for field, value in bad.items():
        job = {**receipt, "context": {**CONTEXTS["payment_receipt"], field: value}}
        ids[enqueue(db, job)] = field
    rows = wait_until(lambda: len(archived_rows(db)) == len(ids) and archived_rows(db))
    assert time.monotonic() - started < 5
    for msg_id, read_ct, error in rows:
        assert read_ct == 1
        assert error["message"].startswith(f"context.{ids[msg_id]}: must ")
    health = httpx.get(f"{service.url}/health", timeout=2)
    assert health.status_code == 200
    assert smtp.received == []


def test_templated_jobs_are_refused_at_enqueue_naming_the_fault(
    db: Database, api: tuple[Service, dict[str, str]]
) -> None:
    missing = {k: v for k, v in CONTEXTS["checkup_completed"].items() if k != "results_url"}
    cases = {
        "unknown template 'welcome'": {"template": "welcome", "context": {}},
        "locale: Input should be 'en' or 'ru'": {
            "template": "checkup_completed",
            "locale": "de",
            "context": CONTEXTS["checkup_completed"],
        },
        "'results_url' is undefined": {"template": "checkup_completed", "context": missing},
        "context.amount: must have at most 24 digits": {
            "template": "payment_receipt",
            "context": {**CONTEXTS["payment_receipt"], "amount": "1E+30000000"},
        },
        "context.currency: must be a currency code": {
            "template": "payment_receipt",
            "context": {**CONTEXTS["payment_receipt"], "currency": "rubles"},
        },
    }
    for says, job in cases.items():
        response = post(api, {"to": "a@example.com", **job})
        assert response.status_code == 422, response.text
        assert says in response.json()["message"], response.text
    assert queue_rows(db) == []


def test_the_cli_refuses_a_templated_job_as_the_manual_api_does(
    db: Database,
    api: tuple[Service, dict[str, str]],
    service_settings: Settings,
    tmp_path: Path,
) -> None:
    job = {"to": "a@example.com", "template": "checkup_completed", "context": {}}
    refused = post(api, job)
    assert refused.status_code == 422
    assert "template 'checkup_completed' (en): 'patient_name' is undefined" in refused.text
    ran = run_cli(
        "enqueue", "email_queue", json.dumps(job), settings=service_settings, cwd=tmp_path
    )
    assert ran.code == 1
    assert ran.err.strip() == f"queue-worker: {refused.json()['message']}"
    assert queue_rows(db) == []


def test_a_sender_name_with_a_control_character_stops_start_up() -> None:
    with pytest.raises(ValueError, match="mail_from_name\n.*line breaks or control characters"):
        settings_for(mail_from_name="Queue\x0bWorker")


def test_subjects_and_names_arrive_exactly_as_written(smtp: SmtpServer) -> None:
    # The standard policy's folder moved a space (`%s ’ 😀` arrived as `%s  ’😀`) and
    # split a name in a long To line (`П етрова`).
    subject = "x'); drop table queue_worker.schedules; -- $$ $q$ \\' %L %s \u2019 \U0001f600"
    names = ["Анна Петрова", "Иванов И. И.", "Smith, John", "Мария-Луиза Zoë", "O'Neil 李"]
    to = [Address(f"r{n}@example.com", name) for n, name in enumerate(names)]
    mailer = Mailer(_settings(smtp))

    async def send() -> None:
        await mailer.send(Mail(to=to, cc=to[:2], subject=subject, text="x"))
        await mailer.close()

    asyncio.run(send())
    [received] = smtp.received
    message = assert_valid_mime(received.raw, attachments=0, alternative=False)
    assert str(message["Subject"]) == subject
    assert [a.display_name for a in message["To"].addresses] == names
    assert [a.display_name for a in message["Cc"].addresses] == names[:2]
    assert message["From"].addresses[0].addr_spec == "worker@example.com"
