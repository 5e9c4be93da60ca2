"""Idempotency keys: a job whose key already succeeded is acked without running.

The key travels in the job's pgmq headers (`idempotency_key`); the check is inside
the claim (and read) function, the record inside the ack, so a job without a key
costs no extra call and a key is kept only for a job that succeeded.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.rpc_gateway import RpcGateway
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import queue_rows

TOKEN = secrets.token_urlsafe(32)
QUEUE = "reports_queue"  # any attached queue; nothing runs in the SQL-level tests
MAIL = {"to": "a@example.com", "subject": "Receipt", "text": "Paid."}


def send(db: Database, body: dict[str, Any], key: str | None, queue: str = QUEUE) -> int:
    headers = json.dumps({"idempotency_key": key}) if key is not None else None
    with db.connect(role=OWNER_ROLE) as conn:
        [(msg_id,)] = conn.execute(
            "select * from pgmq.send(%s, %s::jsonb, %s::jsonb)",
            [queue, json.dumps(body), headers],
        ).fetchall()
    return int(msg_id)


def as_worker(db: Database, statement: str, *params: Any) -> list[Any]:
    with db.connect(role="service_role") as conn:
        return [row[0] for row in conn.execute(statement, list(params)).fetchall()]


def claim(db: Database, *msg_ids: int) -> list[int]:
    return as_worker(db, "select msg_id from queue_worker.claim(%s, %s, 30)", QUEUE, list(msg_ids))


def read(db: Database, qty: int = 10) -> list[int]:
    return sorted(as_worker(db, "select msg_id from queue_worker.read(%s, 30, %s)", QUEUE, qty))


def ack(db: Database, *msg_ids: int) -> list[int]:
    return sorted(as_worker(db, "select * from queue_worker.ack(%s, %s)", QUEUE, list(msg_ids)))


def keys(db: Database) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "select queue_name, msg_id from queue_worker.idempotency_keys order by msg_id"
        ).fetchall()


def remaining(db: Database, queue: str = QUEUE) -> list[int]:
    with db.connect() as conn:
        return [
            row[0]
            for row in conn.execute(
                sql.SQL("select msg_id from pgmq.{} order by 1").format(
                    sql.Identifier(f"q_{queue}")
                )
            ).fetchall()
        ]


def test_a_second_job_with_a_succeeded_key_is_acked_inside_the_claim(db: Database) -> None:
    first = send(db, {"n": 1}, "order-17")
    assert claim(db, first) == [first]
    assert ack(db, first) == [first]
    assert keys(db) == [(QUEUE, first)]
    again = send(db, {"n": 1}, "order-17")
    other = send(db, {"n": 2}, "order-18")
    plain = send(db, {"n": 3}, None)
    assert sorted(claim(db, again, other, plain)) == sorted([other, plain])
    assert again not in remaining(db)  # deleted, not left for later
    assert sorted(remaining(db)) == sorted([other, plain])


def test_the_sweepers_read_skips_succeeded_keys_too(db: Database) -> None:
    first = send(db, {"n": 1}, "k-1")
    claim(db, first)
    ack(db, first)
    copies = [send(db, {"n": 1}, "k-1") for _ in range(3)]
    fresh = send(db, {"n": 2}, "k-2")
    assert read(db) == [fresh]
    assert remaining(db) == [fresh]
    assert all(copy not in remaining(db) for copy in copies)


def test_a_failed_job_leaves_no_key_so_its_next_copy_runs(db: Database) -> None:
    first = send(db, {"n": 1}, "k-9")
    claim(db, first)
    as_worker(db, "select * from queue_worker.archive(%s, %s)", QUEUE, [first])
    assert keys(db) == []
    again = send(db, {"n": 1}, "k-9")
    assert claim(db, again) == [again]


def test_a_key_expires_with_its_queues_retention(db: Database) -> None:
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute(
            "update queue_worker.queues set idempotency_retention = interval '0' "
            "where queue_name = %s",
            [QUEUE],
        )
    try:
        first = send(db, {"n": 1}, "k-1")
        claim(db, first)
        ack(db, first)
        again = send(db, {"n": 1}, "k-1")
        assert claim(db, again) == [again]  # retention 0: the key no longer counts
        ack(db, again)
        assert keys(db) == [(QUEUE, again)]  # recorded again, refreshed
    finally:
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute(
                "update queue_worker.queues set idempotency_retention = default "
                "where queue_name = %s",
                [QUEUE],
            )


def test_two_copies_acked_together_record_the_key_once(db: Database) -> None:
    a, b = send(db, {"n": 1}, "same"), send(db, {"n": 1}, "same")
    assert sorted(claim(db, a, b)) == [a, b]  # claimed at the same moment: both run
    assert ack(db, a, b) == [a, b]
    assert keys(db) == [(QUEUE, a)]


def test_expired_keys_are_deleted_in_batches_by_acks_that_record_keys(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(
            "insert into queue_worker.idempotency_keys (queue_name, key_hash, msg_id, expires_at) "
            "select 'email_queue', sha256(i::text::bytea), i, now() - interval '1 hour' "
            "from generate_series(1, 450) i"
        )
    plain = send(db, {"n": 1}, None)
    claim(db, plain)
    ack(db, plain)
    count = "select count(*) from queue_worker.idempotency_keys where expires_at <= now()"
    with db.connect() as conn:
        assert conn.execute(count).fetchone() == (450,)  # an ack without keys does no cleanup
    for round_ in range(3):
        msg_id = send(db, {"n": round_}, f"key-{round_}")
        claim(db, msg_id)
        ack(db, msg_id)
        with db.connect() as conn:
            assert conn.execute(count).fetchone() == (max(0, 450 - 200 * (round_ + 1)),)


def test_any_key_text_is_kept_as_a_digest(db: Database) -> None:
    huge = "k" * 100_000 + "\u2028 ünïcødé"
    first = send(db, {"n": 1}, huge)
    claim(db, first)
    ack(db, first)
    with db.connect() as conn:
        [(digest,)] = conn.execute("select key_hash from queue_worker.idempotency_keys").fetchall()
        assert conn.execute(
            "select sha256(convert_to(%s, 'UTF8')) = %s", [huge, digest]
        ).fetchone() == (True,)
    assert claim(db, send(db, {"n": 1}, huge)) == []


def test_api_roles_get_nothing_on_the_keys(db: Database) -> None:
    for role in ("anon", "authenticated"):
        with db.connect(role=role) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select * from queue_worker.idempotency_keys")


# -- through the service --------------------------------------------------------------


def test_a_duplicate_enqueue_through_the_api_sends_one_mail(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    gateway: RpcGateway,
) -> None:
    service = start_service(api_token=TOKEN)
    auth = {"Authorization": "Bearer " + TOKEN}

    def enqueue(key: str | None) -> httpx.Response:
        headers = {**auth, **({"Idempotency-Key": key} if key else {})}
        return httpx.post(f"{service.url}/queues/email_queue/messages", json=MAIL, headers=headers)

    assert enqueue("receipt-pi_1").status_code == 201
    smtp.wait_for(1)
    wait_until(lambda: queue_rows(db, "email_queue") == [], what="the first job's ack")
    gateway.reset_counters()
    second = enqueue("receipt-pi_1")
    assert second.status_code == 201
    wait_until(lambda: queue_rows(db, "email_queue") == [], what="the copy to be dropped")
    assert len(smtp.received) == 1  # the copy never ran
    # The check lives in the claim: no extra call for it.
    assert gateway.call_count("claim", "queue_worker") == 1
    assert gateway.call_count("ack", "queue_worker") == 0
    # A job without a key, and one with another key, run as always.
    assert enqueue(None).status_code == 201
    assert enqueue("receipt-pi_2").status_code == 201
    smtp.wait_for(3)


@pytest.mark.parametrize("key", ["", "a" * 256, "tab\there", "é"])
def test_the_api_refuses_an_unusable_idempotency_key(
    start_service: ServiceFactory, key: str
) -> None:
    service = start_service(api_token=TOKEN, register=False)
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        json=MAIL,
        headers={"Authorization": "Bearer " + TOKEN, "Idempotency-Key": key.encode()},
    )
    assert response.status_code == 422, response.text


def test_a_job_without_a_key_costs_a_claim_and_an_ack_and_nothing_more(
    db: Database, service: Service, sender: PgNetSender, smtp: SmtpServer, gateway: RpcGateway
) -> None:
    gateway.reset_counters()
    send(db, MAIL, None, queue="email_queue")
    smtp.wait_for(1)
    wait_until(lambda: queue_rows(db, "email_queue") == [], what="the ack")
    calls = dict(gateway.calls)
    calls.pop("queue_worker.paused_queues", None)  # each process reads the flags every 5 s
    assert calls == {"queue_worker.claim": 1, "queue_worker.ack": 1}
