"""`queue-worker migrate`: the SQL this release ships, printed for a project or applied.

Each test builds a database shaped like a new Supabase project (roles, Vault,
pg_net, pgmq owned by the non-superuser owner) with none of queue-worker's SQL,
and applies the SQL as that owner, as `supabase db push` and `migrate --apply` do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app import __version__
from app.schema import combined, migrations
from tests.support.cli import run_cli
from tests.support.postgres import (
    OWNER_ROLE,
    Database,
    fresh_database,
    migration_files,
    supabase_shape,
)


@pytest.fixture
def project(pg_server: str) -> Iterator[Database]:
    """A new Supabase project's database: no queue-worker SQL yet."""
    with fresh_database(pg_server, prefix="qw_project") as db:
        supabase_shape(db)
        yield db


def ledger(db: Database) -> list[str]:
    with db.connect() as conn:
        exists = conn.execute("select to_regclass('queue_worker.migrations') is not null")
        if not exists.fetchone() == (True,):
            return []
        return [
            row[0] for row in conn.execute("select name from queue_worker.migrations order by 1")
        ]


def functions(db: Database) -> list[str]:
    with db.connect() as conn:
        rows = conn.execute(
            "select p.oid::regprocedure::text || ' ' || coalesce(array_to_string(array("
            "select a::text from unnest(p.proacl) a order by 1), ','), '') "
            "from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'queue_worker' order by 1"
        ).fetchall()
    return [row[0] for row in rows]


def test_print_is_every_migration_in_order_with_a_header(tmp_path: Path) -> None:
    ran = run_cli("migrate", "--print", cwd=tmp_path)
    assert ran.code == 0, ran.err
    assert ran.out == combined()
    assert ran.out.startswith(f"-- queue-worker {__version__}: the worker's SQL")
    assert "queue-worker migrate --print > supabase/migrations/" in ran.out
    # The checkout's files, each whole, in file-name order.
    positions = [ran.out.index(path.read_text().rstrip()) for path in migration_files()]
    assert positions == sorted(positions)
    assert [m.filename for m in migrations()] == [path.name for path in migration_files()]


def test_the_printed_file_builds_what_the_migrations_build(
    project: Database, supabase_db: Database, tmp_path: Path
) -> None:
    printed = run_cli("migrate", "--print", cwd=tmp_path).out
    for _ in range(2):  # idempotent: a second push of the same file changes nothing
        with project.connect(role=OWNER_ROLE) as conn, conn.transaction():
            conn.execute(printed.encode())
    assert ledger(project) == [m.name for m in migrations()]
    assert functions(project) == functions(supabase_db)


def test_apply_applies_what_is_missing_once(project: Database, tmp_path: Path) -> None:
    url = project.url_as(OWNER_ROLE)
    first = run_cli("migrate", "--apply", cwd=tmp_path, env={"DATABASE_URL": url})
    assert first.code == 0, first.out + first.err
    names = [m.filename for m in migrations()]
    assert [line.split()[:2] for line in first.lines] == [["applied", name] for name in names]
    assert ledger(project) == [m.name for m in migrations()]

    again = run_cli("migrate", "--apply", "--database-url", url, "--json", cwd=tmp_path)
    assert again.code == 0
    assert {m["result"] for m in again.json()["migrations"]} == {"skipped"}

    last = migrations()[-1]
    with project.connect() as conn:
        conn.execute("delete from queue_worker.migrations where name = %s", [last.name])
    third = run_cli("migrate", "--apply", cwd=tmp_path, env={"DATABASE_URL": url})
    assert [line.split()[0] for line in third.lines] == ["skipped"] * (len(names) - 1) + ["applied"]
    assert ledger(project) == [m.name for m in migrations()]


def test_apply_stops_at_the_first_file_that_fails(pg_server: str, tmp_path: Path) -> None:
    with fresh_database(pg_server, prefix="qw_project") as db:
        supabase_shape(db, pgmq=False)  # pgmq is not available: the first file fails
        ran = run_cli(
            "migrate", "--apply", cwd=tmp_path, env={"DATABASE_URL": db.url_as(OWNER_ROLE)}
        )
        assert ran.code == 1
        [line] = ran.lines
        assert line.startswith(f"failed   {migrations()[0].filename}  ")
        assert "pgmq" in line
        # One transaction per file: nothing of it is left behind.
        assert ledger(db) == []
        with db.connect() as conn:
            schema = conn.execute("select to_regnamespace('queue_worker')").fetchone()
        assert schema == (None,)


def test_apply_needs_a_database_url(tmp_path: Path) -> None:
    ran = run_cli("migrate", "--apply", cwd=tmp_path)
    assert ran.code == 2
    assert ran.err.strip() == (
        "queue-worker: migrate --apply: DATABASE_URL is required but not set "
        "(or pass --database-url)"
    )
    (tmp_path / "prod.env").write_text("DATABASE_URL=mysql://nope\n")
    wrong = run_cli("--env-file", "prod.env", "migrate", "--apply", cwd=tmp_path)
    assert wrong.code == 2
    assert "DATABASE_URL must be a postgresql:// connection string" in wrong.err
