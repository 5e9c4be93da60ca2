"""The worker on a queue shaped like pgmq 1.4.4's: dead letters keep their reason.

Supabase images ship pgmq 1.4.4 or 1.5.1 (SUPABASE-FACTS.md). 1.4.4's queue and
archive tables have no `headers` column (1.5 added it) and no `last_read_at` (1.10),
and its functions neither read nor write them. pgmq 1.4.4 cannot be installed as a
plain SQL script, so this module's own database starts as the rest of the test bed
does (pgmq 1.13 from the `pgmq` wheel, the migrations applied as the owner) and is
then taken back to 1.4.4's shape: a queue created, both columns dropped from its
tables and from `pgmq.message_record`, and the pgmq functions the worker calls
redefined as 1.4.4 has them (five columns in, five out). Everything then runs
through the real RPC gateway as service_role and through the SQL backend as the
owner, as the service does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from app.queue.backend import QueueBackend
from tests.support.backends import open_backend
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, fresh_database
from tests.support.rpc_gateway import RpcGateway, running_gateway

pytestmark = pytest.mark.anyio

QUEUE = "legacy_queue"

# What makes the database's pgmq look like 1.4.4 to the worker (run as the owner).
PGMQ_144_SHAPE = f"""
select pgmq.create('{QUEUE}');
alter table pgmq.q_{QUEUE} drop column headers, drop column last_read_at;
alter table pgmq.a_{QUEUE} drop column headers, drop column last_read_at;
alter type pgmq.message_record drop attribute headers, drop attribute last_read_at;

-- 1.4.4's functions: only the five columns its tables have.
create or replace function pgmq.read(
  queue_name text, vt integer, qty integer, conditional jsonb default '{{}}'
) returns setof pgmq.message_record language plpgsql as $$
declare
  qtable text := pgmq.format_table_name(queue_name, 'q');
begin
  return query execute format(
    $q$
    with cte as (
      select msg_id from pgmq.%I where vt <= clock_timestamp()
      order by msg_id limit $1 for update skip locked
    )
    update pgmq.%I m set vt = clock_timestamp() + %L, read_ct = read_ct + 1
    from cte where m.msg_id = cte.msg_id
    returning m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message
    $q$, qtable, qtable, make_interval(secs => vt))
  using qty;
end
$$;

create or replace function pgmq.archive(queue_name text, msg_ids bigint[])
returns setof bigint language plpgsql as $$
begin
  return query execute format(
    $q$
    with archived as (
      delete from pgmq.%I where msg_id = any($1)
      returning msg_id, vt, read_ct, enqueued_at, message
    )
    insert into pgmq.%I (msg_id, vt, read_ct, enqueued_at, message)
    select msg_id, vt, read_ct, enqueued_at, message from archived
    returning msg_id
    $q$, pgmq.format_table_name(queue_name, 'q'), pgmq.format_table_name(queue_name, 'a'))
  using msg_ids;
end
$$;

create or replace function pgmq.send(
  queue_name text, msg jsonb, headers jsonb, delay timestamp with time zone
) returns setof bigint language plpgsql as $$
begin
  return query execute format(
    'insert into pgmq.%I (vt, message) values ($2, $1) returning msg_id',
    pgmq.format_table_name(queue_name, 'q'))
  using msg, delay;
end
$$;

create or replace function pgmq.set_vt(
  queue_name text, msg_id bigint, vt timestamp with time zone
) returns setof pgmq.message_record language plpgsql as $$
begin
  return query execute format(
    $q$
    update pgmq.%I set vt = $1 where msg_id = $2
    returning msg_id, read_ct, enqueued_at, vt, message
    $q$, pgmq.format_table_name(queue_name, 'q'))
  using vt, msg_id;
end
$$;
"""

# The worker's own: its catalogue, trigger and service_role's grants, as a
# migration of the user's would attach it.
ATTACH = f"select queue_worker.attach_queue('{QUEUE}')"


@pytest.fixture(scope="module")
def legacy_db(pg_server: str) -> Iterator[Database]:
    with fresh_database(pg_server, prefix="qw_pgmq144") as db:
        bootstrap(db)
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute(PGMQ_144_SHAPE)  # type: ignore[arg-type]
            conn.execute(ATTACH)  # type: ignore[arg-type]
        yield db


@pytest.fixture(scope="module")
def legacy_gateway(legacy_db: Database) -> Iterator[RpcGateway]:
    with running_gateway(legacy_db) as gateway:
        yield gateway


@pytest.fixture(params=["rpc", "sql"])
async def legacy(
    request: pytest.FixtureRequest, legacy_db: Database, legacy_gateway: RpcGateway
) -> AsyncIterator[QueueBackend]:
    with legacy_db.connect() as conn:
        conn.execute(f"truncate pgmq.q_{QUEUE}, pgmq.a_{QUEUE}")
        conn.execute("delete from queue_worker.dead_letters")
    async with open_backend(request.param, legacy_db, legacy_gateway) as (queue, _):
        yield queue


def columns(db: Database, table: str) -> list[str]:
    with db.connect() as conn:
        rows = conn.execute(
            "select attname from pg_attribute where attrelid = %s::regclass "
            "and attnum > 0 and not attisdropped order by attnum",
            [f"pgmq.{table}"],
        ).fetchall()
    return [row[0] for row in rows]


def test_the_queue_has_pgmq_144s_shape(legacy_db: Database) -> None:
    shape = {"msg_id", "read_ct", "enqueued_at", "vt", "message"}
    assert set(columns(legacy_db, f"q_{QUEUE}")) == shape
    assert set(columns(legacy_db, f"a_{QUEUE}")) == shape | {"archived_at"}
    with legacy_db.connect(role=OWNER_ROLE) as conn:
        # 1.5's three-argument send (with headers) has nowhere to put them.
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute(f"insert into pgmq.q_{QUEUE} (message, headers) values ('{{}}', '{{}}')")


async def test_an_archived_message_keeps_its_reason_on_pgmq_144(
    legacy: QueueBackend, legacy_db: Database
) -> None:
    kept, dead = [await legacy.send(QUEUE, {"n": n}) for n in range(2)]
    claimed = await legacy.read(QUEUE, 30, 10)
    assert sorted(m.msg_id for m in claimed) == [kept, dead]
    assert all(m.headers is None for m in claimed)
    error = {"type": "PermanentError", "message": "550 5.1.1 no such user", "attempt": 1}

    assert await legacy.archive(QUEUE, [dead], {dead: error}) == [dead]

    [archived] = await legacy.archived(QUEUE, 10)
    assert (archived.msg_id, archived.message, archived.error) == (dead, {"n": 1}, error)
    with legacy_db.connect() as conn:
        assert conn.execute(
            "select queue_name, msg_id, error from queue_worker.dead_letters"
        ).fetchall() == [(QUEUE, dead, error)]


async def test_a_replayed_message_leaves_its_dead_letter_behind(
    legacy: QueueBackend, legacy_db: Database
) -> None:
    msg_id = await legacy.send(QUEUE, {"n": 1})
    await legacy.read(QUEUE, 30, 10)
    error = {"type": "RetryableError", "message": "451 try later", "attempt": 5}
    await legacy.archive(QUEUE, [msg_id], {msg_id: error})

    new_id = await legacy.replay(QUEUE, msg_id)

    assert new_id is not None and new_id > msg_id
    assert await legacy.archived(QUEUE, 10) == []
    with legacy_db.connect() as conn:
        assert conn.execute("select count(*) from queue_worker.dead_letters").fetchone() == (0,)
    # Claimed (a webhook's path) and archived again, without an error this time: no
    # reason is shown, not the old one.
    [claimed] = await legacy.claim(QUEUE, [new_id], 30)
    assert (claimed.msg_id, claimed.message, claimed.headers) == (new_id, {"n": 1}, None)
    assert await legacy.archive(QUEUE, [new_id], {}) == [new_id]
    [again] = await legacy.archived(QUEUE, 10)
    assert (again.msg_id, again.error) == (new_id, None)


async def test_a_stale_dead_letter_never_names_another_message(
    legacy: QueueBackend, legacy_db: Database
) -> None:
    msg_id = await legacy.send(QUEUE, {"n": 1})
    # Left by a queue that was dropped and created again (msg_ids start over).
    with legacy_db.connect() as conn:
        conn.execute(
            "insert into queue_worker.dead_letters (queue_name, msg_id, error) "
            'values (%s, %s, \'{"type": "Old"}\')',
            [QUEUE, msg_id],
        )
    await legacy.read(QUEUE, 30, 10)
    assert await legacy.archive(QUEUE, [msg_id], {}) == [msg_id]
    [archived] = await legacy.archived(QUEUE, 10)
    assert archived.error is None
