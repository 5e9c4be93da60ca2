"""The reports_queue processor: a report is fetched by RPC, rendered, and mailed with a CSV.

```json
{"report": "payments_summary", "recipient": "Анна <anna@example.com>",
 "params": {"from": "2026-11-01", "to": "2026-12-01", "currency": "EUR"}, "locale": "ru"}
```

A scheduled report names a period relative to the job instead of dates:
`"params": {"period": "last_week"}` (also `yesterday`, `last_month`), turned into dates
from the day (UTC) the job was enqueued, so a retry the next day reports the same week.

Each report type has a row in `REPORTS`: the model of its params, checked before any
RPC, and how its data becomes a mail. The data comes from the function
`queue_worker.report_<type>(params jsonb) returns jsonb` (supabase/migrations), which
validates the params again. The mail is the `report_ready` template: a summary table
in the body and the full data as a CSV attachment.

CSV files are UTF-8 with a byte order mark (Excel reads BOM-less UTF-8 as the local
ANSI code page and garbles Cyrillic; other tools skip the BOM), comma-separated,
quoted as RFC 4180 says (only fields holding a comma, quote or line break; quotes
doubled), CRLF line ends, one header row of stable column names in every locale.
Amounts are exact decimal strings; values are written as stored.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, timedelta
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.errors import JobError, PermanentError, RetryableError, describe_invalid
from app.jobs import Resources
from app.mail import LOCALES, Attachment, Mail, Mailer
from app.mail_templates import format_amount, format_day
from app.processors import parse_body, parse_job
from app.processors.email import EmailAddress
from app.queue.backend import RpcCaller
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError

# Rows of the summary table shown in the mail; the CSV always holds everything.
MAX_ROWS_SHOWN = 50
# REPORT_MAX_BYTES's default: the largest CSV a report mails.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
TEMPLATE = "report_ready"
MIGRATION = "supabase/migrations/20261127000200_reports.sql"

P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Report:
    """A report ready to mail: the summary table for the body, the rows for the CSV."""

    title: str
    period: str
    columns: list[str]
    rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list[str]]
    filename: str


@dataclass(frozen=True)
class ReportType(Generic[P]):
    """A report: the model of its params, and how its function's result becomes a Report.

    `build(params, data, locale)` runs in a worker thread; it raises ValueError when
    `data` is not what the function should return. `resolve(params, day)`, when given,
    turns relative params into the absolute ones the function takes, as of `day` (the
    UTC date the job was enqueued).
    """

    params: type[P]
    build: Callable[[P, Any, str], Report]
    resolve: Callable[[P, date], P] | None = None


class TooLarge(ValueError):
    """The CSV would be larger than allowed; the message says by what limit."""


def build_csv(
    header: Sequence[str], rows: Iterable[Sequence[str]], max_bytes: int | None = None
) -> bytes:
    """RFC 4180 CSV (CRLF, minimal quoting) in UTF-8 with a BOM, header first.

    With `max_bytes`, raises TooLarge as soon as the file would exceed it: a report too
    large to mail costs the memory of `max_bytes`, not of the whole file.
    """
    line = io.StringIO()
    writer = csv.writer(line, dialect="excel", lineterminator="\r\n")
    parts = [b"\xef\xbb\xbf"]  # the byte order mark
    size = 3
    for row in itertools.chain([header], rows):
        writer.writerow(row)
        part = line.getvalue().encode()
        line.seek(0)
        line.truncate()
        size += len(part)
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"the CSV would be larger than {max_bytes} bytes")
        parts.append(part)
    return b"".join(parts)


def exact(amount: Decimal) -> str:
    """A decimal as plain digits, never in exponent notation: `Decimal("1E+2")` -> `100`."""
    return f"{amount:f}"


def display_amount(amount: Decimal, locale: str) -> str:
    """`1234.50` as `1,234.50` (en) or `1 234,50` (ru), every digit kept (Babel)."""
    return format_amount(amount, locale)


# -- payments_summary ------------------------------------------------------------

PaymentStatus = Literal["pending", "succeeded", "canceled", "refunded"]
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_date(value: object) -> object:
    # pydantic would also take a number of seconds since 1970 as a date.
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        return value
    raise ValueError("must be a date as YYYY-MM-DD")


IsoDate = Annotated[date, BeforeValidator(_iso_date)]


Period = Literal["yesterday", "last_week", "last_month"]


class PaymentsSummaryParams(BaseModel):
    """`from` (inclusive) and `to` (exclusive) are UTC dates; currency and status filter.

    Or `period` instead of the dates: `yesterday`, `last_week` (Monday to Sunday) or
    `last_month`, as of the day the job was enqueued (`resolved()`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_: IsoDate | None = Field(None, alias="from")
    to: IsoDate | None = None
    period: Period | None = None
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    status: PaymentStatus | None = None

    @model_validator(mode="after")
    def _period(self) -> PaymentsSummaryParams:
        if self.period is not None:
            if self.from_ is not None or self.to is not None:
                raise ValueError("give either period or from and to, not both")
            return self
        if self.from_ is None or self.to is None:
            raise ValueError(
                "from and to are required (or a period: yesterday, last_week, last_month)"
            )
        if self.to <= self.from_:
            raise ValueError("to must be after from (to is exclusive)")
        return self

    def resolved(self, day: date) -> PaymentsSummaryParams:
        """These params with `period` turned into dates, as of `day`."""
        if self.period is None:
            return self
        if self.period == "yesterday":
            start, end = day - timedelta(days=1), day
        elif self.period == "last_week":
            end = day - timedelta(days=day.weekday())
            start = end - timedelta(days=7)
        else:
            end = day.replace(day=1)
            start = (end - timedelta(days=1)).replace(day=1)
        return self.model_copy(update={"from_": start, "to": end, "period": None})

    def dates(self) -> tuple[date, date]:
        """`[from, to)`; only for resolved params."""
        if self.from_ is None or self.to is None:
            raise ValueError("params with a period must be resolved first")
        return self.from_, self.to


class _Total(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    currency: str
    status: str
    count: int
    amount: Decimal


class _Payment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    created_at: str
    updated_at: str
    provider: str
    payment_id: str
    status: str
    amount: Decimal
    currency: str
    customer_email: str
    metadata: dict[str, Any]


class _PaymentsSummary(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    payment_count: int
    totals: list[_Total]
    payments: list[_Payment]

    @field_validator("totals", "payments", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        if not isinstance(value, list):
            raise ValueError("must be a list")
        return value


PAYMENT_COLUMNS = [
    "created_at_utc",
    "updated_at_utc",
    "provider",
    "payment_id",
    "status",
    "amount",
    "currency",
    "customer_email",
    "metadata",
]

_TEXTS: dict[str, dict[str, Any]] = {
    "en": {
        "title": "Payments summary",
        "columns": ["Currency", "Status", "Payments", "Total"],
        "status": {
            "pending": "pending",
            "succeeded": "succeeded",
            "canceled": "canceled",
            "refunded": "refunded",
        },
    },
    "ru": {
        "title": "Сводка платежей",
        "columns": ["Валюта", "Статус", "Количество", "Сумма"],
        "status": {
            # A row and a filter stand for several payments: plural.
            "pending": "в ожидании",
            "succeeded": "оплаченные",
            "canceled": "отменённые",
            "refunded": "возвращённые",
        },
    },
}


def period_text(start: date, end: date, locale: str) -> str:
    """`[start, end)` as the days it covers, in the locale's one date format.

    `Nov 1, 2026 – Nov 30, 2026 (UTC)`, `01.11.2026 – 30.11.2026 (UTC)`.
    """
    last = end - timedelta(days=1)
    first = format_day(start, locale)
    days = first if last == start else f"{first} – {format_day(last, locale)}"
    return f"{days} (UTC)"


def _payments_summary(params: PaymentsSummaryParams, data: Any, locale: str) -> Report:
    start, end = params.dates()
    try:
        summary = _PaymentsSummary.model_validate(data)
    except ValidationError as error:
        raise ValueError(describe_invalid(error, root="result")) from None
    texts = _TEXTS[locale]
    labels: dict[str, str] = texts["status"]
    filters = [f for f in (params.currency, params.status and labels[params.status]) if f]
    title = texts["title"] + (f" ({', '.join(filters)})" if filters else "")
    return Report(
        title=title,
        period=period_text(start, end, locale),
        columns=list(texts["columns"]),
        rows=[
            [
                t.currency,
                labels.get(t.status, t.status),
                str(t.count),
                display_amount(t.amount, locale),
            ]
            for t in summary.totals
        ],
        csv_header=PAYMENT_COLUMNS,
        csv_rows=[
            [
                p.created_at,
                p.updated_at,
                p.provider,
                p.payment_id,
                p.status,
                exact(p.amount),
                p.currency,
                p.customer_email,
                json.dumps(p.metadata, ensure_ascii=False, separators=(",", ":")),
            ]
            for p in summary.payments
        ],
        filename=f"payments_summary_{start}_{end}.csv",
    )


# Report type -> its params model and builder. Its data comes from report_<type>.
REPORTS: dict[str, ReportType[Any]] = {
    "payments_summary": ReportType(
        PaymentsSummaryParams, _payments_summary, PaymentsSummaryParams.resolved
    ),
}


# -- the job ---------------------------------------------------------------------


def _bounded_address(value: object) -> object:
    if isinstance(value, str) and len(value) > 320:
        raise ValueError("is longer than 320 characters")
    return value


class ReportJob(BaseModel):
    """A report to build and mail to `recipient`; `params` are checked by the report type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: str = Field(max_length=64)
    recipient: Annotated[EmailAddress, BeforeValidator(_bounded_address)]
    params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    locale: str | None = Field(None, max_length=8)

    @field_validator("params")
    @classmethod
    def _small_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked in full by the report type later; bounded here so that a job's
        # params never take more than a few KiB, whoever enqueues it.
        if len(json.dumps(value, ensure_ascii=False, default=str).encode()) > 16 * 1024:
            raise ValueError("is larger than 16384 bytes")
        return value

    @field_validator("report")
    @classmethod
    def _known_report(cls, value: str) -> str:
        if value not in REPORTS:
            raise ValueError(f"unknown report type {value!r}; known: {', '.join(sorted(REPORTS))}")
        return value

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str | None) -> str | None:
        if value is not None and value not in LOCALES:
            raise ValueError(f"must be one of {', '.join(LOCALES)}")
        return value


def rpc_failure(function: str, error: RpcError) -> JobError:
    """What a failed report RPC means for the job.

    A class 22 error is the function refusing the params (HTTP 400): permanent. Anything
    else is the platform or our deployment, which a retry after a fix can save.
    """
    if error.transient:
        return RetryableError(str(error))
    if error.status == 400 and (error.code or "").startswith("22"):
        return PermanentError(f"report refused by {function}: {error.message}")
    if error.status == 404:
        return RetryableError(
            f"{error}; create the function queue_worker.{function}(params jsonb) by applying "
            f"{MIGRATION}, and expose the schema to the API"
        )
    if error.status in (401, 403):
        return RetryableError(
            f"{error}; SUPABASE_SERVICE_ROLE_KEY must be the service_role (secret) key, and "
            f"service_role needs execute on queue_worker.{function} ({MIGRATION} grants it)"
        )
    return RetryableError(str(error))


def _params(job: ReportJob) -> BaseModel:
    """The job's params, checked by its report type; PermanentError names the field."""
    kind = REPORTS[job.report]  # the model accepts known types only
    try:
        params: BaseModel = kind.params.model_validate(job.params)
        return params
    except ValidationError as error:
        problems = describe_invalid(error, root="params", within="params")
        raise PermanentError(f"invalid {job.report} params: {problems}") from None


class ReportsProcessor:
    """Fetches the report a message names, renders it and mails it with its CSV."""

    model = ReportJob

    def __init__(
        self,
        rpc: RpcCaller,
        mailer: Mailer,
        *,
        max_rows_shown: int = MAX_ROWS_SHOWN,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._rpc = rpc
        self._mailer = mailer
        self._max_rows_shown = max_rows_shown
        self._max_bytes = max_bytes

    def validate(self, body: Any) -> None:
        _params(parse_body(self.model, body))

    async def __call__(self, message: QueueMessage) -> None:
        job = parse_job(self.model, message)
        kind = REPORTS[job.report]  # the model accepts known types only
        params = _params(job)
        if kind.resolve is not None:
            params = kind.resolve(params, message.enqueued_at.astimezone(UTC).date())
        function = f"report_{job.report}"
        arguments = params.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            data = await self._rpc.call(function, {"params": arguments})
        except RpcError as error:
            raise rpc_failure(function, error) from None
        locale = job.locale or self._mailer.default_locale
        # Building the CSV and rendering the templates take a while for a large
        # report: off the event loop, so webhooks and other jobs are not held up.
        mail = await asyncio.to_thread(self._compose, kind, params, data, locale, job)
        await self._mailer.send(mail)

    def _compose(
        self, kind: ReportType[Any], params: BaseModel, data: Any, locale: str, job: ReportJob
    ) -> Mail:
        function = f"report_{job.report}"
        try:
            report = kind.build(params, data, locale)
        except ValueError as error:
            # Our function and this worker disagree: a deployment to fix, then retry.
            raise RetryableError(
                f"{function} returned an unexpected result ({error}); apply the latest "
                f"{MIGRATION} and deploy the matching worker"
            ) from None
        try:
            content = build_csv(report.csv_header, report.csv_rows, self._max_bytes)
        except TooLarge as error:
            raise PermanentError(
                f"report too large: {error} (REPORT_MAX_BYTES={self._max_bytes}, "
                f"{len(report.csv_rows)} rows); ask for a shorter period or a narrower filter"
            ) from None
        shown = report.rows[: self._max_rows_shown]
        rendered = self._mailer.templates.render(
            TEMPLATE,
            locale,
            {
                "title": report.title,
                "period": report.period,
                "columns": report.columns,
                "rows": shown,
                "row_count": len(report.csv_rows),
                "truncated": len(shown) < len(report.rows),
                "filename": report.filename,
            },
        )
        return Mail(
            to=[job.recipient],
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            attachments=[Attachment(report.filename, "text/csv", content)],
        )


def processor(resources: Resources) -> ReportsProcessor:
    """The built-in `reports` processor (registered in app/processors/registry.py)."""
    return ReportsProcessor(
        resources.rpc, resources.mailer, max_bytes=resources.settings.report_max_bytes
    )
