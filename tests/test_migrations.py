"""supabase/migrations as users apply them: idempotent, least privilege, pgmq 1.5.1 only."""

from __future__ import annotations

import re

import psycopg
import pytest

from tests.support.postgres import Database, apply_migrations, migration_files

WORKER_FUNCTIONS = [
    "claim",
    "read",
    "ack",
    "set_vt",
    "archive",
    "send",
    "metrics",
    "archived",
    "replay",
    "schedule",
    "unschedule",
    "list_schedules",
    "cron_status",
]

# SECURITY DEFINER, and why: the webhook trigger reads Vault as its owner; the schedule
# functions use pg_cron, whose jobs run as the role that scheduled them and which only
# the owner (Supabase's `postgres`) may use.
DEFINERS = {
    "notify_webhook",
    "schedule",
    "unschedule",
    "list_schedules",
    "cron_status",
    "enqueue",  # the app's users enqueue on allowed queues without rights on the tables
    "preflight",  # `queue-worker check` learns which Vault secrets are set (names only)
}

# What pgmq 1.5.1 offers (SUPABASE-FACTS.md); the migrations may call nothing else.
PGMQ_151 = {
    "send",
    "send_batch",
    "read",
    "read_with_poll",
    "pop",
    "delete",
    "archive",
    "set_vt",
    "metrics",
    "metrics_all",
    "list_queues",
    "create",
}


def test_migrations_apply_twice_without_change(db: Database) -> None:
    with db.connect() as conn:
        before = conn.execute(
            "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'queue_worker'"
        ).fetchone()
    apply_migrations(db)
    with db.connect() as conn:
        after = conn.execute(
            "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'queue_worker'"
        ).fetchone()
        queues = conn.execute("select queue_name from pgmq.meta order by 1").fetchall()
    assert before == after
    assert queues == [("email_queue",), ("payments_queue",), ("reports_queue",)]


# From this file on, every migration records itself in queue_worker.migrations.
LEDGER = "20261130000000_migration_ledger"


def test_every_migration_records_itself_in_the_ledger(db: Database) -> None:
    for path in migration_files():
        if path.stem > LEDGER:
            call = f"select queue_worker.record_migration('{path.stem}');"
            assert call in path.read_text(), f"{path.name} does not end with {call}"
    with db.connect(role="service_role") as conn:
        rows = conn.execute("select * from queue_worker.applied_migrations()").fetchall()
    applied = [row[0] for row in rows]
    assert applied == [path.stem for path in migration_files()]


def test_only_the_owner_records_migrations(db: Database) -> None:
    for role in ("anon", "authenticated", "service_role"):
        with db.connect(role=role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select queue_worker.record_migration('20991231000000_forged')")


def test_migrations_call_only_pgmq_151_functions() -> None:
    called: set[str] = set()
    for path in migration_files():
        called |= set(re.findall(r"\bpgmq\.([a-z_]+)\s*\(", path.read_text()))
    assert called, "the migrations call pgmq"
    assert called <= PGMQ_151, f"not in pgmq 1.5.1: {sorted(called - PGMQ_151)}"


def test_every_worker_function_pins_search_path_and_has_a_comment(db: Database) -> None:
    with db.connect() as conn:
        rows = conn.execute(
            """
            select p.proname, p.proconfig, obj_description(p.oid, 'pg_proc'), p.prosecdef
            from pg_proc p join pg_namespace n on n.oid = p.pronamespace
            where n.nspname = 'queue_worker'
            """
        ).fetchall()
    assert {name for name, *_ in rows} >= set(WORKER_FUNCTIONS) | {"notify_webhook"}
    for name, config, comment, definer in rows:
        assert config == ['search_path=""'], name
        assert comment, f"{name} has no comment"
        assert definer == (name in DEFINERS), name


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("function", WORKER_FUNCTIONS)
def test_api_roles_cannot_execute_worker_functions(db: Database, role: str, function: str) -> None:
    with db.connect() as conn:
        oids = conn.execute(
            "select p.oid::regprocedure::text from pg_proc p "
            "join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'queue_worker' and p.proname = %s",
            [function],
        ).fetchall()
        assert oids
        for (signature,) in oids:
            allowed = conn.execute(
                "select has_function_privilege(%s, %s, 'execute'), "
                "has_function_privilege('service_role', %s, 'execute')",
                [role, signature, signature],
            ).fetchone()
            assert allowed == (False, True), signature


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_touch_queue_tables(db: Database, role: str) -> None:
    with db.connect(role=role) as conn:
        for statement in (
            "select * from pgmq.q_email_queue",
            "delete from pgmq.q_email_queue",
            "select * from queue_worker.read('email_queue', 30, 1)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_read_dead_letters(db: Database, role: str) -> None:
    with db.connect(role=role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from queue_worker.dead_letters")


def test_dead_letters_are_private_to_service_role(db: Database) -> None:
    with db.connect() as conn:
        rls = conn.execute(
            "select relrowsecurity from pg_class where oid = 'queue_worker.dead_letters'::regclass"
        ).fetchone()
        privileges = conn.execute(
            "select grantee, string_agg(privilege_type, ',' order by privilege_type) "
            "from information_schema.role_table_grants "
            "where table_schema = 'queue_worker' and table_name = 'dead_letters' "
            "and grantee <> 'qw_postgres' group by grantee"
        ).fetchall()
    assert rls == (True,)
    assert privileges == [("service_role", "DELETE,INSERT,SELECT,UPDATE")]


def test_service_role_can_run_the_whole_cycle(db: Database) -> None:
    with db.connect(role="service_role") as conn:
        sent = conn.execute("select queue_worker.send('reports_queue', '{\"n\": 1}')").fetchone()
        assert sent is not None
        (msg_id,) = sent
        [(read_id, read_ct)] = conn.execute(
            "select msg_id, read_ct from queue_worker.read('reports_queue', 30, 10)"
        ).fetchall()
        assert (read_id, read_ct) == (msg_id, 1)
        assert conn.execute(
            "select * from queue_worker.set_vt('reports_queue', %s, 0)", [[msg_id]]
        ).fetchall() == [(msg_id,)]
        assert conn.execute(
            "select * from queue_worker.archive('reports_queue', %s)", [[msg_id]]
        ).fetchall() == [(msg_id,)]
        depth = conn.execute(
            "select queue_length from queue_worker.metrics() where queue_name = 'reports_queue'"
        ).fetchone()
    assert depth == (0,)
    with db.connect() as conn:
        archived = conn.execute("select msg_id from pgmq.a_reports_queue").fetchall()
    assert archived == [(msg_id,)]


def test_read_and_claim_return_a_messages_headers(db: Database) -> None:
    with db.connect() as conn:
        with_headers, without = (
            conn.execute(
                "select pgmq.send('reports_queue', '{\"n\": 1}', %s::jsonb)", [headers]
            ).fetchall()[0][0]
            for headers in ('{"trace": "t-1"}', None)
        )
    with db.connect(role="service_role") as conn:
        read = conn.execute(
            "select msg_id, message, headers from queue_worker.read('reports_queue', 30, 10)"
        ).fetchall()
        conn.execute("select queue_worker.set_vt('reports_queue', %s, 0)", [[with_headers]])
        claimed = conn.execute(
            "select msg_id, headers from queue_worker.claim('reports_queue', %s, 30)",
            [[with_headers]],
        ).fetchall()
    assert sorted(read) == [(with_headers, {"n": 1}, {"trace": "t-1"}), (without, {"n": 1}, None)]
    assert claimed == [(with_headers, {"trace": "t-1"})]


def test_claim_refuses_an_unknown_queue(db: Database) -> None:
    with db.connect(role="service_role") as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="unknown queue: nope"):
            conn.execute("select * from queue_worker.claim('nope', array[1]::bigint[], 30)")
        with pytest.raises(psycopg.errors.RaiseException, match="unknown queue"):
            conn.execute(
                "select * from queue_worker.claim('x; drop table y', array[1]::bigint[], 30)"
            )


def test_failing_webhook_never_fails_the_insert(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("select vault.create_secret('http://127.0.0.1:9', 'queue_worker_url')")
        conn.execute(
            "alter function net.http_post(text, jsonb, jsonb, jsonb, integer) "
            "rename to http_post_gone"
        )
    try:
        with db.connect(role="qw_postgres") as conn:
            notices: list[str] = []
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            conn.execute("select pgmq.send('email_queue', '{}')")
            assert conn.execute("select count(*) from pgmq.q_email_queue").fetchone() == (1,)
        assert any("webhook for pgmq.q_email_queue not sent" in n for n in notices)
    finally:
        with db.connect() as conn:
            conn.execute(
                "alter function net.http_post_gone(text, jsonb, jsonb, jsonb, integer) "
                "rename to http_post"
            )


def test_webhook_without_secret_is_sent_without_authorization(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("select vault.create_secret('http://127.0.0.1:9/', 'queue_worker_url')")
        conn.execute("select pgmq.send('payments_queue', '{}')")
        [(url, headers)] = conn.execute(
            "select url, headers from net.http_request_queue"
        ).fetchall()
    assert url == "http://127.0.0.1:9/webhooks/payments_queue"
    assert headers == {"Content-Type": "application/json"}
