"""Fixtures shared by the whole suite.

Real components only: PostgreSQL with pgmq (one bootstrapped database per session),
the PostgREST-compatible RPC gateway, the pg_net sender, an SMTP server with
STARTTLS and AUTH, and the service itself served by uvicorn on loopback.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from app.config import Settings
from app.main import create_app
from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import Database, bootstrap, fresh_database, reset, server_url
from tests.support.rpc_gateway import GatewayHandle, running_gateway
from tests.support.servers import serve_in_thread
from tests.support.settings import new_webhook_secret, settings_for
from tests.support.smtp import SmtpServer, running_smtp

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
    """Settings that point the service at the gateway and the SMTP server."""
    return settings_for(
        supabase_url=gateway.url,
        supabase_service_role_key=gateway.service_role_key,
        webhook_secret=new_webhook_secret(),
        smtp_host="localhost",
        smtp_port=smtp.port,
        smtp_user=smtp.username,
        smtp_password=smtp.password,
        smtp_ca_file=smtp.ca_file,
        mail_from=MAIL_FROM,
        mail_from_name="Queue Worker",
        visibility_timeout_seconds=30,
    )


@dataclass(frozen=True)
class Service:
    """The running service: its base URL and the settings it runs with."""

    url: str
    settings: Settings

    @property
    def webhook_secret(self) -> str:
        return self.settings.webhook_secret.get_secret_value()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.webhook_secret}"}


@pytest.fixture
def service(db: Database, service_settings: Settings) -> Iterator[Service]:
    """The service on loopback, registered in Vault as a user would register it."""
    with serve_in_thread(create_app(service_settings)) as url:
        with db.connect() as conn:
            conn.execute("select vault.create_secret(%s, 'queue_worker_url')", [url])
            conn.execute(
                "select vault.create_secret(%s, 'queue_worker_webhook_secret')",
                [service_settings.webhook_secret.get_secret_value()],
            )
        yield Service(url=url, settings=service_settings)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
