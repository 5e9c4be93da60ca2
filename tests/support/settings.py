"""Valid service settings for tests, with secrets generated per run."""

from __future__ import annotations

import secrets
from typing import Any

from app.config import Settings
from tests.support.rpc_gateway import RpcGateway
from tests.support.smtp import SmtpServer

# Settings that make retries and sweeps happen within a test's patience.
FAST_RETRIES: dict[str, Any] = {
    "sweep_interval_seconds": 0.3,
    "retry_base_seconds": 1,
    "retry_max_seconds": 1,
    "visibility_timeout_seconds": 3,
    "max_attempts": 10,
}

# Every variable the service reads; tests clear them so the developer's own
# environment or .env cannot leak in.
# Every mail setting unset: a deployment whose served queues send no mail.
NO_MAIL: dict[str, Any] = {
    "smtp_host": "",
    "smtp_user": None,
    "smtp_password": None,
    "smtp_ca_file": None,
    "mail_from": "",
    "mail_from_name": None,
}

SERVICE_VARIABLES = (
    "QUEUE_WORKER_MODE",
    "DATA_DIR",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "RPC_SCHEMA",
    "RPC_TIMEOUT_SECONDS",
    "WEBHOOK_SECRET",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASSWORD",
    "SMTP_PASS",
    "SMTP_STARTTLS",
    "SMTP_SSL_TLS",
    "SMTP_TIMEOUT_SECONDS",
    "SMTP_CA_FILE",
    "MAIL_FROM",
    "MAIL_FROM_NAME",
    "MAIL_DEFAULT_LOCALE",
    "QUEUES",
    "QUEUES_FILE",
    "SMTP_CONNECT_TIMEOUT_SECONDS",
    "SMTP_MAX_CONNECTIONS",
    "SMTP_KEEPALIVE_SECONDS",
    "SMTP_MAX_PER_SECOND",
    "VISIBILITY_TIMEOUT_SECONDS",
    "HOST",
    "PORT",
    "LOG_LEVEL",
    "HTTP_MAX_HEADER_BYTES",
    "HTTP_MAX_HEADERS",
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_BODY_TIMEOUT_SECONDS",
    "HTTP_KEEPALIVE_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "MISSED_WEBHOOK_GRACE_SECONDS",
    "TRACING",
)


def new_webhook_secret() -> str:
    return secrets.token_urlsafe(32)


def settings_for(**values: Any) -> Settings:
    """Settings from explicit values only (no environment, no .env file)."""
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def settings_against(gateway: RpcGateway, smtp: SmtpServer, **overrides: Any) -> Settings:
    """Settings pointing the service at a running gateway and SMTP server."""
    values: dict[str, Any] = {
        "supabase_url": gateway.url,
        "supabase_service_role_key": gateway.service_role_key,
        "webhook_secret": new_webhook_secret(),
        "smtp_host": "localhost",
        "smtp_port": smtp.port,
        "smtp_user": smtp.username,
        "smtp_password": smtp.password,
        "smtp_ca_file": smtp.ca_file,
        "mail_from": "worker@example.com",
    }
    return settings_for(**{**values, **overrides})
