"""A PostgreSQL 15 cluster of the tests' own, with real pg_cron loaded.

pg_cron schedules from a background worker that the server starts only when the
library is in `shared_preload_libraries`, which is read once, at server start. The
machine's PostgreSQL (CI's `TEST_DATABASE_URL`) is shared by every test run and must
not be restarted, and the embedded server has no pg_cron build; so the schedule tests
(tests/test_schedules.py) initdb a throwaway cluster from `pg_config --bindir`, as
Debian's `postgresql-15-cron` package expects, with:

- `shared_preload_libraries = 'pg_cron'` and `cron.database_name = 'postgres'`: jobs
  are scheduled from the `postgres` database, as on Supabase;
- `cron.use_background_workers = on`: each run is a background worker connected as
  the job's owner, so no password or TCP login is involved;
- loopback only, on a free port, with its socket in its own directory, trust
  authentication (nothing else can reach it), and no fsync (a test cluster).

The server refuses to run as root: when the tests do, it runs as the `postgres`
OS user, which the PostgreSQL packages create.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.postgres import OWNER_ROLE, Database
from tests.support.servers import bound_socket

# Supabase schedules from its `postgres` database; so do these tests.
CRON_DATABASE = "postgres"
SERVER_USER = "postgres"


def _pg_config(option: str) -> Path | None:
    executable = shutil.which("pg_config")
    if executable is None:
        return None
    result = subprocess.run([executable, option], capture_output=True, text=True, check=False)
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def pg_cron_missing() -> str | None:
    """Why a pg_cron cluster cannot be started here, or None when it can."""
    bindir = _pg_config("--bindir")
    if bindir is None or not (bindir / "initdb").exists() or not (bindir / "pg_ctl").exists():
        return "no PostgreSQL server binaries (pg_config --bindir with initdb and pg_ctl)"
    libdir = _pg_config("--pkglibdir")
    sharedir = _pg_config("--sharedir")
    if (
        libdir is None
        or sharedir is None
        or not (libdir / "pg_cron.so").exists()
        or not (sharedir / "extension" / "pg_cron.control").exists()
    ):
        return "pg_cron is not installed (apt-get install postgresql-15-cron)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root without a {SERVER_USER!r} OS user to run the server"
    return None


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


@contextlib.contextmanager
def cron_cluster() -> Iterator[str]:
    """Starts a pg_cron cluster for the duration; yields a superuser URL to `postgres`."""
    missing = pg_cron_missing()
    if missing is not None:
        raise RuntimeError(missing)
    bindir = _pg_config("--bindir")
    assert bindir is not None
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="qw-cron-"))
    data = root / "data"
    log = root / "server.log"
    try:
        if os.geteuid() == 0:
            server_user = pwd.getpwnam(SERVER_USER)
            os.chown(root, server_user.pw_uid, server_user.pw_gid)
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            "initdb",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{root}'",
            "shared_preload_libraries": "'pg_cron'",
            "cron.database_name": f"'{CRON_DATABASE}'",
            "cron.use_background_workers": "on",
            "max_worker_processes": "16",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/support/cron.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        _run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
            "starting the pg_cron cluster",
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/{CRON_DATABASE}"
        finally:
            _run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                "stopping the pg_cron cluster",
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def enable_pg_cron(db: Database) -> None:
    """Enables pg_cron as Supabase does (Dashboard > Integrations > Cron).

    The extension is created by a superuser; Supabase's after-create script for
    pg_cron then grants its `postgres` role (here OWNER_ROLE) the use of schema cron
    and its functions, and cron.job for reading only (supabase/postgres,
    ansible/files/postgresql_extension_custom_scripts/pg_cron/after-create.sql).
    """
    owner = OWNER_ROLE
    with db.connect() as conn:
        conn.execute("create extension if not exists pg_cron schema pg_catalog")
        for statement in (
            f"grant usage on schema cron to {owner} with grant option",
            f"grant all on all functions in schema cron to {owner} with grant option",
            f"grant all privileges on all tables in schema cron to {owner} with grant option",
            f"revoke all on table cron.job from {owner}",
            f"grant select on table cron.job to {owner} with grant option",
        ):
            conn.execute(statement)  # type: ignore[arg-type]


def forget_schedules(db: Database) -> None:
    """Removes every pg_cron job, its run history and the worker's schedules."""
    with db.connect() as conn:
        conn.execute("select cron.unschedule(jobid) from cron.job")
        conn.execute("truncate cron.job_run_details, queue_worker.schedules")
