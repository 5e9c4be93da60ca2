"""Fixtures shared by the whole suite.

Real components only: PostgreSQL with pgmq (one bootstrapped database per session),
the PostgREST-compatible RPC gateway, the pg_net sender, an SMTP server with
STARTTLS and AUTH, and the service itself served by uvicorn on loopback.
"""

from __future__ import annotations

import contextlib
import faulthandler
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from app.api.deps import Services
from app.config import Settings
from app.main import create_app
from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import Database, bootstrap, fresh_database, reset, server_url
from tests.support.rpc_gateway import GatewayHandle, running_gateway
from tests.support.servers import serve_in_thread
from tests.support.settings import settings_against, settings_for
from tests.support.smtp import SmtpServer, running_smtp
from tests.support.waiting import wait_until

MAIL_FROM = "worker@example.com"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A superuser URL: TEST_DATABASE_URL, or an embedded server for the session."""
    with server_url() as url:
        yield url


@pytest.fixture(scope="session")
def supabase_db(pg_server: str) -> Iterator[Database]:
    """A database shaped like a Supabase project with the migrations applied."""
    with fresh_database(pg_server) as db:
        bootstrap(db)
        yield db


@pytest.fixture
def db(supabase_db: Database) -> Database:
    """The session database, emptied of messages, requests and secrets."""
    reset(supabase_db)
    return supabase_db


@pytest.fixture(scope="session")
def gateway(supabase_db: Database) -> Iterator[GatewayHandle]:
    """The Supabase REST API stand-in, serving RPC on loopback."""
    with running_gateway(supabase_db) as handle:
        yield handle


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    """An SMTP server on loopback: STARTTLS required, AUTH PLAIN/LOGIN."""
    with running_smtp(
        mode="starttls", username="mailer", password=secrets.token_urlsafe(16)
    ) as server:
        yield server


@pytest.fixture
def smtp(smtp_server: SmtpServer) -> Iterator[SmtpServer]:
    """The session's SMTP server with an empty inbox and no faults."""
    smtp_server.clear()
    smtp_server.clear_faults()
    yield smtp_server
    smtp_server.clear_faults()


@pytest.fixture
def sender(db: Database) -> Iterator[PgNetSender]:
    """pg_net's background worker, delivering webhooks after commit."""
    with running_sender(db) as running:
        yield running


@pytest.fixture
def service_settings(gateway: GatewayHandle, smtp: SmtpServer) -> Settings:
    """Settings that point the service at the gateway and the SMTP server.

    The sweeper waits an hour between passes here, so these tests see the webhook
    path alone; reliability tests shorten it.
    """
    return settings_against(
        gateway,
        smtp,
        mail_from=MAIL_FROM,
        mail_from_name="Queue Worker",
        sweep_interval_seconds=3600,
        shutdown_grace_seconds=5,
    )


@dataclass(frozen=True)
class Service:
    """A running service: its base URL, settings and (in-process) its app."""

    url: str
    settings: Settings
    app: FastAPI | None = None

    @property
    def webhook_secret(self) -> str:
        return self.settings.webhook_secret.get_secret_value()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.webhook_secret}"}

    @property
    def services(self) -> Services:
        assert self.app is not None, "only an in-process service exposes its internals"
        services: Services = self.app.state.services
        return services


def register_in_vault(db: Database, url: str, secret: str) -> None:
    """Stores the two Vault secrets the webhook triggers read, as a user would."""
    with db.connect() as conn:
        conn.execute("delete from vault.secrets where name like 'queue_worker_%'")
        conn.execute("select vault.create_secret(%s, 'queue_worker_url')", [url])
        conn.execute("select vault.create_secret(%s, 'queue_worker_webhook_secret')", [secret])


ServiceFactory = Callable[..., Service]


@pytest.fixture
def start_service(db: Database, service_settings: Settings) -> Iterator[ServiceFactory]:
    """Starts services on loopback: `start_service(register=True, **setting_overrides)`.

    With `register`, the service's URL and secret go into Vault so the triggers
    ring its doorbell; several services may share one database (replicas).
    """
    with contextlib.ExitStack() as stack:

        def start(*, register: bool = True, **overrides: Any) -> Service:
            # Validated like real settings, so overrides get the right types.
            settings = settings_for(**{**dict(service_settings), **overrides})
            app = create_app(settings)
            url = stack.enter_context(serve_in_thread(app))
            # The sweeper's first pass runs at start; a test's own messages come after
            # it, so only webhooks (or the test's own sweeps) move them.
            sweeper = app.state.services.sweeper
            wait_until(lambda: all(sweeper.passes.values()), what="the first sweep")
            # So are the checks at start (app/preflight.py:at_start), and their RPCs.
            wait_until(lambda: app.state.checked_at_start.done(), what="the checks at start")
            if register:
                register_in_vault(db, url, settings.webhook_secret.get_secret_value())
            return Service(url=url, settings=settings, app=app)

        yield start


@pytest.fixture
def service(start_service: ServiceFactory) -> Service:
    """The service on loopback, registered in Vault as a user would register it."""
    return start_service()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- figures ------------------------------------------------------------------
# Fault-injection tests report what happened (sent, processed, archived,
# duplicated, lost); the figures are printed together at the end of the run.

_FIGURES: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(**numbers: Any) -> None:
        _FIGURES.append((request.node.name, numbers))
        print(request.node.name, numbers)  # noqa: T201 - shown with -s and on failure

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("figures")
    for name, numbers in _FIGURES:
        values = "  ".join(f"{key}={value}" for key, value in numbers.items())
        terminalreporter.write_line(f"{name}: {values}")


# After the last test, pytest has nothing left to wait for; a thread that never ends
# (a server or pool someone forgot to stop) would then keep the interpreter from
# exiting, and CI would hang without a word. pytest-timeout covers each test and its
# fixtures, not that last step: past this many seconds, every thread's stack is
# printed and the process exits with status 1. Only when this process is the pytest
# command: a program that calls pytest.main() goes on with its own work afterwards.
EXIT_WATCHDOG_SECONDS = 120


def pytest_unconfigure(config: pytest.Config) -> None:
    if Path(sys.argv[0]).name in ("pytest", "py.test", "__main__.py"):
        faulthandler.dump_traceback_later(EXIT_WATCHDOG_SECONDS, exit=True)
