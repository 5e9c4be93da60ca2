"""The app enqueues as its users: `queue_worker.enqueue`, on the queues that allow it.

Called as supabase-js calls it (`supabase.schema('queue_worker').rpc('enqueue', ...)`:
POST /rest/v1/rpc/enqueue with `Content-Profile: queue_worker`) through the RPC
gateway, with the publishable or anon key and a user's token, and from SQL as the
`authenticated` role. Nothing is allowed until the queue's owner says so in a
migration; then only the roles named, only JSON objects within the size bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Service
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database, attached_queue
from tests.support.rpc_gateway import RpcGateway
from tests.support.smtp import SmtpServer

QUEUE = "contact_queue"
JOB = {"name": "Ada", "text": "Please call me back"}


@pytest.fixture
def contact_queue(db: Database) -> Iterator[str]:
    """A queue of the app's own, attached as its migration would, dropped afterwards."""
    with attached_queue(db, QUEUE) as queue:
        yield queue


def allow(db: Database, queue: str, *roles: str, max_bytes: int | None = None) -> None:
    """What the app's own migration says: `select queue_worker.allow_enqueue(...)`."""
    with db.connect(role=OWNER_ROLE) as conn:
        if max_bytes is None:
            conn.execute("select queue_worker.allow_enqueue(%s, %s)", [queue, list(roles)])
        else:
            conn.execute(
                "select queue_worker.allow_enqueue(%s, %s, %s)", [queue, list(roles), max_bytes]
            )


def as_user(gateway: RpcGateway) -> dict[str, str]:
    """A signed-in user in a browser: the publishable key and the user's access token."""
    return {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {gateway.authenticated_key}",
    }


def as_anon(gateway: RpcGateway) -> dict[str, str]:
    return {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.anon_key}"}


def rpc_enqueue(gateway: RpcGateway, who: dict[str, str], **arguments: Any) -> httpx.Response:
    return httpx.post(
        gateway.rpc_url("enqueue"),
        json=arguments,
        headers={**who, "Content-Profile": "queue_worker"},
    )


def messages(db: Database, queue: str) -> list[Any]:
    with db.connect() as conn:
        rows = conn.execute(f"select message from pgmq.q_{queue} order by msg_id").fetchall()
    return [row[0] for row in rows]


def test_nobody_but_service_role_enqueues_until_the_owner_allows(
    db: Database, gateway: RpcGateway, contact_queue: str
) -> None:
    user = rpc_enqueue(gateway, as_user(gateway), queue_name=contact_queue, message=JOB)
    assert user.status_code == 403
    assert user.json()["code"] == "42501"
    assert (
        user.json()["message"] == "queue contact_queue does not take jobs from role authenticated"
    )
    anon = rpc_enqueue(gateway, as_anon(gateway), queue_name=contact_queue, message=JOB)
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")
    # A queue that does not exist, or is not attached, is refused alike: callers learn
    # no queue names.
    ghost = rpc_enqueue(gateway, as_user(gateway), queue_name="nope_queue", message=JOB)
    assert ghost.status_code == 403
    assert messages(db, contact_queue) == []

    server = rpc_enqueue(
        gateway, {"apikey": gateway.secret_key}, queue_name=contact_queue, message=JOB
    )
    assert server.status_code == 200, server.text
    assert messages(db, contact_queue) == [JOB]


def test_an_allowed_role_enqueues_and_no_other(
    db: Database, gateway: RpcGateway, contact_queue: str
) -> None:
    allow(db, contact_queue, "authenticated")
    response = rpc_enqueue(gateway, as_user(gateway), queue_name=contact_queue, message=JOB)
    assert response.status_code == 200, response.text
    msg_id = response.json()
    assert isinstance(msg_id, int)
    anon = rpc_enqueue(gateway, as_anon(gateway), queue_name=contact_queue, message=JOB)
    assert anon.status_code == 401

    allow(db, contact_queue, "anon", "authenticated")
    later = rpc_enqueue(
        gateway, as_anon(gateway), queue_name=contact_queue, message=JOB, delay_seconds=60
    )
    assert later.status_code == 200, later.text
    with db.connect() as conn:
        rows = conn.execute(
            f"select msg_id, vt > now() + interval '50 seconds' from pgmq.q_{contact_queue} "
            "order by msg_id"
        ).fetchall()
    assert rows == [(msg_id, False), (later.json(), True)]

    allow(db, contact_queue)  # nobody again
    again = rpc_enqueue(gateway, as_user(gateway), queue_name=contact_queue, message=JOB)
    assert again.status_code == 403


@pytest.mark.parametrize(
    ("arguments", "status", "code"),
    [
        ({"message": {"text": "x" * 300}}, 413, "PT413"),
        ({"message": ["not", "an", "object"]}, 400, "22023"),
        ({"message": "text"}, 400, "22023"),
        ({"message": JOB, "delay_seconds": -1}, 400, "22023"),
        ({"message": JOB, "delay_seconds": 604_801}, 400, "22023"),
    ],
    ids=["too-large", "array", "string", "negative-delay", "delay-over-a-week"],
)
def test_what_an_allowed_role_sends_is_bounded(
    db: Database,
    gateway: RpcGateway,
    contact_queue: str,
    arguments: dict[str, Any],
    status: int,
    code: str,
) -> None:
    allow(db, contact_queue, "authenticated", max_bytes=256)
    response = rpc_enqueue(gateway, as_user(gateway), queue_name=contact_queue, **arguments)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert messages(db, contact_queue) == []


APP_LOGIN = "qw_app_user"


@pytest.fixture
def app_login(db: Database) -> str:
    """A login an app might use for SQL, member of `authenticated` and nothing else."""
    with db.connect() as conn:
        conn.execute(
            f"do $$ begin if not exists (select from pg_roles where rolname = '{APP_LOGIN}') "
            f"then create role {APP_LOGIN} login noinherit; end if; end $$"
        )
        conn.execute(f"grant authenticated to {APP_LOGIN}")
    return db.url_as(APP_LOGIN)


def test_from_sql_as_the_authenticated_role(
    db: Database, contact_queue: str, app_login: str
) -> None:
    allow(db, contact_queue, "authenticated")
    with psycopg.connect(app_login, autocommit=True) as conn:
        conn.execute("set role authenticated")
        [(msg_id,)] = conn.execute(
            "select queue_worker.enqueue(%s, %s::jsonb)", [contact_queue, json.dumps(JOB)]
        ).fetchall()
        # The role enqueue() reads is one the session may become: it cannot claim more.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select set_config('role', 'service_role', false)")
        # Still no right on the queue table itself, nor on the worker's other functions.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select * from pgmq.q_{contact_queue}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select queue_worker.send(%s, '{}')", [contact_queue])
    with db.connect(role="anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select queue_worker.enqueue(%s, '{}')", [contact_queue])
    assert messages(db, contact_queue) == [JOB]
    assert isinstance(msg_id, int)


def test_only_the_owner_says_who_may_enqueue(db: Database, contact_queue: str) -> None:
    for role in ("anon", "authenticated", "service_role"):
        with db.connect(role=role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select queue_worker.allow_enqueue(%s)", [contact_queue])
    with db.connect(role=OWNER_ROLE) as conn:
        with pytest.raises(
            psycopg.errors.InvalidParameterValue, match="no such role: authenticted"
        ):
            conn.execute("select queue_worker.allow_enqueue(%s, array['authenticted'])", [QUEUE])
        with pytest.raises(psycopg.errors.RaiseException, match="unknown queue"):
            conn.execute("select queue_worker.allow_enqueue('nope_queue')")


def test_a_users_job_is_delivered_end_to_end(
    db: Database,
    gateway: RpcGateway,
    service: Service,
    sender: PgNetSender,
    smtp: SmtpServer,
) -> None:
    """The user story: the app enqueues as the signed-in user, the trigger rings, mail goes."""
    allow(db, "email_queue", "authenticated")
    try:
        job = {"to": "support@example.com", "subject": "From a user", "text": "Hello"}
        response = rpc_enqueue(gateway, as_user(gateway), queue_name="email_queue", message=job)
        assert response.status_code == 200, response.text
        [mail] = smtp.wait_for(1)
    finally:
        allow(db, "email_queue")
    assert mail["Subject"] == "From a user"
