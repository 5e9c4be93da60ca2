"""`queue-worker migrate`: the SQL this release ships, printed or applied.

`--print` writes every migration as one idempotent file for a project's own
`supabase/migrations/` (the Supabase CLI then applies it with its own history);
`--apply` applies the missing ones over DATABASE_URL, as the connecting role, one
transaction per file, and says what it did with each; `--list` names them.
Neither needs the rest of the service's settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Final

from app import schema
from app.cli.common import (
    FAILURE,
    OK,
    USAGE,
    Verbs,
    add_json_flag,
    emit_json,
    fail,
    say,
)

# Two `migrate --apply` at once (replicas deploying together) take turns.
LOCK_KEY: Final = 7_390_516_204_113
CONNECT_TIMEOUT_SECONDS: Final = 10
HAS_LEDGER: Final = "select pg_catalog.to_regclass('queue_worker.migrations') is not null"
LEDGER: Final = "select name from queue_worker.migrations"


def register(verbs: Verbs) -> None:
    parser = verbs.add_parser(
        "migrate",
        help="print or apply the worker's SQL (the migrations this release ships)",
        description="--print writes all migrations as one idempotent SQL file for your own "
        "supabase/migrations/; --apply applies the missing ones over DATABASE_URL.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--print", dest="print_sql", action="store_true", help="write the combined SQL to stdout"
    )
    action.add_argument(
        "--apply", action="store_true", help="apply the missing migrations over DATABASE_URL"
    )
    action.add_argument(
        "--list", dest="list_files", action="store_true", help="name the migrations shipped"
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql:// URL for --apply [env DATABASE_URL]; connect as the role that "
        "owns pgmq (postgres on Supabase)",
    )
    add_json_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        shipped = schema.migrations()
    except schema.MigrationsNotFound as error:
        raise fail(str(error)) from None
    if args.print_sql:
        sys.stdout.write(schema.combined(shipped))
        sys.stdout.flush()
        return OK
    if args.list_files:
        if args.json:
            emit_json({"migrations": [m.name for m in shipped]})
        else:
            for migration in shipped:
                say(migration.filename)
        return OK
    return apply(_url(args), shipped, as_json=args.json)


def _url(args: argparse.Namespace) -> str:
    if args.database_url:
        url: str = args.database_url
    else:
        from pydantic import SecretStr, ValidationError
        from pydantic_settings import BaseSettings, SettingsConfigDict

        from app.config import describe

        class Target(BaseSettings):
            """DATABASE_URL alone, from the environment or the env file, as the service."""

            model_config = SettingsConfigDict(
                env_file=".env", env_file_encoding="utf-8", extra="ignore"
            )

            database_url: SecretStr | None = None

        options: dict[str, Any] = {}
        if args.env_file is not None:
            options["_env_file"] = args.env_file
        try:
            target = Target(**options)
        except ValidationError as error:
            raise fail(describe(error), USAGE) from None
        if target.database_url is None:
            raise fail(
                "migrate --apply: DATABASE_URL is required but not set (or pass --database-url)",
                USAGE,
            )
        url = target.database_url.get_secret_value()
    if not url.startswith(("postgresql://", "postgres://")):
        raise fail("DATABASE_URL must be a postgresql:// connection string", USAGE)
    return url


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def apply(url: str, shipped: list[schema.Migration], *, as_json: bool = False) -> int:
    """Applies each shipped migration the ledger lacks, one transaction per file."""
    import psycopg

    report: list[dict[str, Any]] = []

    def tell(name: str, result: str, detail: str = "") -> None:
        report.append({"migration": name, "result": result, "detail": detail})
        if not as_json:
            say(f"{result:<7}  {name}{'  ' + detail if detail else ''}")

    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.Error as error:
        raise fail(f"migrate --apply: cannot connect: {_first_line(error)}") from None
    status = OK
    with conn:
        conn.execute("select pg_catalog.pg_advisory_lock(%s)", [LOCK_KEY])
        has_ledger = conn.execute(HAS_LEDGER).fetchone()
        applied = (
            {row[0] for row in conn.execute(LEDGER).fetchall()}
            if has_ledger and has_ledger[0]
            else set()
        )
        for migration in shipped:
            if migration.name in applied:
                tell(migration.filename, "skipped", "already applied")
                continue
            started = time.perf_counter()
            try:
                with conn.transaction():
                    conn.execute(migration.sql.encode())
            except psycopg.Error as error:
                tell(migration.filename, "failed", _first_line(error))
                status = FAILURE
                break
            tell(migration.filename, "applied", f"{(time.perf_counter() - started) * 1000:.0f} ms")
    if as_json:
        emit_json({"ok": status == OK, "migrations": report})
    return status
