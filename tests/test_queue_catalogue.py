"""Users' own queues in SQL: `queue_worker.attach_queue` / `detach_queue` and the catalogue.

Applied as the non-superuser owner (`qw_postgres`, Supabase's `postgres`), as a
user's migration line runs; enqueued as `authenticated`; checked for what anon,
authenticated and service_role may do afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.postgres import (
    OWNER_ROLE,
    QUEUES,
    Database,
    apply_migrations,
    attached_queue,
    migration_files,
)

QUEUE = "sms_queue"


@pytest.fixture
def sms(db: Database) -> Iterator[str]:
    with attached_queue(db, QUEUE) as queue:
        yield queue


def triggers(db: Database, queue: str) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "select t.tgname, p.proname from pg_trigger t "
            "join pg_proc p on p.oid = t.tgfoid "
            "where t.tgrelid = to_regclass(%s) and not t.tgisinternal",
            [f"pgmq.q_{queue}"],
        ).fetchall()


def catalogue(db: Database) -> list[str]:
    with db.connect() as conn:
        return [
            name
            for (name,) in conn.execute(
                "select queue_name from queue_worker.queues order by 1"
            ).fetchall()
        ]


def test_attach_creates_the_queue_its_trigger_and_its_catalogue_row(db: Database, sms: str) -> None:
    with db.connect() as conn:
        assert conn.execute(
            "select count(*) from pgmq.meta where queue_name = %s", [sms]
        ).fetchone() == (1,)
    assert triggers(db, sms) == [("queue_worker_webhook", "notify_webhook")]
    assert catalogue(db) == sorted([*QUEUES, sms])


def test_the_built_in_queues_are_attached_by_the_same_function(db: Database) -> None:
    assert catalogue(db) == sorted(QUEUES)
    for queue in QUEUES:
        assert triggers(db, queue) == [("queue_worker_webhook", "notify_webhook")]


def test_attach_is_idempotent_and_keeps_messages(db: Database, sms: str) -> None:
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select pgmq.send(%s, '{\"n\": 1}')", [sms])
        conn.execute("select queue_worker.attach_queue(%s)", [sms])
        conn.execute("select queue_worker.attach_queue(%s)", [sms])
        rows = conn.execute(
            sql.SQL("select message from pgmq.{}").format(sql.Identifier(f"q_{sms}"))
        ).fetchall()
    assert rows == [({"n": 1},)]
    assert triggers(db, sms) == [("queue_worker_webhook", "notify_webhook")]
    assert catalogue(db).count(sms) == 1


def test_migrations_applied_again_keep_a_users_queue_attached(db: Database, sms: str) -> None:
    apply_migrations(db)
    assert sms in catalogue(db)
    assert triggers(db, sms) == [("queue_worker_webhook", "notify_webhook")]


def test_a_new_queue_enqueued_by_authenticated_rings_the_webhook_and_grants_api_roles_nothing(
    db: Database, sms: str
) -> None:
    # attach_queue gave anon and authenticated nothing: no function, no table.
    assert_api_roles_get_nothing(db, sms)
    with db.connect() as conn:
        conn.execute("select vault.create_secret('http://127.0.0.1:9', 'queue_worker_url')")
    # The route an app opens for signed-in users (what pgmq_public's toggle and
    # its grants do); the trigger reads Vault as its owner, not as authenticated.
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("grant usage on schema pgmq to authenticated")
        conn.execute(
            sql.SQL("grant select, insert on pgmq.{} to authenticated").format(
                sql.Identifier(f"q_{sms}")
            )
        )
    try:
        with db.connect(role="authenticated") as conn:
            [(msg_id,)] = conn.execute(
                'select * from pgmq.send(%s, \'{"to": "+15550100"}\')', [sms]
            ).fetchall()
    finally:
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute(
                sql.SQL("revoke select, insert on pgmq.{} from authenticated").format(
                    sql.Identifier(f"q_{sms}")
                )
            )
            conn.execute("revoke usage on schema pgmq from authenticated")
    with db.connect() as conn:
        [(url, body)] = conn.execute(
            "select url, convert_from(body, 'UTF8')::jsonb from net.http_request_queue"
        ).fetchall()
    assert url == f"http://127.0.0.1:9/webhooks/{sms}"
    assert body["table"] == f"q_{sms}" and body["record"]["msg_id"] == msg_id
    assert_api_roles_get_nothing(db, sms)


# The one function anon and authenticated may execute (20261201004100_public_enqueue.sql):
# it refuses them on every queue whose owner did not allow their role.
PUBLIC_ENQUEUE = "queue_worker.enqueue(text,jsonb,integer)"


def assert_api_roles_get_nothing(db: Database, queue: str) -> None:
    with db.connect() as conn:
        functions = [
            signature
            for (signature,) in conn.execute(
                "select p.oid::regprocedure::text from pg_proc p "
                "join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'queue_worker'"
            ).fetchall()
        ]
        tables = [f"pgmq.q_{queue}", f"pgmq.a_{queue}", "queue_worker.queues"]
        for role in ("anon", "authenticated"):
            for signature in functions:
                if signature == PUBLIC_ENQUEUE:
                    continue  # theirs to call; it refuses them below unless the queue allows
                assert conn.execute(
                    "select has_function_privilege(%s, %s, 'execute')", [role, signature]
                ).fetchone() == (False,), (role, signature)
            for table in tables:
                granted = conn.execute(
                    "select p from unnest(array['SELECT','INSERT','UPDATE','DELETE','TRUNCATE']) p "
                    "where has_table_privilege(%s, %s, p)",
                    [role, table],
                ).fetchall()
                assert granted == [], (role, table)
    for role in ("anon", "authenticated"):
        with db.connect(role=role) as conn:
            for statement in (
                sql.SQL("select * from pgmq.{}").format(sql.Identifier(f"q_{queue}")),
                sql.SQL("select * from queue_worker.read({}, 30, 1)").format(sql.Literal(queue)),
                sql.SQL("select queue_worker.enqueue({}, '{{}}')").format(sql.Literal(queue)),
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)


def test_service_role_runs_the_whole_cycle_on_an_attached_queue(db: Database, sms: str) -> None:
    with db.connect(role="service_role") as conn:
        [(msg_id,)] = conn.execute(
            "select queue_worker.send(%s, '{\"n\": 1}'::jsonb)", [sms]
        ).fetchall()
        [(claimed,)] = conn.execute(
            "select msg_id from queue_worker.claim(%s, %s, 30)", [sms, [msg_id]]
        ).fetchall()
        acked = conn.execute("select * from queue_worker.ack(%s, %s)", [sms, [msg_id]]).fetchall()
        depth = conn.execute(
            "select queue_name, queue_length from queue_worker.metrics() order by 1"
        ).fetchall()
    assert claimed == msg_id and acked == [(msg_id,)]
    assert depth == [(name, 0) for name in sorted([*QUEUES, sms])]


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
def test_only_the_owner_may_attach_or_detach(db: Database, role: str) -> None:
    with db.connect(role=role) as conn:
        for function in ("attach_queue", "detach_queue"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    sql.SQL("select queue_worker.{}('email_queue')").format(
                        sql.Identifier(function)
                    )
                )
    assert triggers(db, "email_queue") == [("queue_worker_webhook", "notify_webhook")]


@pytest.mark.parametrize("name", ["SMS", "sms-queue", "x; drop table y", "a" * 48, ""])
def test_attach_refuses_a_name_pgmq_would_not_take(db: Database, name: str) -> None:
    with db.connect(role=OWNER_ROLE) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid queue name"):
            conn.execute("select queue_worker.attach_queue(%s)", [name])
    assert catalogue(db) == sorted(QUEUES)


def test_detach_removes_the_trigger_and_the_worker_but_never_the_messages(
    db: Database, sms: str
) -> None:
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select pgmq.send(%s, '{\"n\": 1}')", [sms])
        conn.execute("select queue_worker.detach_queue(%s)", [sms])
        conn.execute("select queue_worker.detach_queue(%s)", [sms])  # idempotent
        messages = conn.execute(
            sql.SQL("select message from pgmq.{}").format(sql.Identifier(f"q_{sms}"))
        ).fetchall()
    assert messages == [({"n": 1},)]
    assert triggers(db, sms) == []
    assert sms not in catalogue(db)
    with db.connect(role="service_role") as conn:
        with pytest.raises(psycopg.errors.RaiseException, match=f"unknown queue: {sms}"):
            conn.execute("select * from queue_worker.read(%s, 30, 1)", [sms])
        names = [n for (n,) in conn.execute("select queue_name from queue_worker.metrics()")]
    assert sms not in names
    # Attached again, it is served again, with its messages.
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.attach_queue(%s)", [sms])
    with db.connect(role="service_role") as conn:
        assert conn.execute(
            "select count(*) from queue_worker.read(%s, 30, 10)", [sms]
        ).fetchone() == (1,)


def test_no_function_of_the_plumbing_names_a_queue(db: Database, sms: str) -> None:
    # What is in force after every migration: the functions' bodies. Queue
    # creation, grants, triggers and metrics() cover every attached queue by
    # reading the catalogue; only the payments rule names where receipts go.
    with db.connect() as conn:
        bodies = conn.execute(
            "select p.proname, p.prosrc from pg_proc p "
            "join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'queue_worker'"
        ).fetchall()
    named = {name for name, body in bodies if re.search(r"'(email|reports|payments)_queue'", body)}
    assert named == {"apply_payment_event"}


def test_the_newest_migration_attaches_the_built_in_queues_by_name_only() -> None:
    # The old migrations keep their loops over the three names (their behaviour is
    # history); from the catalogue migration on, a name appears only in an attach line.
    catalogue_migration = next(p for p in migration_files() if "queue_catalogue" in p.name)
    later = [p for p in migration_files() if p.name >= catalogue_migration.name]
    # The one business rule that names a queue (test above): apply_payment_event sends
    # its receipt to email_queue, so a migration that replaces it keeps that line.
    receipt = "select s into v_receipt from pgmq.send('email_queue', v_job) s;"
    for path in later:
        text = path.read_text()
        replaces_apply = "function queue_worker.apply_payment_event(" in text
        for line in text.splitlines():
            if replaces_apply and line.strip() == receipt:
                continue
            if re.search(r"'(email|reports|payments)_queue'", line):
                assert line.startswith("select queue_worker.attach_queue("), (path.name, line)
