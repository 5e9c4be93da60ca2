"""Sending mail with fastapi-mail, and telling a bad address from a bad day.

One `Mailer` per process, created in the lifespan. SMTP replies are sorted into
the job error tree: a 5xx about the message or its recipients is permanent, while
connection, login, timeout and 4xx failures are retryable (the message is fine;
the server or our credentials are not, and retrying later can succeed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import aiosmtplib
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.errors import ConnectionErrors
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import NameEmail

from app.config import Settings
from app.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mail:
    """A mail ready to send: at least one of `text` and `html`."""

    to: list[str]
    subject: str
    text: str | None = None
    html: str | None = None
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)


def connection_config(settings: Settings) -> ConnectionConfig:
    """fastapi-mail's config from our settings; every field explicit.

    ConnectionConfig is itself a BaseSettings and would otherwise pick up stray
    MAIL_* variables from the environment.
    """
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


def _addresses(addresses: list[str]) -> list[NameEmail]:
    # A bare address given to fastapi-mail as a string gets its local part as a
    # display name ("a <a@example.com>"); a name equal to the address is omitted.
    return [NameEmail(address, address) for address in addresses]


def _schema(mail: Mail) -> MessageSchema:
    common = {
        "recipients": _addresses(mail.to),
        "cc": _addresses(mail.cc),
        "bcc": _addresses(mail.bcc),
        "reply_to": _addresses(mail.reply_to),
        "subject": mail.subject,
    }
    if mail.html is not None and mail.text is not None:
        # Plain first, HTML last: in multipart/alternative the last part is the
        # preferred one, so clients that can show HTML do.
        return MessageSchema(
            **common,
            body=mail.text,
            alternative_body=mail.html,
            subtype=MessageType.plain,
            multipart_subtype=MultipartSubtypeEnum.alternative,
        )
    if mail.html is not None:
        return MessageSchema(**common, body=mail.html, subtype=MessageType.html)
    return MessageSchema(**common, body=mail.text, subtype=MessageType.plain)


def _reply(code: int, message: str) -> str:
    return f"{code} {message}".strip()


class Mailer:
    """The process's SMTP sender."""

    def __init__(self, settings: Settings) -> None:
        self._mail = FastMail(connection_config(settings))

    async def send(self, mail: Mail) -> None:
        """Sends `mail`; raises PermanentError or RetryableError on failure."""
        try:
            await self._mail.send_message(_schema(mail))
        except aiosmtplib.SMTPRecipientsRefused as error:
            replies = "; ".join(_reply(r.code, r.message) for r in error.recipients)
            if all(500 <= r.code < 600 for r in error.recipients):
                raise PermanentError(f"SMTP refused the recipients: {replies}") from None
            raise RetryableError(f"SMTP refused the recipients for now: {replies}") from None
        except aiosmtplib.SMTPResponseException as error:
            reply = _reply(error.code, error.message)
            if 500 <= error.code < 600 and not isinstance(
                error, aiosmtplib.SMTPAuthenticationError
            ):
                raise PermanentError(f"SMTP rejected the message: {reply}") from None
            raise RetryableError(f"SMTP failed: {reply}") from None
        except (ConnectionErrors, aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            # fastapi-mail wraps connect and login failures in ConnectionErrors with a
            # message that names the cause; it carries no secrets.
            detail = getattr(error, "expression", None) or str(error) or type(error).__name__
            raise RetryableError(f"SMTP unavailable: {detail}") from None
