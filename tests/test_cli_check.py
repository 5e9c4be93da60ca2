"""`queue-worker check` against the test bed: all green, then each failure provoked once.

The preflight runs as an operator runs it (a process, settings from its
environment) against the RPC gateway, the Vault and pg_net stand-ins, the real
PostgreSQL and the real SMTP server. Each failure is made the way it happens in a
project (a wrong key, a schema not exposed, a migration not applied, a secret not
stored, a trigger dropped, pg_net missing, SMTP down, a wrong password, an
untrusted certificate), and the line that reports it must name the fix.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.schema import migrations
from tests.conftest import ServiceFactory, register_in_vault
from tests.support.cli import Ran, run_cli
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.rpc_gateway import RpcGateway, running_gateway
from tests.support.settings import NO_MAIL
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until

CHECKS = [
    "settings",
    "rpc",
    "migrations",
    "pg_net",
    "vault secrets",
    "webhook secret",
    "webhook triggers",
    "smtp connect",
    "smtp tls",
    "smtp login",
]


@pytest.fixture
def ready(db: Database, service_settings: Settings) -> Settings:
    """A project set up as the docs say: Vault holds the URL and the webhook secret."""
    secret = service_settings.webhook_secret
    assert secret is not None
    register_in_vault(db, "https://worker.example.net", secret.get_secret_value())
    return service_settings


def check(settings: Settings, tmp_path: Path, *args: str) -> Ran:
    return run_cli("check", *args, settings=settings, cwd=tmp_path)


def line(ran: Ran, name: str) -> str:
    """The line of one check: `STATUS  name  detail[. Fix: ...]`."""
    for text in ran.lines:
        status, _, rest = text.partition("  ")
        if rest.strip().startswith(name + "  ") or rest.strip() == name:
            return text
    raise AssertionError(f"no {name!r} line in:\n{ran.out}")


def status(ran: Ran, name: str) -> str:
    return line(ran, name).split()[0]


def only_failure(ran: Ran, name: str) -> str:
    """Asserts exit 1 and that `name` is the one FAIL; returns its line."""
    assert ran.code == 1, ran.out + ran.err
    failures = [text for text in ran.lines if text.startswith("FAIL")]
    assert failures == [line(ran, name)], ran.out
    return failures[0]


def test_everything_in_place_passes(ready: Settings, tmp_path: Path) -> None:
    ran = check(ready, tmp_path)
    assert ran.code == 0, ran.out + ran.err
    assert [status(ran, name) for name in CHECKS] == ["OK"] * len(CHECKS)
    assert f"all {len(migrations())} of queue-worker" in line(ran, "migrations")
    assert "queue_worker_url, queue_worker_webhook_secret set (values not read)" in line(
        ran, "vault secrets"
    )
    assert "on email_queue, payments_queue, reports_queue" in line(ran, "webhook triggers")
    # Names only: no secret value is ever printed.
    for value in (ready.webhook_secret, ready.smtp_password, ready.supabase_service_role_key):
        assert value is not None and value.get_secret_value() not in ran.out + ran.err

    as_json = check(ready, tmp_path, "--json")
    assert as_json.code == 0
    document = as_json.json()
    assert document["ok"] is True
    assert [c["name"] for c in document["checks"]] == CHECKS


def test_a_wrong_key(ready: Settings, tmp_path: Path) -> None:
    wrong = ready.model_copy(
        update={"supabase_service_role_key": "sb_secret_" + secrets.token_urlsafe(24)}
    )
    ran = check(wrong, tmp_path)
    failure = only_failure(ran, "rpc")
    assert "the key was refused" in failure
    assert "Project Settings > API Keys > Secret keys" in failure
    assert status(ran, "migrations") == "SKIP" and status(ran, "pg_net") == "SKIP"


@pytest.fixture
def hidden_schema(supabase_db: Database) -> Iterator[RpcGateway]:
    """A gateway whose project exposes only the default schemas, as a new project does."""
    with running_gateway(supabase_db, schemas=("public", "graphql_public")) as gateway:
        yield gateway


def test_the_schema_not_exposed(ready: Settings, hidden_schema: RpcGateway, tmp_path: Path) -> None:
    settings = ready.model_copy(
        update={
            "supabase_url": hidden_schema.url,
            "supabase_service_role_key": hidden_schema.secret_key,
        }
    )
    failure = only_failure(check(settings, tmp_path), "rpc")
    assert "schema queue_worker is not exposed by the Data API (PGRST106)" in failure
    assert "Exposed schemas: add queue_worker" in failure
    assert '[api] schemas = ["public", "graphql_public", "queue_worker"]' in failure


def test_a_missing_migration(db: Database, ready: Settings, tmp_path: Path) -> None:
    last = migrations()[-1].name
    with db.connect() as conn:
        conn.execute("delete from queue_worker.migrations where name = %s", [last])
    try:
        ran = check(ready, tmp_path)
    finally:
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute("select queue_worker.record_migration(%s)", [last])
    failure = only_failure(ran, "migrations")
    assert f"1 of {len(migrations())} missing: {last}" in failure
    assert "queue-worker migrate --print > supabase/migrations/" in failure
    assert "supabase db push" in failure


def test_a_missing_vault_secret(db: Database, ready: Settings, tmp_path: Path) -> None:
    with db.connect() as conn:
        conn.execute("delete from vault.secrets where name = 'queue_worker_url'")
    ran = check(ready, tmp_path)
    failure = only_failure(ran, "vault secrets")
    assert "missing queue_worker_url" in failure
    assert (
        "select vault.create_secret('https://<your-worker-host>', 'queue_worker_url');" in failure
    )


def test_a_vault_secret_that_is_not_the_webhook_secret(
    db: Database, ready: Settings, tmp_path: Path
) -> None:
    register_in_vault(db, "https://worker.example.net", secrets.token_urlsafe(32))
    failure = only_failure(check(ready, tmp_path), "webhook secret")
    assert "Vault's queue_worker_webhook_secret is not WEBHOOK_SECRET" in failure
    assert "vault.update_secret(" in failure


def test_a_missing_trigger(db: Database, ready: Settings, tmp_path: Path) -> None:
    with db.connect() as conn:
        conn.execute("drop trigger queue_worker_webhook on pgmq.q_reports_queue")
    try:
        ran = check(ready, tmp_path)
    finally:
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute(
                "create trigger queue_worker_webhook after insert on pgmq.q_reports_queue "
                "for each row execute function queue_worker.notify_webhook()"
            )
    failure = only_failure(ran, "webhook triggers")
    assert "no webhook trigger on reports_queue" in failure


def test_no_pg_net(db: Database, ready: Settings, tmp_path: Path) -> None:
    signature = "net.http_post(text, jsonb, jsonb, jsonb, integer)"
    with db.connect() as conn:
        conn.execute(f"alter function {signature} rename to http_post_gone")
    try:
        ran = check(ready, tmp_path)
    finally:
        with db.connect() as conn:
            conn.execute(
                "alter function net.http_post_gone(text, jsonb, jsonb, jsonb, integer) "
                "rename to http_post"
            )
    failure = only_failure(ran, "pg_net")
    assert "Database > Extensions: enable pg_net" in failure


def test_smtp_down(ready: Settings, smtp: SmtpServer, tmp_path: Path) -> None:
    smtp.stop()
    try:
        ran = check(ready, tmp_path)
    finally:
        smtp.start()
    failure = only_failure(ran, "smtp connect")
    assert "Connect call failed" in failure and "check SMTP_HOST and SMTP_PORT" in failure
    assert (status(ran, "smtp tls"), status(ran, "smtp login")) == ("SKIP", "SKIP")


def test_a_wrong_smtp_password(ready: Settings, tmp_path: Path) -> None:
    wrong = ready.model_copy(update={"smtp_password": secrets.token_urlsafe(16)})
    failure = only_failure(check(wrong, tmp_path), "smtp login")
    assert "535" in failure and "check SMTP_USER and SMTP_PASSWORD" in failure


def test_an_untrusted_smtp_certificate(ready: Settings, tmp_path: Path) -> None:
    # Without SMTP_CA_FILE the test server's private CA is not trusted.
    untrusted = ready.model_copy(update={"smtp_ca_file": None})
    ran = check(untrusted, tmp_path)
    failure = only_failure(ran, "smtp tls")
    assert "CERTIFICATE_VERIFY_FAILED" in failure and "SMTP_CA_FILE" in failure
    assert status(ran, "smtp connect") == "OK" and status(ran, "smtp login") == "SKIP"


def test_bad_settings_exit_2_with_the_variable_named(ready: Settings, tmp_path: Path) -> None:
    ran = run_cli(
        "check",
        settings=ready,
        cwd=tmp_path,
        env={"QUEUES": "email_queue,sms_queue"},
    )
    assert ran.code == 2
    [failure] = ran.lines
    assert failure.startswith(
        "FAIL  settings  invalid configuration: QUEUES: no processor for 'sms_queue'"
    )
    assert failure.endswith("Fix: set the variables it names (.env.example lists them)")


def test_over_database_url_the_same_checks_pass(
    db: Database, ready: Settings, tmp_path: Path
) -> None:
    direct = ready.model_copy(update={"database_url": db.url_as(OWNER_ROLE), "supabase_url": None})
    ran = check(direct, tmp_path)
    assert ran.code == 0, ran.out + ran.err
    assert line(ran, "database").startswith("OK    database          DATABASE_URL connects")
    assert status(ran, "webhook triggers") == "OK" and status(ran, "vault secrets") == "OK"


def test_a_queue_of_ones_own_not_attached(db: Database, ready: Settings, tmp_path: Path) -> None:
    # queues.toml serves sms_queue, but no migration attached it.
    (tmp_path / "queues.toml").write_text(
        '[queues.email_queue]\nprocessor = "email"\n\n'
        '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://example.net/send-sms"\n'
    )
    ran = check(ready, tmp_path)
    failure = only_failure(ran, "webhook triggers")
    assert "no such queue: sms_queue" in failure
    assert "select queue_worker.attach_queue('sms_queue');" in failure
    assert "queues email_queue, sms_queue" in line(ran, "settings")
    # Created by pgmq but never attached (or detached since): the worker's functions refuse it.
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select pgmq.create('sms_queue')")
    failure = only_failure(check(ready, tmp_path), "webhook triggers")
    assert "not attached: sms_queue" in failure
    assert "select queue_worker.attach_queue('sms_queue');" in failure


def test_a_forward_only_deployment_passes_without_smtp(
    db: Database, ready: Settings, tmp_path: Path
) -> None:
    # A queues.toml of forward queues only, attached by a migration; no mail settings.
    (tmp_path / "queues.toml").write_text(
        '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://example.net/send-sms"\n'
    )
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.attach_queue('sms_queue')")
    no_mail = ready.model_copy(update=NO_MAIL)
    ran = check(no_mail, tmp_path)
    assert ran.code == 0, ran.out + ran.err
    names = [*CHECKS[:-3], "smtp"]
    assert [status(ran, name) for name in names] == ["OK"] * (len(names) - 1) + ["N/A"]
    assert line(ran, "smtp").split(None, 2)[2] == "not needed (no served queue sends mail)"
    assert not any("smtp connect" in text for text in ran.lines), ran.out
    assert "queues sms_queue" in line(ran, "settings")
    # SMTP settings left over are not checked either (the server is not even asked).
    leftover = check(ready, tmp_path)
    assert leftover.code == 0, leftover.out + leftover.err
    assert line(leftover, "smtp").split(None, 2)[2] == (
        "not needed (no served queue sends mail); SMTP_HOST is set but not checked"
    )


def test_a_service_started_against_an_unready_project_says_so_in_its_log(
    db: Database,
    ready: Settings,
    start_service: ServiceFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same database checks run once at start: a served queue nobody attached would
    # otherwise show only as jobs that never run.
    queues = tmp_path / "queues.toml"
    queues.write_text(
        '[queues.email_queue]\nprocessor = "email"\n\n'
        '[queues.fax_queue]\nprocessor = "forward"\nurl = "https://example.net/send-fax"\n'
    )
    with caplog.at_level(logging.WARNING, logger="app"):
        start_service(register=False, queues_file=queues)
        wait_until(lambda: start_up_failures(caplog), what="the check at start")
    [failure] = start_up_failures(caplog)
    fields = vars(failure)  # what the JSON log line carries
    assert fields["check"] == "webhook triggers"
    assert "no such queue: fax_queue" in fields["detail"]
    assert "select queue_worker.attach_queue('fax_queue');" in fields["fix"]


def test_a_service_started_against_a_ready_project_warns_of_nothing(
    ready: Settings, start_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app"):
        start_service(register=False)
        wait_until(
            lambda: [r for r in caplog.records if r.getMessage() == "start-up checks passed"],
            what="the check at start",
        )
    assert start_up_failures(caplog) == []


def start_up_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "start-up check failed"]
