"""Reports end to end: data from the database, mailed as a summary with every row in a CSV.

An app enqueues a report job with `pgmq.send`; the trigger rings the service through
pg_net; the service claims it through the RPC gateway, validates the params, calls
`queue_worker.report_payments_summary` through the gateway, renders the summary and the
CSV off the event loop and mails them over SMTP. Payments are inserted into
`queue_worker.payments` as the owner, the way the payments processor leaves them.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from psycopg.types.json import Jsonb

from app.errors import PermanentError, RetryableError
from app.processors.reports import (
    MIGRATION,
    PAYMENT_COLUMNS,
    build_csv,
    display_amount,
    exact,
    rpc_failure,
)
from app.queue.rpc import RpcError
from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.rpc_gateway import GatewayHandle
from tests.support.settings import FAST_RETRIES
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, queue_rows

QUEUE = "reports_queue"
FUNCTION = "report_payments_summary"
NOVEMBER = {"from": "2026-11-01", "to": "2026-12-01"}

# -- helpers ------------------------------------------------------------------------


def enqueue(db: Database, job: dict[str, Any]) -> int:
    with db.connect(role="qw_postgres") as conn:
        row = conn.execute(
            "select * from pgmq.send(%s, %s::jsonb)", [QUEUE, json.dumps(job)]
        ).fetchone()
    assert row is not None
    return int(row[0])


def report_job(params: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "report": "payments_summary",
        "recipient": "finance@example.com",
        "params": NOVEMBER if params is None else params,
        **fields,
    }


def payment(
    payment_id: str,
    status: str,
    amount: str,
    currency: str,
    created_at: str,
    *,
    provider: str = "stripe",
    customer_email: str = "customer@example.com",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "provider": provider,
        "payment_id": payment_id,
        "status": status,
        "amount": Decimal(amount),
        "currency": currency,
        "customer_email": customer_email,
        "metadata": Jsonb(metadata or {}),
        "created_at": created_at,
    }


def insert_payments(db: Database, payments: list[dict[str, Any]]) -> None:
    with db.connect(role="qw_postgres") as conn, conn.cursor() as cursor:
        cursor.executemany(
            """
            insert into queue_worker.payments
              (provider, payment_id, status, amount, currency, customer_email, metadata,
               created_at, updated_at)
            values (%(provider)s, %(payment_id)s, %(status)s, %(amount)s, %(currency)s,
                    %(customer_email)s, %(metadata)s, %(created_at)s,
                    %(created_at)s::timestamptz + interval '90 seconds')
            """,
            payments,
        )


def stored_payments(
    db: Database, start: str, end: str, *, currency: str | None = None, status: str | None = None
) -> list[tuple[Any, ...]]:
    """The payments a report of [start, end) must list, in its order, straight from the table."""
    with db.connect() as conn:
        return conn.execute(
            """
            select created_at, updated_at, provider, payment_id, status, amount, currency,
                   customer_email, metadata
              from queue_worker.payments
             where created_at >= %s::date::timestamp at time zone 'UTC'
               and created_at < %s::date::timestamp at time zone 'UTC'
               and (%s::text is null or currency = %s::text)
               and (%s::text is null or status = %s::text)
             order by created_at, provider, payment_id
            """,
            [start, end, currency, currency, status, status],
        ).fetchall()


def utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def csv_attachment(mail: EmailMessage) -> tuple[str, bytes]:
    [part] = list(mail.iter_attachments())
    assert part.get_content_type() == "text/csv"
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    filename = part.get_filename()
    assert filename is not None
    return filename, data


def parse_csv(data: bytes) -> list[list[str]]:
    assert data.startswith(b"\xef\xbb\xbf"), "UTF-8 BOM, so Excel reads it as UTF-8"
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def assert_csv_matches(rows: list[list[str]], stored: list[tuple[Any, ...]]) -> None:
    header, *body = rows
    assert header == PAYMENT_COLUMNS
    assert len(body) == len(stored)
    for line, row in zip(body, stored, strict=True):
        created, updated, provider, payment_id, status, amount, currency, email, metadata = row
        assert line[:5] == [utc(created), utc(updated), provider, payment_id, status]
        assert Decimal(line[5]) == amount, (payment_id, line[5], amount)  # exact, not float
        assert line[6:8] == [currency, email]
        assert json.loads(line[8]) == metadata


def html_table(mail: EmailMessage) -> list[list[str]]:
    body = mail.get_body(("html",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    # The report's table is the one with a header row; the layout's tables have none.
    [body_rows] = re.findall(r"</thead>\s*<tbody>(.*?)</tbody>", content, flags=re.S)
    return [
        [html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", body_rows, flags=re.S)
    ]


def plain_text(mail: EmailMessage) -> str:
    body = mail.get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


# -- end to end ---------------------------------------------------------------------


def test_payments_summary_is_mailed_with_every_payment_in_the_csv(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    insert_payments(
        db,
        [
            payment("pi_1", "succeeded", "10.25", "EUR", "2026-11-01 00:00:00+00"),
            payment("pi_2", "succeeded", "20.254321", "EUR", "2026-11-06 10:00:00+00"),
            payment("pi_3", "refunded", "5", "EUR", "2026-11-07 10:00:00+00"),
            payment("pi_4", "pending", "1000", "USD", "2026-11-08 12:30:45+00"),
            payment(
                "pi_5",
                "succeeded",
                "1234567.89",
                "RUB",
                "2026-11-30 23:59:59+00",
                metadata={"order": 'A-1, "gift"', "lines": 2},
            ),
            # Outside the period: `from` is inclusive, `to` exclusive.
            payment("pi_early", "succeeded", "1", "EUR", "2026-10-31 23:59:59+00"),
            payment("pi_late", "succeeded", "1", "EUR", "2026-12-01 00:00:00+00"),
        ],
    )
    msg_id = enqueue(db, report_job(recipient="Finance <finance@example.com>"))

    [mail] = smtp.wait_for(1)
    assert mail["To"] == "Finance <finance@example.com>"
    assert list(smtp.received[0].rcpt_tos) == ["finance@example.com"]
    assert mail["Subject"] == "Report ready: Payments summary"  # the default locale, en
    # The summary: per currency and status, count and total, every digit kept.
    assert html_table(mail) == [
        ["EUR", "succeeded", "2", "30.504321"],
        ["EUR", "refunded", "1", "5.00"],
        ["RUB", "succeeded", "1", "1,234,567.89"],
        ["USD", "pending", "1", "1,000.00"],
    ]
    text = plain_text(mail)
    assert "Nov 1, 2026 – Nov 30, 2026 (UTC)" in text
    assert "payments_summary_2026-11-01_2026-12-01.csv (rows: 5)" in text

    filename, data = csv_attachment(mail)
    assert filename == "payments_summary_2026-11-01_2026-12-01.csv"
    rows = parse_csv(data)
    assert_csv_matches(rows, stored_payments(db, "2026-11-01", "2026-12-01"))
    assert [row[3] for row in rows[1:]] == ["pi_1", "pi_2", "pi_3", "pi_4", "pi_5"]

    wait_until(lambda: queue_rows(db, QUEUE) == [], what="the report job to be deleted")
    assert archived_rows(db, QUEUE) == []
    assert msg_id > 0


def test_russian_report_with_filters_arrives_intact(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    insert_payments(
        db,
        [
            payment(
                "заказ-1",
                "succeeded",
                "1000.5",
                "RUB",
                "2026-11-02 09:00:00+00",
                provider="юкасса",
                customer_email="анна@пример.рф",
                metadata={"товар": "Подписка «Год», 12 мес."},
            ),
            payment("заказ-2", "succeeded", "234", "RUB", "2026-11-03 09:00:00+00"),
            payment("заказ-3", "pending", "99", "RUB", "2026-11-03 10:00:00+00"),
            payment("pi_eur", "succeeded", "7", "EUR", "2026-11-03 11:00:00+00"),
        ],
    )
    enqueue(
        db,
        report_job(
            {**NOVEMBER, "currency": "RUB", "status": "succeeded"},
            recipient="Анна Петрова <anna@example.com>",
            locale="ru",
        ),
    )

    [mail] = smtp.wait_for(1)
    assert mail["To"] == "Анна Петрова <anna@example.com>"
    assert mail["Subject"] == "Отчёт «Сводка платежей (RUB, оплаченные)» готов"
    assert html_table(mail) == [["RUB", "оплаченные", "2", "1\u00a0234,50"]]
    html_part = mail.get_body(("html",))
    assert html_part is not None
    assert "01.11.2026 – 30.11.2026 (UTC)" in html_part.get_content()
    assert "Полный отчёт — во вложении" in plain_text(mail)

    _, data = csv_attachment(mail)
    rows = parse_csv(data)
    stored = stored_payments(db, "2026-11-01", "2026-12-01", currency="RUB", status="succeeded")
    assert_csv_matches(rows, stored)
    assert rows[1][2:4] == ["юкасса", "заказ-1"]
    assert rows[1][7] == "анна@пример.рф"
    assert json.loads(rows[1][8]) == {"товар": "Подписка «Год», 12 мес."}
    wait_until(lambda: queue_rows(db, QUEUE) == [], what="the report job to be deleted")


def test_bad_report_jobs_are_archived_with_their_error_and_never_queried(
    db: Database,
    service: Service,
    sender: PgNetSender,
    smtp: SmtpServer,
    gateway: GatewayHandle,
) -> None:
    calls_before = gateway.call_count(FUNCTION, "queue_worker")
    jobs = {
        "unknown_type": {**report_job(), "report": "revenue_forecast"},
        "bad_date": report_job({"from": "2026-02-30", "to": "2026-03-01"}),
        "not_a_date": report_job({"from": 1762000000, "to": "2026-12-01"}),
        "backwards": report_job({"from": "2026-12-01", "to": "2026-11-01"}),
        "empty_period": report_job({"from": "2026-11-01", "to": "2026-11-01"}),
        "unknown_param": report_job({**NOVEMBER, "region": "eu"}),
        "bad_currency": report_job({**NOVEMBER, "currency": "euro"}),
        "no_recipient": {"report": "payments_summary", "params": NOVEMBER},
        "unknown_field": report_job(format="xlsx"),
        "bad_locale": report_job(locale="de"),
    }
    ids = {name: enqueue(db, job) for name, job in jobs.items()}

    wait_until(lambda: len(archived_rows(db, QUEUE)) == len(jobs), what="every bad job archived")
    errors = {msg_id: error for msg_id, _, error in archived_rows(db, QUEUE)}
    message = {name: errors[msg_id]["message"] for name, msg_id in ids.items()}
    assert {errors[msg_id]["type"] for msg_id in ids.values()} == {"PermanentError"}
    assert "report: Value error, unknown report type 'revenue_forecast'" in message["unknown_type"]
    assert "known: payments_summary" in message["unknown_type"]
    assert "invalid payments_summary params: params.from:" in message["bad_date"]
    assert "params.from: Value error, must be a date as YYYY-MM-DD" in message["not_a_date"]
    assert "to must be after from (to is exclusive)" in message["backwards"]
    assert "to must be after from" in message["empty_period"]
    assert "params.region: Extra inputs are not permitted" in message["unknown_param"]
    assert "params.currency: String should match pattern" in message["bad_currency"]
    assert "recipient: Field required" in message["no_recipient"]
    assert "format: Extra inputs are not permitted" in message["unknown_field"]
    assert "locale: Value error, must be one of en, ru" in message["bad_locale"]

    assert smtp.messages == []
    assert queue_rows(db, QUEUE) == []
    # Refused before any RPC: the database was never asked.
    assert gateway.call_count(FUNCTION, "queue_worker") == calls_before


def test_manual_api_refuses_bad_report_params_at_enqueue(
    db: Database, start_service: ServiceFactory
) -> None:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, queues=[QUEUE], api_token=token)
    response = httpx.post(
        f"{service.url}/queues/{QUEUE}/messages",
        json=report_job({"from": "2026-12-01", "to": "2026-11-01"}),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_message"
    assert "to must be after from" in response.json()["message"]
    assert queue_rows(db, QUEUE) == []


def test_a_report_the_function_refuses_is_archived_with_its_reason(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # One payment more than a report may hold: only the function knows, and says so
    # with SQLSTATE 22023 (HTTP 400), which no retry can change.
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            """
            insert into queue_worker.payments
              (provider, payment_id, status, amount, currency, customer_email, created_at)
            select 'stripe', 'pi_' || n, 'succeeded', 1, 'EUR', 'c@example.com',
                   timestamptz '2026-11-01 00:00:00+00' + n * interval '1 second'
              from generate_series(1, 100001) n
            """
        )
    msg_id = enqueue(db, report_job())

    [(archived_id, read_ct, error)] = wait_until(
        lambda: archived_rows(db, QUEUE), timeout=30, what="the report archived"
    )
    assert (archived_id, read_ct) == (msg_id, 1)  # never retried
    assert error["type"] == "PermanentError"
    assert error["message"] == (
        f"report refused by {FUNCTION}: the report would hold 100001 payments, "
        "more than the 100000 one report may hold"
    )
    assert smtp.messages == []


def test_rpc_failure_is_retried_and_the_report_mailed_after_recovery(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    gateway: GatewayHandle,
) -> None:
    insert_payments(db, [payment("pi_1", "succeeded", "42.42", "EUR", "2026-11-05 10:00:00+00")])
    start_service(**FAST_RETRIES)
    gateway.fail_functions(FUNCTION)  # 503 PGRST000 for the report only
    try:
        msg_id = enqueue(db, report_job())
        wait_until(
            lambda: [row[:2] for row in queue_rows(db, QUEUE) if row[1] >= 2] == [(msg_id, 2)],
            timeout=20,
            what="a second attempt",
        )
        assert smtp.messages == []
        assert archived_rows(db, QUEUE) == []
    finally:
        gateway.fail_functions()

    [mail] = smtp.wait_for(1, timeout=20)
    assert html_table(mail) == [["EUR", "succeeded", "1", "42.42"]]
    wait_until(lambda: queue_rows(db, QUEUE) == [], what="the report job to be deleted")
    assert archived_rows(db, QUEUE) == []


@pytest.mark.parametrize("fault", ["missing_function", "no_permission"])
def test_deployment_faults_are_retryable_and_say_what_to_fix(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    fault: str,
) -> None:
    # With one attempt allowed the retryable error is archived at once, so its text shows.
    start_service(max_attempts=1)
    break_it, fix_it = {
        "missing_function": (
            f"alter function queue_worker.{FUNCTION}(jsonb) rename to {FUNCTION}_gone",
            f"alter function queue_worker.{FUNCTION}_gone(jsonb) rename to {FUNCTION}",
        ),
        "no_permission": (
            f"revoke execute on function queue_worker.{FUNCTION}(jsonb) from service_role",
            f"grant execute on function queue_worker.{FUNCTION}(jsonb) to service_role",
        ),
    }[fault]
    with db.connect(role="qw_postgres") as conn:
        conn.execute(break_it)
    try:
        enqueue(db, report_job())
        [(_, _, error)] = wait_until(lambda: archived_rows(db, QUEUE), what="the job archived")
    finally:
        with db.connect(role="qw_postgres") as conn:
            conn.execute(fix_it)
    assert error["type"] == "RetryableError"
    if fault == "missing_function":
        assert "(HTTP 404)" in error["message"]
        assert f"by applying {MIGRATION}" in error["message"]
    else:
        assert "(HTTP 403)" in error["message"]
        assert "service_role needs execute" in error["message"]
    assert smtp.messages == []


def test_large_report_is_mailed_with_every_row(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            """
            insert into queue_worker.payments
              (provider, payment_id, status, amount, currency, customer_email, metadata,
               created_at)
            select 'stripe', 'pi_' || n,
                   (array['pending', 'succeeded', 'canceled', 'refunded'])[n % 4 + 1],
                   n * 1.000001, (array['EUR', 'USD', 'RUB'])[n % 3 + 1],
                   'c' || n || '@example.com', jsonb_build_object('n', n),
                   timestamptz '2026-11-01 00:00:00+00' + n * interval '1 minute'
              from generate_series(1, 20000) n
            """
        )
        total = conn.execute(
            "select sum(amount) from queue_worker.payments where status = 'succeeded'"
        ).fetchone()
    assert total is not None
    enqueue(db, report_job())

    [mail] = smtp.wait_for(1, timeout=60)
    summary = html_table(mail)
    assert len(summary) == 12  # three currencies by four statuses
    assert sum(int(row[2]) for row in summary) == 20000
    succeeded = sum(Decimal(row[3].replace(",", "")) for row in summary if row[1] == "succeeded")
    assert succeeded == total[0]
    assert "(rows: 20000)" in plain_text(mail)
    _, data = csv_attachment(mail)
    rows = parse_csv(data)
    assert len(rows) == 20001
    assert_csv_matches(rows, stored_payments(db, "2026-11-01", "2026-12-01"))
    wait_until(lambda: queue_rows(db, QUEUE) == [], what="the report job to be deleted")


def test_a_report_larger_than_report_max_bytes_is_refused_at_once_with_the_limit(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # The hostile run: 3,000 payments with 16 KiB of metadata each (a 48 MB CSV) was
    # built, mailed and refused, five times over.
    start_service(report_max_bytes=1024 * 1024, **FAST_RETRIES)
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            """
            insert into queue_worker.payments
              (provider, payment_id, status, amount, currency, customer_email, metadata,
               created_at)
            select 'stripe', 'pi_' || n, 'succeeded', 1, 'EUR', 'c' || n || '@example.com',
                   jsonb_build_object('blob', repeat('x', 16384)),
                   timestamptz '2026-11-01 00:00:00+00' + n * interval '1 minute'
              from generate_series(1, 3000) n
            """
        )
    msg_id = enqueue(db, report_job())
    [(archived_id, read_ct, error)] = wait_until(
        lambda: archived_rows(db, QUEUE), timeout=60, what="the archive"
    )
    assert (archived_id, read_ct) == (msg_id, 1)
    assert error["type"] == "PermanentError"
    assert error["message"].startswith(
        "report too large: the CSV would be larger than 1048576 bytes "
        "(REPORT_MAX_BYTES=1048576, 3000 rows)"
    )
    assert smtp.received == []


def test_an_empty_report_says_so(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    enqueue(db, report_job(locale="ru"))
    enqueue(db, report_job(recipient="b@example.com"))
    mails = smtp.wait_for(2)
    texts = sorted(plain_text(mail) for mail in mails)
    assert "There is no data for this period." in texts[0]
    assert "За этот период данных нет." in texts[1]
    for mail in mails:
        html_part = mail.get_body(("html",))
        assert html_part is not None and "<thead>" not in html_part.get_content()


def test_summary_longer_than_the_mail_shows_is_cut_and_the_csv_is_not(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer
) -> None:
    currencies = [f"C{chr(65 + i)}X" for i in range(13)]  # 13 currencies x 4 statuses = 52
    statuses = ["pending", "succeeded", "canceled", "refunded"]
    insert_payments(
        db,
        [
            payment(f"p_{c}_{s}", s, "1", c, "2026-11-10 10:00:00+00")
            for c in currencies
            for s in statuses
        ],
    )
    enqueue(db, report_job())
    [mail] = smtp.wait_for(1)
    summary = html_table(mail)
    assert len(summary) == 50
    assert summary[0][:2] == ["CAX", "pending"]
    assert "Shown: 50 of 52 rows." in plain_text(mail)
    _, data = csv_attachment(mail)
    assert len(parse_csv(data)) == 53


# -- the function through the REST API ----------------------------------------------


@pytest.mark.parametrize(
    ("params", "sqlstate", "text"),
    [
        ({"from": "2026-11-01"}, "22007", "params.to: must be a date as YYYY-MM-DD"),
        ({"from": "2026-02-30", "to": "2026-03-01"}, "22008", "params.from: 2026-02-30 is not"),
        ({"from": "2026-12-01", "to": "2026-11-01"}, "22023", "params.to: must be after"),
        ({**NOVEMBER, "region": "eu"}, "22023", "params: unknown key(s): region"),
        ({**NOVEMBER, "currency": "eur"}, "22023", "params.currency: must be three"),
        ({**NOVEMBER, "status": "paid"}, "22023", "params.status: must be one of"),
        ([], "22023", "params must be a JSON object"),
    ],
)
def test_function_refuses_bad_params_with_a_class_22_error(
    db: Database, gateway: GatewayHandle, params: Any, sqlstate: str, text: str
) -> None:
    response = httpx.post(
        gateway.rpc_url(FUNCTION),
        json={"params": params},
        headers={
            "apikey": gateway.service_role_key,
            "Authorization": f"Bearer {gateway.service_role_key}",
            "Content-Profile": "queue_worker",
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == sqlstate
    assert body["message"].startswith(text)


def test_function_is_refused_to_api_roles(db: Database, gateway: GatewayHandle) -> None:
    for key in (gateway.anon_key, gateway.authenticated_key):
        response = httpx.post(
            gateway.rpc_url(FUNCTION),
            json={"params": NOVEMBER},
            headers={
                "apikey": gateway.anon_key,
                "Authorization": f"Bearer {key}",
                "Content-Profile": "queue_worker",
            },
        )
        assert response.status_code in (401, 403), response.text
        assert response.json()["code"] == "42501"


# -- units --------------------------------------------------------------------------


def test_csv_is_rfc4180_utf8_with_bom_and_round_trips() -> None:
    rows = [
        ["plain", "with, comma", 'with "quotes"', "line\nbreak", "Цена: 1 234,50 ₽"],
        ["", " padded ", "=1+1", "'", "tab\there"],
    ]
    data = build_csv(["a", "b", "c", "d", "e"], rows)
    assert data.startswith("\ufeff".encode())
    text = data.decode("utf-8-sig")
    assert text.splitlines(keepends=True)[0] == "a,b,c,d,e\r\n"
    assert '"with, comma","with ""quotes""","line\nbreak"' in text
    assert text.endswith("\r\n")
    assert list(csv.reader(io.StringIO(text, newline=""))) == [["a", "b", "c", "d", "e"], *rows]


def test_amounts_are_exact_decimal_strings() -> None:
    assert exact(Decimal("1E+2")) == "100"
    assert exact(Decimal("0.000001")) == "0.000001"
    assert exact(Decimal("99999999999999.999999")) == "99999999999999.999999"
    assert display_amount(Decimal("1234567.5"), "en") == "1,234,567.50"
    assert display_amount(Decimal("1234567.50"), "ru") == "1\u00a0234\u00a0567,50"
    assert display_amount(Decimal("0.000001"), "en") == "0.000001"


@pytest.mark.parametrize(
    ("status", "code", "kind", "says"),
    [
        (400, "22023", PermanentError, "report refused by report_x: bad"),
        (400, "22008", PermanentError, "report refused by report_x: bad"),
        (None, None, RetryableError, "no response"),
        (503, "PGRST000", RetryableError, "HTTP 503"),
        (504, "PGRST003", RetryableError, "HTTP 504"),
        (404, "PGRST202", RetryableError, f"by applying {MIGRATION}"),
        (401, "42501", RetryableError, "SUPABASE_SERVICE_ROLE_KEY"),
        (403, "42501", RetryableError, "service_role needs execute"),
        (400, "P0001", RetryableError, "HTTP 400"),
    ],
)
def test_rpc_failures_are_classified(
    status: int | None, code: str | None, kind: type[Exception], says: str
) -> None:
    error = rpc_failure("report_x", RpcError("report_x", status, "bad", code=code))
    assert type(error) is kind
    assert says in str(error)
