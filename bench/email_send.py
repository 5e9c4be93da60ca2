"""Mails per second to the local SMTP server: with and without session reuse.

The same N mails (STARTTLS + AUTH on loopback, the test bed's aiosmtpd server) are
sent at concurrency C three ways in one run:

- fastapi-mail's own `FastMail.send_message`, one session per call (the baseline);
- the service's `Mailer` with `SMTP_KEEPALIVE_SECONDS=0` (a session per mail);
- the service's `Mailer` with reuse (`SMTP_MAX_CONNECTIONS` sessions kept open).

    uv run python -m bench.email_send [--mails 300] [--concurrency 8] [--connections 4]

The SMTP server runs in this process (its own thread), so every variant pays for it
alike; the figures compare the variants, not a production SMTP provider.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import NameEmail

from app.config import Settings
from app.mail import Address, Mail, Mailer
from tests.support.settings import settings_for
from tests.support.smtp import SmtpServer, running_smtp


def settings(smtp: SmtpServer, **overrides: object) -> Settings:
    return settings_for(
        supabase_url="http://127.0.0.1:9",  # never contacted here
        supabase_service_role_key="sb_secret_" + secrets.token_urlsafe(24),
        webhook_secret=secrets.token_urlsafe(32),
        smtp_host="localhost",
        smtp_port=smtp.port,
        smtp_user=smtp.username,
        smtp_password=smtp.password,
        smtp_ca_file=smtp.ca_file,
        mail_from="bench@example.com",
        **overrides,
    )


def connection_config(settings: Settings) -> ConnectionConfig:
    """fastapi-mail's config for the baseline (the service composed with it until 2026-12)."""
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
    return ConnectionConfig(
        MAIL_USERNAME=settings.smtp_user or "",
        MAIL_PASSWORD=password,
        MAIL_SERVER=settings.smtp_host,
        MAIL_PORT=settings.smtp_port,
        MAIL_STARTTLS=settings.smtp_starttls,
        MAIL_SSL_TLS=settings.smtp_ssl_tls,
        MAIL_FROM=settings.mail_from,
        MAIL_FROM_NAME=settings.mail_from_name,
        USE_CREDENTIALS=bool(settings.smtp_user),
        VALIDATE_CERTS=True,
        TIMEOUT=settings.smtp_timeout_seconds,
        CERT_BUNDLE=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
        MAIL_DEBUG=0,
        SUPPRESS_SEND=0,
        TEMPLATE_FOLDER=None,
        LOCAL_HOSTNAME=None,
    )


def _schema(mail: Mail) -> MessageSchema:
    return MessageSchema(
        recipients=[NameEmail(a.name or a.email, a.email) for a in mail.to],
        subject=mail.subject,
        body=mail.text,
        subtype=MessageType.plain,
        multipart_subtype=MultipartSubtypeEnum.mixed,
    )


def mail(n: int) -> Mail:
    return Mail(to=[Address("a@example.com")], subject=f"Bench {n}", text="Hello " * 50)


async def run(send: Callable[[Mail], Awaitable[None]], mails: int, concurrency: int) -> float:
    limit = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with limit:
            await send(mail(n))

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(mails)))
    return time.perf_counter() - started


async def bench(smtp: SmtpServer, mails: int, concurrency: int, connections: int) -> None:
    rows: list[tuple[str, float, int]] = []

    plain = FastMail(connection_config(settings(smtp)))

    async def fastapi_mail(m: Mail) -> None:
        await plain.send_message(_schema(m))

    variants: list[tuple[str, Callable[[Mail], Awaitable[None]], Mailer | None]] = [
        ("fastapi-mail send_message", fastapi_mail, None),
    ]
    single = Mailer(settings(smtp, smtp_keepalive_seconds=0, smtp_max_connections=connections))
    reuse = Mailer(settings(smtp, smtp_max_connections=connections))
    variants.append(("Mailer, a session per mail", single.send, single))
    variants.append((f"Mailer, {connections} reused sessions", reuse.send, reuse))
    for name, send, mailer in variants:
        await send(mail(-1))  # warm-up: imports, TLS context, first session
        smtp.clear()
        seconds = await run(send, mails, concurrency)
        smtp.wait_for(mails + 0, timeout=30)
        sessions = len({received.peer for received in smtp.received})
        rows.append((name, seconds, sessions))
        if mailer is not None:
            await mailer.close()
    baseline = rows[0][1]
    print(f"{mails} mails at concurrency {concurrency}, STARTTLS + AUTH on loopback")  # noqa: T201
    print(f"{'sender':34} {'seconds':>8} {'mails/s':>8} {'sessions':>9} {'vs baseline':>12}")  # noqa: T201
    for name, seconds, sessions in rows:
        print(  # noqa: T201
            f"{name:34} {seconds:8.2f} {mails / seconds:8.1f} {sessions:9d} "
            f"{baseline / seconds:11.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    with running_smtp(
        mode="starttls", username="bench", password=secrets.token_urlsafe(16)
    ) as smtp:
        asyncio.run(bench(smtp, args.mails, args.concurrency, args.connections))


if __name__ == "__main__":
    main()
