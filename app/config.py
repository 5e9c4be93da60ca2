"""Settings, read once at start from the environment and `.env`, validated loudly.

A missing or malformed variable stops start-up with one line that names it
(`ConfigError`), never a traceback and never the value of a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    EmailStr,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.mime import HEADER_UNSAFE

Port = Annotated[int, Field(ge=1, le=65535)]
# Where local mode listens when HOST is not set.
LOCAL_HOST = "127.0.0.1"

# Shorter webhook secrets are refused: the secret is the only thing standing between
# the internet and the job queue.
MIN_WEBHOOK_SECRET_LENGTH = 16

# Standard Webhooks secrets: `whsec_` + base64 of the key bytes.
SIGNING_SECRET_PREFIX = "whsec_"
_PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "replace-me", "replaceme")
_PLACEHOLDER_VALUES = {"secret", "password", "placeholder", "example", "token", "none", "null"}


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: `whsec_<base64>` decoded, else its UTF-8 bytes."""
    if secret.startswith(SIGNING_SECRET_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(SIGNING_SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64 after whsec_") from None
    return secret.encode()


def is_placeholder(value: str) -> bool:
    """True for values copied from a template rather than generated: `<...>`, `your-...`,
    `change-me`, `secret`, one character repeated, and the like."""
    text = value.strip().lower()
    return (
        not text
        or (text.startswith("<") and text.endswith(">"))
        or text.startswith(("your-", "your_", "your "))
        or any(word in text for word in _PLACEHOLDER_WORDS)
        or text in _PLACEHOLDER_VALUES
        or len(set(text)) == 1
    )


def is_template_text(value: str) -> bool:
    """True for a non-secret value left as a template wrote it: `<...>` (as in .env.example)
    or a placeholder word like `change-me`. An empty value is unset, not a template."""
    text = value.strip().lower()
    if not text:
        return False
    return (text.startswith("<") and text.endswith(">")) or any(
        word in text for word in _PLACEHOLDER_WORDS
    )


def is_template_address(value: str) -> bool:
    """`is_template_text`, or an address with a `your-...` part (`noreply@your-domain.com`).

    Reserved example domains (example.com, RFC 2606) are not refused: the tests and
    local mode's outbox use them, and a real provider refuses them at MAIL FROM anyway.
    """
    parts = re.split(r"[@.]", value.strip().lower())
    return is_template_text(value) or any(
        part == "your" or part.startswith(("your-", "your_")) for part in parts
    )


class ConfigError(Exception):
    """Invalid configuration; the message is one line meant for the operator."""


def _jwt_claims(token: str) -> dict[str, object] | None:
    """The claims of a JWT-shaped token (unverified), or None when it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class Settings(BaseSettings):
    """Every setting of the service. Secrets are `SecretStr` and never logged."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Mode. `local` runs an embedded PostgreSQL in DATA_DIR and needs no Supabase
    # project, webhooks or SMTP (app/local.py); unset means local when none of
    # SUPABASE_URL, SUPABASE_SERVICE_ROLE_KEY and DATABASE_URL is set.
    queue_worker_mode: Literal["local", "supabase"] | None = None
    data_dir: Path = Path(".queue-worker")

    # Supabase: the RPC path (SUPABASE_URL and the key), or a direct connection
    # (DATABASE_URL, app/queue/sql.py); both unneeded in local mode.
    supabase_url: AnyHttpUrl | None = None
    supabase_service_role_key: SecretStr | None = None
    database_url: SecretStr | None = None
    database_pool_size: int = Field(10, ge=1, le=1000)
    rpc_schema: str = Field("queue_worker", pattern=r"^[a-z_][a-z0-9_]*$")
    rpc_timeout_seconds: float = Field(10.0, gt=0)

    # Webhooks (required unless in local mode)
    webhook_secret: SecretStr | None = None
    # Security (README "Security"). While rotating, the previous webhook secret is
    # still accepted, as a bearer token and as a signing key.
    webhook_secret_previous: SecretStr | None = None
    # Body caps in bytes: a webhook carries one row event; the manual API must take
    # an email with attachments up to the email model's caps (20 MiB decoded is
    # 26.7 MiB of base64, plus two 1M-character bodies that JSON may escape).
    max_webhook_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_api_body_bytes: int = Field(40 * 1024 * 1024, ge=1024)
    # Serve /docs and /openapi.json; off by default.
    enable_docs: bool = False

    # SMTP (app/mail.py). SMTP_HOST and MAIL_FROM are required when a served queue
    # sends mail (the queue plan decides: app/processors/registry.py require_mail),
    # except in local mode, where no SMTP_HOST means mail goes to the outbox; "" means
    # not set.
    smtp_host: str = ""
    smtp_port: Port = 587
    smtp_user: str | None = None
    smtp_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SMTP_PASSWORD", "SMTP_PASS")
    )
    smtp_starttls: bool = True
    smtp_ssl_tls: bool = False
    # Each SMTP command waits at most SMTP_TIMEOUT_SECONDS; connecting (TCP and TLS
    # handshake) at most SMTP_CONNECT_TIMEOUT_SECONDS.
    smtp_timeout_seconds: int = Field(30, ge=1)
    smtp_connect_timeout_seconds: float = Field(10.0, gt=0)
    # Sessions open at once, and how long an idle one is kept for the next mail
    # (0 = a new session for every mail).
    smtp_max_connections: int = Field(4, ge=1, le=100)
    smtp_keepalive_seconds: float = Field(10.0, ge=0)
    # Mails per second per process (unset = no limit); providers throttle.
    smtp_max_per_second: float | None = Field(None, gt=0)
    # After a 421 or 451 reply the next attempt of that mail waits this long (capped
    # by RETRY_MAX_SECONDS) instead of the usual backoff.
    smtp_backoff_seconds: float = Field(60.0, ge=0)
    smtp_ca_file: FilePath | None = None
    mail_from: EmailStr = ""
    mail_from_name: str | None = None
    # The language of templated mails that do not say (`locale` in the job).
    mail_default_locale: Literal["en", "ru"] = "en"
    # A report's CSV attachment at most this many bytes; a larger one is refused
    # (permanent) instead of being built and mailed.
    report_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)

    # Jobs
    # The queues this service processes (comma-separated), among those of the queues
    # file (or the built-in ones without one); unset means all of them.
    queues: Annotated[list[str] | None, NoDecode] = Field(None, min_length=1)
    # The queues file (app/processors/registry.py): each queue's processor and limits.
    # Unset: ./queues.toml when present, else the three built-in queues.
    queues_file: Path | None = None
    # A claimed message stays invisible this long; a running job's lease is
    # extended every third of it (the heartbeat).
    visibility_timeout_seconds: int = Field(30, ge=3)
    job_timeout_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    retry_base_seconds: float = Field(5.0, gt=0)
    retry_max_seconds: float = Field(600.0, gt=0)
    max_concurrency: int = Field(16, ge=1, le=10_000)
    sweep_interval_seconds: float = Field(10.0, gt=0)
    sweep_batch_size: int = Field(50, ge=1, le=1000)
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    # A message the sweeper takes is counted as a missed webhook only when no webhook
    # for it rang within this many seconds (app/worker/doorbell.py).
    missed_webhook_grace_seconds: float = Field(60.0, gt=0, le=3600)

    # Claim/ack batching (app/queue/coalesce.py): concurrent claims, acks, retries and
    # archives of one queue share one RPC, sent when COALESCE_MAX_BATCH ids are pending
    # or COALESCE_FLUSH_MS after the first one; COALESCE_MAX_BATCH=1 turns it off.
    coalesce_max_batch: int = Field(100, ge=1, le=1000)
    coalesce_flush_ms: float = Field(2.0, ge=0, le=1000)
    # A finished job's ack may wait this long to leave with others (app/worker/settle.py);
    # its slot is free meanwhile. 0 sends each ack at once (through the batching above).
    ack_max_delay_ms: float = Field(500.0, ge=0, le=2000)
    # Claimed messages per queue that may wait for a free slot, so that claims and
    # reads are not limited to the slots that happen to be free.
    prefetch: int = Field(50, ge=0, le=10_000)

    # Operations
    # Bearer token of the manual API (/queues...); the API is off when unset.
    api_token: SecretStr | None = None
    metrics_cache_seconds: float = Field(5.0, ge=0)
    # Dead letters archived more than this many days ago are deleted, in batches, in
    # the background (app/worker/retention.py); unset keeps them until purged.
    archive_retention_days: int | None = Field(None, ge=1, le=3650)
    # OpenTelemetry traces (app/tracing.py): unset means on when OTEL_SERVICE_NAME or
    # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; needs the `otel` extra.
    tracing: bool | None = None

    # Server. HOST unset: 0.0.0.0 (every interface, as a container needs), but
    # 127.0.0.1 in local mode, so a laptop does not expose the API and /metrics to
    # its network (see _local_binds_loopback).
    host: str = "0.0.0.0"
    port: Port = 8000
    # uvicorn worker processes started by `queue-worker`; each runs its own runner
    # and sweeper (they share the queues like replicas do).
    workers: int = Field(1, ge=1, le=64)
    # HTTP limits (app/server.py), per connection unless said: the request line and
    # headers at most HTTP_MAX_HEADER_BYTES in HTTP_MAX_HEADERS fields (431 beyond);
    # headers complete within HTTP_HEADER_TIMEOUT_SECONDS of the connection or the
    # request's first byte, the body within HTTP_BODY_TIMEOUT_SECONDS after them (408
    # and closed); an idle keep-alive connection closed after HTTP_KEEPALIVE_SECONDS;
    # at most HTTP_MAX_CONNECTIONS open per process (503 and closed beyond).
    http_max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    http_max_headers: int = Field(100, ge=10, le=10_000)
    http_header_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    http_body_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    http_keepalive_seconds: int = Field(5, ge=1, le=3600)
    http_max_connections: int = Field(1000, ge=1, le=1_000_000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("mail_from", "smtp_host", "smtp_user", mode="before")
    @classmethod
    def _not_a_template_address(cls, value: object) -> object:
        # .env.example's `MAIL_FROM=<noreply@example.com>` would otherwise go out as
        # the sender: refused like a placeholder secret.
        if isinstance(value, str) and is_template_address(value):
            raise ValueError(
                "looks like a placeholder from a template (<...>, your-...), not a real value"
            )
        return value

    @field_validator("mail_from_name", mode="before")
    @classmethod
    def _not_a_template_name(cls, value: object) -> object:
        if isinstance(value, str) and is_template_text(value):
            raise ValueError("looks like a placeholder from a template (<...>), not a real name")
        # It goes into every mail's From header (app/mime.py).
        if isinstance(value, str) and HEADER_UNSAFE.search(value):
            raise ValueError("must not contain line breaks or control characters")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        # LOG_LEVEL=info works as INFO does.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("smtp_host", "mail_from", mode="wrap")
    @classmethod
    def _empty_is_unset(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        # SMTP_HOST= (empty) is not set; whether it must be depends on the mode (_check).
        return "" if value == "" else handler(value)

    @field_validator("queues", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # QUEUES=email_queue,payments_queue (a JSON list works too).
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("queues")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("names a queue twice")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        missing = self._missing()
        if missing:
            raise ValueError("; ".join(f"{name}: is required but not set" for name in missing))
        if self.queue_worker_mode == "local" and self.database_url is not None:
            raise ValueError(
                "DATABASE_URL is set with QUEUE_WORKER_MODE=local, which runs its own "
                "database: unset one of them"
            )
        if self.database_url is not None and not self.database_url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("DATABASE_URL must be a postgresql:// connection string")
        if self.smtp_starttls and self.smtp_ssl_tls:
            raise ValueError(
                "SMTP_STARTTLS and SMTP_SSL_TLS are both true: use STARTTLS (port 587) "
                "or implicit TLS (port 465), not both"
            )
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("RETRY_MAX_SECONDS must not be below RETRY_BASE_SECONDS")
        if bool(self.smtp_user) != bool(self.smtp_password):
            raise ValueError("SMTP_USER and SMTP_PASSWORD (or SMTP_PASS) go together")
        if self.api_token is not None and len(self.api_token.get_secret_value().strip()) < 16:
            raise ValueError(
                "API_TOKEN must be at least 16 characters (or unset to turn the API off)"
            )
        key = (
            self.supabase_service_role_key.get_secret_value()
            if self.supabase_service_role_key
            else ""
        )
        if key.startswith("sb_publishable_"):
            raise ValueError(
                "SUPABASE_SERVICE_ROLE_KEY is a publishable key; use the secret key "
                "(sb_secret_...) or the legacy service_role JWT"
            )
        if key and not key.startswith("sb_secret_"):
            claims = _jwt_claims(key)
            if claims is None:
                raise ValueError("SUPABASE_SERVICE_ROLE_KEY is neither an sb_secret_ key nor a JWT")
            if claims.get("role") != "service_role":
                raise ValueError(
                    "SUPABASE_SERVICE_ROLE_KEY is a JWT for role "
                    f"{claims.get('role')!r}; the worker needs the service_role key"
                )
        return self

    @model_validator(mode="after")
    def _local_binds_loopback(self) -> Settings:
        if "host" not in self.model_fields_set and self.local_mode:
            self.__dict__["host"] = LOCAL_HOST  # frozen: set once, while validating
        return self

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        # An empty HMAC key verifies anything, and a template value is public.
        named = {
            "WEBHOOK_SECRET": self.webhook_secret,
            "WEBHOOK_SECRET_PREVIOUS": self.webhook_secret_previous,
            "API_TOKEN": self.api_token,
            "SMTP_PASSWORD": self.smtp_password,
        }
        for variable, value in named.items():
            if value is not None and not value.get_secret_value().strip():
                raise ValueError(f"{variable} is empty; set a generated secret or unset it")
            if value is not None and is_placeholder(value.get_secret_value()):
                raise ValueError(
                    f"{variable} looks like a placeholder, not a generated secret; generate "
                    'one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
                )
        for variable in ("WEBHOOK_SECRET", "WEBHOOK_SECRET_PREVIOUS"):
            value = named[variable]
            if value is None:
                continue
            secret = value.get_secret_value()
            if len(secret.strip()) < MIN_WEBHOOK_SECRET_LENGTH:
                raise ValueError(
                    f"{variable} must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters"
                )
            try:
                key = signing_key(secret)
            except ValueError as error:
                raise ValueError(f"{variable} {error}") from None
            if len(key) < MIN_WEBHOOK_SECRET_LENGTH:
                raise ValueError(
                    f"{variable} must hold at least {MIN_WEBHOOK_SECRET_LENGTH} key bytes"
                )
        return self

    def _missing(self) -> list[str]:
        """The variables this mode needs that are not set, in the order of the README.

        Not the mail settings: whether they are needed depends on the served queues
        (`missing_mail`, checked with the queue plan).
        """
        needed: dict[str, object] = {}
        if not self.local_mode:
            if self.database_url is None:
                needed["SUPABASE_URL"] = self.supabase_url
                needed["SUPABASE_SERVICE_ROLE_KEY"] = self.supabase_service_role_key
            needed["WEBHOOK_SECRET"] = self.webhook_secret
        return [name for name, value in needed.items() if value is None or value == ""]

    def missing_mail(self) -> list[str]:
        """The mail variables not set that sending mail needs here: SMTP_HOST (unless
        local mode, which has the outbox) and MAIL_FROM (unless the outbox)."""
        needed: dict[str, str] = {}
        if not self.local_mode:
            needed["SMTP_HOST"] = self.smtp_host
        if not self.mail_outbox:
            needed["MAIL_FROM"] = self.mail_from
        return [name for name, value in needed.items() if not value]

    @property
    def local_mode(self) -> bool:
        """Local mode: an embedded database, and no Supabase project needed."""
        if self.queue_worker_mode is not None:
            return self.queue_worker_mode == "local"
        return (
            self.supabase_url is None
            and self.supabase_service_role_key is None
            and self.database_url is None
        )

    @property
    def mail_outbox(self) -> bool:
        """Mail goes to DATA_DIR/outbox/ instead of SMTP (local mode without SMTP_HOST)."""
        return self.local_mode and not self.smtp_host

    @property
    def webhook_secrets(self) -> tuple[str, ...]:
        """The accepted webhook secrets: the current one, then the previous one if set."""
        secrets = [self.webhook_secret, self.webhook_secret_previous]
        return tuple(s.get_secret_value() for s in secrets if s is not None)

    @cached_property
    def supabase_headers(self) -> dict[str, str]:
        """Auth headers for every Supabase request, as SUPABASE-FACTS describes.

        New `sb_secret_` keys are not JWTs and go in `apikey` only; legacy JWT keys go
        in `apikey` and as the bearer token.
        """
        if self.supabase_service_role_key is None:
            return {}
        key = self.supabase_service_role_key.get_secret_value()
        headers = {"apikey": key}
        if not key.startswith("sb_secret_"):
            headers["Authorization"] = f"Bearer {key}"
        return headers


def _variable(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    name = str(loc[0])
    if name == "smtp_password":
        return "SMTP_PASSWORD"
    return name.upper()


def describe(error: ValidationError) -> str:
    """One line naming each bad variable and what is wrong, without any values."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required but not set"
        loc = tuple(item["loc"])
        problems.append(f"{_variable(loc)}: {message}" if loc else message)
    return "invalid configuration: " + "; ".join(problems)


def load_settings(**overrides: object) -> Settings:
    """Reads the settings; raises ConfigError with one readable line on any problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe(error)) from None
