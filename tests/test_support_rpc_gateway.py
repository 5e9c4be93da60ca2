"""The PostgREST-compatible RPC gateway stand-in, exercised over real HTTP.

These pin the behaviour the service's RPC client relies on: keys and roles,
schema selection, function resolution, response shapes, PostgREST's error
bodies and status codes, one transaction per call, and the fault switches.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.support import jwt
from tests.support.postgres import Database
from tests.support.rpc_gateway import (
    DEFAULT_SCHEMAS,
    RpcGateway,
    running_gateway,
    status_for_sqlstate,
)

TEST_SCHEMA = "gateway_test"
BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0 Safari/537.36"
)

# Small functions covering each response shape and error path. Owned by the
# superuser; EXECUTE stays with PUBLIC, so every API role may call them.
TEST_SCHEMA_SQL = f"""
drop schema if exists {TEST_SCHEMA} cascade;
create schema {TEST_SCHEMA};
grant usage on schema {TEST_SCHEMA} to anon, authenticated, service_role;

create table {TEST_SCHEMA}.log (id bigint primary key, note text);
grant select, insert on {TEST_SCHEMA}.log to service_role;
create table {TEST_SCHEMA}.hidden (x integer);
revoke all on {TEST_SCHEMA}.hidden from public, anon, authenticated, service_role;

create function {TEST_SCHEMA}.yes() returns boolean
  language sql as $$ select true $$;
create function {TEST_SCHEMA}.answer() returns integer
  language sql as $$ select 42 $$;
create function {TEST_SCHEMA}.nothing() returns integer
  language sql as $$ select null::integer $$;
create function {TEST_SCHEMA}.answers(n integer default 1) returns setof integer
  language sql as $$ select 42 from pg_catalog.generate_series(1, n) $$;
create function {TEST_SCHEMA}.rows(n integer)
  returns table (k integer, at timestamptz, tags text[], doc jsonb)
  language sql as $$
    select g, '2026-01-02 03:04:05.678+00'::timestamptz, array['a', 'b'],
           pg_catalog.jsonb_build_object('g', g)
    from pg_catalog.generate_series(1, n) g
  $$;
create function {TEST_SCHEMA}.pair(k integer, out doubled integer, out label text)
  language sql as $$ select k * 2, 'x' $$;
create function {TEST_SCHEMA}.sum_ids(ids bigint[], doc jsonb default '{{}}')
  returns jsonb
  language sql as $$
    select pg_catalog.jsonb_build_object(
      'sum', (select sum(i) from pg_catalog.unnest(ids) i), 'doc', doc)
  $$;
create function {TEST_SCHEMA}.log_note(id bigint, note text) returns void
  language sql as $$ insert into {TEST_SCHEMA}.log values (id, note) $$;
create function {TEST_SCHEMA}.log_then_fail(id bigint) returns void
  language plpgsql as $$
  begin
    insert into {TEST_SCHEMA}.log values (id, 'doomed');
    raise exception 'failed after the insert';
  end
  $$;
create function {TEST_SCHEMA}.fail(code text) returns void
  language plpgsql as $$
  begin
    raise exception 'failing with %', code using errcode = code, detail = 'd', hint = 'h';
  end
  $$;
create function {TEST_SCHEMA}.peek_hidden() returns bigint
  language sql as $$ select count(*) from {TEST_SCHEMA}.hidden $$;
create function {TEST_SCHEMA}.whoami() returns jsonb
  language sql stable as $$
    select pg_catalog.jsonb_build_object(
      'current_user', current_user,
      'claims', pg_catalog.current_setting('request.jwt.claims', true)::jsonb,
      'method', pg_catalog.current_setting('request.method', true),
      'search_path', pg_catalog.current_setting('search_path'))
  $$;
create function {TEST_SCHEMA}.overloaded(a integer) returns integer
  language sql as $$ select a $$;
create function {TEST_SCHEMA}.overloaded(a text) returns text
  language sql as $$ select a $$;
create function {TEST_SCHEMA}.echo({TEST_SCHEMA}.log) returns integer
  language sql as $$ select 1 $$;
create function {TEST_SCHEMA}.whole_body(jsonb) returns jsonb
  language sql as $$ select $1 $$;
"""


@pytest.fixture(scope="module")
def test_schema(supabase_db: Database) -> Iterator[str]:
    with supabase_db.connect() as conn:
        conn.execute(TEST_SCHEMA_SQL)
    yield TEST_SCHEMA
    with supabase_db.connect() as conn:
        conn.execute(f"drop schema if exists {TEST_SCHEMA} cascade")


@pytest.fixture
def gateway(db: Database, test_schema: str) -> Iterator[RpcGateway]:
    with db.connect() as conn:
        conn.execute(f"truncate {test_schema}.log")
    with running_gateway(db, schemas=(*DEFAULT_SCHEMAS, test_schema)) as gw:
        yield gw


@pytest.fixture
def client(gateway: RpcGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


def legacy(key: str) -> dict[str, str]:
    """Headers supabase-py sends with a legacy JWT key."""
    return {"apikey": key, "Authorization": f"Bearer {key}"}


def opaque(key: str) -> dict[str, str]:
    """Headers for a new sb_secret_/sb_publishable_ key: apikey only."""
    return {"apikey": key}


def rpc(
    client: httpx.Client,
    fn: str,
    args: dict[str, Any] | None = None,
    *,
    headers: dict[str, str],
    schema: str | None = "queue_worker",
) -> httpx.Response:
    all_headers = dict(headers)
    if schema is not None:
        all_headers["Content-Profile"] = schema
    return client.post(f"/rest/v1/rpc/{fn}", json=args, headers=all_headers)


def queue_rows(db: Database, queue: str = "email_queue") -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            f"select msg_id, read_ct, message from pgmq.q_{queue} order by msg_id"
        ).fetchall()


def assert_pgrst_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "details", "hint"}
    assert body["code"] == code
    return body


# -- the JWT helper -------------------------------------------------------------


def test_jwt_round_trip_and_refusals() -> None:
    key, other = "k" * 32, "o" * 32
    token = jwt.encode({"role": "anon", "exp": time.time() + 60}, key)
    assert jwt.decode(token, key)["role"] == "anon"

    with pytest.raises(jwt.JWTDecodeError, match="cryptographic operation failed"):
        jwt.decode(token, other)
    with pytest.raises(jwt.JWTDecodeError, match="Expected 3 parts in JWT; got 2"):
        jwt.decode("a.b", key)
    with pytest.raises(jwt.JWTClaimsError, match="JWT expired"):
        jwt.decode(jwt.encode({"exp": time.time() - 5}, key), key)
    # Within the leeway an expired token still passes, as in PostgREST.
    assert jwt.decode(jwt.encode({"exp": time.time() - 5}, key), key, leeway=30) == {
        "exp": pytest.approx(time.time() - 5, abs=2)
    }
    with pytest.raises(jwt.JWTClaimsError, match="not yet valid"):
        jwt.decode(jwt.encode({"nbf": time.time() + 600}, key), key)
    unsigned = jwt.encode({"role": "service_role"}, key, headers={"alg": "none"})
    with pytest.raises(jwt.JWTDecodeError, match="unsupported encoding algorithm"):
        jwt.decode(unsigned, key)


def test_keys_are_random_per_gateway(db: Database) -> None:
    first, second = RpcGateway(db), RpcGateway(db)
    assert first.jwt_secret != second.jwt_secret
    assert first.secret_key.startswith("sb_secret_")
    assert first.publishable_key.startswith("sb_publishable_")
    assert first.secret_key != second.secret_key
    assert jwt.decode(first.service_role_key, first.jwt_secret)["role"] == "service_role"
    assert jwt.decode(first.anon_key, first.jwt_secret)["role"] == "anon"
    assert jwt.decode(first.authenticated_key, first.jwt_secret)["role"] == "authenticated"


def test_status_table_matches_postgrest() -> None:
    assert status_for_sqlstate("42501", "permission denied", authed=True) == 403
    assert status_for_sqlstate("42501", "permission denied", authed=False) == 401
    assert status_for_sqlstate("22023", 'role "ghost" does not exist', authed=True) == 401
    assert status_for_sqlstate("25006", "read-only", authed=True) == 405
    assert status_for_sqlstate("PT418", "teapot", authed=True) == 418


# -- the worker's functions through both kinds of service key --------------------


@pytest.mark.parametrize("kind", ["legacy service_role JWT", "sb_secret key"])
def test_service_keys_drive_the_worker_functions(
    kind: str, gateway: RpcGateway, client: httpx.Client, db: Database
) -> None:
    headers = (
        legacy(gateway.service_role_key)
        if kind.startswith("legacy")
        else opaque(gateway.secret_key)
    )

    sent = rpc(
        client, "send", {"queue_name": "email_queue", "message": {"to": "a@b.c"}}, headers=headers
    )
    assert sent.status_code == 200, sent.text
    assert sent.headers["content-type"] == "application/json; charset=utf-8"
    msg_id = sent.json()
    assert isinstance(msg_id, int)
    assert queue_rows(db) == [(msg_id, 0, {"to": "a@b.c"})]

    claimed = rpc(
        client,
        "claim",
        {"queue_name": "email_queue", "msg_ids": [msg_id], "vt": 30},
        headers=headers,
    )
    assert claimed.status_code == 200, claimed.text
    [message] = claimed.json()
    assert message["msg_id"] == msg_id
    assert message["read_ct"] == 1
    assert message["message"] == {"to": "a@b.c"}
    assert set(message) == {"msg_id", "read_ct", "enqueued_at", "vt", "message", "headers"}
    vt = datetime.fromisoformat(message["vt"])
    assert vt.utcoffset() is not None  # ISO-8601 with an offset, as PostgreSQL's json gives
    assert vt > datetime.fromisoformat(message["enqueued_at"])

    # Already claimed: a repeated webhook gets nothing.
    again = rpc(
        client,
        "claim",
        {"queue_name": "email_queue", "msg_ids": [msg_id], "vt": 30},
        headers=headers,
    )
    assert again.status_code == 200
    assert again.json() == []

    acked = rpc(client, "ack", {"queue_name": "email_queue", "msg_ids": [msg_id]}, headers=headers)
    assert acked.status_code == 200, acked.text
    assert acked.json() == [msg_id]
    assert queue_rows(db) == []


def test_read_and_metrics(gateway: RpcGateway, client: httpx.Client, db: Database) -> None:
    headers = opaque(gateway.secret_key)
    ids = [
        rpc(
            client, "send", {"queue_name": "reports_queue", "message": {"n": n}}, headers=headers
        ).json()
        for n in range(3)
    ]

    read = rpc(client, "read", {"queue_name": "reports_queue", "vt": 30, "qty": 2}, headers=headers)
    assert read.status_code == 200, read.text
    assert [m["msg_id"] for m in read.json()] == ids[:2]
    assert read.headers["content-range"] == "0-1/*"
    assert [row[1] for row in queue_rows(db, "reports_queue")] == [1, 1, 0]

    # No body at all means no arguments.
    metrics = client.post(
        "/rest/v1/rpc/metrics", headers={**headers, "Content-Profile": "queue_worker"}
    )
    assert metrics.status_code == 200, metrics.text
    by_queue = {m["queue_name"]: m for m in metrics.json()}
    assert set(by_queue) == {"email_queue", "reports_queue", "payments_queue"}
    assert by_queue["reports_queue"]["queue_length"] == 3
    assert by_queue["reports_queue"]["visible_length"] == 1
    # Timestamps come as ISO-8601 with an offset.
    assert datetime.fromisoformat(read.json()[0]["enqueued_at"]).utcoffset() is not None


# -- keys and roles ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_name", "headers_for", "status"),
    [
        ("anon_key", legacy, 401),
        ("publishable_key", opaque, 401),
        ("authenticated_key", legacy, 403),
    ],
)
def test_other_roles_may_not_use_the_worker_schema(
    key_name: str,
    headers_for: Any,
    status: int,
    gateway: RpcGateway,
    client: httpx.Client,
    db: Database,
) -> None:
    response = rpc(
        client,
        "send",
        {"queue_name": "email_queue", "message": {"x": 1}},
        headers=headers_for(getattr(gateway, key_name)),
    )
    body = assert_pgrst_error(response, status, "42501")
    # They may use the schema for queue_worker.enqueue alone (tests/test_public_enqueue.py).
    assert body["message"] == "permission denied for function send"
    assert queue_rows(db) == []


def test_user_token_with_publishable_key_runs_as_authenticated(
    gateway: RpcGateway, client: httpx.Client
) -> None:
    headers = {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {gateway.authenticated_key}",
    }
    response = rpc(client, "whoami", headers=headers, schema=TEST_SCHEMA)
    assert response.status_code == 200, response.text
    assert response.json()["current_user"] == "authenticated"


@pytest.mark.parametrize(
    ("key_name", "role"),
    [("service_role_key", "service_role"), ("secret_key", "service_role"), ("anon_key", "anon")],
)
def test_call_runs_as_the_key_role_with_claims(
    key_name: str, role: str, gateway: RpcGateway, client: httpx.Client
) -> None:
    key = getattr(gateway, key_name)
    headers = opaque(key) if key.startswith("sb_") else legacy(key)
    response = rpc(client, "whoami", headers=headers, schema=TEST_SCHEMA)
    assert response.status_code == 200, response.text
    me = response.json()
    assert me["current_user"] == role
    assert me["claims"]["role"] == role
    assert me["method"] == "POST"
    assert me["search_path"] == f'"{TEST_SCHEMA}", "public", "extensions"'


def test_authorization_header_takes_precedence_over_apikey(
    gateway: RpcGateway, client: httpx.Client
) -> None:
    headers = {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.service_role_key}"}
    response = rpc(client, "whoami", headers=headers, schema=TEST_SCHEMA)
    assert response.json()["current_user"] == "service_role"


def test_secret_key_refused_from_a_browser(
    gateway: RpcGateway, client: httpx.Client, db: Database
) -> None:
    response = rpc(
        client,
        "send",
        {"queue_name": "email_queue", "message": {}},
        headers={**opaque(gateway.secret_key), "User-Agent": BROWSER_UA},
    )
    assert response.status_code == 401
    assert "browser" in response.json()["message"]
    assert queue_rows(db) == []
    # The legacy service_role JWT is not checked this way, and the publishable key is for browsers.
    ok = rpc(
        client,
        "yes",
        headers={**opaque(gateway.publishable_key), "User-Agent": BROWSER_UA},
        schema=TEST_SCHEMA,
    )
    assert ok.status_code == 200


def test_missing_and_unknown_keys(gateway: RpcGateway, client: httpx.Client) -> None:
    missing = client.post("/rest/v1/rpc/metrics", headers={"Content-Profile": "queue_worker"})
    assert missing.status_code == 401
    assert missing.json()["message"] == "No API key found in request"

    unknown = rpc(client, "metrics", headers=opaque("sb_secret_" + "x" * 32))
    assert unknown.status_code == 401
    assert unknown.json()["message"] == "Invalid API key"

    forged = jwt.encode({"role": "service_role"}, "not-the-project-secret-" * 2)
    bad_signature = assert_pgrst_error(
        rpc(client, "metrics", headers=legacy(forged)), 401, "PGRST301"
    )
    assert bad_signature["message"] == "JWT cryptographic operation failed"

    expired = gateway.mint_jwt("service_role", expires_in=-120)
    response = rpc(client, "metrics", headers=legacy(expired))
    assert assert_pgrst_error(response, 401, "PGRST303")["message"] == "JWT expired"
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')

    garbage = assert_pgrst_error(
        rpc(client, "metrics", headers=legacy("not-a-jwt")), 401, "PGRST301"
    )
    assert garbage["message"] == "Expected 3 parts in JWT; got 1"
    assert gateway.transactions == 0  # refused before the database


# -- schemas and function resolution ------------------------------------------------


def test_schema_not_exposed(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(
        client,
        "send",
        {"queue_name": "email_queue", "msg": {}},
        headers=legacy(gateway.service_role_key),
        schema="pgmq",
    )
    assert response.status_code == 406
    assert response.json() == {
        "code": "PGRST106",
        "details": None,
        "hint": "Only the following schemas are exposed: "
        f"public, graphql_public, queue_worker, {TEST_SCHEMA}",
        "message": "Invalid schema: pgmq",
    }


def test_default_schema_is_the_first_exposed(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(client, "answer", headers=opaque(gateway.secret_key), schema=None)
    body = assert_pgrst_error(response, 404, "PGRST202")
    assert body["message"] == (
        "Could not find the function public.answer without parameters in the schema cache"
    )
    assert body["details"] == (
        "Searched for the function public.answer without parameters or with a single unnamed "
        "json/jsonb parameter, but no matches were found in the schema cache."
    )


def test_wrong_argument_names(gateway: RpcGateway, client: httpx.Client, db: Database) -> None:
    headers = opaque(gateway.secret_key)
    response = rpc(client, "send", {"queue": "email_queue", "msg": {"x": 1}}, headers=headers)
    body = assert_pgrst_error(response, 404, "PGRST202")
    assert body["message"] == (
        "Could not find the function queue_worker.send(msg, queue) in the schema cache"
    )
    assert body["details"] == (
        "Searched for the function queue_worker.send with parameters msg, queue or with a "
        "single unnamed json/jsonb parameter, but no matches were found in the schema cache."
    )
    assert body["hint"] == (
        "Perhaps you meant to call the function "
        "queue_worker.send(delay_seconds, headers, message, queue_name)"
    )
    # A required argument missing, or one too many, does not match either.
    missing = rpc(client, "send", {"queue_name": "email_queue"}, headers=headers)
    assert assert_pgrst_error(missing, 404, "PGRST202")["message"] == (
        "Could not find the function queue_worker.send(queue_name) in the schema cache"
    )
    extra = rpc(
        client, "ack", {"queue_name": "email_queue", "msg_ids": [], "force": True}, headers=headers
    )
    assert_pgrst_error(extra, 404, "PGRST202")
    unknown = rpc(client, "sned", {"queue_name": "email_queue"}, headers=headers)
    assert assert_pgrst_error(unknown, 404, "PGRST202")["hint"] == (
        "Perhaps you meant to call the function queue_worker.send"
    )
    assert queue_rows(db) == []


def test_ambiguous_overload(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(
        client, "overloaded", {"a": 1}, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA
    )
    body = assert_pgrst_error(response, 300, "PGRST203")
    assert body["message"].startswith("Could not choose the best candidate function between: ")
    assert f"{TEST_SCHEMA}.overloaded(a => integer)" in body["message"]
    assert f"{TEST_SCHEMA}.overloaded(a => text)" in body["message"]


def test_single_unnamed_jsonb_parameter_gets_the_whole_body(
    gateway: RpcGateway, client: httpx.Client
) -> None:
    response = rpc(
        client,
        "whole_body",
        {"any": ["thing", 1]},
        headers=opaque(gateway.secret_key),
        schema=TEST_SCHEMA,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"any": ["thing", 1]}


def test_invalid_json_body(gateway: RpcGateway, client: httpx.Client) -> None:
    response = client.post(
        "/rest/v1/rpc/metrics",
        content=b"{not json",
        headers={
            **opaque(gateway.secret_key),
            "Content-Profile": "queue_worker",
            "Content-Type": "application/json",
        },
    )
    assert assert_pgrst_error(response, 400, "PGRST102")["message"] == "Empty or invalid json"


# -- response shapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "args", "expected_text"),
    [
        ("yes", None, "true"),
        ("answer", None, "42"),
        ("nothing", None, "null"),
        ("answers", None, "[42]"),
        ("answers", {"n": 3}, "[42, 42, 42]"),
        ("answers", {"n": 0}, "[]"),
        ("rows", {"n": 0}, "[]"),
    ],
)
def test_scalar_and_setof_shapes(
    fn: str,
    args: dict[str, Any] | None,
    expected_text: str,
    gateway: RpcGateway,
    client: httpx.Client,
) -> None:
    response = rpc(client, fn, args, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.text == expected_text


def test_setof_composite_is_an_array_of_objects(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(client, "rows", {"n": 2}, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA)
    assert response.status_code == 200, response.text
    assert response.json() == [
        {"k": 1, "at": "2026-01-02T03:04:05.678+00:00", "tags": ["a", "b"], "doc": {"g": 1}},
        {"k": 2, "at": "2026-01-02T03:04:05.678+00:00", "tags": ["a", "b"], "doc": {"g": 2}},
    ]


def test_single_composite_is_an_object(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(
        client, "pair", {"k": 21}, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"doubled": 42, "label": "x"}


def test_arguments_are_converted_like_postgrest(gateway: RpcGateway, client: httpx.Client) -> None:
    headers = opaque(gateway.secret_key)
    response = rpc(
        client,
        "sum_ids",
        {"ids": [1, 2, 39], "doc": {"deep": [True, None]}},
        headers=headers,
        schema=TEST_SCHEMA,
    )
    assert response.json() == {"sum": 42, "doc": {"deep": [True, None]}}
    # The optional argument may be left out: its default applies.
    defaulted = rpc(client, "sum_ids", {"ids": [5]}, headers=headers, schema=TEST_SCHEMA)
    assert defaulted.json() == {"sum": 5, "doc": {}}


def test_void_is_204_and_commits(gateway: RpcGateway, client: httpx.Client, db: Database) -> None:
    response = rpc(
        client,
        "log_note",
        {"id": 7, "note": "hello"},
        headers=opaque(gateway.secret_key),
        schema=TEST_SCHEMA,
    )
    assert response.status_code == 204
    assert response.content == b""
    assert "content-type" not in response.headers
    with db.connect() as conn:
        assert conn.execute(f"select id, note from {TEST_SCHEMA}.log").fetchall() == [(7, "hello")]


def test_failed_call_rolls_back(gateway: RpcGateway, client: httpx.Client, db: Database) -> None:
    response = rpc(
        client, "log_then_fail", {"id": 8}, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA
    )
    body = assert_pgrst_error(response, 400, "P0001")
    assert body["message"] == "failed after the insert"
    with db.connect() as conn:
        assert conn.execute(f"select count(*) from {TEST_SCHEMA}.log").fetchone() == (0,)


def test_get_with_query_string_runs_read_only(
    gateway: RpcGateway, client: httpx.Client, db: Database
) -> None:
    headers = {**opaque(gateway.secret_key), "Accept-Profile": TEST_SCHEMA}
    response = client.get("/rest/v1/rpc/answers", params={"n": "2"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == [42, 42]
    who = client.get("/rest/v1/rpc/whoami", headers=headers)
    assert who.json()["method"] == "GET"
    writing = client.get("/rest/v1/rpc/log_note", params={"id": "9", "note": "x"}, headers=headers)
    assert_pgrst_error(writing, 405, "25006")
    with db.connect() as conn:
        assert conn.execute(f"select count(*) from {TEST_SCHEMA}.log").fetchone() == (0,)


def test_other_methods_are_refused(gateway: RpcGateway, client: httpx.Client) -> None:
    response = client.put("/rest/v1/rpc/answer", json={}, headers=opaque(gateway.secret_key))
    assert_pgrst_error(response, 405, "PGRST101")


# -- errors -----------------------------------------------------------------------------


def test_unknown_queue_is_p0001_400(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(
        client,
        "claim",
        {"queue_name": "nope", "msg_ids": [1], "vt": 30},
        headers=legacy(gateway.service_role_key),
    )
    body = assert_pgrst_error(response, 400, "P0001")
    assert body["message"] == "unknown queue: nope"
    assert body["hint"] == (
        "Attach it in a migration with select queue_worker.attach_queue('<name>'), "
        "or check the name."
    )


def test_invalid_parameter_is_400(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(
        client,
        "claim",
        {"queue_name": "email_queue", "msg_ids": [1], "vt": 0},
        headers=legacy(gateway.service_role_key),
    )
    assert assert_pgrst_error(response, 400, "22023")["message"] == (
        "vt must be a positive number of seconds"
    )


@pytest.mark.parametrize(
    ("sqlstate", "status"),
    [
        ("P0001", 400),
        ("23505", 409),
        ("23503", 409),
        ("42883", 404),
        ("42P01", 404),
        ("08006", 503),
        ("53300", 503),
        ("40001", 500),
        ("40P01", 500),
        ("57014", 500),
        ("XX000", 500),
        ("22012", 400),
        ("PT402", 402),
    ],
)
def test_sqlstate_to_http_status(
    sqlstate: str, status: int, gateway: RpcGateway, client: httpx.Client
) -> None:
    response = rpc(
        client, "fail", {"code": sqlstate}, headers=opaque(gateway.secret_key), schema=TEST_SCHEMA
    )
    assert assert_pgrst_error(response, status, sqlstate) == {
        "code": sqlstate,
        "message": f"failing with {sqlstate}",
        "details": "d",
        "hint": "h",
    }


def test_privilege_error_is_403_for_service_role(gateway: RpcGateway, client: httpx.Client) -> None:
    response = rpc(client, "peek_hidden", headers=opaque(gateway.secret_key), schema=TEST_SCHEMA)
    body = assert_pgrst_error(response, 403, "42501")
    assert body["message"] == "permission denied for table hidden"


def test_unknown_path_is_pgrst125(gateway: RpcGateway, client: httpx.Client) -> None:
    response = client.get("/rest/v1/nothing-here", headers=opaque(gateway.secret_key))
    assert_pgrst_error(response, 404, "PGRST125")


# -- faults and counters ------------------------------------------------------------------


def test_down_switch(gateway: RpcGateway, client: httpx.Client, db: Database) -> None:
    headers = opaque(gateway.secret_key)
    args = {"queue_name": "email_queue", "message": {"n": 1}}

    gateway.set_down(True)
    down = rpc(client, "send", args, headers=headers)
    body = assert_pgrst_error(down, 503, "PGRST000")
    assert body["message"] == "Database connection error. Retrying the connection."
    assert queue_rows(db) == []
    assert gateway.transactions == 0

    gateway.set_down(False)
    up = rpc(client, "send", args, headers=headers)
    assert up.status_code == 200, up.text
    assert len(queue_rows(db)) == 1


def test_delayed_answers_come_late_after_the_database_committed(
    gateway: RpcGateway, client: httpx.Client, db: Database
) -> None:
    headers = opaque(gateway.secret_key)
    rpc(client, "send", {"queue_name": "email_queue", "message": {"n": 1}}, headers=headers)
    gateway.delay_answers(2.0, "read")
    try:
        # The client gives up before the answer comes: the read has claimed anyway.
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/rest/v1/rpc/read",
                json={"queue_name": "email_queue", "vt": 30, "qty": 1},
                headers={**headers, "Content-Profile": "queue_worker"},
                timeout=0.5,
            )
        assert [row[1] for row in queue_rows(db)] == [1]
        # Other functions answer at once.
        started = time.monotonic()
        assert rpc(client, "metrics", headers=headers).status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        gateway.delay_answers(0)
    started = time.monotonic()
    read = rpc(client, "read", {"queue_name": "email_queue", "vt": 30, "qty": 1}, headers=headers)
    assert read.status_code == 200
    assert time.monotonic() - started < 1.0


def test_stop_refuses_connections_and_start_restores_the_same_url(
    gateway: RpcGateway, client: httpx.Client
) -> None:
    url = gateway.url
    gateway.stop()
    assert not gateway.running
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=url) as fresh:
        rpc(fresh, "metrics", headers=opaque(gateway.secret_key))
    gateway.start()
    assert gateway.url == url
    with httpx.Client(base_url=url) as fresh:
        assert rpc(fresh, "metrics", headers=opaque(gateway.secret_key)).status_code == 200


def test_database_unreachable_is_503(db: Database) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    # Nothing listens on free_port once the probe socket is closed.
    dead = f"postgresql://authenticator@127.0.0.1:{free_port}/{db.name}"
    with (
        running_gateway(db, database_url=dead, pool_timeout=0.5) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as client,
    ):
        response = rpc(client, "metrics", headers=opaque(gw.secret_key))
    body = assert_pgrst_error(response, 503, "PGRST000")
    assert "refused" in json.dumps(body["details"]).lower()


def test_counters(gateway: RpcGateway, client: httpx.Client) -> None:
    headers = legacy(gateway.service_role_key)
    for n in range(3):
        rpc(client, "send", {"queue_name": "payments_queue", "message": {"n": n}}, headers=headers)
    rpc(client, "read", {"queue_name": "payments_queue", "vt": 30, "qty": 10}, headers=headers)
    rpc(client, "metrics", headers={})  # refused: no apikey, still a call received

    assert gateway.calls == {
        "queue_worker.send": 3,
        "queue_worker.read": 1,
        "queue_worker.metrics": 1,
    }
    assert gateway.call_count("send", "queue_worker") == 3
    assert gateway.total_calls == 5
    assert gateway.transactions == 4  # one per call that reached the database

    gateway.reset_counters()
    assert gateway.calls == {}
    assert gateway.transactions == 0
