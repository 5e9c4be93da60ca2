"""Settings, read once at start from the environment and `.env`, validated loudly.

A missing or malformed variable stops start-up with one line that names it
(`ConfigError`), never a traceback and never the value of a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    EmailStr,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=1, le=65535)]

# Shorter webhook secrets are refused: the secret is the only thing standing between
# the internet and the job queue.
MIN_WEBHOOK_SECRET_LENGTH = 16


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

    # Supabase
    supabase_url: AnyHttpUrl
    supabase_service_role_key: SecretStr
    rpc_schema: str = Field("queue_worker", pattern=r"^[a-z_][a-z0-9_]*$")
    rpc_timeout_seconds: float = Field(10.0, gt=0)

    # Webhooks
    webhook_secret: SecretStr

    # SMTP (fastapi-mail)
    smtp_host: str = Field(min_length=1)
    smtp_port: Port = 587
    smtp_user: str | None = None
    smtp_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SMTP_PASSWORD", "SMTP_PASS")
    )
    smtp_starttls: bool = True
    smtp_ssl_tls: bool = False
    smtp_timeout_seconds: int = Field(30, ge=1)
    smtp_ca_file: FilePath | None = None
    mail_from: EmailStr
    mail_from_name: str | None = None

    # Jobs
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

    # Operations
    # Bearer token of the manual API (/queues...); the API is off when unset.
    api_token: SecretStr | None = None
    metrics_cache_seconds: float = Field(5.0, ge=0)

    # Server
    host: str = "0.0.0.0"
    port: Port = 8000
    # uvicorn worker processes started by `queue-worker`; each runs its own runner
    # and sweeper (they share the queues like replicas do).
    workers: int = Field(1, ge=1, le=64)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.smtp_starttls and self.smtp_ssl_tls:
            raise ValueError(
                "SMTP_STARTTLS and SMTP_SSL_TLS are both true: use STARTTLS (port 587) "
                "or implicit TLS (port 465), not both"
            )
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("RETRY_MAX_SECONDS must not be below RETRY_BASE_SECONDS")
        if bool(self.smtp_user) != bool(self.smtp_password):
            raise ValueError("SMTP_USER and SMTP_PASSWORD (or SMTP_PASS) go together")
        secret = self.webhook_secret.get_secret_value()
        if len(secret.strip()) < MIN_WEBHOOK_SECRET_LENGTH:
            raise ValueError(
                f"WEBHOOK_SECRET must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters"
            )
        if self.api_token is not None and len(self.api_token.get_secret_value().strip()) < 16:
            raise ValueError(
                "API_TOKEN must be at least 16 characters (or unset to turn the API off)"
            )
        key = self.supabase_service_role_key.get_secret_value()
        if key.startswith("sb_publishable_"):
            raise ValueError(
                "SUPABASE_SERVICE_ROLE_KEY is a publishable key; use the secret key "
                "(sb_secret_...) or the legacy service_role JWT"
            )
        if not key.startswith("sb_secret_"):
            claims = _jwt_claims(key)
            if claims is None:
                raise ValueError("SUPABASE_SERVICE_ROLE_KEY is neither an sb_secret_ key nor a JWT")
            if claims.get("role") != "service_role":
                raise ValueError(
                    "SUPABASE_SERVICE_ROLE_KEY is a JWT for role "
                    f"{claims.get('role')!r}; the worker needs the service_role key"
                )
        return self

    @cached_property
    def supabase_headers(self) -> dict[str, str]:
        """Auth headers for every Supabase request, as SUPABASE-FACTS describes.

        New `sb_secret_` keys are not JWTs and go in `apikey` only; legacy JWT keys go
        in `apikey` and as the bearer token.
        """
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
