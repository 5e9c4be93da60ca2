"""Dead letters at scale: bulk replay and purge by filter, in windows; retention; headers kept.

Backend-level tests run through both backends (the RPC client over the gateway and
the direct SQL pool, tests/test_backends.py's fixture); the rest go through the
running service's manual API and the CLI.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import operations
from app.operations import OperationError
from app.queue.backend import DeadFilter
from app.worker.retention import Retention, expire
from tests.conftest import Service, ServiceFactory
from tests.support.cli import run_cli
from tests.support.postgres import Database
from tests.support.waiting import wait_until
from tests.test_api import metric
from tests.test_backends import Backend, backend  # noqa: F401 - the fixture
from tests.test_e2e import archived_rows, queue_rows

QUEUE = "email_queue"
REGISTRY = {QUEUE: object()}  # operations only ask whether a queue is served


def bury(db: Database, errors: list[str], *, headers: dict[str, Any] | None = None) -> list[int]:
    """Dead letters as the runner leaves them: enqueued, then archived with an error each."""
    ids = []
    with db.connect() as conn:
        for n, _ in enumerate(errors):
            if headers is None:
                row = conn.execute(
                    "select pgmq.send(%s, %s::jsonb)", [QUEUE, json.dumps({"n": n})]
                ).fetchone()
            else:
                row = conn.execute(
                    "select pgmq.send(%s, %s::jsonb, %s::jsonb)",
                    [QUEUE, json.dumps({"n": n}), json.dumps(headers)],
                ).fetchone()
            assert row is not None
            ids.append(int(row[0]))
    reasons = {
        str(msg_id): {"type": "PermanentError", "message": error, "attempt": 5}
        for msg_id, error in zip(ids, errors, strict=True)
    }
    with db.connect(role="service_role") as conn:
        conn.execute(
            "select queue_worker.archive(%s, %s, %s::jsonb)", [QUEUE, ids, json.dumps(reasons)]
        )
    return ids


def age(db: Database, msg_ids: list[int], days: float) -> None:
    with db.connect() as conn:
        conn.execute(
            f"update pgmq.a_{QUEUE} set archived_at = now() - make_interval(secs => %s)"
            " where msg_id = any(%s)",
            [days * 86400, msg_ids],
        )


def dead_ids(db: Database) -> list[int]:
    return [row[0] for row in archived_rows(db)]


def bodies(db: Database) -> list[Any]:
    with db.connect() as conn:
        return [
            row[0] for row in conn.execute(f"select message from pgmq.q_{QUEUE} order by msg_id")
        ]


pytestmark = pytest.mark.anyio


async def test_replay_keeps_the_jobs_headers_but_not_its_error(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    [msg_id] = bury(db, ["550 no such user"], headers={"idempotency_key": "order-17"})
    new_id = await backend.queue.replay(QUEUE, msg_id)
    assert new_id is not None
    with db.connect() as conn:
        row = conn.execute(f"select headers from pgmq.q_{QUEUE} where msg_id = %s", [new_id])
        assert row.fetchone() == ({"idempotency_key": "order-17"},)
        left = conn.execute(
            "select count(*) from queue_worker.dead_letters where msg_id = %s", [msg_id]
        ).fetchone()
    assert left == (0,)


async def test_bulk_replay_takes_only_matching_dead_letters_a_window_at_a_time(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    errors = ["SMTP 550 no such user", "timeout", "smtp 550 mailbox full", "other", "SMTP 550"]
    ids = bury(db, errors, headers={"idempotency_key": "k"})
    done = await operations.bulk_dead(
        backend.queue, REGISTRY, QUEUE, "replay", DeadFilter(error_text="smtp 550"), batch=2
    )
    # Five archived rows in windows of two: three calls that found rows, and the end.
    assert (done.scanned, done.affected, done.batches) == (5, 3, 3)
    assert dead_ids(db) == [ids[1], ids[3]]
    assert sorted(b["n"] for b in bodies(db)) == [0, 2, 4]
    with db.connect() as conn:
        headers = conn.execute(f"select headers from pgmq.q_{QUEUE}").fetchall()
    assert headers == [({"idempotency_key": "k"},)] * 3


async def test_bulk_purge_by_time_range_and_refusal_without_a_filter(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    ids = bury(db, ["a", "b", "c", "d"])
    age(db, ids[:2], days=3)
    with pytest.raises(OperationError, match="no filter"):
        await operations.bulk_dead(backend.queue, REGISTRY, QUEUE, "purge", DeadFilter())
    now = datetime.now(UTC)
    done = await operations.bulk_dead(
        backend.queue,
        REGISTRY,
        QUEUE,
        "purge",
        DeadFilter(archived_from=now - timedelta(days=4), archived_to=now - timedelta(days=2)),
    )
    assert (done.scanned, done.affected) == (4, 2)
    assert dead_ids(db) == ids[2:]
    assert await backend.queue.dead_letter_counts() == {
        "email_queue": 2,
        "payments_queue": 0,
        "reports_queue": 0,
    }
    everything = await operations.bulk_dead(
        backend.queue, REGISTRY, QUEUE, "purge", DeadFilter(), everything=True
    )
    assert everything.affected == 2
    assert dead_ids(db) == []
    assert queue_rows(db) == []


async def test_retention_deletes_old_dead_letters_in_batches(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    ids = bury(db, ["x"] * 7)
    age(db, ids[:5], days=10)
    age(db, ids[5:6], days=2)
    assert await expire(backend.queue, QUEUE, 3, batch=2) == 5
    retention = Retention(backend.queue, [QUEUE], days=3)
    assert dead_ids(db) == ids[5:]
    assert await retention.run_once() == {QUEUE: 0}


async def test_a_million_rows_would_be_a_thousand_short_calls(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    # The window is capped in SQL whatever the caller asks: 1,000 rows per call.
    ids = bury(db, ["e"] * 3)
    batch = await backend.queue.dead_batch("purge", QUEUE, 0, 1_000_000, DeadFilter())
    assert (batch.scanned, batch.affected, batch.last_id) == (3, 3, ids[-1])
    with db.connect(role="service_role") as conn:
        row = conn.execute(
            "select scanned from queue_worker.purge_dead(%s, 0, 1000000)", [QUEUE]
        ).fetchone()
    assert row == (0,)
    with db.connect() as conn:
        conn.execute(
            f"insert into pgmq.a_{QUEUE} (msg_id, read_ct, enqueued_at, archived_at, vt, message)"
            " select g, 1, now(), now(), now(), '{}' from generate_series(10000000, 10001500) g"
        )
    first = await backend.queue.dead_batch("purge", QUEUE, 0, 1_000_000, DeadFilter())
    assert (first.scanned, first.last_id) == (1000, 10000999)


# -- through the service ------------------------------------------------------


@pytest.fixture
def api(start_service: ServiceFactory) -> tuple[Service, dict[str, str]]:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, api_token=token, metrics_cache_seconds=0)
    return service, {"Authorization": f"Bearer {token}"}


def test_api_replays_and_purges_by_filter_and_counts_dead_letters(
    db: Database, api: tuple[Service, dict[str, str]]
) -> None:
    service, auth = api
    ids = bury(db, ["SMTP 550 no such user", "timeout", "SMTP 550 mailbox full"])
    assert metric(service, "queue_worker_queue_dead_letters", queue=QUEUE) == 3
    url = f"{service.url}/queues/{QUEUE}/archive"

    refused = httpx.post(f"{url}/purge", json={}, headers=auth)
    assert refused.status_code == 400
    assert "no filter" in refused.json()["message"]
    assert (
        httpx.post(f"{url}/purge", json={"since": "2026-01-01T00:00"}, headers=auth).status_code
        == 422
    )
    assert httpx.post(f"{url}/purge", json={"colour": 1}, headers=auth).status_code == 422

    replayed = httpx.post(f"{url}/replay", json={"error": "smtp 550"}, headers=auth)
    assert replayed.json() == {"queue": QUEUE, "replayed": 2, "scanned": 3}
    assert dead_ids(db) == [ids[1]]
    purged = httpx.post(f"{url}/purge", json={"all": True}, headers=auth)
    assert purged.json() == {"queue": QUEUE, "purged": 1, "scanned": 1}
    assert metric(service, "queue_worker_queue_dead_letters", queue=QUEUE) == 0


def test_cli_replays_and_purges_by_filter(
    db: Database, api: tuple[Service, dict[str, str]], tmp_path: Path
) -> None:
    service, _ = api
    ids = bury(db, ["boom one", "fine", "boom two"])
    ran = run_cli("replay", QUEUE, "--error", "BOOM", settings=service.settings, cwd=tmp_path)
    assert ran.code == 0, ran.err
    assert ran.out.strip() == f"replayed 2 of 3 dead letters in {QUEUE}"
    assert dead_ids(db) == [ids[1]]
    refused = run_cli("purge", QUEUE, settings=service.settings, cwd=tmp_path)
    assert refused.code == 1
    assert "no filter" in refused.err
    both = run_cli("replay", QUEUE, "7", "--all", settings=service.settings, cwd=tmp_path)
    assert both.code == 2
    naive = run_cli(
        "purge", QUEUE, "--since", "2026-01-01", settings=service.settings, cwd=tmp_path
    )
    assert naive.code == 2
    ran = run_cli("purge", QUEUE, "--all", "--json", settings=service.settings, cwd=tmp_path)
    assert ran.json() == {"queue": QUEUE, "purged": 1, "scanned": 1}
    wait_until(lambda: dead_ids(db) == [], what="the archive to be empty")


def test_retention_setting_expires_old_dead_letters_at_start(
    db: Database, start_service: ServiceFactory
) -> None:
    ids = bury(db, ["old", "new"])
    age(db, ids[:1], days=40)
    start_service(register=False, archive_retention_days=30)
    wait_until(lambda: dead_ids(db) == ids[1:], what="the old dead letter to go")
