"""The RPC surface through Supabase's keys: only service_role gets in.

Every function of the `queue_worker` schema is read from pg_proc, so a function
added by a later migration is covered without touching this file. Each one is
called through the REST gateway with the keys a browser or a signed-in user
holds (anon, publishable, a user's access token): all get 401 or 403. The queue
tables are tried at SQL level as those roles: nothing can be read, inserted,
changed or deleted. service_role can do all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.support.postgres import Database
from tests.support.rpc_gateway import RpcGateway

# Called only as the owner: service_role is refused too. The migrations' helpers
# change the schema (record migrations, create queues, triggers, grants, who may
# enqueue), which the service, holding the secret key, never does; pg_cron runs a
# schedule's job, and schedule() checks its expression, as the owner.
OWNER_ONLY = {
    "record_migration",
    "attach_queue",
    "detach_queue",
    "allow_enqueue",
    "run_schedule",
    "cron_expression",
}
# Executable by anon and authenticated by design: the function itself refuses them
# unless the queue allows their role (tests/test_public_enqueue.py). Called with the
# arguments below (a queue nobody allowed), it refuses every key here too.
PUBLIC_ENTRY = {"enqueue"}


@dataclass(frozen=True)
class Function:
    name: str
    signature: str
    arguments: dict[str, Any]
    is_trigger: bool


def _value(type_name: str) -> Any:
    """A plausible argument of a parameter type, so the gateway finds the function."""
    if type_name.endswith("[]"):
        return [_value(type_name[:-2])]
    if type_name in ("integer", "bigint", "smallint", "numeric"):
        return 1
    if type_name in ("json", "jsonb"):
        return {}
    if type_name == "boolean":
        return False
    return "email_queue"


def worker_functions(db: Database) -> list[Function]:
    with db.connect() as conn:
        rows = conn.execute(
            """
            select p.proname, p.oid::regprocedure::text,
                   coalesce(p.proargnames, '{}'),
                   array(select format_type(t, null) from unnest(p.proargtypes) t),
                   p.pronargdefaults, p.prorettype = 'trigger'::regtype
            from pg_proc p join pg_namespace n on n.oid = p.pronamespace
            where n.nspname = 'queue_worker' and p.prokind = 'f'
            order by 2
            """
        ).fetchall()
    functions = []
    for name, signature, names, types, n_defaults, is_trigger in rows:
        required = len(types) - n_defaults
        arguments = {
            arg: _value(type_name)
            for arg, type_name in list(zip(names, types, strict=False))[:required]
        }
        functions.append(Function(name, signature, arguments, is_trigger))
    return functions


@pytest.fixture
def functions(db: Database) -> list[Function]:
    found = worker_functions(db)
    assert {"claim", "read", "ack", "send", "notify_webhook"} <= {f.name for f in found}
    return found


def call(gateway: RpcGateway, function: Function, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        gateway.rpc_url(function.name),
        json=function.arguments,
        headers={**headers, "Content-Profile": "queue_worker"},
    )


def api_keys(gateway: RpcGateway) -> Iterator[tuple[str, dict[str, str], int]]:
    """(who, headers, expected status) for every key a non-server client may hold."""
    yield "anon", {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.anon_key}"}, 401
    yield "anon-apikey-only", {"apikey": gateway.anon_key}, 401
    yield "publishable", {"apikey": gateway.publishable_key}, 401
    user = {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.authenticated_key}"}
    yield "authenticated", user, 403
    with_publishable = {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {gateway.authenticated_key}",
    }
    yield "authenticated+publishable", with_publishable, 403


def test_api_keys_get_401_or_403_from_every_worker_function(
    gateway: RpcGateway, functions: list[Function]
) -> None:
    answers = {}
    for function in functions:
        for who, headers, expected in api_keys(gateway):
            response = call(gateway, function, headers)
            answers[(function.signature, who)] = (response.status_code, expected)
            assert response.json()["code"] == "42501", (function.signature, who, response.text)
    wrong = {key: got for key, (got, expected) in answers.items() if got != expected}
    assert wrong == {}
    print(f"{len(functions)} functions x 5 keys refused")  # noqa: T201


def test_no_api_role_may_execute_any_worker_function(
    db: Database, functions: list[Function]
) -> None:
    with db.connect() as conn:
        for function in functions:
            if function.name in PUBLIC_ENTRY:
                continue
            for role in ("anon", "authenticated", "public"):
                if role == "public":
                    allowed = conn.execute(
                        "select exists (select 1 from pg_proc p, aclexplode(p.proacl) a "
                        "where p.oid = %s::regprocedure and a.grantee = 0 "
                        "and a.privilege_type = 'EXECUTE') "
                        "or (select proacl is null from pg_proc where oid = %s::regprocedure)",
                        [function.signature, function.signature],
                    ).fetchone()
                else:
                    allowed = conn.execute(
                        "select has_function_privilege(%s, %s, 'execute')",
                        [role, function.signature],
                    ).fetchone()
                assert allowed == (False,), (role, function.signature)


def test_service_role_reaches_every_worker_function_but_the_trigger_and_owner_ones(
    gateway: RpcGateway, functions: list[Function]
) -> None:
    keys = {
        "secret key": {"apikey": gateway.secret_key},
        "legacy JWT": {
            "apikey": gateway.service_role_key,
            "Authorization": f"Bearer {gateway.service_role_key}",
        },
    }
    for function in functions:
        for who, headers in keys.items():
            response = call(gateway, function, headers)
            if function.is_trigger or function.name in OWNER_ONLY:
                # Nobody calls a trigger function directly, service_role included;
                # the migrations' own helpers are the owner's.
                assert response.status_code == 403, (function.signature, who)
            else:
                assert response.status_code not in (401, 403, 404), (
                    function.signature,
                    who,
                    response.text,
                )


def test_queues_are_not_reachable_through_other_schemas(gateway: RpcGateway) -> None:
    for schema in ("pgmq", "pgmq_public", "vault", "net"):
        response = httpx.post(
            gateway.rpc_url("read"),
            json={"queue_name": "email_queue", "vt": 30, "qty": 1},
            headers={
                "apikey": gateway.anon_key,
                "Authorization": f"Bearer {gateway.authenticated_key}",
                "Content-Profile": schema,
            },
        )
        assert response.status_code == 406, schema
        assert response.json()["code"] == "PGRST106"


def queue_tables(db: Database) -> list[str]:
    """Every pgmq queue and archive table, and every table of the worker's schema."""
    with db.connect() as conn:
        rows = conn.execute(
            """
            select format('%I.%I', n.nspname, c.relname)
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('r', 'p', 'v')
              and (n.nspname = 'queue_worker'
                   or (n.nspname = 'pgmq' and (c.relname ~ '^[qa]_' or c.relname = 'meta')))
            order by 1
            """
        ).fetchall()
    tables = [name for (name,) in rows]
    assert {"pgmq.q_email_queue", "pgmq.a_email_queue", "pgmq.meta"} <= set(tables)
    return tables


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_read_insert_change_or_delete_queue_rows(db: Database, role: str) -> None:
    with db.connect() as conn:
        conn.execute("select pgmq.send('email_queue', '{\"to\": \"a@example.com\"}')")
    tables = queue_tables(db)
    with db.connect() as conn:
        for table in tables:
            granted = conn.execute(
                "select privilege_type from unnest(array['SELECT','INSERT','UPDATE','DELETE',"
                "'TRUNCATE']) privilege_type where has_table_privilege(%s, %s, privilege_type)",
                [role, table],
            ).fetchall()
            assert granted == [], (role, table)
    statements = [
        "select * from {}",
        "insert into {} (vt, message) values (now(), '{{}}')",
        "update {} set vt = now()",
        "delete from {}",
    ]
    with db.connect(role=role) as conn:
        for table in ("pgmq.q_email_queue", "pgmq.a_email_queue"):
            schema, name = table.split(".")
            for statement in statements:
                query = sql.SQL(statement).format(sql.Identifier(schema, name))
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(query)
    with db.connect() as conn:
        assert conn.execute("select count(*) from pgmq.q_email_queue").fetchone() == (1,)


def test_service_role_can_read_insert_and_delete_queue_rows(db: Database) -> None:
    with db.connect(role="service_role") as conn:
        with conn.transaction():
            conn.execute("insert into pgmq.q_email_queue (vt, message) values (now(), '{}')")
            [(msg_id,)] = conn.execute("select msg_id from pgmq.q_email_queue").fetchall()
            conn.execute("update pgmq.q_email_queue set vt = now() where msg_id = %s", [msg_id])
            deleted = conn.execute(
                "delete from pgmq.q_email_queue where msg_id = %s returning msg_id", [msg_id]
            ).fetchall()
    assert deleted == [(msg_id,)]
