"""Jobs on a schedule, against real pg_cron (Debian's postgresql-15-cron, 1.4).

pg_cron must be in shared_preload_libraries, so these tests run a PostgreSQL 15
cluster of their own (tests/support/cron.py), bootstrapped like the main test bed:
the migrations are applied as the non-superuser owner while pg_cron is absent, then
pg_cron is enabled and granted as Supabase does it. Without pg_cron on the machine
they are skipped, with the reason, except under CI=true, where they fail.

Only `test_every_minute_schedule_is_processed_once_by_two_replicas` waits for pg_cron's
minute; the others call what pg_cron would call (`queue_worker.run_schedule`) or read
`cron.job`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import ValidationError

from app.main import create_app
from app.processors.reports import PaymentsSummaryParams
from app.queue import schedules
from app.queue.sql import SqlQueue
from tests.conftest import MAIL_FROM, register_in_vault
from tests.support.cli import Ran, run_cli
from tests.support.cron import (
    CRON_DATABASE,
    cron_cluster,
    enable_pg_cron,
    forget_schedules,
    pg_cron_missing,
)
from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, reset
from tests.support.process import service_process
from tests.support.rpc_gateway import GatewayHandle, running_gateway
from tests.support.scrape import sample
from tests.support.servers import serve_in_thread
from tests.support.settings import settings_against
from tests.support.smtp import SmtpServer
from tests.support.tools import in_ci
from tests.support.waiting import wait_until
from tests.test_reports import csv_attachment, insert_payments, parse_csv, payment

API_TOKEN = "schedules-" + secrets.token_urlsafe(16)
# A job body that would break out of any SQL built by pasting it into a string.
HOSTILE = "x'); drop table queue_worker.schedules; -- $$ $q$ \\' %L %s \u2019 \U0001f600"
WEEKLY_REPORT = {
    "cron": "0 9 * * 1",
    "queue": "reports_queue",
    "job": {
        "report": "payments_summary",
        "recipient": "finance@example.com",
        "params": {"period": "last_week"},
    },
}


# -- the cluster ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cron_server() -> Iterator[Database]:
    """A pg_cron cluster, bootstrapped like the main test bed, with pg_cron enabled."""
    missing = pg_cron_missing()
    if missing is not None:
        if in_ci():
            pytest.fail(f"{missing} (CI=true: the schedule tests must run)", pytrace=False)
        pytest.skip(f"pg_cron tests skipped: {missing}")
    with cron_cluster() as url:
        db = Database(url=url, name=CRON_DATABASE)
        bootstrap(db)  # the migrations, applied before pg_cron is there
        enable_pg_cron(db)
        yield db


@pytest.fixture
def cron_db(cron_server: Database) -> Database:
    """The pg_cron database without schedules, cron jobs, messages or secrets."""
    forget_schedules(cron_server)
    reset(cron_server)
    return cron_server


@pytest.fixture(scope="session")
def cron_gateway(cron_server: Database) -> Iterator[GatewayHandle]:
    with running_gateway(cron_server) as handle:
        yield handle


@pytest.fixture
def cron_sender(cron_db: Database) -> Iterator[PgNetSender]:
    with running_sender(cron_db) as running:
        yield running


@pytest.fixture
def api(
    cron_db: Database, cron_gateway: GatewayHandle, smtp: SmtpServer, cron_sender: PgNetSender
) -> Iterator[httpx.Client]:
    """The service against the pg_cron database, its manual API open with API_TOKEN."""
    settings = settings_against(cron_gateway, smtp, api_token=API_TOKEN, mail_from=MAIL_FROM)
    with serve_in_thread(create_app(settings)) as url:
        register_in_vault(cron_db, url, settings.webhook_secret.get_secret_value())
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
        ) as client:
            yield client


def schedule(db: Database, name: str, cron: str, queue: str, job: dict[str, Any]) -> int:
    with db.connect(role="service_role") as conn:
        row = conn.execute(
            "select queue_worker.schedule(%s, %s, %s, %s::jsonb)",
            [name, cron, queue, json.dumps(job)],
        ).fetchone()
    assert row is not None
    return int(row[0])


def cron_jobs(db: Database) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "select jobid, jobname, schedule, command, username, active from cron.job order by 1"
        ).fetchall()


def run_schedule(db: Database, name: str) -> tuple[int, date]:
    """What pg_cron runs, as the job's owner: the new msg_id and the day it was enqueued."""
    with db.connect(role=OWNER_ROLE) as conn:
        row = conn.execute(
            "select queue_worker.run_schedule(%s), (now() at time zone 'UTC')::date", [name]
        ).fetchone()
    assert row is not None
    return int(row[0]), row[1]


def email(subject: str, to: str = "ops@example.com") -> dict[str, Any]:
    return {"to": to, "subject": subject, "text": "scheduled"}


# -- without pg_cron ------------------------------------------------------------------


def test_without_pg_cron_schedule_says_to_enable_it(db: Database) -> None:
    # The main test bed has no pg_cron; its migrations applied all the same.
    with db.connect(role="service_role") as conn:
        status = conn.execute("select * from queue_worker.cron_status()").fetchone()
        with pytest.raises(psycopg.errors.FeatureNotSupported) as raised:
            conn.execute(
                "select queue_worker.schedule('nightly', '0 3 * * *', 'email_queue', %s::jsonb)",
                [json.dumps(email("nightly"))],
            )
        listed = conn.execute("select * from queue_worker.list_schedules()").fetchall()
        removed = conn.execute("select queue_worker.unschedule('nightly')").fetchone()
    assert status == (None, False, None, False)
    assert "pg_cron is not enabled" in raised.value.diag.message_primary
    hint = raised.value.diag.message_hint or ""
    assert "Enable the pg_cron extension" in hint
    assert "Dashboard > Integrations > Cron" in hint and "create extension pg_cron" in hint
    assert listed == [] and removed == (False,)


def test_without_pg_cron_the_api_answers_409_with_the_fix(
    db: Database, gateway: GatewayHandle, smtp: SmtpServer
) -> None:
    settings = settings_against(gateway, smtp, api_token=API_TOKEN)
    with serve_in_thread(create_app(settings)) as url:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        put = httpx.put(
            f"{url}/schedules/weekly-payments-summary", json=WEEKLY_REPORT, headers=headers
        )
        listed = httpx.get(f"{url}/schedules", headers=headers)
    assert put.status_code == 409, put.text
    assert put.json()["error"] == "cron_unavailable"
    assert "Enable the pg_cron extension" in put.json()["message"]
    assert listed.json() == {
        "cron": {"version": None, "usable": False, "time_zone": None, "seconds": False},
        "schedules": [],
    }


def test_the_cli_lists_sets_and_removes_schedules(
    cron_db: Database, cron_gateway: GatewayHandle, smtp: SmtpServer, tmp_path: Path
) -> None:
    settings = settings_against(cron_gateway, smtp, mail_from=MAIL_FROM)
    job = json.dumps(WEEKLY_REPORT["job"])

    def cli(*args: str) -> Ran:
        return run_cli(*args, settings=settings, cwd=tmp_path)

    put = cli("schedules", "set", "weekly-payments-summary", "0 9 * * 1", "reports_queue", job)
    assert put.code == 0, put.err
    assert "weekly-payments-summary  0 9 * * 1  reports_queue  yes" in put.out

    listed = cli("schedules", "--json")
    assert listed.code == 0, listed.err
    body = json.loads(listed.out)
    assert body["cron"]["version"] == "1.4-1"
    assert [(s["name"], s["queue"], s["job"]) for s in body["schedules"]] == [
        ("weekly-payments-summary", "reports_queue", WEEKLY_REPORT["job"])
    ]
    assert [row[2] for row in cron_jobs(cron_db)] == ["0 9 * * 1"]
    human = cli("schedules")
    assert human.out.splitlines()[0].startswith("pg_cron 1.4-1: times in ")

    # The database names a bad expression; the processor a job that could never succeed.
    nightly = json.dumps(email("nightly"))
    bad_cron = cli("schedules", "set", "nightly", "61 3 * * *", "email_queue", nightly)
    assert bad_cron.code == 1 and "minute field: 61 is outside 0-59" in bad_cron.err
    bad_job = cli("schedules", "set", "nightly", "0 3 * * *", "email_queue", '{"to": "a@b.c"}')
    assert bad_job.code == 1 and "invalid EmailJob message" in bad_job.err, bad_job.err
    assert "Traceback" not in bad_cron.err + bad_job.err

    assert cli("schedules", "remove", "weekly-payments-summary").code == 0
    again = cli("schedules", "remove", "weekly-payments-summary")
    assert again.code == 1 and "no schedule named 'weekly-payments-summary'" in again.err
    assert (
        cron_jobs(cron_db) == [] and json.loads(cli("schedules", "--json").out)["schedules"] == []
    )


def test_without_pg_cron_the_cli_says_how_to_enable_it(
    db: Database, gateway: GatewayHandle, smtp: SmtpServer, tmp_path: Path
) -> None:
    settings = settings_against(gateway, smtp, mail_from=MAIL_FROM)
    job = json.dumps(WEEKLY_REPORT["job"])
    ran = run_cli(
        "schedules",
        "set",
        "weekly",
        "0 9 * * 1",
        "reports_queue",
        job,
        settings=settings,
        cwd=tmp_path,
    )
    assert ran.code == 1
    assert "pg_cron is not enabled" in ran.err and "create extension pg_cron" in ran.err
    listed = run_cli("schedules", settings=settings, cwd=tmp_path)
    assert listed.code == 0 and listed.out.startswith("pg_cron: not enabled")


# -- the SQL functions ------------------------------------------------------------------


def test_schedule_makes_a_pg_cron_job_that_calls_one_fixed_function(cron_db: Database) -> None:
    jobid = schedule(cron_db, "nightly", "0 3 * * *", "email_queue", email("nightly"))
    assert cron_jobs(cron_db) == [
        (
            jobid,
            "queue_worker:nightly",
            "0 3 * * *",
            "select queue_worker.run_schedule('nightly')",
            OWNER_ROLE,  # pg_cron runs it as the owner, who may send to the queue
            True,
        )
    ]
    # The same name again replaces the schedule and keeps its pg_cron job.
    again = schedule(cron_db, "nightly", " 30  4 * * SUN ", "reports_queue", {"n": 2})
    [(same_id, _, cron, *_)] = cron_jobs(cron_db)
    with cron_db.connect(role="service_role") as conn:
        listed = conn.execute(
            "select name, cron, queue_name, job from queue_worker.list_schedules()"
        ).fetchall()
    assert again == same_id == jobid and cron == "30 4 * * sun"
    assert listed == [("nightly", "30 4 * * sun", "reports_queue", {"n": 2})]


def test_a_hostile_job_body_stays_data(cron_db: Database) -> None:
    body = {
        "to": "ops@example.com",
        "subject": HOSTILE,
        "text": "$$; select pg_sleep(60); $$",
        "nested": {HOSTILE: [HOSTILE, "')"]},
    }
    schedule(cron_db, "hostile", "* * * * *", "email_queue", body)
    [(_, _, _, command, _, _)] = cron_jobs(cron_db)
    msg_id, _ = run_schedule(cron_db, "hostile")
    with cron_db.connect() as conn:
        [(message,)] = conn.execute(
            "select message from pgmq.q_email_queue where msg_id = %s", [msg_id]
        ).fetchall()
        table = conn.execute("select to_regclass('queue_worker.schedules')").fetchone()
    assert command == "select queue_worker.run_schedule('hostile')"
    assert message == body
    assert table == ("queue_worker.schedules",)


@pytest.mark.parametrize(
    "name",
    ["x'); drop table queue_worker.schedules; --", "Weekly", "-lead", "a" * 49, "", "a b", "é"],
)
def test_a_name_outside_the_pattern_is_refused(cron_db: Database, name: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid schedule name"):
        schedule(cron_db, name, "* * * * *", "email_queue", email("x"))
    assert cron_jobs(cron_db) == []


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("61 * * * *", "minute field: 61 is outside 0-59"),
        ("* 24 * * *", "hour field: 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month field: 0 is outside 1-31"),
        ("* * * foo * ", 'month field: "foo" is not a number or a month (jan-dec)'),
        ("* * * * 8", "day-of-week field: 8 is outside 0-7"),
        ("5/10 * * * *", "a step goes after * or a range"),
        ("*/0 * * * *", "the step 0 must be from 1 to 60"),
        ("30-10 * * * *", "the range 30-10 is backwards"),
        ("* * * *", "it has 4 fields, not five"),
        ("1,,2 * * * *", 'minute field: "" is not *, a value, a range or a step'),
        ("@reboot", "runs only when the database server starts"),
        ("@fortnightly", "unknown shorthand"),
        ("0 seconds", "seconds must be from 1 to 59"),
        ("30 seconds", "this database's pg_cron has no seconds schedules"),
        ("*" * 101, "in at most 100 characters"),
    ],
)
def test_a_bad_cron_expression_is_named(cron_db: Database, cron: str, expected: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        schedule(cron_db, "bad", cron, "email_queue", email("x"))
    assert expected in raised.value.diag.message_primary
    assert raised.value.diag.message_hint
    assert cron_jobs(cron_db) == []


@pytest.mark.parametrize(
    ("cron", "stored"),
    [
        ("*/15 9-17 * * mon-fri", "*/15 9-17 * * mon-fri"),
        ("0 0 1,15 JAN,jul 0,7", "0 0 1,15 jan,jul 0,7"),
        ("0-30/10 * * * *", "0-30/10 * * * *"),
        ("@Weekly", "@weekly"),
    ],
)
def test_pg_cron_takes_every_expression_schedule_accepts(
    cron_db: Database, cron: str, stored: str
) -> None:
    schedule(cron_db, "ok", cron, "email_queue", email("x"))
    assert [row[2] for row in cron_jobs(cron_db)] == [stored]


def test_seconds_schedules_are_checked_for_pg_cron_that_has_them(cron_db: Database) -> None:
    # Supabase runs pg_cron 1.6, which takes '30 seconds'; this machine's 1.4 does not,
    # so the check is asked as it would be there.
    with cron_db.connect(role=OWNER_ROLE) as conn:
        takes = conn.execute(
            "select queue_worker.cron_expression('30 Second', true), "
            "queue_worker.cron_expression(' 1  seconds ', true)"
        ).fetchone()
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="from 1 to 59"):
            conn.execute("select queue_worker.cron_expression('60 seconds', true)")
    with cron_db.connect(role="service_role") as conn:
        status = conn.execute("select * from queue_worker.cron_status()").fetchone()
    assert takes == ("30 seconds", "1 seconds")
    assert status == ("1.4-1", True, "GMT", False)


def test_queue_and_job_are_checked(cron_db: Database) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match="unknown queue: nope"):
        schedule(cron_db, "q", "* * * * *", "nope", email("x"))
    with cron_db.connect(role="service_role") as conn:
        for job in ("[1, 2]", '"text"', json.dumps({"big": "x" * 70_000})):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid job"):
                conn.execute(
                    "select queue_worker.schedule('q', '* * * * *', 'email_queue', %s::jsonb)",
                    [job],
                )
    assert cron_jobs(cron_db) == []


def test_unschedule_removes_the_schedule_and_its_pg_cron_job(cron_db: Database) -> None:
    schedule(cron_db, "keep", "0 * * * *", "email_queue", email("keep"))
    schedule(cron_db, "drop", "0 * * * *", "email_queue", email("drop"))
    with cron_db.connect(role="service_role") as conn:
        removed = conn.execute("select queue_worker.unschedule('drop')").fetchone()
        again = conn.execute("select queue_worker.unschedule('drop')").fetchone()
        names = conn.execute("select name from queue_worker.list_schedules()").fetchall()
    assert removed == (True,) and again == (False,)
    assert names == [("keep",)]
    assert [row[1] for row in cron_jobs(cron_db)] == ["queue_worker:keep"]


def test_only_the_owner_runs_a_schedule_and_only_service_role_sets_one(
    cron_db: Database,
) -> None:
    schedule(cron_db, "mine", "0 * * * *", "email_queue", email("mine"))
    with cron_db.connect(role="service_role") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select queue_worker.run_schedule('mine')")
    for role in ("anon", "authenticated"):
        with cron_db.connect(role=role) as conn:
            for call in (
                "select queue_worker.schedule('x', '* * * * *', 'email_queue', '{}')",
                "select queue_worker.unschedule('mine')",
                "select * from queue_worker.list_schedules()",
                "select * from queue_worker.cron_status()",
                "select * from queue_worker.schedules",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(call)  # type: ignore[arg-type]
    assert len(cron_jobs(cron_db)) == 1


def test_the_operations_run_over_a_direct_connection_too(cron_db: Database, db: Database) -> None:
    # DATABASE_URL and the CLI call the same functions over SQL instead of PostgREST.
    async def scenario(database: Database) -> dict[str, Any]:
        pool = SqlQueue.create_pool(database.url_as(OWNER_ROLE), max_size=2, timeout=10)
        await pool.open(wait=True)
        seen: dict[str, Any] = {}
        try:
            rpc = SqlQueue(pool, schema="queue_worker", timeout=10)
            seen["status"] = await schedules.cron_status(rpc)
            try:
                seen["set"] = await schedules.set_schedule(
                    rpc, "nightly", "0 3 * * *", "email_queue", email("nightly")
                )
                await schedules.set_schedule(rpc, "nightly", "60 3 * * *", "email_queue", {})
            except schedules.ScheduleError as error:
                seen["refused"] = error
            seen["listed"] = [s.name for s in await schedules.list_schedules(rpc)]
            seen["removed"] = [await schedules.remove_schedule(rpc, "nightly") for _ in "12"]
            seen["missing"] = await schedules.get_schedule(rpc, "nightly")
        finally:
            await pool.close()
        return seen

    with_cron = asyncio.run(scenario(cron_db))
    assert with_cron["status"].version == "1.4-1" and with_cron["set"].jobid is not None
    assert with_cron["set"].cron == "0 3 * * *" and with_cron["set"].queue == "email_queue"
    assert isinstance(with_cron["refused"], schedules.InvalidSchedule)
    assert "minute field: 60 is outside 0-59" in with_cron["refused"].message
    assert with_cron["listed"] == ["nightly"] and with_cron["removed"] == [True, False]
    assert with_cron["missing"] is None

    without = asyncio.run(scenario(db))
    assert without["status"] == schedules.CronStatus()
    assert isinstance(without["refused"], schedules.CronUnavailable)
    assert "Dashboard > Integrations > Cron" in (without["refused"].hint or "")
    assert without["listed"] == [] and without["removed"] == [False, False]


# -- the manual API -------------------------------------------------------------------


def test_the_api_lists_sets_and_removes_schedules(api: httpx.Client) -> None:
    created = api.put("/schedules/weekly-payments-summary", json=WEEKLY_REPORT)
    assert created.status_code == 200, created.text
    body = created.json()
    assert {k: body[k] for k in ("name", "cron", "queue", "job", "active")} == {
        "name": "weekly-payments-summary",
        **WEEKLY_REPORT,
        "active": True,
    }
    assert body["jobid"] > 0 and body["last_status"] is None

    changed = api.put(
        "/schedules/weekly-payments-summary", json={**WEEKLY_REPORT, "cron": "0 8 * * 1"}
    )
    listed = api.get("/schedules").json()
    assert changed.json()["jobid"] == body["jobid"]
    assert listed["cron"] == {
        "version": "1.4-1",
        "usable": True,
        "time_zone": "GMT",
        "seconds": False,
    }
    assert [(s["name"], s["cron"]) for s in listed["schedules"]] == [
        ("weekly-payments-summary", "0 8 * * 1")
    ]
    assert api.get("/schedules/weekly-payments-summary").json()["cron"] == "0 8 * * 1"

    assert api.delete("/schedules/weekly-payments-summary").status_code == 204
    assert api.delete("/schedules/weekly-payments-summary").status_code == 404
    assert api.get("/schedules/weekly-payments-summary").status_code == 404
    assert api.get("/schedules").json()["schedules"] == []


def test_the_api_refuses_what_could_never_run(api: httpx.Client) -> None:
    refusals = {
        "bad_cron": ({**WEEKLY_REPORT, "cron": "0 9 * * funday"}, 422, "invalid_schedule"),
        "seconds": ({**WEEKLY_REPORT, "cron": "30 seconds"}, 422, "invalid_schedule"),
        "unknown_queue": ({**WEEKLY_REPORT, "queue": "nope"}, 422, "invalid_schedule"),
        # A reports job without a recipient: its processor refuses it now, not every Monday.
        "bad_job": (
            {**WEEKLY_REPORT, "job": {"report": "payments_summary", "params": {}}},
            422,
            "invalid_message",
        ),
        "extra_field": ({**WEEKLY_REPORT, "owner": "me"}, 422, "invalid_request"),
    }
    for name, (body, status, error) in refusals.items():
        response = api.put("/schedules/refused", json=body)
        assert (response.status_code, response.json()["error"]) == (status, error), name
    seconds = api.put("/schedules/refused", json=refusals["seconds"][0]).json()["message"]
    assert "no seconds schedules" in seconds and "Use five fields" in seconds
    assert api.put("/schedules/Bad%20Name", json=WEEKLY_REPORT).status_code == 422
    unauthorized = httpx.put(
        f"{api.base_url}/schedules/x", json=WEEKLY_REPORT, headers={"Authorization": "Bearer no"}
    )
    assert unauthorized.status_code == 401
    assert api.get("/schedules").json()["schedules"] == []


def test_the_weekly_report_mails_last_weeks_payments(
    cron_db: Database, api: httpx.Client, smtp: SmtpServer
) -> None:
    # The docs' example, set through the API, run as pg_cron runs it on a Monday.
    assert api.put("/schedules/weekly-payments-summary", json=WEEKLY_REPORT).status_code == 200
    today = datetime.now(UTC).date()
    monday = today - timedelta(days=today.weekday())
    start = monday - timedelta(days=7)
    insert_payments(
        cron_db,
        [
            payment(
                "pi_before", "succeeded", "1.00", "EUR", f"{start - timedelta(days=1)} 23:59:59+00"
            ),
            payment("pi_first", "succeeded", "10.25", "EUR", f"{start} 00:00:00+00"),
            payment(
                "pi_last", "refunded", "5.00", "EUR", f"{monday - timedelta(days=1)} 23:59:59+00"
            ),
            payment("pi_after", "succeeded", "2.00", "EUR", f"{monday} 00:00:00+00"),
        ],
    )
    _, enqueued_on = run_schedule(cron_db, "weekly-payments-summary")
    [mail] = smtp.wait_for(1)
    filename, data = csv_attachment(mail)
    rows = parse_csv(data)
    end = enqueued_on - timedelta(days=enqueued_on.weekday())
    assert filename == f"payments_summary_{end - timedelta(days=7)}_{end}.csv"
    assert [row[3] for row in rows[1:]] == ["pi_first", "pi_last"]
    assert mail["To"] == "finance@example.com"


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "guides" / "schedules.md"


def docs_blocks(language: str, page: Path = DOCS) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", [DOCS, ROOT / "README.md"], ids=["schedules.md", "README.md"])
def test_the_docs_weekly_report_is_the_example_tested_here(cron_db: Database, page: Path) -> None:
    if page == DOCS:
        assert json.loads(docs_blocks("json")[0]) == WEEKLY_REPORT
    with cron_db.connect(role="service_role") as conn:
        conn.execute(docs_blocks("sql", page)[0])  # type: ignore[arg-type]
        listed = conn.execute(
            "select name, cron, queue_name, job from queue_worker.list_schedules()"
        ).fetchall()
    assert listed == [("weekly-payments-summary", *WEEKLY_REPORT.values())]


@pytest.mark.parametrize(
    ("day", "period", "expected"),
    [
        ("2026-12-07", "last_week", ("2026-11-30", "2026-12-07")),  # a Monday
        ("2026-12-06", "last_week", ("2026-11-23", "2026-11-30")),  # a Sunday
        ("2026-01-01", "yesterday", ("2025-12-31", "2026-01-01")),
        ("2026-03-01", "last_month", ("2026-02-01", "2026-03-01")),
        ("2026-01-31", "last_month", ("2025-12-01", "2026-01-01")),
    ],
)
def test_a_relative_period_counts_from_the_day_the_job_was_enqueued(
    day: str, period: str, expected: tuple[str, str]
) -> None:
    params = PaymentsSummaryParams.model_validate({"period": period, "currency": "EUR"})
    resolved = params.resolved(date.fromisoformat(day))
    assert resolved.model_dump(mode="json", by_alias=True, exclude_none=True) == {
        "from": expected[0],
        "to": expected[1],
        "currency": "EUR",
    }


@pytest.mark.parametrize(
    "params",
    [{"period": "last_week", "from": "2026-11-01"}, {}, {"period": "last_year"}],
)
def test_a_period_is_one_of_three_and_never_with_dates(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PaymentsSummaryParams.model_validate(params)


# -- real pg_cron, real minutes ---------------------------------------------------------


def run_details(db: Database, name: str) -> list[tuple[str, str]]:
    """pg_cron's record of a schedule's runs, by command (kept after its job is gone)."""
    with db.connect() as conn:
        return conn.execute(
            "select status, return_message from cron.job_run_details "
            "where command = format('select queue_worker.run_schedule(%%L)', %s::text) "
            "order by runid",
            [name],
        ).fetchall()


@pytest.mark.timeout(240)
def test_every_minute_schedule_is_processed_once_by_two_replicas(
    cron_db: Database,
    cron_gateway: GatewayHandle,
    smtp: SmtpServer,
    cron_sender: PgNetSender,
) -> None:
    schedule(cron_db, "every-minute", "* * * * *", "email_queue", email(HOSTILE))
    scheduled = time.monotonic()
    schedule(cron_db, "stopped", "* * * * *", "email_queue", email("must never arrive"))
    with cron_db.connect(role="service_role") as conn:
        conn.execute("select queue_worker.unschedule('stopped')")
    # A schedule whose queue is detached fails at run time, and the list says so.
    with cron_db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.attach_queue('doomed_queue')")
    schedule(cron_db, "failing", "* * * * *", "doomed_queue", {"n": 1})
    with cron_db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.detach_queue('doomed_queue')")

    # The replicas start while pg_cron's minute runs (one after the other, each taking
    # seconds to import): a job enqueued before they are up waits in the queue for their
    # first sweep, as it would during a deploy.
    settings = settings_against(cron_gateway, smtp, mail_from=MAIL_FROM, sweep_interval_seconds=0.5)
    with service_process(settings) as first, service_process(settings) as second:
        # Webhooks ring the first replica; both sweep the queue twice a second.
        register_in_vault(cron_db, first.url, settings.webhook_secret.get_secret_value())
        wait_until(lambda: smtp.messages, timeout=130, what="pg_cron's first run mailed")
        waited = time.monotonic() - scheduled
        wait_until(
            lambda: [s for s, _ in run_details(cron_db, "failing")] == ["failed"],
            timeout=10,
            what="the failing schedule's run recorded",
        )
        time.sleep(2)  # four sweeps by each replica: room for a (wrong) duplicate
        runs = run_details(cron_db, "every-minute")
        per_replica = [
            sample(r.url, "queue_worker_jobs_total", queue="email_queue", outcome="succeeded")
            for r in (first, second)
        ]
        with cron_db.connect(role="service_role") as conn:
            listed = {
                row[0]: row[1:]
                for row in conn.execute(
                    "select name, last_status, last_message from queue_worker.list_schedules()"
                ).fetchall()
            }

    print(f"waited {waited:.1f}s for pg_cron's minute; runs {runs}")  # noqa: T201
    subjects = [mail["Subject"] for mail in smtp.messages]
    assert runs and {status for status, _ in runs} == {"succeeded"}
    assert subjects == [HOSTILE] * len(runs)  # one mail per run, the body as data
    assert sum(per_replica) == len(runs)
    assert run_details(cron_db, "stopped") == []
    assert listed["every-minute"][0] == "succeeded"
    assert listed["failing"][0] == "failed"
    assert "unknown queue: doomed_queue" in (listed["failing"][1] or "")
