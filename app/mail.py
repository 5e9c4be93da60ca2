"""Sending mail with fastapi-mail, and telling a bad address from a bad day.

One `Mailer` per process, created in the lifespan. SMTP replies are sorted into
the job error tree: a 5xx about the message or its recipients is permanent, while
connection, login, timeout and 4xx failures are retryable (the message is fine;
the server or our credentials are not, and retrying later can succeed).
"""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
from dataclasses import dataclass, field
from email.message import Message

import aiosmtplib
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import NameEmail
from starlette.datastructures import Headers, UploadFile

from app import metrics
from app.config import Settings
from app.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Address:
    """An address with an optional display name."""

    email: str
    name: str | None = None


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True)
class Mail:
    """A mail ready to send: at least one of `text` and `html`."""

    to: list[Address]
    subject: str
    text: str | None = None
    html: str | None = None
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)


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


def _addresses(addresses: list[Address]) -> list[NameEmail]:
    # fastapi-mail would give a bare address its local part as a display name
    # ("a <a@example.com>"); a name equal to the address is left out instead.
    return [NameEmail(a.name or a.email, a.email) for a in addresses]


def _upload(attachment: Attachment) -> UploadFile:
    return UploadFile(
        file=io.BytesIO(attachment.content),
        filename=attachment.filename,
        headers=Headers({"content-type": attachment.content_type}),
    )


def _schema(mail: Mail) -> MessageSchema:
    common = {
        "recipients": _addresses(mail.to),
        "cc": _addresses(mail.cc),
        "bcc": _addresses(mail.bcc),
        "reply_to": _addresses(mail.reply_to),
        "subject": mail.subject,
        "attachments": [_upload(a) for a in mail.attachments],
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


def _tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.smtp_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.smtp_ca_file))
    return context


async def _closed(transport: asyncio.BaseTransport | None, timeout: float = 2.0) -> None:
    """Waits until a transport's socket is really closed.

    `quit()` returns as soon as the server said goodbye, while a TLS connection
    still exchanges close_notify; a process that exits in that gap leaks the socket.
    """
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    deadline = asyncio.get_running_loop().time() + timeout
    while sock is not None and sock.fileno() != -1:
        if asyncio.get_running_loop().time() > deadline:
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            return
        await asyncio.sleep(0.005)


class Mailer:
    """The process's SMTP sender.

    fastapi-mail composes the messages (MIME structure, encodings, templates);
    delivery goes through aiosmtplib, fastapi-mail's own transport, driven here
    so that connections are closed completely, several mails can share one
    connection, and each SMTP reply is classified.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._compose = FastMail(connection_config(settings))
        self._tls = _tls_context(settings)

    async def send(self, mail: Mail) -> None:
        """Sends `mail`; raises PermanentError or RetryableError on failure."""
        message = await self._compose.get_message(_schema(mail))
        assert isinstance(message, Message)  # one schema in, one message out
        try:
            await self._deliver([message])
        except Exception:
            metrics.EMAILS.labels("failed").inc()
            raise
        metrics.EMAILS.labels("sent").inc()

    async def check(self) -> None:
        """Connects, logs in and says NOOP: raises RetryableError (with the cause) if not."""
        smtp = self._client()
        try:
            await smtp.connect()
            await self._login(smtp)
            await smtp.noop()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise RetryableError("SMTP check failed") from error
        finally:
            await self._close(smtp)

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        if self._settings.smtp_user and self._settings.smtp_password:
            await smtp.login(
                self._settings.smtp_user, self._settings.smtp_password.get_secret_value()
            )

    def _client(self) -> aiosmtplib.SMTP:
        settings = self._settings
        return aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            use_tls=settings.smtp_ssl_tls,
            start_tls=settings.smtp_starttls,
            tls_context=self._tls,
            timeout=settings.smtp_timeout_seconds,
        )

    async def _deliver(self, messages: list[Message]) -> None:
        smtp = self._client()
        try:
            await smtp.connect()
            await self._login(smtp)
            for message in messages:
                await smtp.send_message(message)
        except aiosmtplib.SMTPRecipientsRefused as error:
            replies = "; ".join(_reply(r.code, r.message) for r in error.recipients)
            if all(500 <= r.code < 600 for r in error.recipients):
                raise PermanentError(f"SMTP refused the recipients: {replies}") from None
            raise RetryableError(f"SMTP refused the recipients for now: {replies}") from None
        except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPSenderRefused) as error:
            # Our credentials or sender address, not the job: retrying after the
            # configuration is fixed saves the job.
            raise RetryableError(f"SMTP refused us: {_reply(error.code, error.message)}") from None
        except aiosmtplib.SMTPResponseException as error:
            reply = _reply(error.code, error.message)
            if 500 <= error.code < 600:
                raise PermanentError(f"SMTP rejected the message: {reply}") from None
            raise RetryableError(f"SMTP failed: {reply}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise RetryableError(f"SMTP unavailable: {type(error).__name__}: {error}") from None
        finally:
            await self._close(smtp)

    async def _close(self, smtp: aiosmtplib.SMTP) -> None:
        transport = smtp.transport
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
        else:
            smtp.close()
        await _closed(transport)
