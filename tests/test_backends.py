"""The queue interface, held to one contract by both of its backends.

Every test here runs twice on the same database: through `RpcQueue` (the Supabase
RPC client, over HTTP to the PostgREST-compatible gateway, as service_role) and
through `SqlQueue` (the same functions over a direct connection, as the role that
owns pgmq, which is what a Supabase connection string logs in as). The runner's
outcomes are checked the same way, so the two backends cannot drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict

from app.errors import PermanentError, RetryableError
from app.queue.backend import QueueBackend, RpcCaller
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError
from app.worker import Offer, RetryPolicy, Runner, RunnerConfig
from tests.conftest import ServiceFactory
from tests.support.backends import open_backend
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.rpc_gateway import RpcGateway
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

QUEUE = "email_queue"
T = TypeVar("T")


@dataclass(frozen=True)
class Backend:
    queue: QueueBackend
    rpc: RpcCaller
    kind: str


@pytest.fixture(params=["rpc", "sql"])
async def backend(
    request: pytest.FixtureRequest, db: Database, gateway: RpcGateway
) -> AsyncIterator[Backend]:
    async with open_backend(request.param, db, gateway, pool_size=4) as (queue, rpc):
        yield Backend(queue, rpc, request.param)


def rows(db: Database, table: str) -> list[tuple[Any, ...]]:
    """(msg_id, read_ct, visible now, message) of a pgmq table, straight from the database."""
    with db.connect() as conn:
        query = sql.SQL(
            "select msg_id, read_ct, vt <= now(), message from pgmq.{} order by msg_id"
        ).format(sql.Identifier(table))
        return conn.execute(query).fetchall()


async def eventually(probe: Callable[[], T], *, timeout: float = 10.0, what: str = "") -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the QueueBackend contract -------------------------------------------------


async def test_claim_takes_a_visible_message_once(backend: Backend, db: Database) -> None:
    queue = backend.queue
    msg_id = await queue.send(QUEUE, {"to": "a@example.com", "n": 1})

    [claimed] = await queue.claim(QUEUE, [msg_id, msg_id + 1000], 30)
    assert (claimed.msg_id, claimed.read_ct, claimed.message) == (
        msg_id,
        1,
        {"to": "a@example.com", "n": 1},
    )
    assert claimed.vt > claimed.enqueued_at
    # Claimed means invisible: a repeated webhook or another replica gets nothing.
    assert await queue.claim(QUEUE, [msg_id], 30) == []
    assert rows(db, f"q_{QUEUE}") == [(msg_id, 1, False, {"to": "a@example.com", "n": 1})]


async def test_read_claims_oldest_first_up_to_qty(backend: Backend) -> None:
    queue = backend.queue
    ids = [await queue.send(QUEUE, {"n": n}) for n in range(3)]

    first = await queue.read(QUEUE, 30, 2)
    assert [(m.msg_id, m.read_ct, m.message) for m in first] == [
        (ids[0], 1, {"n": 0}),
        (ids[1], 1, {"n": 1}),
    ]
    [last] = await queue.read(QUEUE, 30, 2)
    assert last.msg_id == ids[2]
    assert await queue.read(QUEUE, 30, 2) == []


async def test_ack_deletes_the_given_messages(backend: Backend, db: Database) -> None:
    queue = backend.queue
    keep, done = [await queue.send(QUEUE, {"n": n}) for n in range(2)]

    assert await queue.ack(QUEUE, [done, done + 1000]) == [done]
    assert await queue.ack(QUEUE, [done]) == []
    assert [row[0] for row in rows(db, f"q_{QUEUE}")] == [keep]


async def test_set_vt_releases_and_delays(backend: Backend, db: Database) -> None:
    queue = backend.queue
    msg_id = await queue.send(QUEUE, {"n": 1})
    await queue.claim(QUEUE, [msg_id], 30)

    assert await queue.set_vt(QUEUE, [msg_id, msg_id + 1000], 0) == [msg_id]
    [again] = await queue.read(QUEUE, 30, 10)
    assert (again.msg_id, again.read_ct) == (msg_id, 2)

    assert await queue.set_vt(QUEUE, [msg_id], 3600) == [msg_id]
    assert await queue.read(QUEUE, 30, 10) == []
    assert rows(db, f"q_{QUEUE}")[0][:3] == (msg_id, 2, False)


async def test_archive_keeps_the_error_and_replay_brings_it_back(
    backend: Backend, db: Database
) -> None:
    queue = backend.queue
    msg_id = await queue.send(QUEUE, {"to": "x@example.com"})
    await queue.claim(QUEUE, [msg_id], 30)
    error = {"type": "PermanentError", "message": "550 no such user", "attempt": 1}

    assert await queue.archive(QUEUE, [msg_id], {msg_id: error}) == [msg_id]
    assert rows(db, f"q_{QUEUE}") == []
    [dead] = await queue.archived(QUEUE, 10)
    assert (dead.msg_id, dead.read_ct, dead.message, dead.error) == (
        msg_id,
        1,
        {"to": "x@example.com"},
        error,
    )
    assert dead.archived_at >= dead.enqueued_at

    new_id = await queue.replay(QUEUE, msg_id)
    assert new_id is not None and new_id > msg_id
    assert await queue.archived(QUEUE, 10) == []
    assert rows(db, f"q_{QUEUE}") == [(new_id, 0, True, {"to": "x@example.com"})]
    assert await queue.replay(QUEUE, msg_id) is None


async def test_archived_pages_newest_first(backend: Backend) -> None:
    queue = backend.queue
    ids = [await queue.send(QUEUE, {"n": n}) for n in range(3)]
    assert sorted(await queue.archive(QUEUE, ids, {})) == ids

    page = await queue.archived(QUEUE, 2)
    assert [m.msg_id for m in page] == [ids[2], ids[1]]
    assert all(m.error is None for m in page)
    rest = await queue.archived(QUEUE, 2, before_id=page[-1].msg_id)
    assert [m.msg_id for m in rest] == [ids[0]]


async def test_send_with_delay_and_metrics(backend: Backend) -> None:
    queue = backend.queue
    await queue.send(QUEUE, {"n": 1})
    await queue.send(QUEUE, {"n": 2}, delay_seconds=3600)

    metrics = {m.queue_name: m for m in await queue.metrics()}
    assert {"email_queue", "reports_queue", "payments_queue"} <= set(metrics)
    email = metrics[QUEUE]
    assert (email.queue_length, email.visible_length) == (2, 1)
    assert email.oldest_msg_age_sec is not None and email.oldest_msg_age_sec >= 0
    [visible] = await queue.read(QUEUE, 30, 10)
    assert visible.message == {"n": 1}


async def test_an_unknown_queue_fails_the_same_way(backend: Backend) -> None:
    with pytest.raises(RpcError) as caught:
        await backend.queue.claim("no_such_queue", [1], 30)
    error = caught.value
    assert (error.status, error.code, error.transient) == (400, "P0001", False)
    assert "unknown queue: no_such_queue" in error.message


# -- the RpcCaller contract (what the payments and reports processors use) -------


async def test_call_returns_what_postgrest_returns(backend: Backend) -> None:
    rpc = backend.rpc
    msg_id = await rpc.call("send", {"queue_name": QUEUE, "message": {"k": "v"}})
    assert isinstance(msg_id, int)  # a scalar as itself

    claimed = await rpc.call("claim", {"queue_name": QUEUE, "msg_ids": [msg_id], "vt": 30})
    assert isinstance(claimed, list) and len(claimed) == 1  # a set of composites as objects
    assert {k: claimed[0][k] for k in ("msg_id", "read_ct", "message")} == {
        "msg_id": msg_id,
        "read_ct": 1,
        "message": {"k": "v"},
    }
    assert await rpc.call("ack", {"queue_name": QUEUE, "msg_ids": [msg_id]}) == [msg_id]
    assert await rpc.call("ack", {"queue_name": QUEUE, "msg_ids": [msg_id]}) == []
    # Defaults apply to arguments left out; null comes back as None.
    assert await rpc.call("replay", {"queue_name": QUEUE, "msg_id": msg_id}) is None
    metrics = await rpc.call("metrics", {})
    assert {row["queue_name"] for row in metrics} >= {QUEUE}


async def test_call_refuses_unknown_functions_and_arguments(backend: Backend) -> None:
    for function, args in [
        ("no_such_function", {}),
        ("send", {"queue": QUEUE, "message": {}}),  # a wrong argument name
    ]:
        with pytest.raises(RpcError) as caught:
            await backend.rpc.call(function, args)
        assert (caught.value.status, caught.value.code) == (404, "PGRST202")


async def test_call_passes_data_errors_with_their_sqlstate(backend: Backend) -> None:
    with pytest.raises(RpcError) as caught:
        await backend.rpc.call("claim", {"queue_name": QUEUE, "msg_ids": [1], "vt": 0})
    assert (caught.value.status, caught.value.code) == (400, "22023")
    assert not caught.value.transient


# -- the runner on both backends -------------------------------------------------


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: str


@dataclass
class Scripted:
    """A processor that does what the message says: ok, retry or permanent."""

    model: type[BaseModel] = Job
    seen: list[tuple[int, int]] = field(default_factory=list)

    async def __call__(self, message: QueueMessage) -> None:
        self.seen.append((message.msg_id, message.read_ct))
        outcome = Job.model_validate(message.message).outcome
        if outcome == "retry":
            raise RetryableError("try later")
        if outcome == "permanent":
            raise PermanentError("this will never work")


@pytest.fixture
async def runner(backend: Backend) -> AsyncIterator[tuple[Runner, Scripted]]:
    processor = Scripted()
    config = RunnerConfig(
        visibility_timeout=30,
        job_timeout=10,
        max_concurrency=4,
        # The first retry comes after exactly one second.
        retry=RetryPolicy(max_attempts=3, base_delay=1, max_delay=1, random=lambda: 1.0),
    )
    runner = Runner(backend.queue, {QUEUE: processor}, config)
    runner.start()
    try:
        yield runner, processor
    finally:
        await runner.drain(5)
        await runner.close()


async def run_one(backend: Backend, runner: Runner, outcome: str) -> int:
    msg_id = await backend.queue.send(QUEUE, {"outcome": outcome})
    assert runner.offer(QUEUE, [msg_id]) is Offer.ACCEPTED
    await eventually(lambda: runner.in_flight() == 0, what="the job to finish")
    return msg_id


async def test_runner_success_deletes_the_message(
    backend: Backend, runner: tuple[Runner, Scripted], db: Database
) -> None:
    the_runner, processor = runner
    msg_id = await run_one(backend, the_runner, "ok")
    await eventually(lambda: rows(db, f"q_{QUEUE}") == [], what="the ack")
    assert processor.seen == [(msg_id, 1)]
    assert rows(db, f"a_{QUEUE}") == []


async def test_runner_retryable_failure_comes_back_later(
    backend: Backend, runner: tuple[Runner, Scripted], db: Database
) -> None:
    the_runner, processor = runner
    msg_id = await run_one(backend, the_runner, "retry")
    await eventually(lambda: rows(db, f"q_{QUEUE}") != [], what="the message")
    [(row_id, read_ct, visible, _)] = rows(db, f"q_{QUEUE}")
    assert (row_id, read_ct, visible) == (msg_id, 1, False)  # kept, hidden for the backoff

    again = await eventually(
        lambda: rows(db, f"q_{QUEUE}")[0][2], timeout=10, what="the backoff to pass"
    )
    assert again
    [retry] = await backend.queue.read(QUEUE, 30, 10)
    assert (retry.msg_id, retry.read_ct) == (msg_id, 2)
    assert processor.seen == [(msg_id, 1)]


async def test_runner_permanent_failure_is_archived_with_its_error(
    backend: Backend, runner: tuple[Runner, Scripted], db: Database
) -> None:
    the_runner, _ = runner
    msg_id = await run_one(backend, the_runner, "permanent")
    await eventually(lambda: rows(db, f"a_{QUEUE}") != [], what="the archive")
    assert rows(db, f"q_{QUEUE}") == []
    [dead] = await backend.queue.archived(QUEUE, 10)
    assert dead.msg_id == msg_id
    assert dead.message == {"outcome": "permanent"}
    assert dead.error is not None
    assert (dead.error["type"], dead.error["message"], dead.error["attempt"]) == (
        "PermanentError",
        "this will never work",
        1,
    )


async def test_runner_sweep_reads_through_the_backend(
    backend: Backend, runner: tuple[Runner, Scripted], db: Database
) -> None:
    the_runner, processor = runner
    ids = [await backend.queue.send(QUEUE, {"outcome": "ok"}) for _ in range(3)]
    asked, got = await the_runner.sweep(QUEUE, 10)
    assert (asked, got) == (4, 3)  # as many as free slots; three were waiting
    await eventually(lambda: rows(db, f"q_{QUEUE}") == [], what="the acks")
    assert sorted(processor.seen) == [(msg_id, 1) for msg_id in ids]


# -- the direct SQL backend in production (DATABASE_URL) ----------------------------


def test_database_url_serves_webhooked_jobs_without_the_rpc_api(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    gateway: RpcGateway,
) -> None:
    gateway.reset_counters()
    # A Supabase connection string logs in as `postgres`, which owns pgmq.
    service = start_service(database_url=db.url_as(OWNER_ROLE))
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute(
            "select pgmq.send('email_queue', %s)",
            [Jsonb({"to": "a@example.com", "subject": "Over SQL", "text": "Hello"})],
        )

    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Over SQL"
    wait_until(lambda: rows(db, f"q_{QUEUE}") == [], what="the message to be deleted")
    ready = httpx.get(f"{service.url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "smtp": "ok", "sweeper": "ok"}
    # The webhook rang, the claim and the ack went over SQL: no RPC call at all.
    assert gateway.total_calls == 0
